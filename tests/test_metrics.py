from __future__ import annotations

import pytest

from convcli.evaluation import distinct_n, response_metrics, unigram_f1, words


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
