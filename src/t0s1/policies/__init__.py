"""Test-time policies beside s1's budget forcing: what each one is called, its parameters (the
paper's names and defaults) and how a user's ``--policy NAME --policy-arg KEY=VALUE`` becomes one.

Every policy composes with budget forcing: the cap and the Waits of ``BudgetForcing`` still apply
to each trace; the policy decides how many traces run, which stop early and how the answer is
chosen. The decision rules themselves are pure functions in ``t0s1.policies.rules``.

| name | paper | parameters (defaults) |
| --- | --- | --- |
| budget | s1 (one greedy or sampled trace) | - |
| vote | s1's parallel baseline: majority over n traces | - |
| deepconf | DeepConf (arXiv 2508.15260) | mode=offline, top_k=20, window=2048, confidence=lowest, bottom_percent=10, keep_percent=90, warmup=16, consensus=0.95, wave=1 |
| early-exit | DEER (arXiv 2504.15895) | threshold=0.95, trial_tokens=20, confidence=geometric, max_trials=10 |
| probe | Dynasor-CoT (arXiv 2412.20993) | interval=64, probe_tokens=20, agree=3 |
| short-m-of-k | short-m@k (arXiv 2505.17813) | m=1 |
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from t0s1.errors import UserError


@dataclass(frozen=True)
class Policy:
    """A test-time policy: its name and parameters. ``n`` traces per prompt (1: one trace)."""

    name: ClassVar[str] = ""
    needs_logprobs: ClassVar[bool] = False
    parallel: ClassVar[bool] = False
    """Runs several traces per prompt and votes (so sampling, temperature > 0, makes sense)."""

    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise UserError(f"n must be a positive integer, got {self.n!r}.")
        if not self.parallel and self.n != 1:
            raise UserError(f"policy {self.name!r} runs one trace per prompt; n={self.n} needs a parallel policy "
                            f"({', '.join(n for n, p in POLICIES.items() if p.parallel)}).")

    def label(self) -> str:
        """The policy as it appears in results: its name and every parameter that differs from the
        default, e.g. ``deepconf[n=8,mode=online]``."""
        changed = [f"{f.name}={_shown(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"{self.name}[{','.join(changed)}]" if changed else self.name

    def parameters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _shown(value) -> str:
    """A parameter as labels show it: 10 for 10.0, 0.9 for 0.9, 0.9999999 whole (labels key results,
    so two values never share one)."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


