from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from convcli.errors import UsageError
from convcli.inference.model import ConversationModel, GenerationResult, fit_turns
from convcli.inference.packed import has_packed_weight, packing_available
from convcli.modelfolder import ModelMeta, save_model_folder
from convcli.tokenizer import ConversationTokenizer, layout_length
from tests.conftest import DIALOGUES, tiny_gpt2

PACKABLE = (Conv1D, torch.nn.Linear)


@pytest.fixture(scope="session")
def forward(trained) -> ConversationModel:
    return ConversationModel.from_pretrained(trained[0], device="cpu")


def _inputs_seen(model: ConversationModel) -> list[dict]:
    """Record the kwargs of every forward call of the HF model."""
    seen: list[dict] = []

    def hook(module, args, kwargs):
        seen.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_seed_000_calls_work_as_written(tiny_model_dir):
    import convcli

    model = convcli.ConversationModel.from_pretrained(tiny_model_dir)
    assert isinstance(model.tokenizer, ConversationTokenizer)
    result = model.generate(["Hello"], do_sample=True, top_p=0.95, top_k=50)
    assert isinstance(result, GenerationResult)
    assert len(result.responses) == 1
    assert str(result) == result.text == result.responses[0]
    assert result.context == ["Hello"]


def test_generation_stops_at_the_sep_token(forward):
    # The model learnt whole dialogues: without stopping at sep it would run on
    # into the next turns ("Hi, how are you? I am fine, ...").
    result = forward.generate(["Hello"], return_token_ids=True)
    assert result.text == DIALOGUES[0][1]
    assert forward.tokenizer.sep_token_id not in result.token_ids[0]


def test_no_special_token_text_in_output(tiny_model_dir):
    model = ConversationModel.from_pretrained(tiny_model_dir)
    sep_text = model.tokenizer.sep_token
    result = model.generate(
        [f"say {sep_text} please"],
        do_sample=True,
        num_return_sequences=8,
        max_new_tokens=20,
        seed=0,
        return_token_ids=True,
    )
    assert len(result.responses) == 8
    for text, ids in zip(result.responses, result.token_ids, strict=True):
        assert sep_text not in text
        assert model.tokenizer.sep_token_id not in ids
        assert model.tokenizer.pad_token_id not in ids


def test_batch_gives_the_same_greedy_replies_as_one_at_a_time(forward):
    contexts = [
        ["Hello"],
        ["Where do you live?", "I live in a small town.", "Is it nice?"],
        ["Do you like tea?"],
        ["こんにちは", "こんにちは、元気ですか?"],
    ]
    batch = forward.generate(contexts, return_token_ids=True)
    alone = [forward.generate(c, return_token_ids=True) for c in contexts]
    assert batch.token_ids == [a.token_ids[0] for a in alone]
    assert batch.responses == [a.text for a in alone]
    assert all(batch.responses)


def test_batch_equals_single_on_a_random_model_over_many_tokens(tiny_model_dir):
    # Random weights make every position matter: wrong positions would change the tokens.
    model = ConversationModel.from_pretrained(tiny_model_dir)
    contexts = [["Hello"], ["Where do you live?", "I live in a small town.", "Is it nice?"]]
    kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "return_token_ids": True}
    batch = model.generate(contexts, **kwargs)
    assert batch.token_ids == [model.generate(c, **kwargs).token_ids[0] for c in contexts]


def test_several_samples_share_one_prefill_and_match_repeated_contexts(tiny_model_dir):
    model = ConversationModel.from_pretrained(tiny_model_dir)
    contexts = [["Hello"], ["Where do you live?", "I live in a small town.", "Is it nice?"]]
    kwargs = {"do_sample": True, "max_new_tokens": 8, "min_new_tokens": 8, "return_token_ids": True}
    seen = _inputs_seen(model)
    shared = model.generate(contexts, num_return_sequences=3, seed=4, **kwargs)
    widths = [s["input_ids"].shape for s in seen]
    # One forward over the contexts (batch 2), then one token per step for 6 sequences.
    assert widths[0][0] == 2 and all(w == (6, 1) for w in widths[1:])
    repeated = model.generate([c for c in contexts for _ in range(3)], seed=4, **kwargs)
    assert shared.token_ids == repeated.token_ids
    assert len({tuple(ids) for ids in shared.token_ids}) > 1


def test_generated_tokens_get_the_response_segment_type(forward):
    seen = _inputs_seen(forward)
    forward.generate(["Hello", "Hi, how are you?"], max_new_tokens=4, min_new_tokens=4)
    prompt, *steps = seen
    # Two turns: segments 0 and 1, then the reply's segment has type 0 (its lone sep too).
    assert prompt["token_type_ids"][0, -1].item() == 0
    assert prompt["token_type_ids"][0, 1].item() == 0
    assert steps and all(s["token_type_ids"].flatten().tolist() == [0] for s in steps)


def test_token_types_only_when_the_folder_says_so(tmp_path, tiny_tokenizer):
    model = tiny_gpt2(len(tiny_tokenizer))
    meta = ModelMeta(token_types=False, sep_token_id=tiny_tokenizer.sep_token_id)
    folder = save_model_folder(model, tiny_tokenizer, meta, tmp_path / "m")
    loaded = ConversationModel.from_pretrained(folder)
    seen = _inputs_seen(loaded)
    loaded.generate(["Hello", "Hi"], max_new_tokens=3)
    assert seen and all("token_type_ids" not in s for s in seen)


