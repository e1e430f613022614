"""Dynamic batching: one worker thread owns the model; requests that arrive together are
answered by one `generate_rows` call.

The event loop never touches the model. It hands a `RowRequest` to `Batcher.submit`
and awaits the returned future; streamed text crosses back through an asyncio queue
(`call_soon_threadsafe`). The worker takes the first waiting request, lets others join
for `window` seconds (or until `max_rows` rows), and decodes them together. Requests
whose client left (or timed out) while waiting are dropped before they cost anything.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convcli.inference.rows import RowRequest, RowResult, generate_rows

if TYPE_CHECKING:
    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel


@dataclass
class _Job:
    request: RowRequest
    future: Future[RowResult]

    @property
    def rows(self) -> int:
        mmi = self.request.mmi
        return self.request.n * (mmi.num_candidates if mmi else 1)


class Batcher:
    """The one thread that runs the model."""

    def __init__(
        self,
        model: ConversationModel,
        reranker: MMIReranker | None = None,
        *,
        window: float = 0.01,
        max_rows: int = 64,
    ) -> None:
        self.model, self.reranker = model, reranker
        self.window, self.max_rows = window, max_rows
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="convcli-batcher", daemon=True)
        self.batches = 0
        """Batches decoded so far (tests and logs read it)."""
        self.largest = 0
        """Most requests answered by one batch."""
        self.finished: Counter[str] = Counter()
        """Replies by finish reason ("cancelled": a client left or timed out mid-reply)."""
        self._carry: _Job | None = None  # a job that did not fit the batch before
        self._thread.start()

    def submit(self, request: RowRequest) -> Future[RowResult]:
        future: Future[RowResult] = Future()
        self._queue.put(_Job(request, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job and those that join it within the window; and whether to stop."""
        jobs, rows = [first], first.rows
        deadline = time.monotonic() + self.window
        while rows < self.max_rows:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            if rows + job.rows > self.max_rows:
                self._carry = job  # the next batch starts with it, ahead of later arrivals
                break
            jobs.append(job)
            rows += job.rows
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first, self._carry = self._carry or self._queue.get(), None
            if first is None:
                return
            jobs, stop = self._collect(first)
            live = [j for j in jobs if not _gone(j.request)]
            for job in jobs:
                if job not in live:
                    job.future.cancel()
            if not live:
                continue
            try:
                results = generate_rows(self.model, [j.request for j in live], self.reranker)
            except BaseException as exc:  # a bug: every waiting request hears of it
                for job in live:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            self.largest = max(self.largest, len(live))
            for job, result in zip(live, results, strict=True):
                self.finished.update(c.finish_reason for c in result.choices)
                job.future.set_result(result)


def _gone(request: RowRequest) -> bool:
    return request.cancelled is not None and request.cancelled.is_set()
