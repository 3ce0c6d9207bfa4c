"""Running a policy on the engine: traces, probes and votes over budget-forced sequences.

Every trace is a budget-forced ``Sequence`` (``t0s1.forcing_rules``) driven by the engine
(``t0s1.forcing.Engine``), so the cap and the Waits apply to each. A policy adds three things:

- parallel traces: the ``n`` samples of a prompt are prefilled once and forked from its KV cache
  (sampled trace ``j`` of prompt ``i`` uses ``seed + j``);
- side branches: a trial answer (DEER) or a probe (Dynasor) is a fork of a running trace with the
  forced end appended; the trace goes on undisturbed. When the branch's first tokens decide "exit",
  the branch *becomes* the trace (it answers on to ``max_answer_tokens``) and the trace's
  continuation is dropped; otherwise the branch is dropped. The result equals stopping the thinking
  at the branch point, and every token of a dropped branch or continuation is counted;
- early stops and votes: DeepConf online stops a trace when its window confidence falls below the
  warm-up threshold, short-m@k stops the rest once m traces finished; the vote picks the answer.

Branches decode greedily. ``total_tokens`` counts every token the model generated for a prompt:
all traces, branches and dropped continuations (injected ids such as "Wait" are not generated).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from t0s1.errors import UserError
from t0s1.forcing_rules import BudgetForcing, Prompt, RenderedPrompt, Result, per_prompt_settings
from t0s1.policies import MAX_PENDING_PROBES, Budget, DeepConf, EarlyExit, Policy, Probe, ShortMOfK, Vote
from t0s1.policies import rules
from t0s1.progress import ProgressBar

Extract = Callable[[str], str | None]


def default_extract(text: str) -> str | None:
    """The answer a reply gives, read as a math answer (``\\boxed{}``, "Final Answer:", the last
    number): what ``t0s1 eval`` does for math tasks."""
    from t0s1.evaluation.grading import extract_answer

    return extract_answer(text, "math")


@dataclass
class Trace:
    """One trace of a policy's run. ``confidence``: the score its vote used (None: unweighted)."""

    result: Result
    answer: str | None
    stopped_early: bool = False
    confs: list[float] | None = None
    confidence: float | None = None
    generated_tokens: int = 0
    voted: bool = True

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "thinking_tokens": self.result.thinking_tokens,
            "answer_tokens": self.result.answer_tokens,
            "generated_tokens": self.generated_tokens,
            "stopped_early": self.stopped_early,
            "voted": self.voted,
            "confidence": self.confidence,
            "confs": self.confs,
            "finish_reason": self.result.finish_reason,
            "num_ignored": self.result.num_ignored,
            "hit_budget": self.result.hit_budget,
            "thinking": self.result.thinking,
            "reply": self.result.answer,
        }


@dataclass
class PolicyResult:
    """What a policy gives for one prompt: the voted answer, the reply of the trace that carries
    it, every trace, and the tokens spent."""

    policy: str
    voted: str | None
    result: Result
    traces: list[Trace]
    total_tokens: int
    seconds: float
    probes: int = 0

    @property
    def answer(self) -> str:
        return self.result.answer

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "voted": self.voted,
            "answer": self.result.answer,
            "thinking": self.result.thinking,
            "total_tokens": self.total_tokens,
            "probes": self.probes,
            "seconds": self.seconds,
            "traces": [t.to_dict() for t in self.traces],
        }


def generate_with_policy(lm, prompts: Sequence[Prompt], budget: BudgetForcing | Sequence[BudgetForcing] | None, policy: Policy, *,
                         chat_template_kwargs: dict | None = None, extract: Extract | None = None,
                         progress: bool = False) -> list[PolicyResult]:
    """Run ``policy`` on every prompt (a message, a conversation or a ``RenderedPrompt``), batched
    on one engine. One ``PolicyResult`` per prompt. ``budget``: one setting for every prompt (trace
    j of each uses seed + j) or one per prompt."""
    from t0s1.forcing import _render_numbered

    if isinstance(prompts, str):
        raise UserError("generate takes a list of prompts; wrap a single prompt in a list.")
    # one setting: the same for every prompt (not seed + i as generate: trace j's seed is seed + j)
    single = budget is None or isinstance(budget, BudgetForcing)
    budgets = [budget or BudgetForcing()] * len(prompts) if single else per_prompt_settings(budget, len(prompts))
    extract = extract or default_extract
    if policy.parallel and policy.n > 1 and any(b.greedy for b in budgets):
        raise UserError(f"policy {policy.name!r} with n={policy.n} needs sampling: greedy traces are all the same. "
                        "Give a temperature, e.g. --temperature 0.6 --top-p 0.95 (DeepConf's and s1's settings).")
    top_k = getattr(policy, "top_k", 0)
    if top_k > lm.vocab_size:
        raise UserError(f"{policy.name}: top_k={top_k} is larger than the model's vocabulary ({lm.vocab_size} tokens).")
    if policy.needs_logprobs and not getattr(lm, "supports_logprobs", True):
        raise UserError(f"policy {policy.name!r} needs per-token log-probabilities, which this backend does not give; "
                        "use the transformers or llama.cpp backend.")
    started = time.perf_counter()
    controllers = []
    for i, prompt in enumerate(prompts):
        rendered = prompt if isinstance(prompt, RenderedPrompt) else _render_numbered(lm, prompt, i, chat_template_kwargs)
        controllers.append(_controller(lm, policy, budgets[i], rendered, i, extract))
    with ProgressBar(progress, len(prompts), "policy", unit="prompts") as bar:
        _run(lm, controllers, policy, started, bar)
    return [c.outcome(time.perf_counter() - started) for c in controllers]


