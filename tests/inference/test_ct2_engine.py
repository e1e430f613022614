"""The ctranslate2 backend: the same replies as torch in float32 (token types too), close
ones in int8, seeds that reproduce, MMI scores equal to torch's, one conversion per folder."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytest.importorskip("ctranslate2", reason="the ctranslate2 backend is an optional extra")

CONTEXT = ["Do you like tea?"]


def load(path: Path, **kwargs):
    from convcli.inference.model import ConversationModel

    return ConversationModel.from_pretrained(path, device="cpu", **kwargs)


def test_float32_greedy_replies_equal_torch(plain_pair: tuple[Path, Path]) -> None:
    torch_model = load(plain_pair[0])
    ct2_model = load(plain_pair[0], backend="ctranslate2", compute_type="float32")
    contexts = [["Do you like tea?"], ["Hello", "Hi, how are you?"], ["Where do you live?"]]
    options = {"max_new_tokens": 12, "return_token_ids": True}
    expected = torch_model.generate(contexts, **options)
    got = ct2_model.generate(contexts, **options)
    assert got.token_ids == expected.token_ids
    assert got.responses == expected.responses
    assert "green tea" in got.responses[0]  # the trained reply, not noise


def test_token_types_give_torch_replies_and_scores(
    trained: tuple[Path, Path], tiny_model_dir: Path, cache: Path
) -> None:
    """A model trained with token types (the forward of `trained`): replies of both
    parities in one batch, and scores, equal torch's in float32."""
    from convcli.inference.mmi import score_candidates

    torch_model = load(trained[0])
    heard: list[str] = []
    ct2_model = load(trained[0], backend="ctranslate2", compute_type="float32", report=heard.append)
    assert torch_model.meta.token_types
    contexts = [["Do you like tea?"], ["Hello", "Hi, how are you?"], ["Good morning"]]
    options = {"max_new_tokens": 12, "return_token_ids": True}
    got = ct2_model.generate(contexts, **options)
    assert got.token_ids == torch_model.generate(contexts, **options).token_ids
    assert got.responses[:2] == ["Yes, I like green tea.", "I am fine, thank you."]
    assert len(list(cache.iterdir())) == 2  # one table per reply parity
    assert [m.split(" for ")[1].split("), once")[0] for m in heard] == [
        "the ctranslate2 backend (float32, replies of token type 0",
        "the ctranslate2 backend (float32, replies of token type 1",
    ]  # two conversions, each said once and for what

    typed = load(tiny_model_dir)  # random weights, token types: any mistake shows
    tok = typed.tokenizer
    candidates = tok.encode_turns(["Yes, I like green tea.", "My name is Tiny."])
    sources = [[tok.encode_turns(["Do you like tea?"])[0], tok.encode_turns(["Hello"])[0]]] * 2
    expected = score_candidates(typed, candidates, sources)
    ct2_typed = load(tiny_model_dir, backend="ctranslate2", compute_type="float32")
    assert score_candidates(ct2_typed, candidates, sources) == pytest.approx(expected, abs=1e-4)


def test_int8_scores_stay_close_to_float32(plain_pair: tuple[Path, Path]) -> None:
    """int8 weights move each token's log-probability a little, not the reply's sense."""
    exact = load(plain_pair[0], backend="ctranslate2", compute_type="float32")
    int8 = load(plain_pair[0], backend="ctranslate2", compute_type="int8")
    rows = [exact.tokenizer.encode_turns(["Do you like tea?", "Yes, I like green tea."])[0]]
    rows = [(rows[0], None)]
    (a,), (b,) = exact.engine.log_probs(rows), int8.engine.log_probs(rows)
    assert len(a) == len(b) == len(rows[0][0]) - 1
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 0.5
    assert int8.generate(CONTEXT, max_new_tokens=12).text  # a reply comes out


def test_beams_and_top_k_1_match_torch(plain_pair: tuple[Path, Path]) -> None:
    """Beam search with early stopping (CTranslate2's only kind) and top-k 1 sampling of
    several replies give torch's replies in float32."""
    torch_model = load(plain_pair[0])
    ct2_model = load(plain_pair[0], backend="ctranslate2", compute_type="float32")
    contexts = [["Do you like tea?"], ["Where do you live?"]]
    for options in (
        {"num_beams": 3, "early_stopping": True, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 1, "num_return_sequences": 3},
    ):
        expected = torch_model.generate(contexts, max_new_tokens=10, **options).responses
        assert ct2_model.generate(contexts, max_new_tokens=10, **options).responses == expected