def test_long_history_drops_the_oldest_turns(forward):
    turns = [f"turn number {i} of a long conversation" for i in range(12)]
    seen = _inputs_seen(forward)
    result = forward.generate(turns, max_context_tokens=40, max_new_tokens=3)
    ids = seen[0]["input_ids"][0].tolist()
    kept = forward.tokenizer.decode_turns(ids)
    assert kept == turns[-len(kept) :]
    assert 1 <= len(kept) < len(turns)
    lengths = [len(t) for t in forward.tokenizer.encode_turns(turns)]
    assert layout_length(lengths[-len(kept) :]) <= 40 < layout_length(lengths[-len(kept) - 1 :])
    assert result.context_lengths == [len(ids)]


def test_context_and_generation_always_fit_the_positions(tmp_path, tiny_tokenizer):
    model = tiny_gpt2(len(tiny_tokenizer), n_positions=32)
    meta = ModelMeta(token_types=True, sep_token_id=tiny_tokenizer.sep_token_id)
    folder = save_model_folder(model, tiny_tokenizer, meta, tmp_path / "m")
    small = ConversationModel.from_pretrained(folder)
    turns = ["a rather long turn that goes on and on " * 3] * 5
    result = small.generate(turns, max_new_tokens=500, min_new_tokens=500)
    assert result.max_new_tokens < 32
    assert result.context_lengths[0] + result.max_new_tokens <= 32
    # The default cap applies without max_new_tokens.
    assert small.generate(["hi"]).max_new_tokens <= 32 - 3


def test_fit_turns_keeps_the_opening_turns():
    turns = [[1, 2], [3], [4, 4, 4], [5, 5], [6]]
    # budget 10: opening [1,2] costs 3 + final sep 1; then [6]=2, [5,5]=3 -> 9; [4,4,4] would be 13
    assert fit_turns(turns, 10, keep_first=1) == [[1, 2], [5, 5], [6]]
    assert fit_turns(turns, 10) == [[4, 4, 4], [5, 5], [6]]
    # The newest turn alone too long: its end is kept.
    assert fit_turns([[1], list(range(10, 30))], 8, keep_first=1) == [[1], [26, 27, 28, 29]]


def test_seed_makes_sampling_reproducible(tiny_model_dir):
    model = ConversationModel.from_pretrained(tiny_model_dir)
    kwargs = {"do_sample": True, "max_new_tokens": 10, "min_new_tokens": 10}
    runs = [model.generate(["Hello"], seed=s, return_token_ids=True, **kwargs) for s in (1, 1, 2)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids


def test_hf_options_pass_through(forward):
    result = forward.generate(
        [["Hello"], ["Do you like tea?"]],
        num_beams=3,
        num_return_sequences=2,
        no_repeat_ngram_size=2,
        repetition_penalty=1.2,
        max_new_tokens=6,
    )
    assert len(result.responses) == 4
    assert [len(group) for group in result.per_context()] == [2, 2]
    short = forward.generate(["Do you like tea?"], max_new_tokens=2, return_token_ids=True)
    assert len(short.token_ids[0]) <= 2


def test_max_length_counts_the_context_as_in_transformers(forward):
    context_len = layout_length([len(forward.tokenizer.encode("Do you like tea?"))])
    result = forward.generate(
        ["Do you like tea?"], max_length=context_len + 3, return_token_ids=True
    )
    assert result.max_new_tokens == 3
    assert 1 <= len(result.token_ids[0]) <= 3


def test_bad_calls_are_usage_errors(forward):
    with pytest.raises(UsageError, match="list of turns"):
        forward.generate("Hello")
    with pytest.raises(UsageError, match="generation options rejected"):
        forward.generate(["Hello"], num_return_sequences=2, do_sample=False)


def test_greedy_replies_are_plain_transformers_generate_in_float32(tiny_model_dir):
    """The fast path (shared prefill, packed weights for batched rows) changes no token."""
    import copy

    model = ConversationModel.from_pretrained(tiny_model_dir, device="cpu")
    plain = copy.deepcopy(model.model)
    for module in plain.modules():  # back to transformers' own layers
        if type(module) not in PACKABLE and isinstance(module, PACKABLE):
            module.__class__ = module.__class__.__bases__[0]
    contexts = [["Hello"], ["Where do you live?", "I live in a small town.", "Is it nice?"]]
    kwargs = {"max_new_tokens": 16, "min_new_tokens": 16}
    for batch in ([contexts[1]], contexts):
        _, tensors, _ = model.prepare(batch, max_new_tokens=16)
        with torch.inference_mode():
            bare = plain.generate(
                **tensors, pad_token_id=model.tokenizer.pad_token_id,
                eos_token_id=model.sep_token_id, do_sample=False, **kwargs,
            )  # fmt: skip
        ours = model.generate(batch, return_token_ids=True, **kwargs)
        width = tensors["input_ids"].shape[1]
        assert ours.token_ids == model.response_ids(bare, width)
        # The batched rows really took the packed route, and its logits agree.
        with torch.inference_mode():
            fast, slow = model.model(**tensors).logits, plain(**tensors).logits
        assert torch.allclose(fast, slow, atol=1e-5)
    if packing_available():
        layers = [m for m in model.model.modules() if isinstance(m, PACKABLE)]
        assert len(layers) == 2 * 4 + 1 and all(map(has_packed_weight, layers))
