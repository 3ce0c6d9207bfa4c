"""Continuous batching: one worker thread runs the budget forcing engine for every request.

Requests wait in a queue. Between two decode steps the worker admits what has arrived, up to
``max_batch`` running sequences: their prompts are prefilled and their rows join the running batch
(``t0s1.forcing.Engine.add``), so a new request starts at the next step instead of after the
running ones, and a sequence that finishes leaves the batch at once. Each request brings its own
``Sequence`` (its budget resolved for its own prompt, its own seed), so what it generates does not
depend on its neighbours. The engine is synchronous PyTorch and only this thread runs it; each
request gets its events on an asyncio queue of the event loop that submitted it.

Failures stay with their request: a prompt that cannot be prefilled, or a sequence whose own step
raises, fails alone. A failure of the batched forward pass has no single culprit: every running
request gets the error and the worker goes on with a fresh cache. ``shutdown`` stops the running
work within one decode step; everything running or queued is answered with ``ServerShuttingDown``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from t0s1.forcing import BudgetForcing, Engine, RenderedPrompt
from t0s1.forcing_rules import Sequence
from t0s1.models import LoadedModel


class ServerShuttingDown(Exception):
    """The request was queued or running when the server began to shut down."""


@dataclass(frozen=True)
class Continuation:
    """A plain continuation instead of budget forcing (``/v1/completions`` with ``stop``): the
    prompt is continued as it is until a stop id, the token limit or a ``stop`` string."""

    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # with the end of turn; None: the model's end of thinking
    min_tokens: int = 0  # 1: the first token may not be a stop id
    skip_special_tokens: bool = False


@dataclass
class Job:
    """One request. Events on ``events``: ("thinking" | "answer", text) while streaming, then
    ("result", Result) or ("error", exception)."""

    id: int
    stream: bool
    loop: asyncio.AbstractEventLoop
    continuation: Continuation | None = None
    sequence: Sequence | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    text: str = ""  # a plain continuation's text so far
    stopped: bool = False  # a plain continuation reached one of its stop strings

    def cancel(self) -> None:
        """The client has gone: stop generating (at the next step)."""
        self.cancelled.set()

    @property
    def should_stop(self) -> bool:
        if self.cancelled.is_set() or self.stopped:
            return True
        # A plain continuation ends where the thinking phase ends; nothing after it is asked for.
        return self.continuation is not None and not self.sequence.thinking

    def emit(self, kind: str, value) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    def on_text(self, _: int, channel: str, text: str) -> None:
        """The sequence's new text (incremental: the cost does not grow with the text)."""
        if self.continuation is None:
            self.emit(channel, text)
            return
        if channel == "thinking":
            self.text += text
            self.stopped = any(stop in self.text for stop in self.continuation.stop)


@dataclass
class BatcherStats:
    """What the worker has done: the engine's own throughput is ``generated_tokens / busy_seconds``."""

    requests: int = 0
    cancelled: int = 0
    failed: int = 0
    prefills: int = 0
    steps: int = 0
    largest_batch: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0

    def to_dict(self) -> dict:
        tokens_per_second = self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0
        return {
            "requests": self.requests,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "prefills": self.prefills,
            "steps": self.steps,
            "largest_batch": self.largest_batch,
            "generated_tokens": self.generated_tokens,
            "busy_seconds": round(self.busy_seconds, 3),
            "engine_tokens_per_second": round(tokens_per_second, 1),
        }


