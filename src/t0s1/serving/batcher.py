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
request gets the error and the worker goes on with a fresh cache. If no engine can be built (at
``start``, which raises the reason, or when a fresh cache is needed) or the worker itself fails,
the worker is dead: every request, queued or new, is answered with ``EngineFailed``, ``failure``
says why and ``on_failure`` is called (``t0s1 serve`` then exits non-zero for a supervisor to
restart it). ``shutdown`` stops the running work within one decode step; everything running or
queued is answered with ``ServerShuttingDown``.

A request with a test-time policy (``t0s1.policies``: n traces, side branches, a vote) is decided
over all its traces together, so it does not join the batch: when the worker takes it from the
queue it admits nothing more, lets the running requests finish, then runs the policy alone
(``generate_with_policy``, its traces batched on their own runner) and goes back to continuous
batching. Requests queued behind it wait for it (first come, first served); requests already
running are not slowed. A client that leaves, or a shutdown, stops it within one decode step.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing, Engine, ForwardPassError, RenderedPrompt
from t0s1.forcing_rules import Sequence
from t0s1.models import LoadedModel
from t0s1.policies import Policy
from t0s1.serving.protocol import DEFAULT_MAX_QUEUED


class ServerShuttingDown(Exception):
    """The request was queued or running when the server began to shut down."""


class ServerBusy(Exception):
    """The queue holds as many requests as the server takes: this one is refused (retry later)."""


class EngineFailed(Exception):
    """The worker is dead (no engine could be built, or the worker itself failed): no request can
    be served until the server is restarted."""


@dataclass(frozen=True)
class Continuation:
    """A plain continuation instead of budget forcing (``/v1/completions`` with ``stop``): the
    prompt is continued as it is until a stop id, the token limit or a ``stop`` string."""

    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # with the end of turn; None: the model's end of thinking
    min_tokens: int = 0  # 1: the first token may not be a stop id
    skip_special_tokens: bool = False
    max_tokens: int = 16


CONTEXT_IDS = 4
"""Ids decoded before a continuation's new ones, so that a token's text is what it is in context
(a leading space of SentencePiece tokens survives), as vLLM detokenizes."""


