from __future__ import annotations

import warnings

import pytest
import torch

from convcli.errors import ConvcliError
from convcli.inference.mmi import MMIReranker, choice_probabilities, choose
from convcli.inference.model import ConversationModel
from convcli.modelfolder import ModelMeta, save_model_folder
from convcli.tokenizer import ConversationTokenizer
from tests.conftest import tiny_gpt2


@pytest.fixture(scope="session")
def pair(trained) -> tuple[ConversationModel, ConversationModel]:
    return tuple(ConversationModel.from_pretrained(p, device="cpu") for p in trained)


@pytest.fixture(scope="session")
def typed_reverse(tmp_path_factory, tiny_tokenizer_dir) -> ConversationModel:
    """A random reverse model that uses token types."""
    tokenizer = ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)
    meta = ModelMeta(token_types=True, sep_token_id=tokenizer.sep_token_id, reverse=True)
    folder = tmp_path_factory.mktemp("rev") / "typed"
    save_model_folder(tiny_gpt2(len(tokenizer), seed=7), tokenizer, meta, folder)
    return ConversationModel.from_pretrained(folder, device="cpu")


def independent_score(reverse: ConversationModel, candidate: str, source: list[str]) -> float:
    """The seed's `_score_response`, one candidate at a time: -loss of the source
    (turns newest first, each followed by sep) given `[sep] candidate [sep]`."""
    tok = reverse.tokenizer
    sep = tok.sep_token_id
    prefix = [sep, *tok.encode(candidate), sep]
    target: list[int] = []
    for turn in source:
        target += [*tok.encode(turn), sep]
    ids = torch.tensor([prefix + target])
    labels = torch.tensor([[-100] * len(prefix) + target])
    extra = {}
    if reverse.meta.token_types:
        # Segment 0 is [sep] candidate; segment i is [sep] source turn i; then the final sep.
        types = [0] * (len(tok.encode(candidate)) + 1)
        for i, turn in enumerate(source, 1):
            types += [i % 2] * (len(tok.encode(turn)) + 1)
        types.append((len(source) + 1) % 2)
        extra["token_type_ids"] = torch.tensor([types])
    with torch.no_grad():
        return -reverse.model(ids, labels=labels, **extra).loss.item()


@pytest.mark.parametrize("source", ["last", "history"])
def test_argmax_picks_the_best_candidate_by_an_independent_scoring(pair, source):
    forward, reverse = pair
    context = ["Where do you live?", "I live in a small town."]
    reranker = MMIReranker(forward, reverse, num_candidates=6, argmax=True, source=source)
    result = reranker.respond(context, seed=3, temperature=2.0, max_new_tokens=12)
    texts = [c.text for c in result.candidates]
    assert sum(c.count for c in result.candidates) == 6
    assert len(set(texts)) == len(texts) > 1  # distinct, and a real choice to make
    src = context[-1:] if source == "last" else context[::-1]
    expected = [independent_score(reverse, c.text, src) for c in result.candidates]
    assert [c.score for c in result.candidates] == pytest.approx(expected, abs=1e-4)
    best = max(s for s, text in zip(expected, texts, strict=True) if text)
    # The chosen one is a best-scored non-empty candidate (ties: identical texts).
    assert texts[result.chosen] and expected[result.chosen] == pytest.approx(best, abs=1e-5)
    assert result.response == texts[result.chosen]


def test_reverse_token_types_are_used_when_its_meta_says_so(pair, typed_reverse):
    forward, _ = pair
    reranker = MMIReranker(forward, typed_reverse, num_candidates=4, argmax=True)
    result = reranker.respond(["Hello", "Hi, how are you?"], seed=1, temperature=2.0)
    expected = [
        independent_score(typed_reverse, c.text, ["Hi, how are you?"]) for c in result.candidates
    ]
    assert [c.score for c in result.candidates] == pytest.approx(expected, abs=1e-4)


