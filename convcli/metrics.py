"""Response quality metrics: distinct-n, unigram F1, length. Pure functions on text.

Words are runs of non-space letters/digits; kana and CJK ideographs count as one
word per character (Japanese has no spaces), so the metrics mean the same in both.
Punctuation is ignored and case folded, as in ParlAI's F1.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def words(text: str) -> list[str]:
    """Normalised words of a text (see module docstring)."""
    return _WORD.findall(text.casefold())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole set of texts (Li et al., 2016)."""
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def unigram_f1(hypothesis: str, reference: str) -> float:
    """Bag-of-words F1 between a response and its reference."""
    hyp, ref = Counter(words(hypothesis)), Counter(words(reference))
    common = sum((hyp & ref).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(hyp.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def response_metrics(
    responses: Sequence[str], references: Sequence[str] | None
) -> dict[str, float]:
    """distinct-1/2, average length in words, and mean unigram F1 when references are given."""
    result = {
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "avg_length": sum(len(words(r)) for r in responses) / len(responses) if responses else 0.0,
    }
    if references is not None:
        if len(references) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        scores = [unigram_f1(h, r) for h, r in zip(responses, references, strict=True)]
        result["f1"] = sum(scores) / len(scores) if scores else 0.0
    return result