def continuation_text(tokenizer, prompt_ids: list[int], ids: list[int], *, skip_special_tokens: bool) -> str:
    """The text of ``ids`` as they continue ``prompt_ids``: decoded after the last prompt ids."""
    context = list(prompt_ids[-CONTEXT_IDS:])
    head = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
    whole = tokenizer.decode(context + list(ids), skip_special_tokens=skip_special_tokens)
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Where the earliest of ``stops`` starts in ``text``; -1 if none is there."""
    return min((text.find(stop) for stop in stops if stop in text), default=-1)


class StopWatch:
    """Finds a continuation's stop strings in its raw text as each token arrives (vLLM's rule: the
    text as detokenized, nothing stripped or held back), decoding each token once."""

    def __init__(self, tokenizer, prompt_ids: list[int], continuation: Continuation):
        self.tokenizer = tokenizer
        self.stops = continuation.stop
        self.skip_special_tokens = continuation.skip_special_tokens
        self.window = list(prompt_ids[-CONTEXT_IDS:])
        self.read = len(self.window)  # ids of the window already turned into text
        self.seen = 0  # generated ids taken in
        self.text = ""

    def reached(self, ids: list[int]) -> bool:
        """Take in the ids generated since the last call; whether the text now holds a stop string."""
        if not self.stops or len(ids) <= self.seen:
            return False
        self.window += ids[self.seen :]
        self.seen = len(ids)
        decode = self.tokenizer.decode
        before = decode(self.window[: self.read], skip_special_tokens=self.skip_special_tokens)
        after = decode(self.window, skip_special_tokens=self.skip_special_tokens)
        if after.endswith("\ufffd") and len(self.window) - self.read < 4:
            return False  # half a UTF-8 character so far: wait for the rest
        start = max(0, len(self.text) - max(map(len, self.stops)) + 1)
        self.text += after[len(os.path.commonprefix([before, after])) :]
        self.window = self.window[-CONTEXT_IDS:]
        self.read = len(self.window)
        return first_stop(self.text[start:], self.stops) >= 0


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
    stop_watch: StopWatch | None = None  # a plain continuation's stop strings
    policy: Policy | None = None  # a test-time policy: run alone, answered with a PolicyResult
    prompt: RenderedPrompt | None = None  # a policy's prompt
    settings: BudgetForcing | None = None  # a policy's budget forcing (each trace's)

    def cancel(self) -> None:
        """The client has gone: stop generating (at the next step)."""
        self.cancelled.set()

    @property
    def should_stop(self) -> bool:
        """Whether to stop before the next token (asked by the worker at each step)."""
        if self.cancelled.is_set():
            return True
        if self.continuation is None:
            return False
        # A plain continuation ends where the thinking phase ends (a stop id, its token limit) or
        # where its text holds a stop string, checked right after each token.
        return not self.sequence.thinking or self.stop_watch.reached(self.sequence.thinking_ids)

    def emit(self, kind: str, value) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    def on_text(self, _: int, channel: str, text: str) -> None:
        """The sequence's new text (incremental: the cost does not grow with the text)."""
        self.emit(channel, text)


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

    def __init__(self, lm: LoadedModel, max_batch: int = 8, max_queued: int = DEFAULT_MAX_QUEUED):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.lm = lm
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.stats = BatcherStats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._running: dict[int, Job] = {}
        self._policy_job: Job | None = None  # taken from the queue: runs once the batch has drained
        self._ids = itertools.count()
        self._lock = threading.Lock()  # orders submit against shutdown: no job slips past the last drain
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: Exception | None = None  # why the worker died; None while it serves
        self.on_failure = None  # called (from the worker thread) with the error when the worker dies

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def check_room(self, count: int = 1) -> None:
        """Raise ``ServerBusy`` unless ``count`` more requests fit in the queue (call from the event
        loop right before submitting them: only the worker takes from the queue meanwhile)."""
        if self._queue.qsize() + count > self.max_queued:
            raise ServerBusy(f"The server is busy: {self._queue.qsize()} requests wait for the batch and it queues at "
                             f"most {self.max_queued}{f'; this one needs {count} places' if count > 1 else ''}. "
                             "Retry later.")

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        """Whether the worker serves (started, not dead; a shutdown in progress counts as alive)."""
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Build the engine and start the worker. An engine that cannot be built (a ``--max-batch``
        the runtime refuses, no memory for the cache) raises here, so the server does not start."""
        if self._thread is None:
            engine = self._new_engine()
            self._thread = threading.Thread(target=self._work, args=(engine,), name="t0s1-engine", daemon=True)
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
               continuation: Continuation | None = None, policy: Policy | None = None) -> Job:
        """Queue a request; call from the event loop that will read the job's events.

        The request's ``Sequence`` is made here, so a budget that does not fit its prompt is a
        ``UserError`` before anything is queued. ``continuation``: a plain continuation; its token
        limit is ``settings.max_thinking_tokens``. ``policy``: run the request under this policy
        (not streamed); its result is a ``PolicyResult`` and ``sequence`` only says the budget.
        """
        job = Job(next(self._ids), stream, asyncio.get_running_loop(), continuation)
        if policy is not None:
            job.policy, job.prompt, job.settings = policy, prompt, settings
            job.sequence = self.lm.rules.sequence(job.id, prompt, settings)  # checks the budget fits
        elif continuation is None:
            job.sequence = self.lm.rules.sequence(job.id, prompt, settings, on_text=job.on_text if stream else None)
        else:
            job.sequence = self._continuation_sequence(job.id, prompt, settings, continuation)
            job.stop_watch = StopWatch(self.lm.tokenizer, prompt.ids, continuation)
        with self._lock:
            if self.failure is not None:
                raise EngineFailed(f"The engine has failed and this server cannot generate: {self.failure}")
            if self._stopping:
                raise ServerShuttingDown("The server is shutting down: it takes no new requests.")
            if self._thread is None or not self._thread.is_alive():
                raise EngineFailed("The engine's worker is not running (start the app with its lifespan).")
            self.check_room()
            self._queue.put(job)
        return job

    def _continuation_sequence(self, index: int, prompt: RenderedPrompt, settings: BudgetForcing,
                               continuation: Continuation) -> Sequence:
        """A sequence that continues ``prompt`` as it is: its thinking is the continuation, its
        budget ``continuation.max_tokens``; it must fit the context (vLLM's rule: prompt +
        max_tokens), with no room kept for a forced end that is never written."""
        context = self.lm.context_length
        if context and len(prompt.ids) + continuation.max_tokens > context:
            raise UserError(f"max_tokens={continuation.max_tokens} does not fit the model's context of {context} "
                            f"tokens with a {len(prompt.ids)}-token prompt; use at most {context - len(prompt.ids)}.")
        rules = copy.copy(self.lm.rules)  # this request's own stops; the rest of the rules as they are
        rules.context_length = None  # checked above
        if continuation.stop_token_ids is not None:  # only these ids and the end of turn stop it
            rules.stop_ids = rules.end_of_turn | frozenset(continuation.stop_token_ids)
            rules.written_end = None
        settings = replace(settings, max_thinking_tokens=continuation.max_tokens, num_ignore=0, max_answer_tokens=1)
        sequence = rules.sequence(index, prompt, settings)
        sequence.ban_stop = bool(continuation.min_tokens)
        return sequence

    # ---- the worker thread ----------------------------------------------------------------

    def _work(self, engine: Engine) -> None:
        cause: Exception = ServerShuttingDown("The server is shutting down: this request was stopped before it finished.")
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._admit(engine)
                    if self._policy_job is not None and not engine.active and not self._stopping:
                        self._run_policy(self._policy_job)
                        continue
                    if self._stopping or not engine.active:
                        continue
                    try:
                        finished = self._timed(engine.step)
                    except Exception as error:  # noqa: BLE001 - the batch's forward pass: no single culprit
                        if isinstance(error, ForwardPassError):  # what finished in that step is whole
                            for sequence in error.finished:
                                self._finish(sequence)
                            error = error.error
                        self._fail_running(error)
                        engine.runner.close()
                        engine = None
                        engine = self._new_engine()  # a failure here kills the worker (below)
                        continue
                    self.stats.steps += 1
                    for sequence in finished:
                        self._finish(sequence)
        except Exception as error:  # noqa: BLE001 - a fault of the worker itself: answer everyone with it
            cause = EngineFailed(f"The engine has failed and this server cannot generate: {type(error).__name__}: {error}")
            with self._lock:
                self.failure = error
        finally:
            self._fail_running(cause)
            while True:  # what is still queued (submit refuses new jobs once failure or _stopping is set)
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.emit("error", cause)
            if engine is not None:
                engine.runner.close()
        if self.failure is not None and self.on_failure is not None:
            self.on_failure(self.failure)

    def _new_engine(self) -> Engine:
        # A row per request that may run at once (a llama.cpp runner allocates them up front).
        runner = self.lm.new_runner(rows=self.max_batch)
        return Engine(self.lm, runner=runner, is_cancelled=self._should_stop, on_error=self._sequence_failed)

    def _should_stop(self, index: int) -> bool:
        job = self._running.get(index)
        return job is None or job.should_stop

    def _admit(self, engine: Engine) -> None:
        """Prefill what has arrived, up to ``max_batch`` running sequences; wait while idle. A
        policy request taken from the queue stops admission until it has run."""
        if self._policy_job is not None:
            return
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
            if job.policy is not None:  # runs alone once the batch has drained
                self._policy_job = job
                break
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

    def _run_policy(self, job: Job) -> None:
        """Run a policy request alone, on its own runner (the batch is empty)."""
        from t0s1.policies.run import generate_with_policy

        self._policy_job = None
        if job.cancelled.is_set():  # its client left while it waited for the batch to drain
            self._running.pop(job.id, None)
            self.stats.cancelled += 1
            return
        stopped = lambda: job.cancelled.is_set() or self._stopping  # noqa: E731
        try:
            [outcome] = self._timed(generate_with_policy, _StoppableModel(self.lm, stopped), [job.prompt], job.settings,
                                    job.policy)
        except Exception as error:  # noqa: BLE001 - this request's alone: the worker goes on
            if isinstance(error, ForwardPassError):
                error = error.error
            if isinstance(error, _Stopped) and not self._stopping:
                self._running.pop(job.id, None)
                self.stats.cancelled += 1
                job.emit("error", error)
            elif isinstance(error, _Stopped):
                self._fail(job, ServerShuttingDown("The server is shutting down: this request was stopped before it "
                                                   "finished."))
            else:
                self._fail(job, error)
            return
        self._running.pop(job.id, None)
        self.stats.requests += 1
        self.stats.generated_tokens += outcome.total_tokens
        job.emit("result", outcome)

    def _finish(self, sequence: Sequence) -> None:
        job = self._running.pop(sequence.index, None)
        if job is None:  # its request was answered already (failed): nobody waits for this result
            return
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
        if self._policy_job is job:  # it waited for the batch to drain: it must not run after its answer
            self._policy_job = None
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


class _Stopped(Exception):
    """A policy request stopped before its next decode step (its client left, or a shutdown)."""


class _StoppableModel:
    """The model as ``generate_with_policy`` sees it, with runners that stop before a decode step
    once ``stopped()`` is true (the policy's run then raises ``_Stopped`` and closes its runner)."""

    def __init__(self, lm: LoadedModel, stopped):
        self._lm, self._stopped = lm, stopped

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def new_runner(self, *args, **kwargs):
        return _StoppableRunner(self._lm.new_runner(*args, **kwargs), self._stopped)


class _StoppableRunner:
    def __init__(self, runner, stopped):
        self._runner, self._stopped = runner, stopped

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def add(self, *args, **kwargs):
        if self._stopped():
            raise _Stopped("The request was stopped before it finished.")
        return self._runner.add(*args, **kwargs)

    def step(self, *args, **kwargs):
        if self._stopped():
            raise _Stopped("The request was stopped before it finished.")
        return self._runner.step(*args, **kwargs)
