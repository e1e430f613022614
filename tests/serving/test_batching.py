"""The batching worker: requests that arrive together share a batch, in arrival order."""

from __future__ import annotations

import threading

from convcli.inference.rows import RowRequest, RowResult
from convcli.serving import batching


def test_a_request_too_large_for_the_batch_leads_the_next_one(monkeypatch):
    """Batch rows are capped; a request that does not fit waits for the next batch, ahead of
    requests that arrived after it (not behind them, where larger requests would starve)."""
    batches: list[list[str]] = []
    started, release = threading.Event(), threading.Event()

    def fake_generate_rows(model, requests, reranker):
        batches.append([r.turns[0] for r in requests])
        started.set()
        release.wait(10)  # the first batch runs until every request has been submitted
        return [RowResult() for _ in requests]

    monkeypatch.setattr(batching, "generate_rows", fake_generate_rows)
    batcher = batching.Batcher(None, window=0.2, max_rows=3)  # type: ignore[arg-type]
    try:
        futures = [batcher.submit(RowRequest(["A"]))]
        assert started.wait(10)
        for name, n in (("C", 1), ("B", 3), ("D", 1)):
            futures.append(batcher.submit(RowRequest([name], n=n)))
        release.set()
        for future in futures:
            future.result(timeout=10)
    finally:
        batcher.close()
    assert batches == [["A"], ["C"], ["B"], ["D"]]
