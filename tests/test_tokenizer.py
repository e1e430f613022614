from __future__ import annotations

import re
from pathlib import Path

import pytest

from convcli.tokenizer import (
    LOSS_RESPONSE,
    LOSS_WEIGHTED,
    ConversationTokenizer,
    layout,
    layout_length,
    split_turns,
    truncate_turns,
)


def test_seed_table_with_the_gpt2_vocabulary(gpt2_tokenizer_dir):
    tokenizer = ConversationTokenizer.from_pretrained(gpt2_tokenizer_dir)
    assert tokenizer(["Hello", "How are you"]) == {
        "input_ids": [50256, 15496, 50256, 2437, 389, 345, 50256],
        "token_type_ids": [0, 0, 1, 1, 1, 1, 0],
        "attention_mask": [1, 1, 1, 1, 1, 1, 1],
    }
    assert tokenizer.sep_token_id == 50256
    assert len(tokenizer) == 50257  # eos doubles as sep: no token added


def test_sep_added_as_a_real_special_token_when_missing(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    hf.sep_token = hf.eos_token = hf.pad_token = None
    size = len(hf)
    tokenizer = ConversationTokenizer(hf)
    assert tokenizer.sep_token == "<sep>"
    assert tokenizer.sep_token_id == size  # a new id, not unk
    assert len(tokenizer) == size + 1
    assert tokenizer.encode("<sep>") != [tokenizer.sep_token_id]  # typed text is split


def test_tokenizer_own_bos_eos_do_not_leak_into_turns(tiny_tokenizer_dir):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    plain = ConversationTokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    eos = hf.eos_token_id
    hf.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    assert hf("hello")["input_ids"][0] == eos  # this tokenizer adds its own markers...
    tokenizer = ConversationTokenizer(hf)
    assert tokenizer(["hello", "there"]) == plain(["hello", "there"])  # ...but not in turns


@pytest.mark.parametrize("which", ["gpt2", "tiny"])
def test_encode_turns_fast_path_matches_the_hf_call(which, request):
    folder = request.getfixturevalue(
        "gpt2_tokenizer_dir" if which == "gpt2" else "tiny_tokenizer_dir"
    )
    tokenizer = ConversationTokenizer.from_pretrained(folder)
    texts = [
        "Hello",
        " two  spaces ",
        "a <|endoftext|> b",
        "こんにちは、元気?",
        "emoji 🙂\ttab",
        "<sep>",
    ]
    slow = tokenizer.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    assert tokenizer.encode_turns(texts) == slow["input_ids"]
    flat, lengths = tokenizer.encode_turns_flat(texts)
    assert lengths == [len(ids) for ids in slow["input_ids"]]
    assert flat == [i for ids in slow["input_ids"] for i in ids]
    assert tokenizer.encode_turns_flat([]) == ([], [])
    # The backend's own flag is left as it was: plain HF calls still see special tokens.
    assert tokenizer.tokenizer("<|endoftext|>", add_special_tokens=False)["input_ids"] == [
        tokenizer.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ]


@pytest.mark.parametrize("which", ["gpt2", "tiny", "added sep"])
def test_a_backend_snapshot_encodes_and_decodes_as_transformers(which, request):
    """What the ctranslate2 backend loads instead of transformers (BackendTokenizer, from
    a JSON snapshot) gives the same ids, texts, special tokens and fingerprint."""
    import json

    from convcli.tokenizer import BackendTokenizer, load_hf_tokenizer

    folder = request.getfixturevalue(
        "gpt2_tokenizer_dir" if which == "gpt2" else "tiny_tokenizer_dir"
    )
    hf = load_hf_tokenizer(folder)
    if which == "added sep":  # no eos: a <sep> token is added to the vocabulary
        hf.sep_token = hf.eos_token = hf.pad_token = None
    real = ConversationTokenizer(hf)
    snapshot = json.loads(json.dumps(BackendTokenizer.snapshot(real.tokenizer)))
    light = ConversationTokenizer(BackendTokenizer(**snapshot))
    assert (light.sep_token_id, light.pad_token_id, len(light), light.fingerprint()) == (
        real.sep_token_id, real.pad_token_id, len(real), real.fingerprint()
    )  # fmt: skip
    texts = ["Hello", " two  spaces ", "a <|endoftext|> b <sep>", "こんにちは、元気?",
             "emoji 🙂\ttab", "don't , stop . now", ""]  # fmt: skip
    assert light(texts) == real(texts)
    ids = real(texts)["input_ids"]
    assert light.decode_turns(ids) == real.decode_turns(ids)
    noise = [i * 7919 % len(real) for i in range(300)]  # any ids, byte pieces included
    assert light.decode(noise) == real.decode(noise)
    assert light.tokenizer.decode(noise) == real.tokenizer.decode(noise)  # specials kept


def test_special_token_text_typed_by_a_user_stays_text(tiny_tokenizer):
    encoded = tiny_tokenizer(["a <|endoftext|> b", "c"])["input_ids"]
    assert encoded.count(tiny_tokenizer.sep_token_id) == 3
    assert tiny_tokenizer.decode_turns(encoded) == ["a <|endoftext|> b", "c"]


def test_batch_encoding_matches_single_and_decodes_back(tiny_tokenizer):
    contexts = [["Hello", "How are you?"], ["こんにちは"], ["a", "b", "c"]]
    batch = tiny_tokenizer(contexts)
    for i, context in enumerate(contexts):
        single = tiny_tokenizer(context)
        assert {k: v[i] for k, v in batch.items()} == single
        assert tiny_tokenizer.decode_turns(single["input_ids"]) == context


def test_a_string_context_is_refused(tiny_tokenizer):
    with pytest.raises(TypeError, match="list of turns"):
        tiny_tokenizer("Hello")


def test_layout_types_and_loss_flags():
    ids, types, flags = layout([[5], [6, 7], [8]], sep_id=0, weighted=[False, True, False])
    assert ids == [0, 5, 0, 6, 7, 0, 8, 0]
    assert types == [0, 0, 1, 1, 1, 0, 0, 1]
    r, w = LOSS_RESPONSE, LOSS_WEIGHTED
    # position 0 is never a target; a turn's sep closer carries that turn's flags
    assert flags == [0, 0, 0, r | w, r | w, r | w, r, r]
    assert layout_length([1, 2, 1]) == len(ids)
    assert split_turns(ids, 0) == [[5], [6, 7], [8]]


def test_truncation_drops_whole_oldest_turns():
    turns = [[1] * 5, [2] * 5, [3] * 5]
    assert truncate_turns(turns, 100) == turns
    assert truncate_turns(turns, layout_length([5, 5])) == turns[1:]
    assert truncate_turns(turns, layout_length([5, 5]) - 1) == turns[2:]


def test_truncation_keeps_the_end_of_a_single_long_turn():
    assert truncate_turns([[1, 2], list(range(10, 20))], 6) == [[16, 17, 18, 19]]


def test_call_with_max_length_truncates(tiny_tokenizer):
    full = tiny_tokenizer(["one two three", "four", "five"])
    cut = tiny_tokenizer(["one two three", "four", "five"], max_length=len(full["input_ids"]) - 1)
    assert tiny_tokenizer.decode_turns(cut["input_ids"]) == ["four", "five"]
    assert cut["token_type_ids"][0] == 0  # types restart from the first kept turn


def test_fingerprint_survives_save_and_load(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    assert (
        ConversationTokenizer.from_pretrained(tmp_path).fingerprint()
        == tiny_tokenizer.fingerprint()
    )


def test_missing_tokenizer_is_one_clear_error(tmp_path):
    from convcli.errors import ConvcliError

    with pytest.raises(ConvcliError, match=r"tokenizer folder not found: .*nope"):
        ConversationTokenizer.from_pretrained(tmp_path / "nope")


def test_a_damaged_tokenizer_file_is_named_in_one_line(tiny_tokenizer_dir, tmp_path):
    """Truncated JSON, a missing entry, a merge whose token left the vocabulary: one
    ConvcliError naming the folder and the file, not a library traceback."""
    import json
    import shutil

    from convcli.errors import ConvcliError

    def damaged(name: str, change) -> Path:
        folder = Path(shutil.copytree(tiny_tokenizer_dir, tmp_path / name))
        file = folder / "tokenizer.json"
        file.write_text(change(file.read_text()))
        return folder

    def without_a_token(text: str) -> str:  # the last merge's result renamed
        data = json.loads(text)
        last = data["model"]["merges"][-1]  # "a b" or ["a", "b"], by tokenizers version
        merged = "".join(last.split(" ") if isinstance(last, str) else last)
        data["model"]["vocab"][merged + "#"] = data["model"]["vocab"].pop(merged)
        return json.dumps(data)

    cases = {
        "truncated": (lambda text: text[: len(text) // 2], r"Unterminated|Expecting"),
        "emptied": (lambda text: "{}", r"no 'added_tokens' entry"),
        "inconsistent": (without_a_token, r"out of vocabulary"),
    }
    for name, (change, detail) in cases.items():
        folder = damaged(name, change)
        with pytest.raises(ConvcliError) as caught:
            ConversationTokenizer.from_pretrained(folder)
        message = str(caught.value)
        assert message.startswith(f"cannot load tokenizer '{folder}' (tokenizer.json): "), message
        assert re.search(detail, message) and "\n" not in message, message