def _check_range(policy: Policy, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    value = getattr(policy, name)
    if (isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value > high or value < low
            or (low_open and value == low)):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise UserError(f"{policy.name}: {name} must be a number in {bound}, got {value!r}.")


def _check_positive_int(policy: Policy, *names: str) -> None:
    for name in names:
        value = getattr(policy, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{policy.name}: {name} must be a positive integer, got {value!r}.")


def _check_choice(policy: Policy, name: str, choices: tuple[str, ...]) -> None:
    if getattr(policy, name) not in choices:
        raise UserError(f"{policy.name}: {name} must be one of {', '.join(choices)}, got {getattr(policy, name)!r}.")


@dataclass(frozen=True)
class Budget(Policy):
    """s1's budget forcing alone: one trace per prompt."""

    name: ClassVar[str] = "budget"


@dataclass(frozen=True)
class Vote(Policy):
    """n traces, majority vote over their extracted answers (s1's parallel comparison)."""

    name: ClassVar[str] = "vote"
    parallel: ClassVar[bool] = True
    n: int = 8


MAX_TOP_K = 100
"""The most candidates a token's confidence may read (each generated token keeps that many log-probabilities)."""


@dataclass(frozen=True)
class DeepConf(Policy):
    """DeepConf. offline: score every trace (``confidence`` over its token confidences), keep the
    top ``keep_percent`` %, confidence-weighted vote. online: ``warmup`` traces set the threshold at
    their lowest group confidences' ``100 - keep_percent`` percentile; later traces stop as soon as
    their ``window``-token group falls below it; they start ``wave`` at a time (1: the paper's loop,
    one trace and then the consensus check; ``n - warmup``: all at once, as DeepConf's online example
    script), and sampling stops once the vote's winner holds ``consensus`` of the weight."""

    name: ClassVar[str] = "deepconf"
    needs_logprobs: ClassVar[bool] = True
    parallel: ClassVar[bool] = True
    n: int = 8
    mode: str = "offline"
    top_k: int = 20
    window: int = 2048
    confidence: str = "lowest"
    bottom_percent: float = 10.0
    keep_percent: float = 90.0
    warmup: int = 16
    consensus: float = 0.95
    wave: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self, "mode", ("offline", "online"))
        _check_choice(self, "confidence", ("lowest", "bottom", "tail", "mean"))
        _check_positive_int(self, "top_k", "window", "warmup", "wave")
        if self.top_k > MAX_TOP_K:
            raise UserError(f"deepconf: top_k={self.top_k} is above {MAX_TOP_K}: every token keeps top_k log-probabilities "
                            f"(the paper uses 20).")
        _check_range(self, "keep_percent", 0, 100, low_open=True)
        _check_range(self, "bottom_percent", 0, 100, low_open=True)
        _check_range(self, "consensus", 0, 1, low_open=True)
        if self.mode == "online" and self.n <= self.warmup:
            raise UserError(f"deepconf online: n={self.n} leaves no trace after the {self.warmup} warm-up traces; "
                            f"give more traces than the warm-up (e.g. n={2 * self.warmup}; the paper samples up to 512) "
                            f"or a smaller warm-up (e.g. warmup={max(1, self.n // 4)}).")


@dataclass(frozen=True)
class EarlyExit(Policy):
    """DEER: at each point where the model would end its thinking or re-check (writes the ignore
    string, "Wait"), fork a trial answer (the forced end and answer prefix, at most
    ``trial_tokens`` tokens); when its confidence (``confidence`` of the max-token probabilities)
    reaches ``threshold``, end the thinking there, else go on. At most ``max_trials`` trials."""

    name: ClassVar[str] = "early-exit"
    needs_logprobs: ClassVar[bool] = True
    threshold: float = 0.95
    trial_tokens: int = 20
    confidence: str = "geometric"
    max_trials: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range(self, "threshold", 0, 1)
        _check_positive_int(self, "trial_tokens", "max_trials")
        _check_choice(self, "confidence", ("geometric", "mean", "min"))


MAX_PENDING_PROBES = 4
"""Probes of one trace that may be undecided at once (each is a fork with its own cache)."""


@dataclass(frozen=True)
class Probe(Policy):
    """Dynasor-CoT: every ``interval`` thinking tokens fork a probe answer (at most
    ``probe_tokens`` tokens); end the thinking when the last ``agree`` probes give the same
    non-empty answer and none hedges. At most ``MAX_PENDING_PROBES`` probes of a trace run at once
    (a probe point that finds them all running is skipped: only when ``interval`` is under a
    quarter of ``probe_tokens``)."""

    name: ClassVar[str] = "probe"
    interval: int = 64
    probe_tokens: int = 20
    agree: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int(self, "interval", "probe_tokens", "agree")


@dataclass(frozen=True)
class ShortMOfK(Policy):
    """short-m@k: k = n traces in parallel; stop when the first ``m`` finish; vote among them."""

    name: ClassVar[str] = "short-m-of-k"
    parallel: ClassVar[bool] = True
    n: int = 8
    m: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int(self, "m")
        if self.m > self.n:
            raise UserError(f"short-m-of-k: m={self.m} is larger than k = n = {self.n}.")


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Budget, Vote, DeepConf, EarlyExit, Probe, ShortMOfK)}


def _convert(policy_class: type[Policy], key: str, raw):
    fields = {f.name: f for f in dataclasses.fields(policy_class)}
    if key not in fields:
        known = ", ".join(sorted(fields)) or "none"
        raise UserError(f"policy {policy_class.name!r} has no parameter {key!r} (its parameters: {known}).")
    kind = type(fields[key].default)
    if not isinstance(raw, str):
        if kind is int and isinstance(raw, float) and raw.is_integer():
            return int(raw)  # 5.0 from a JSON body is the integer 5
        return raw
    try:
        return kind(raw) if kind is not float else float(raw)
    except ValueError:
        raise UserError(f"{policy_class.name}: {key} must be a {kind.__name__}, got {raw!r}.") from None


def make_policy(name: str, args: dict | None = None, *, n: int | None = None) -> Policy:
    """The policy ``name`` with ``args`` (strings are converted to each parameter's type) and
    ``n`` traces (None: the policy's default). Unknown names or parameters raise UserError."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}.")
    policy_class = POLICIES[name]
    values = {key: _convert(policy_class, key, value) for key, value in (args or {}).items()}
    if n is not None:
        values["n"] = n
    return policy_class(**values)


def parse_policy_args(items: list[str] | None) -> dict[str, str]:
    """``["window=512", "mode=online"]`` (the repeated ``--policy-arg KEY=VALUE``) as a dict."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--policy-arg takes KEY=VALUE, got {item!r}.")
        out[key.strip()] = value.strip()
    return out
