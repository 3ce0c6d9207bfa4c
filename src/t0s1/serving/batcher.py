"""One worker thread runs the budget forcing engine for every request of the server.

Requests wait in a queue. The worker takes the first, gathers whatever else arrives within a few
milliseconds (up to ``max_batch``), and generates them as one engine batch, each request with its
own ``BudgetForcing``. The engine is synchronous PyTorch: only this thread runs it, one batch at a
time. Each request gets its events (streamed text, then its result or its error) on an asyncio
queue of the event loop that submitted it. A request cancelled by its client (a disconnect) stops
between two engine steps without disturbing the rest of the batch.

The engine cannot yet add sequences to a running batch, so a request that arrives while a batch
runs waits for that batch to finish (see docs/serving.md).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from t0s1.forcing import BudgetForcing, RenderedPrompt, Result, generate_from_ids
from t0s1.models import LoadedModel

GATHER_SECONDS = 0.01
"""How long the worker waits for more requests after the first one before starting a batch."""


@dataclass
class Job:
    """One request in the queue. Events on ``events``: ("thinking" | "answer", text) while
    streaming, then ("result", Result) or ("error", exception)."""

    prompt_ids: RenderedPrompt | list[int]
    budget: BudgetForcing
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed_any: bool = False
    stop: tuple[str, ...] | None = None  # a plain continuation (see Batcher.submit)
    text: str = ""  # a plain continuation's text so far
    stopped: bool = False  # a plain continuation ended at one of its stop strings

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel()


@dataclass
class BatcherStats:
    """What the worker has done: the engine's own throughput is ``generated_tokens / busy_seconds``."""

    requests: int = 0
    cancelled: int = 0
    batches: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    largest_batch: int = 0

    def to_dict(self) -> dict:
        tokens_per_second = self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0
        return {
            "requests": self.requests,
            "cancelled": self.cancelled,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "generated_tokens": self.generated_tokens,
            "busy_seconds": round(self.busy_seconds, 3),
            "engine_tokens_per_second": round(tokens_per_second, 1),
        }


class Batcher:
    """Batches queued requests through the engine in one worker thread."""

    def __init__(self, lm: LoadedModel, max_batch: int = 8, *, gather_seconds: float = GATHER_SECONDS):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.lm = lm
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self.stats = BatcherStats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="t0s1-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and end the worker."""
        if self._thread is None:
            return
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit("error", RuntimeError("The server is shutting down."))
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, prompt_ids: list[int], budget: BudgetForcing, *, stream: bool,
               stop: tuple[str, ...] | None = None) -> Job:
        """Queue a request; call from the event loop that will read the job's events.

        ``stop``: a plain continuation instead of budget forcing: the engine's thinking phase
        continues ``prompt_ids`` for up to ``budget.max_thinking_tokens`` tokens and the job ends
        where that phase ends (a stop token, the budget) or where a stop string appears.
        """
        job = Job(prompt_ids, budget, stream, asyncio.get_running_loop(), stop=stop)
        self._queue.put(job)
        return job

    # ---- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.gather_seconds
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            waiting = [job for job in batch if not job.cancelled.is_set()]
            self.stats.cancelled += len(batch) - len(waiting)  # their clients left while they queued
            batch = waiting
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        try:
            results = self._generate(batch)
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the worker
            self._recover(batch, error)
            return
        finally:
            self.stats.busy_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for job, result in zip(batch, results, strict=True):
            self.stats.requests += 1
            self.stats.cancelled += result.finish_reason == "cancelled" and job.stop is None
            self.stats.generated_tokens += result.thinking_tokens + result.answer_tokens
            job.emit("result", result)

    def _generate(self, batch: list[Job]) -> list[Result]:
        def on_delta(i: int, channel: str, text: str) -> None:
            job = batch[i]
            if job.stop is not None:
                if channel == "answer":  # the continuation has ended; skip the answer
                    job.cancel()
                    return
                job.text += text
                if any(stop in job.text for stop in job.stop):
                    job.stopped = True
                    job.cancel()
                return
            if job.stream:
                job.streamed_any = True
                job.emit(channel, text)

        return generate_from_ids(
            self.lm,
            [job.prompt_ids for job in batch],
            [job.budget for job in batch],
            on_delta=on_delta if any(job.stream or job.stop is not None for job in batch) else None,
            is_cancelled=lambda i: batch[i].cancelled.is_set(),
        )

    def _recover(self, batch: list[Job], error: Exception) -> None:
        """A batch failed: run its requests one by one so that only the culprit gets the error.
        A request that already streamed text cannot start over: it gets the error."""
        if len(batch) == 1:
            batch[0].emit("error", error)
            return
        for job in batch:
            if job.streamed_any:
                job.emit("error", error)
            elif not job.cancelled.is_set():
                self._run([job])