def test_seeds_reproduce_and_differ(plain_pair: tuple[Path, Path]) -> None:
    model = load(plain_pair[0], backend="ctranslate2")
    options = {"do_sample": True, "top_k": 0, "temperature": 3.0, "max_new_tokens": 10,
               "num_return_sequences": 4}  # fmt: skip
    first = model.generate(CONTEXT, seed=7, **options).responses
    model.generate(CONTEXT, **options)  # an unseeded call between does not matter
    assert model.generate(CONTEXT, seed=7, **options).responses == first
    assert len(first) == 4
    assert model.generate(CONTEXT, seed=8, **options).responses != first


def test_a_seeded_mmi_turn_repeats(plain_pair: tuple[Path, Path]) -> None:
    """The candidates and the choice among them (a draw) both follow the seed."""
    from convcli.inference.mmi import MMIReranker

    forward, reverse = (load(p, backend="ctranslate2") for p in plain_pair)
    reranker = MMIReranker(forward, reverse, num_candidates=6, temperature=5.0)
    sampling = {"do_sample": True, "top_k": 0, "temperature": 3.0, "max_new_tokens": 8}
    turns = [reranker.respond(CONTEXT, seed=s, **sampling) for s in (11, 12, 11)]
    assert [c.text for c in turns[0].candidates] == [c.text for c in turns[2].candidates]
    assert turns[0].chosen == turns[2].chosen
    assert turns[0].candidates != turns[1].candidates
    assert forward.model is None  # the torch weights were never read


def test_mmi_scores_equal_torch_and_argmax_picks_the_best(plain_pair: tuple[Path, Path]) -> None:
    from convcli.inference.mmi import MMIReranker, score_candidates

    torch_reverse = load(plain_pair[1])
    ct2_reverse = load(plain_pair[1], backend="ctranslate2", compute_type="float32")
    tok = torch_reverse.tokenizer
    candidates = tok.encode_turns(["Yes, I like green tea.", "My name is Tiny.", ""])
    sources = [[tok.encode_turns(["Do you like tea?"])[0]]] * 3
    expected = score_candidates(torch_reverse, candidates, sources)
    assert score_candidates(ct2_reverse, candidates, sources) == pytest.approx(expected, abs=1e-4)
    assert expected[0] > expected[1]  # the reverse model knows which reply fits

    forward = load(plain_pair[0], backend="ctranslate2")
    reranker = MMIReranker(forward, load(plain_pair[1], backend="ctranslate2"), num_candidates=6,
                           argmax=True)  # fmt: skip
    result = reranker.respond(CONTEXT, seed=1, do_sample=True, top_k=0, temperature=2.0)
    scores = [c.score for c in result.candidates if c.text]
    assert result.candidates[result.chosen].score == max(scores)
    assert sum(c.count for c in result.candidates) == 6


