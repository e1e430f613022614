from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from convcli.cli.app import app
from convcli.errors import ConvcliError, InputError
from convcli.evaluation import (
    distinct_n,
    evaluate_loss,
    evaluate_responses,
    read_samples,
    response_metrics,
    unigram_f1,
    words,
)
from convcli.inference.model import ConversationModel
from convcli.tokenizer import LOSS_RESPONSE
from tests.conftest import DIALOGUES

runner = CliRunner()


def test_loss_is_per_token_over_the_whole_split(tiny_model_dir, make_shards):
    from convcli.data.shards import Shards

    shards = make_shards()
    model = ConversationModel.from_pretrained(tiny_model_dir, device="cpu")
    report = evaluate_loss(model, shards, batch_tokens=64)  # many small batches
    # Independently: one example at a time, the summed loss of the response tokens.
    total, count = 0.0, 0
    for example in Shards(shards).split("valid"):
        ids = torch.tensor(np.asarray(example.ids, dtype=np.int64))[None]
        types = torch.tensor(np.asarray(example.types, dtype=np.int64))[None]
        keep = torch.tensor((np.asarray(example.mask) & LOSS_RESPONSE) != 0)
        with torch.no_grad():
            logits = model.model(input_ids=ids, token_type_ids=types).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float(losses[keep[1:]].sum())
        count += int(keep[1:].sum())
    assert report.tokens == count
    assert report.loss == pytest.approx(total / count, rel=1e-5)
    assert report.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert evaluate_loss(model, shards, train_on="all").tokens > count


def test_shards_of_another_tokenizer_are_refused(tiny_model_dir, make_shards, tmp_path):
    from convcli.data.vocab import train_bpe_tokenizer

    other = tmp_path / "other-tokenizer"
    train_bpe_tokenizer(["something else entirely"] * 20, 300).save_pretrained(str(other))
    shards = make_shards(tokenizer_dir=other)
    model = ConversationModel.from_pretrained(tiny_model_dir, device="cpu")
    with pytest.raises(ConvcliError, match="another tokenizer"):
        evaluate_loss(model, shards)


def test_references_from_keys_last_turns_or_a_file(tmp_path):
    contexts = tmp_path / "c.jsonl"
    contexts.write_text(
        '{"turns": ["Hi"], "expected": "Hello"}\n\n["Do you like tea?", "Yes."]\n',
        encoding="utf-8",
    )
    samples = read_samples(contexts)
    assert [(s.line, s.context, s.reference) for s in samples] == [
        (1, ["Hi"], "Hello"),
        (3, ["Do you like tea?"], "Yes."),
    ]
    refs = tmp_path / "r.jsonl"
    refs.write_text('"A"\n{"reference": "B"}\n', encoding="utf-8")
    assert [s.reference for s in read_samples(contexts, refs)] == ["A", "B"]


def test_bad_samples_name_the_line(tmp_path):
    contexts = tmp_path / "c.jsonl"
    contexts.write_text('["Hi", "Hello"]\n["lonely"]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.jsonl:2: needs a reference"):
        read_samples(contexts)
    refs = tmp_path / "r.jsonl"
    refs.write_text('"A"\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.jsonl:2: no reference"):
        read_samples(contexts, refs)


def test_response_metrics_for_sampling_and_mmi(trained):
    from convcli.inference.mmi import MMIReranker

    forward, reverse = (ConversationModel.from_pretrained(p, device="cpu") for p in trained)
    unique = list(dict.fromkeys(tuple(d) for d in DIALOGUES))
    samples = read_samples_from(unique)
    reranker = MMIReranker(forward, reverse, num_candidates=4, argmax=True)
    reports = evaluate_responses(forward, samples, reranker=reranker, batch_size=2, seed=0)
    assert [r.system for r in reports] == ["sampling", "mmi"]
    for report in reports:
        assert report.samples == len(samples)
        assert set(report.metrics) == {"distinct_1", "distinct_2", "avg_length", "f1"}
        # The models learnt these dialogues: most replies are right.
        assert report.metrics["f1"] > 0.5
    # The plain system is the model's own sampling: the same seed gives the same replies.
    plain = forward.generate([s.context for s in samples[:2]], seed=0, do_sample=True, top_k=50)
    assert reports[0].examples[0]["response"] == plain.responses[0]


def read_samples_from(dialogues) -> list:
    from convcli.evaluation import Sample

    return [Sample(i, list(d[:-1]), d[-1]) for i, d in enumerate(dialogues, 1)]


def test_cli_json_with_loss_and_mmi(trained, tmp_path, make_shards):
    forward, reverse = trained
    contexts = tmp_path / "c.jsonl"
    contexts.write_text(
        "\n".join(json.dumps(list(d)) for d in dict.fromkeys(tuple(d) for d in DIALOGUES)),
        encoding="utf-8",
    )
    result = runner.invoke(
        app,
        ["eval", str(forward), "--data", str(make_shards()), "--input", str(contexts),
         "--reverse-model", str(reverse), "--num-candidates", "2", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["loss"]["split"] == "valid" and out["loss"]["perplexity"] > 1
    assert [r["system"] for r in out["responses"]] == ["sampling", "mmi"]


def test_cli_needs_something_to_evaluate(tiny_model_dir):
    result = runner.invoke(app, ["eval", str(tiny_model_dir)])
    assert result.exit_code == 2
    assert "give --data SHARDS" in result.stderr


def test_words_fold_case_drop_punctuation_and_split_japanese():
    assert words("Hello, World! It's 3pm.") == ["hello", "world", "it", "s", "3pm"]
    assert words("こんにちは、元気") == ["こ", "ん", "に", "ち", "は", "元", "気"]


def test_distinct_counts_over_the_whole_set():
    assert distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["", "x"], 2) == 0.0


def test_unigram_f1():
    assert unigram_f1("the cat sat", "the cat sat") == 1.0
    assert unigram_f1("the cat", "a dog") == 0.0
    # common = 1 ("cat"); precision 1/2, recall 1/3 -> F1 = 0.4
    assert unigram_f1("cat here", "a cat there") == pytest.approx(0.4)


def test_response_metrics_with_and_without_references():
    metrics = response_metrics(["a b", "a c"], ["a b", "x"])
    assert metrics == pytest.approx(
        {"distinct_1": 3 / 4, "distinct_2": 1.0, "avg_length": 2.0, "f1": 0.5}
    )
    assert "f1" not in response_metrics(["a"], None)
    with pytest.raises(ValueError, match="1 responses but 2 references"):
        response_metrics(["a"], ["a", "b"])