class Batcher:
    """Runs every request through one engine, continuously batched, in one worker thread."""

    def __init__(self, lm: LoadedModel, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.lm = lm
        self.max_batch = max_batch
        self.stats = BatcherStats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._running: dict[int, Job] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # orders submit against shutdown: no job slips past the last drain
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="t0s1-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Begin to stop (returns at once): running work stops within one decode step, and
        everything running or queued is answered with ``ServerShuttingDown``; new requests are refused."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._queue.put(None)  # wakes an idle worker

    def stop(self, timeout: float = 10.0) -> None:
        """``shutdown``, then wait for the worker to end."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt: RenderedPrompt, settings: BudgetForcing, *, stream: bool,
               continuation: Continuation | None = None) -> Job:
        """Queue a request; call from the event loop that will read the job's events.

        The request's ``Sequence`` is made here, so a budget that does not fit its prompt is a
        ``UserError`` before anything is queued. ``continuation``: a plain continuation; its token
        limit is ``settings.max_thinking_tokens``.
        """
        job = Job(next(self._ids), stream, asyncio.get_running_loop(), continuation)
        rules = self.lm.rules
        if continuation is not None and continuation.stop_token_ids is not None:
            rules = copy.copy(rules)  # this request's own stop ids; the rest of the rules as they are
            rules.stop_ids = rules.end_of_turn | frozenset(continuation.stop_token_ids)
        wants_text = stream or continuation is not None
        job.sequence = rules.sequence(job.id, prompt, settings, on_text=job.on_text if wants_text else None)
        if continuation is not None and continuation.min_tokens:
            job.sequence.ban_stop = True
        with self._lock:
            if self._stopping:
                raise ServerShuttingDown("The server is shutting down: it takes no new requests.")
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("The engine's worker is not running (start the app with its lifespan).")
            self._queue.put(job)
        return job

    # ---- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        engine = self._new_engine()
        cause: Exception = ServerShuttingDown("The server is shutting down: this request was stopped before it finished.")
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._admit(engine)
                    if self._stopping or not engine.active:
                        continue
                    try:
                        finished = self._timed(engine.step)
                    except Exception as error:  # noqa: BLE001 - the batch's forward pass: no single culprit
                        self._fail_running(error)
                        engine.runner.close()
                        engine = self._new_engine()
                        continue
                    self.stats.steps += 1
                    for sequence in finished:
                        self._finish(sequence)
        except Exception as error:  # noqa: BLE001 - a fault of the worker itself: answer everyone with it
            cause = error
            with self._lock:
                self._stopping = True
        finally:
            self._fail_running(cause)
            while True:  # what is still queued (submit refuses new jobs once _stopping is set)
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.emit("error", cause)
            engine.runner.close()

    def _new_engine(self) -> Engine:
        # A row per request that may run at once (a llama.cpp runner allocates them up front).
        runner = self.lm.new_runner(rows=self.max_batch)
        return Engine(self.lm, runner=runner, is_cancelled=self._should_stop, on_error=self._sequence_failed)

    def _should_stop(self, index: int) -> bool:
        job = self._running.get(index)
        return job is None or job.should_stop

    def _admit(self, engine: Engine) -> None:
        """Prefill what has arrived, up to ``max_batch`` running sequences; wait while idle."""
        room = self.max_batch - engine.active
        room = min(room, getattr(engine.runner, "free_slots", room))
        if room <= 0 or (engine.active and not getattr(engine.runner, "can_join", True)):
            return  # a cache that cannot take new rows mid-run (sliding window): wait for the batch to end
        jobs = []
        while len(jobs) < room:
            try:
                job = self._queue.get() if not engine.active and not jobs else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # shutdown
                break
            if job.cancelled.is_set():  # its client left while it queued
                self.stats.cancelled += 1
                continue
            self._running[job.id] = job
            jobs.append(job)
        if jobs:
            self._prefill(engine, jobs)

    def _prefill(self, engine: Engine, jobs: list[Job]) -> None:
        try:
            self._timed(engine.add, [job.sequence for job in jobs])
        except Exception as error:  # noqa: BLE001 - find the prompt that fails: each alone
            if len(jobs) == 1:
                self._fail(jobs[0], error)
            else:
                for job in jobs:
                    self._prefill(engine, [job])
            return
        self.stats.prefills += 1
        self.stats.largest_batch = max(self.stats.largest_batch, engine.active)

    def _finish(self, sequence: Sequence) -> None:
        job = self._running.pop(sequence.index)
        try:
            result = sequence.result(time.perf_counter() - job.submitted)
        except Exception as error:  # noqa: BLE001
            self.stats.failed += 1
            job.emit("error", error)
            return
        self.stats.requests += 1
        self.stats.cancelled += job.cancelled.is_set()
        self.stats.generated_tokens += result.thinking_tokens + result.answer_tokens
        job.emit("result", result)

    def _sequence_failed(self, sequence: Sequence, error: Exception) -> None:
        job = self._running.pop(sequence.index, None)
        if job is not None:
            self._fail(job, error)

    def _fail(self, job: Job, error: Exception) -> None:
        self._running.pop(job.id, None)
        self.stats.failed += not isinstance(error, ServerShuttingDown)
        job.emit("error", error)

    def _fail_running(self, error: Exception) -> None:
        for job in list(self._running.values()):
            self._fail(job, error)

    def _timed(self, function, *args):
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.stats.busy_seconds += time.perf_counter() - started