def _run(lm, controllers: list, policy: Policy, started: float, bar) -> None:
    """Every prompt's traces on one engine, the prompts starting as ``Admission`` lets them within
    the model's limit (llama.cpp holds 256): each counts its most sequences at once
    (``peak_rows``) until it is complete and has left the engine. A prompt that alone needs more
    than the limit is refused."""
    from t0s1.forcing import Admission, Engine, ForwardPassError, _runner_for

    limit = getattr(lm, "max_sequences", None)
    need = max((c.peak_rows() for c in controllers), default=0)
    if limit is not None and need > limit:
        raise UserError(f"policy {policy.label()} runs up to {need} sequences of a prompt at once; this backend holds at most "
                        f"{limit}: lower n.")
    admission = Admission(controllers, limit, need=lambda c: c.peak_rows(), done=lambda c: c.complete and not c.live)
    first = admission.next()
    sequences = [s for c in first for s in c.start()]
    longest = [lm.rules.sequence(None, c.prompt, c.budget) for c in controllers]  # sizes the runner for every prompt
    engine = Engine(lm, runner=_runner_for(lm, sequences + [s for c in first for s in c.reserve()], later=longest))
    for c in first:
        c.keep_prompt(engine)
    done = 0
    try:
        with torch.inference_mode():
            engine.add(sequences)
            while engine.rows:
                try:
                    finished = engine.step()
                except ForwardPassError as failure:  # a policy's traces are decided together: the call fails
                    raise failure.error from None
                for sequence in finished:  # each sequence knows its prompt's controller (branches too)
                    sequence.controller.finished(sequence, time.perf_counter() - started)
                added = []
                for c in admission.running:
                    added += c.after_step(engine)
                if added:
                    engine.add(added)
                admitted = admission.next(engine)
                joining = [s for c in admitted for s in c.start()]
                for c in admitted:
                    c.keep_prompt(engine)
                engine.add(joining)
                now = sum(c.complete for c in controllers)
                bar.advance(now - done)
                done = now
    finally:
        engine.runner.close()


# ------------------------------------------------------------------------------------------------
# One prompt under one policy