def test_a_folder_is_converted_once_and_again_when_it_changes(
    plain_pair: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    import shutil

    load(plain_pair[0], backend="ctranslate2")
    (converted,) = cache.iterdir()
    stamp = (converted / "model.bin").stat().st_mtime_ns
    load(plain_pair[0], backend="ctranslate2")
    assert [p.name for p in cache.iterdir()] == [converted.name]
    assert (converted / "model.bin").stat().st_mtime_ns == stamp  # loaded, not rewritten

    copy = shutil.copytree(plain_pair[0], tmp_path / "copy")
    load(copy, backend="ctranslate2")  # another folder: its own conversion
    load(plain_pair[0], backend="ctranslate2", compute_type="float32")  # another storage
    assert len(list(cache.iterdir())) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no leftovers

    # The copy's weights rewritten in place, same size and mtime: a new conversion, and
    # the old one goes (as does a temp folder of a conversion that died an hour ago).
    weights = copy / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    dead = cache / ".copy-0123456789abcdef.xyz"
    dead.mkdir()
    os.utime(dead, (time.time() - 7200,) * 2)
    load(copy, backend="ctranslate2")
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 3 and not [n for n in names if n.startswith(".")]
    assert converted.name in names


def test_two_processes_converting_at_once_share_one_copy(
    plain_pair: tuple[Path, Path], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other process's copy lands while this one converts: this one uses it."""
    import shutil

    from convcli.inference import ct2_engine

    real = ct2_engine.convert

    def raced(folder, output, *args):
        real(folder, output, *args)
        ident = ct2_engine.identity(folder, args[0], args[2])
        shutil.copytree(output, cache / ct2_engine.cache_key(ident))

    monkeypatch.setattr(ct2_engine, "convert", raced)
    assert load(plain_pair[0], backend="ctranslate2").generate(CONTEXT, max_new_tokens=4).text
    assert [p.name.startswith(".") for p in cache.iterdir()] == [False]


def test_without_renameat2_a_plain_rename_places_the_conversion(
    plain_pair: tuple[Path, Path], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convcli import outputs

    monkeypatch.setattr(outputs, "_renameat2", lambda *args: False)  # as on macOS
    assert load(plain_pair[0], backend="ctranslate2").generate(CONTEXT, max_new_tokens=4).text
    assert len(list(cache.iterdir())) == 1


def test_refusals_are_one_line(plain_pair: tuple[Path, Path], monkeypatch) -> None:
    from convcli.errors import ConvcliError, UsageError

    model = load(plain_pair[0], backend="ctranslate2")
    with pytest.raises(UsageError, match="does not take the generation option `top_a`"):
        model.generate(CONTEXT, top_a=3)
    with pytest.raises(UsageError, match="samples without beams"):
        model.generate(CONTEXT, do_sample=True, num_beams=2)
    with pytest.raises(UsageError, match=r"`repetition_penalty`.*torch backend"):
        model.generate(CONTEXT, repetition_penalty=1.3)
    with pytest.raises(UsageError, match="option `early_stopping` to true"):
        model.generate(CONTEXT, num_beams=2)
    with pytest.raises(UsageError, match=r"float16 does not run on this CPU: choose one of int8"):
        load(plain_pair[0], backend="ctranslate2", compute_type="float16")
    with pytest.raises(ConvcliError, match="evaluating the loss runs on the torch backend"):
        from convcli.evaluation import evaluate_loss

        evaluate_loss(model, plain_pair[0])
    monkeypatch.setenv("CONVCLI_CACHE", str(plain_pair[0] / "config.json" / "cache"))
    with pytest.raises(
        ConvcliError,
        match=r"cannot keep converted models in .*config.json/cache/"
        r"ctranslate2: Not a directory \(set CONVCLI_CACHE to a folder you can",
    ):
        load(plain_pair[0], backend="ctranslate2")  # fmt: skip
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # not installed
    with pytest.raises(ConvcliError, match=r"pip install 'convcli\[ctranslate2\]'"):
        load(plain_pair[0], backend="ctranslate2")


def test_cli_backend_option(plain_pair: tuple[Path, Path]) -> None:
    forward, reverse = (str(p) for p in plain_pair)
    torch_run = run_cli("generate", forward, *CONTEXT, "--max-new-tokens", "12")
    ct2_runs = [
        run_cli("generate", forward, *CONTEXT, "--max-new-tokens", "12",
                "--backend", "ctranslate2", "--compute-type", "float32")
        for _ in range(2)
    ]  # fmt: skip
    assert ct2_runs[0].returncode == 0, ct2_runs[0].stderr
    assert ct2_runs[0].stdout == ct2_runs[1].stdout == torch_run.stdout
    # The first run says it converts (seconds of silence otherwise); the second loads.
    assert f"converting {forward} for the ctranslate2 backend (float32), once" in ct2_runs[0].stderr
    assert "converting" not in ct2_runs[1].stderr
    mmi = [
        run_cli("generate", forward, *CONTEXT, "--reverse-model", reverse, "--backend",
                "ctranslate2", "--seed", "3", "--temperature", "3", "--json")
        for _ in range(2)
    ]  # fmt: skip
    assert mmi[0].returncode == 0, mmi[0].stderr
    assert '"candidates"' in mmi[0].stdout
    assert mmi[0].stdout == mmi[1].stdout  # a seed repeats the candidates and the choice
    chats = [
        run_cli("chat", forward, "--reverse-model", reverse, "--backend", "ctranslate2",
                "--seed", "5", "--temperature", "3", input="Hello\nDo you like tea?\n/quit\n")
        for _ in range(2)
    ]  # fmt: skip
    assert chats[0].returncode == 0, chats[0].stderr
    assert chats[0].stdout == chats[1].stdout  # a seeded chat repeats itself
    assert len(chats[0].stdout.splitlines()) == 2
    wrong = run_cli("generate", forward, *CONTEXT, "--compute-type", "int8")
    assert wrong.returncode == 2
    assert "--compute-type is for --backend ctranslate2" in wrong.stderr