def test_one_generate_call_and_one_reverse_forward(pair, monkeypatch):
    forward, reverse = pair
    calls: list[dict] = []
    original = forward.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(forward.model, "generate", counting_generate)
    reverse_calls = []
    handle = reverse.model.base_model.register_forward_hook(lambda *a: reverse_calls.append(1))
    try:
        results = MMIReranker(forward, reverse, num_candidates=8).respond_batch(
            [["Hello"], ["Do you like tea?"]], seed=0
        )
    finally:
        handle.remove()
    assert len(calls) == 1
    assert calls[0]["input_ids"].shape[0] == 16  # 2 contexts x 8 candidates, one call
    assert len(reverse_calls) == 1
    assert [sum(c.count for c in r.candidates) for r in results] == [8, 8]


def test_empty_candidates_are_never_chosen():
    scores = [-0.1, -9.0, -0.2, -8.0]  # the empty ones score best
    nonempty = [False, True, False, True]
    torch.manual_seed(0)
    picks = {choose(scores, nonempty, temperature=5.0) for _ in range(200)}
    assert picks == {1, 3}
    assert choose(scores, nonempty, argmax=True) == 3
    # All empty: something is still returned.
    assert choose(scores, [False] * 4, argmax=True) == 0


def test_empty_candidates_are_not_chosen_end_to_end(pair, monkeypatch):
    forward, reverse = pair
    reranker = MMIReranker(forward, reverse, num_candidates=4, argmax=True)
    # Make two candidates empty (sep right away) and give them the best score.
    import convcli.inference.mmi as mmi

    hi, morning = forward.tokenizer.encode("Hi"), forward.tokenizer.encode("Good morning")
    monkeypatch.setattr(forward, "response_ids", lambda seq, width: [[], [], hi, morning])
    scores = {(): 0.0, tuple(hi): -5.0, tuple(morning): -3.0}
    monkeypatch.setattr(mmi, "score_candidates", lambda r, c, s: [scores[tuple(x)] for x in c])
    result = reranker.respond(["Hello"], seed=0)
    assert result.response == "Good morning"
    assert result.candidates[0].text == "" and result.candidates[0].count == 2


def test_sampling_follows_the_seed(pair):
    forward, reverse = pair
    reranker = MMIReranker(forward, reverse, num_candidates=5, temperature=0.5)
    runs = [reranker.respond(["Hello"], seed=11, temperature=2.0) for _ in range(2)]
    assert [c.text for c in runs[0].candidates] == [c.text for c in runs[1].candidates]
    assert runs[0].chosen == runs[1].chosen


def test_a_reverse_model_with_another_tokenizer_is_refused(pair, tmp_path):
    from convcli.data.vocab import train_bpe_tokenizer

    forward, _ = pair
    other = ConversationTokenizer(
        train_bpe_tokenizer(["something else entirely", "another text"], vocab_size=300)
    )
    meta = ModelMeta(token_types=False, sep_token_id=other.sep_token_id, reverse=True)
    folder = save_model_folder(tiny_gpt2(len(other)), other, meta, tmp_path / "other")
    with pytest.raises(ConvcliError, match="tokenizer"):
        MMIReranker(forward, ConversationModel.from_pretrained(folder))


def test_duplicate_candidates_are_scored_once_and_listed_once_with_their_count(pair, monkeypatch):
    forward, reverse = pair
    import convcli.inference.mmi as mmi

    hi, tea = forward.tokenizer.encode("Hi, how are you?"), forward.tokenizer.encode("I like tea.")
    monkeypatch.setattr(forward, "response_ids", lambda seq, width: [hi, hi, tea, hi])
    scored: list[list[list[int]]] = []
    real_score = mmi.score_candidates

    def spy(rev, candidates, sources):
        scored.append([list(c) for c in candidates])
        return real_score(rev, candidates, sources)

    monkeypatch.setattr(mmi, "score_candidates", spy)
    result = MMIReranker(forward, reverse, num_candidates=4, argmax=True).respond(["Hello"], seed=0)
    assert scored == [[hi, tea]]  # each distinct reply went through the reverse model once
    assert [(c.text, c.count) for c in result.candidates] == [
        ("Hi, how are you?", 3),
        ("I like tea.", 1),
    ]
    expected = [independent_score(reverse, c.text, ["Hello"]) for c in result.candidates]
    assert [c.score for c in result.candidates] == pytest.approx(expected, abs=1e-4)
    assert result.new_tokens == 3 * len(hi) + len(tea)
    assert result.candidates[0].to_dict()["count"] == 3