class _Controller:
    """The traces of one prompt and the policy's decisions over them."""

    def __init__(self, lm, policy: Policy, budget: BudgetForcing, prompt, index: int, extract: Extract):
        self.lm, self.policy, self.budget, self.prompt, self.index, self.extract = lm, policy, budget, prompt, index, extract
        self.live: list = []  # sequences of this prompt in the engine
        self.traces: dict[int, Trace] = {}  # trace number -> finished trace
        self.sequences: dict[int, object] = {}  # trace number -> the sequence that carries it now
        self.generated = 0  # tokens sampled by every sequence of this prompt that left the engine
        self.probes = 0
        self.complete = False
        self.kept_prompt: list[int] | None = None  # the prompt whose prefill the engine keeps for later traces

    # ---- set-up -----------------------------------------------------------------------------

    def trace_settings(self, j: int) -> BudgetForcing:
        if self.budget.greedy or self.budget.seed is None:
            return self.budget
        return replace(self.budget, seed=self.budget.seed + j)

    def new_trace(self, j: int):
        sequence = self.lm.rules.sequence(j, self.prompt, self.trace_settings(j))
        sequence.keep_logprobs = self.policy.top_k if isinstance(self.policy, DeepConf) else (
            1 if isinstance(self.policy, EarlyExit) else 0)
        sequence.controller = self
        self.sequences[j] = sequence
        self.live.append(sequence)
        return sequence

    def start(self) -> list:
        return [self.new_trace(j) for j in range(self.first_wave())]

    def first_wave(self) -> int:
        return self.policy.n

    def reserve(self) -> list:
        """Sequences that may join later (sizes the runner); none by default."""
        return []

    def starts_later(self) -> bool:
        """Whether traces start after the first ones may have left the engine (DeepConf online's
        later traces); branches fork a running trace and need no copy."""
        return False

    def keep_prompt(self, engine) -> None:
        """Have the engine keep the prompt's prefill when traces start later (``starts_later``):
        they fork it instead of prefilling the prompt again."""
        if self.starts_later():
            self.kept_prompt = list(self.prompt.ids)
            engine.keep_prompt(self.kept_prompt)

    def peak_rows(self) -> int:
        """The most sequences of this prompt in the engine at once."""
        return self.rows_at_once(self.policy)

    @staticmethod
    def rows_at_once(policy) -> int:
        """``peak_rows`` of a prompt under ``policy``: its n traces by default."""
        return policy.n

    # ---- the engine's events ----------------------------------------------------------------

    def adopt(self, branch) -> None:
        """A branch forked off one of this prompt's traces."""
        branch.controller = self
        self.live.append(branch)
        self.probes += 1

    def finished(self, sequence, seconds: float) -> None:
        if sequence in self.live:
            self.live.remove(sequence)
        self.generated += sequence.sampled
        j = sequence.index
        if getattr(sequence, "dropped", False) or self.sequences.get(j) is not sequence:
            return
        result = sequence.result(seconds)
        cancelled = result.finish_reason == "cancelled"
        trace = Trace(result, None if cancelled else self.extract(result.answer), voted=not cancelled,
                      stopped_early=bool(getattr(sequence, "stopped_early", False)),
                      generated_tokens=sequence.sampled + getattr(sequence, "inherited", 0))
        if sequence.keep_logprobs and isinstance(self.policy, DeepConf):
            trace.confs = [rules.token_confidence(step) for step in sequence.top_logprobs]
        self.traces[j] = trace
        self.on_trace(j, trace)

    def on_trace(self, j: int, trace: Trace) -> None:
        pass

    def after_step(self, engine) -> list:
        """Decisions after a step (cancel traces, start more); new sequences to add."""
        if not self.complete and not self.live:
            self.complete = True
        if self.complete and self.kept_prompt is not None:
            engine.release_prompt(self.kept_prompt)
            self.kept_prompt = None
        return []

    # ---- the outcome ------------------------------------------------------------------------

    def vote(self, traces: list[Trace]) -> str | None:
        return rules.majority_vote([t.answer for t in traces if t.voted])

    def outcome(self, seconds: float) -> PolicyResult:
        traces = [self.traces[j] for j in sorted(self.traces)]
        voted = self.vote(traces)
        carrier = next((t for t in traces if t.voted and t.answer == voted and voted is not None), None)
        carrier = carrier or (traces[0] if traces else None)
        return PolicyResult(self.policy.label(), voted, carrier.result, traces, self.generated, seconds, self.probes)


class _DeepConf(_Controller):
    """DeepConf offline (all n traces, filter, weighted vote) or online (warm-up, threshold, early
    stop, consensus)."""

    policy: DeepConf

    def __init__(self, *args):
        super().__init__(*args)
        self.threshold: float | None = None

    def first_wave(self) -> int:
        return self.policy.warmup if self.policy.mode == "online" else self.policy.n

    @staticmethod
    def rows_at_once(policy) -> int:
        # online: the later traces start once the warm-up has finished
        return max(policy.warmup, policy.wave) if policy.mode == "online" else policy.n

    def starts_later(self) -> bool:
        return self.policy.mode == "online"

    def reserve(self) -> list:
        if self.policy.mode != "online":
            return []
        extra = self.lm.rules.sequence(None, self.prompt, self.budget)
        return [extra] * min(self.policy.wave, self.policy.n - self.policy.warmup)

    def score(self, trace: Trace) -> float:
        policy = self.policy
        if policy.mode == "online":
            return rules.lowest_group_confidence(trace.confs or [], policy.window)
        return rules.trace_confidence(trace.confs or [], policy.confidence, window=policy.window, bottom_percent=policy.bottom_percent)

    def on_trace(self, j: int, trace: Trace) -> None:
        trace.confidence = self.score(trace) if trace.result.finish_reason != "cancelled" else None
        if self.policy.mode == "online" and self.threshold is not None and trace.confidence is not None:
            # a later trace votes only above the threshold too: one shorter than the window was never checked while it ran
            trace.voted = bool(trace.confidence >= self.threshold)

    def after_step(self, engine) -> list:
        policy = self.policy
        if policy.mode != "online" or self.complete:
            return super().after_step(engine)
        warm = [self.traces[j] for j in range(policy.warmup) if j in self.traces]
        if self.threshold is None:
            if len(warm) < policy.warmup:
                return []
            self.threshold = rules.warmup_threshold([t.confidence for t in warm], policy.keep_percent)
            for t in warm:
                t.voted = bool(t.confidence >= self.threshold)
            return self._next_wave()
        # later traces: stop one whose latest window falls below the threshold
        for sequence in list(self.live):
            if sequence.done or sequence.index is None or sequence.index < policy.warmup:
                continue
            if self._window_mean(sequence) < self.threshold:
                sequence.stopped_early = True
                sequence.cancel()
        # consensus among the traces that vote, checked once a trace after the warm-up has finished
        # (the paper's loop): stop sampling, the traces still running included
        voting = [t for t in self.traces.values() if t.voted and t.answer is not None]
        after_warmup = any(j >= policy.warmup and t.result.finish_reason != "cancelled" for j, t in self.traces.items())
        if voting and after_warmup and rules.consensus([t.answer for t in voting], [t.confidence for t in voting]) >= policy.consensus:
            for sequence in self.live:
                if not sequence.done:  # one that finished in this same step is whole: not cancelled
                    sequence.stopped_early = True
                    sequence.cancel()
        elif not self.live:  # the wave has ended without consensus: the next one (none once n have started)
            added = self._next_wave()
            if added:
                return added
        return super().after_step(engine)

    def _next_wave(self) -> list:
        """The next ``wave`` later traces, numbered on from those started so far."""
        started = len(self.sequences)
        return [self.new_trace(j) for j in range(started, min(self.policy.n, started + self.policy.wave))]

    def _window_mean(self, sequence) -> float:
        """The mean confidence of ``sequence``'s last ``window`` tokens (infinite until it has that
        many), kept as a running sum: each step adds its new tokens' confidences only."""
        window = self.policy.window
        confs = sequence.__dict__.setdefault("confs", [])
        total = sequence.__dict__.get("window_sum", 0.0)
        for step in sequence.top_logprobs[len(confs):]:
            confs.append(rules.token_confidence(step))
            total += confs[-1]
            if len(confs) > window:
                total -= confs[-window - 1]
        sequence.window_sum = total
        return total / window if len(confs) >= window else float("inf")

    def vote(self, traces: list[Trace]) -> str | None:
        policy = self.policy
        candidates = [t for t in traces if t.answer is not None and t.result.finish_reason != "cancelled"]
        if policy.mode == "online":
            voting = [t for t in candidates if t.voted]
            return rules.weighted_vote([t.answer for t in voting], [t.confidence for t in voting])
        kept = rules.keep_top([t.confidence for t in candidates], policy.keep_percent)
        for trace in traces:
            trace.voted = False
        for trace, keep in zip(candidates, kept, strict=True):
            trace.voted = bool(keep)
        voting = [t for t in candidates if t.voted]
        return rules.weighted_vote([t.answer for t in voting], [t.confidence for t in voting])


class _ShortMOfK(_Controller):
    """short-m@k: stop the rest once m traces finished; vote among the first m."""

    policy: ShortMOfK

    def on_trace(self, j: int, trace: Trace) -> None:
        finished = [t for t in self.traces.values() if t.result.finish_reason != "cancelled"]
        trace.voted = trace.result.finish_reason != "cancelled" and len(finished) <= self.policy.m
        if len(finished) >= self.policy.m:
            for sequence in self.live:
                if not sequence.done:  # one that finished in this same step is whole: not cancelled
                    sequence.stopped_early = True
                    sequence.cancel()

    def vote(self, traces: list[Trace]) -> str | None:
        voting = [t for t in traces if t.voted]
        return rules.short_m_of_k_vote([t.answer for t in voting], [t.result.thinking_tokens + t.result.answer_tokens for t in voting],
                                       self.policy.m)