def test_merging_duplicates_leaves_the_choice_distribution_unchanged():
    # Seven samples: A three times, B twice, C once and one empty reply.
    samples = [("A", -1.0), ("B", -0.5), ("A", -1.0), ("C", -2.0), ("", 0.0), ("B", -0.5)]
    samples.append(("A", -1.0))
    each = choice_probabilities(
        [s for _, s in samples], [bool(t) for t, _ in samples], temperature=0.7
    )
    per_text: dict[str, float] = {}
    for (text, _), p in zip(samples, each, strict=True):
        per_text[text] = per_text.get(text, 0.0) + p
    merged = choice_probabilities(
        [-1.0, -0.5, -2.0, 0.0], [True, True, True, False], [3, 2, 1, 1], temperature=0.7
    )
    assert merged == pytest.approx([per_text[t] for t in "ABC"] + [0.0], abs=1e-12)
    # Drawn many times, the merged choice follows it.
    torch.manual_seed(0)
    picks = [
        choose([-1.0, -0.5, -2.0, 0.0], [True, True, True, False], [3, 2, 1, 1], temperature=0.7)
        for _ in range(4000)
    ]
    freq = [picks.count(i) / len(picks) for i in range(4)]
    assert freq == pytest.approx(merged, abs=0.03)
    # argmax ignores counts: the best score wins.
    assert choose([-1.0, -0.5], [True, True], [5, 1], argmax=True) == 1


def test_an_mmi_turn_prints_no_deprecation_warning(pair, capfd):
    forward, reverse = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MMIReranker(forward, reverse, num_candidates=4).respond(["Hello"], seed=0)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert "deprecated" not in capfd.readouterr().err


def test_a_forward_and_reverse_pair_with_one_tokenizer_loads_it_once(pair, trained, monkeypatch):
    from convcli.inference.loading import load_models
    from convcli.inference.settings import MMISettings, RuntimeSettings

    loads, fingerprints = [], []
    real_load = ConversationTokenizer.from_pretrained.__func__
    real_fingerprint = ConversationTokenizer.fingerprint

    def counting_load(cls, *args, **kwargs):
        loads.append(args)
        return real_load(cls, *args, **kwargs)

    def counting_fingerprint(self):
        fingerprints.append(self)
        return real_fingerprint(self)

    monkeypatch.setattr(ConversationTokenizer, "from_pretrained", classmethod(counting_load))
    monkeypatch.setattr(ConversationTokenizer, "fingerprint", counting_fingerprint)
    settings = MMISettings(reverse_model=trained[1], num_candidates=4)
    forward, reranker, _ = load_models(trained[0], settings, RuntimeSettings(device="cpu"))
    assert len(loads) == 1 and fingerprints == []
    assert reranker.reverse.tokenizer is forward.tokenizer
    # The same replies as a pair loaded one folder at a time, each with its own tokenizer.
    separate = MMIReranker(*pair, num_candidates=4)
    ours, theirs = (r.respond(["Hello"], seed=3) for r in (reranker, separate))
    assert [(c.text, c.score) for c in ours.candidates] == [
        (c.text, c.score) for c in theirs.candidates
    ]
    assert ours.response == theirs.response


def test_a_reverse_folder_whose_tokenizer_files_differ_loads_its_own(trained, tmp_path):
    import json
    import shutil

    from convcli.inference.loading import load_models
    from convcli.inference.settings import MMISettings, RuntimeSettings

    reverse_dir = shutil.copytree(trained[1], tmp_path / "reverse")
    config_file = reverse_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = 77
    config_file.write_text(json.dumps(config))
    settings = MMISettings(reverse_model=reverse_dir, num_candidates=2)
    forward, reranker, _ = load_models(trained[0], settings, RuntimeSettings(device="cpu"))
    assert reranker.reverse.tokenizer is not forward.tokenizer
    assert reranker.reverse.tokenizer.tokenizer.model_max_length == 77
    assert forward.tokenizer.tokenizer.model_max_length != 77