class _Branching(_Controller, ABC):
    """A single trace that forks side branches (DEER's trial answers, Dynasor's probes) and exits
    when a branch decides so."""

    def __init__(self, *args):
        super().__init__(*args)
        self.pending: list = []  # branches not decided yet, oldest first
        self.probe_answers: list[str | None] = []
        self.probe_texts: list[str] = []
        self.trials = 0

    @property
    def branch_tokens(self) -> int:
        return self.policy.trial_tokens if isinstance(self.policy, EarlyExit) else self.policy.probe_tokens

    def new_trace(self, j: int):
        sequence = super().new_trace(j)
        sequence.on_thinking = self.on_thinking
        return sequence

    def on_thinking(self, sequence, event: str, written: int) -> list:
        """The trace ``sequence`` reached ``event``: "end" (it ended its thinking and a Wait comes),
        "ignore" (it wrote the ignore string itself, the last ``written`` ids) or "token"."""
        if sequence.index is None or self.sequences.get(sequence.index) is not sequence:
            return []
        if not self.wants_branch(sequence, event):
            return []
        branch = sequence.branch(replace(sequence.settings, max_answer_tokens=sequence.settings.max_answer_tokens, temperature=0.0),
                                 drop_last=written if event == "ignore" else 0)
        branch.keep_logprobs = 1
        branch.branch_of = sequence
        branch.inherited = sequence.sampled  # the trace's tokens up to here: the exited trace's own
        self.adopt(branch)
        self.pending.append(branch)
        return [branch]

    @abstractmethod
    def wants_branch(self, sequence, event: str) -> bool:
        """Whether to fork a branch off ``sequence`` at ``event``."""

    def reserve(self) -> list:
        """Room for a branch and the trace's continuation beside the trace."""
        return [self.sequences[0]] * 2

    @staticmethod
    def rows_at_once(policy) -> int:
        """The trace and its undecided branch (one at a time)."""
        return 2

    def after_step(self, engine) -> list:
        for branch in list(self.pending):
            generated = branch.answer_generated
            if not (branch.done or generated >= self.branch_tokens):
                continue
            self.pending.remove(branch)
            if self.decide(branch):
                self.exit_at(branch)
                break
            branch.dropped = True
            branch.cancel()
        return super().after_step(engine)

    @abstractmethod
    def decide(self, branch) -> bool:
        """Whether the thinking ends where ``branch`` forked (its first tokens are in)."""

    def exit_at(self, branch) -> None:
        """``branch`` becomes the trace: the continuation and every other branch are dropped."""
        trace = branch.branch_of
        j = trace.index
        for other in self.pending:
            other.dropped = True
            other.cancel()
        self.pending = []
        trace.dropped = True
        trace.cancel()
        branch.stopped_early = True
        self.sequences[j] = branch
        branch.index = j

    def finished(self, sequence, seconds: float) -> None:
        if sequence in self.pending:
            self.pending.remove(sequence)
            if not getattr(sequence, "dropped", False) and self.decide(sequence):
                self.exit_at(sequence)
            else:
                sequence.dropped = True
        super().finished(sequence, seconds)


class _EarlyExit(_Branching):
    policy: EarlyExit

    def wants_branch(self, sequence, event: str) -> bool:
        return event in ("end", "ignore") and self.trials < self.policy.max_trials and not self.pending

    def on_thinking(self, sequence, event: str, written: int) -> list:
        branches = super().on_thinking(sequence, event, written)
        self.trials += len(branches)
        return branches

    def decide(self, branch) -> bool:
        steps = branch.top_logprobs[: self.policy.trial_tokens]
        probabilities = [math.exp(step[0]) for step in steps]
        return rules.trial_confidence(probabilities, self.policy.confidence) >= self.policy.threshold


class _Probe(_Branching):
    policy: Probe

    @staticmethod
    def rows_at_once(policy) -> int:
        return 1 + MAX_PENDING_PROBES

    def wants_branch(self, sequence, event: str) -> bool:
        thinking = len(sequence.thinking_ids)
        return (event == "token" and thinking > 0 and thinking % self.policy.interval == 0
                and len(self.pending) < MAX_PENDING_PROBES)

    def decide(self, branch) -> bool:
        text = self.lm.rules.tokenizer.decode(branch.answer_ids[: len(branch.answer_ids)], skip_special_tokens=True)
        self.probe_answers.append(self.extract(text))
        self.probe_texts.append(text)
        return rules.probes_agree(self.probe_answers, self.probe_texts, self.policy.agree)


_CONTROLLERS: dict[type[Policy], type[_Controller]] = {
    Budget: _Controller, Vote: _Controller, DeepConf: _DeepConf, ShortMOfK: _ShortMOfK, EarlyExit: _EarlyExit, Probe: _Probe,
}


def rows_at_once(policy: Policy) -> int:
    """The most sequences one prompt runs at once under ``policy`` (traces and branches)."""
    return _CONTROLLERS[type(policy)].rows_at_once(policy)


def _controller(lm, policy: Policy, budget: BudgetForcing, prompt, index: int, extract: Extract) -> _Controller:
    return _CONTROLLERS[type(policy)](lm, policy, budget, prompt, index, extract)
