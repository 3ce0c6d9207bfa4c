"""``t0s1 eval``: run tasks over a grid of budget forcing settings, grade, summarise, plot.

The grid is every ``max_thinking_tokens`` x every ``num_ignore``. Under greedy decoding each batch
of questions runs the whole grid with one prefix-sharing sweep (``Backend.sweep``); with sampling
(``samples`` K, temperature > 0) every (question, k) pair is generated per setting with its own seed.

With test-time policies (``EvalConfig.policies``, ``t0s1 eval --policy``) the grid is every policy
(each combination of its swept parameters, ``expand_policies``) x every budget x every num_ignore;
each setting's batches run ``generate_with_policy`` on the engine (trace j of sample k uses seed
``seed + SEED_STRIDE * k + j``), and a row is the reply of the trace that carries the vote, graded
by the task, with the policy's ``voted`` answer, ``total_tokens`` (every trace and probe) and
``seconds`` (the batch's wall time shared evenly among its questions). Without policies nothing
changes: the same settings, keys and rows as before policies existed.

Files in the output directory:
- ``samples/<task>.jsonl``: one row per (setting, question, k), appended and flushed per batch:
  prompt, thinking, output, token counts, extracted answer, gold, verdict.
- ``results.json``: accuracy per setting and the s1 metrics per method; it depends only on the
  samples, so a run killed and rerun gives the same file as one that ran through.
- ``results.md``: a markdown table per task; ``<task>.png``: the scaling plot.
- ``config.json``: the settings the samples were made with (a rerun must match them);
  ``policies.json``: with policies, each policy label's full parameters (labels leave out those
  at their defaults; a rerun whose label now stands for other values is refused, so a changed
  default never reuses rows made with the old one); ``timings.json``: wall time per task of each
  invocation.

Resuming: rows already logged are skipped by their (setting, id, k) key. Work is done in fixed
batches (the same questions in the same order every time), and a batch with any row missing is
recomputed as a whole, so every sample comes from the same computation in both cases.

Grading is not part of what a rerun must share: each row records its ``grader`` (``rules (KIND)``
or ``LLM judge (MODEL)``), and a rerun with another grader re-grades the logged rows it uses with
the current one (the generation is reused) before it generates anything, rewriting the log
atomically and saying so on stderr; the summary's grader is then the grader of every row.

Writes never leave half a file: rows are appended whole-line (a torn last line is dropped on
resume), results.json, results.md, the plots, config.json and timings.json are written to a
temporary file and renamed. A full disk stops the run with a ``UserError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t0s1.backends import Backend
from t0s1.errors import UserError
from t0s1.evaluation import metrics
from t0s1.evaluation.grading import Verdict
from t0s1.evaluation.plots import TOTAL_TOKENS_LABEL, plot_task
from t0s1.evaluation.tasks import Example, Task
from t0s1.files import atomic_path, read_json_object, remove_atomic_leftovers, write_text_atomic, writing
from t0s1.forcing import BudgetForcing, Result
from t0s1.jsonl import drop_partial_last_line
from t0s1.policies import POLICIES, Policy, make_policy
from t0s1.progress import ProgressBar

SEED_STRIDE = 1_000_003  # seeds of sample k and k+1 of one question are this far apart


ENGINE_BACKENDS = ("transformers", "llamacpp")
"""The backends policies run on: they need the loaded model (forks, log-probabilities)."""


@dataclass(frozen=True)
class Setting:
    max_thinking_tokens: int | str
    num_ignore: int
    policy: Policy | None = None

    @property
    def key(self) -> str:
        plain = f"budget={self.max_thinking_tokens},ignore={self.num_ignore}"
        return plain if self.policy is None else f"{plain},policy={self.policy.label()}"

    @property
    def budget_limit(self) -> int | None:
        return self.max_thinking_tokens if isinstance(self.max_thinking_tokens, int) else None


#: Fields of the run key that earlier versions did not record: a stored key without them still resumes.
LATER_KEY_FIELDS = ("reasoning_format", "tokenizer", "context_length", "dtype")


@dataclass
class EvalConfig:
    """What the samples depend on (model, backend and decoding), plus what is evaluated."""

    model: str
    backend: str = "transformers"
    max_thinking_tokens: list = field(default_factory=lambda: [1024])
    num_ignore: list = field(default_factory=lambda: [0])
    ignore_str: str = "Wait"
    max_answer_tokens: int = 512
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    end_phrase: str | None = None
    answer_prefix: str | None = None
    chat_template_kwargs: dict | None = None
    policies: list[Policy] = field(default_factory=list)
    """Test-time policies (``expand_policies``); empty: plain budget forcing, as before policies."""
    reasoning_format: str | None = None
    tokenizer: str | None = None
    context_length: int | None = None
    dtype: str | None = None
    """The loaded weights' dtype where the backend has one (``--dtype auto`` resolves per machine)."""

    def __post_init__(self) -> None:
        if not self.max_thinking_tokens:
            raise UserError("Give at least one thinking budget (--max-thinking-tokens 256,512).")
        if not self.num_ignore:
            raise UserError("Give at least one num_ignore value (--num-ignore 0,1,2).")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise UserError(f"--samples must be a positive integer, got {self.samples!r}.")
        if self.samples > 1 and self.temperature == 0:
            raise UserError(f"--samples {self.samples} with greedy decoding gives {self.samples} identical samples; add --temperature, e.g. 1.0.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"--batch-size must be a positive integer, got {self.batch_size!r}.")
        if self.policies:
            if self.backend not in ENGINE_BACKENDS:
                raise UserError(f"--policy runs on the engine backends ({', '.join(ENGINE_BACKENDS)}), which give the forks and "
                                f"log-probabilities policies need; got --backend {self.backend}.")
            for policy in self.policies:
                if policy.parallel and policy.n > 1 and self.greedy:
                    raise UserError(f"policy {policy.label()!r} runs n={policy.n} traces per question, which greedy decoding makes "
                                    "all the same; give a temperature, e.g. --temperature 0.6 --top-p 0.95.")
        for setting in self.settings:  # validate every combination now, before any generation
            self.budget(setting)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def settings(self) -> list[Setting]:
        if self.policies:
            return [Setting(budget, ignore, policy) for policy in self.policies
                    for budget in self.max_thinking_tokens for ignore in self.num_ignore]
        return [Setting(budget, ignore) for budget in self.max_thinking_tokens for ignore in self.num_ignore]

    def budget(self, setting: Setting, seed: int | None = None) -> BudgetForcing:
        return BudgetForcing(
            max_thinking_tokens=setting.max_thinking_tokens,
            num_ignore=setting.num_ignore,
            ignore_str=self.ignore_str,
            max_answer_tokens=self.max_answer_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed if seed is None else seed,
            end_phrase=self.end_phrase,
            answer_prefix=self.answer_prefix,
        )

    def generation_key(self) -> dict:
        """The fields a rerun in the same directory must share (the rest may change), unset ones
        included: a rerun that sets one is refused."""
        data = asdict(self)
        keys = ["model", "backend", "ignore_str", "max_answer_tokens", "temperature", "top_p", "seed", "batch_size",
                "end_phrase", "answer_prefix", "chat_template_kwargs", *LATER_KEY_FIELDS]
        return {key: data[key] for key in keys}


def expand_policies(names: list[str], args: dict[str, str] | None = None, n: int | None = None) -> list[Policy]:
    """The policies of ``--policy a,b --n N --policy-arg KEY=V1,V2``: every named policy with every
    combination of the values of the parameters it has (a comma-separated value is a sweep
    dimension). ``n`` (``--n`` or ``n=``) applies to the parallel policies, any other parameter to
    the named policies that have it; one that none has is a UserError, as are unknown names and
    bad values (``make_policy``). Policies that come out the same (same label) are kept once."""
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not names:
        raise UserError(f"--policy: no policy given; choose from {', '.join(POLICIES)} (comma-separated).")
    for name in names:
        if name not in POLICIES:
            make_policy(name)  # the UserError naming the known policies
    values: dict[str, list[str]] = {}
    for key, raw in (args or {}).items():
        values[key] = list(dict.fromkeys(part.strip() for part in str(raw).split(",") if part.strip()))
        if not values[key]:
            raise UserError(f"--policy-arg {key}=: give a value, or several separated by commas (e.g. {key}=10,90).")
    if n is not None:
        if "n" in values:
            raise UserError("Give n once: --n N or --policy-arg n=N1,N2, not both.")
        values["n"] = [str(n)]

    def has(name: str, key: str) -> bool:
        if key == "n":
            return POLICIES[name].parallel
        return key in {f.name for f in dataclasses.fields(POLICIES[name])}

    for key in values:
        if not any(has(name, key) for name in names):
            if key == "n":
                parallel = ", ".join(name for name, p in POLICIES.items() if p.parallel)
                raise UserError(f"--n applies to the policies that run several traces ({parallel}); none of {', '.join(names)} does.")
            try:  # the policies' own message, with each one's parameters
                for name in names:
                    make_policy(name, {key: values[key][0]})
            except UserError as error:
                raise UserError(f"--policy-arg {key}: none of the policies {', '.join(names)} has it ({error})") from None
    policies: dict[str, Policy] = {}
    for name in names:
        keys = [key for key in values if has(name, key)]
        for combination in itertools.product(*(values[key] for key in keys)):
            policy = make_policy(name, dict(zip(keys, combination, strict=True)))
            policies.setdefault(policy.label(), policy)
    return list(policies.values())


# --------------------------------------------------------------------------------------------
# Grading a sample


VERDICT_FIELDS = ("extracted", "gold", "correct", "rule_correct", "grader")
"""The fields of a sample row that grading writes (the rest is the generation)."""


def grader_name(task: Task, judge=None) -> str:
    """Who grades ``task``'s samples: ``LLM judge (MODEL)`` or the task's rules (``rules (KIND)``).
    A task may describe its own rules (``grader`` attribute, e.g. ``rag eval``'s extra rule)."""
    if judge is not None:
        return f"LLM judge ({judge.model})"
    return getattr(task, "grader", None) or f"rules ({task.answer_kind})"


def grade_output(task: Task, example: Example, output: str, judge=None) -> dict:
    """The verdict fields of a sample row: extracted, gold, correct (and the judge's)."""
    verdict: Verdict = task.grade_example(example, output)
    row = verdict.to_dict()
    if judge is not None:
        row["rule_correct"] = verdict.correct
        row["correct"] = bool(judge.judge(example.prompt, output, example.gold))
    return row


# --------------------------------------------------------------------------------------------
# The run


class SampleLog:
    """``samples/<task>.jsonl``: rows appended per batch, keyed by (setting, id, sample)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str, int], dict] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            complete = drop_partial_last_line(self.path)  # a run killed mid-write leaves a partial last line
        except UnicodeDecodeError:
            raise UserError(f"{self.path} is not UTF-8 text: not a sample log of t0s1 eval; use a fresh --out directory.") from None
        for number, line in enumerate(complete.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.rows[(row["setting"], row["id"], row["sample"])] = row
            except (json.JSONDecodeError, KeyError, TypeError):  # TypeError: a row that is not an object
                raise UserError(f"{self.path}, line {number}: not a sample row of t0s1 eval; use a fresh --out directory.") from None

    def has(self, key: tuple[str, str, int]) -> bool:
        return key in self.rows

    def append(self, rows: list[dict]) -> None:
        rows = [row for row in rows if (row["setting"], row["id"], row["sample"]) not in self.rows]
        if not rows:
            return
        with writing(self.path, "The rows logged before are kept (a torn last line is dropped on resume)."):
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                handle.flush()
        for row in rows:
            self.rows[(row["setting"], row["id"], row["sample"])] = row

    def regrade(self, task: Task, examples: list[Example], judge=None) -> dict[str, int]:
        """Grade again, with the current grader, the rows of ``examples`` another grader graded;
        rewrite the log (atomically) if any. Returns how many rows each earlier grader had."""
        grader = grader_name(task, judge)
        by_id = {example.id: example for example in examples}
        stale = [row for row in self.rows.values() if row["id"] in by_id and row.get("grader") != grader]
        if not stale:
            return {}
        earlier: dict[str, int] = {}
        for row in stale:
            previous = row.get("grader") or "an unrecorded grader"
            earlier[previous] = earlier.get(previous, 0) + 1
            for name in VERDICT_FIELDS:
                row.pop(name, None)
            row.update(grade_output(task, by_id[row["id"]], row["output"], judge), grader=grader)
        write_text_atomic(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows.values()))
        return earlier


def sample_row(task: Task, example: Example, setting: Setting, k: int, result: Result, judge=None) -> dict:
    row = {
        "task": task.name,
        "setting": setting.key,
        "max_thinking_tokens": setting.max_thinking_tokens,
        "num_ignore": setting.num_ignore,
        "id": example.id,
        "sample": k,
        "prompt": example.prompt,
        "thinking": result.thinking,
        "output": result.answer,
        "thinking_tokens": result.thinking_tokens,
        "answer_tokens": result.answer_tokens,
        "num_ignored": result.num_ignored,
        "hit_budget": result.hit_budget,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
    }
    row.update(grade_output(task, example, result.answer, judge), grader=grader_name(task, judge))
    return row


def policy_row(task: Task, example: Example, setting: Setting, k: int, outcome, seconds: float, judge=None) -> dict:
    """The row of a policy's run on one question: the carrier trace's reply (graded by the task),
    the vote, the tokens of every trace and probe, and a short record of each trace."""
    row = sample_row(task, example, setting, k, outcome.result, judge)
    row.update(
        policy=setting.policy.label(),
        voted=outcome.voted,
        total_tokens=outcome.total_tokens,
        probes=outcome.probes,
        seconds=round(seconds, 4),
        traces=[{
            "answer": trace.answer,
            "thinking_tokens": trace.result.thinking_tokens,
            "answer_tokens": trace.result.answer_tokens,
            "generated_tokens": trace.generated_tokens,
            "stopped_early": trace.stopped_early,
            "voted": trace.voted,
            "confidence": None if trace.confidence is None else round(float(trace.confidence), 6),
            "finish_reason": trace.result.finish_reason,
        } for trace in outcome.traces],
    )
    return row


def run_eval(
    backend: Backend,
    tasks: list[Task],
    config: EvalConfig,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    judge=None,
    progress: bool = True,
    on_batch: Callable[[str, int], None] | None = None,
) -> dict:
    """Run (or resume) the evaluation and write every file; returns the results."""
    out = Path(out_dir)
    if config.policies and getattr(backend, "lm", None) is None:
        raise UserError(f"--policy runs on the engine backends ({', '.join(ENGINE_BACKENDS)}); the {backend.name} backend "
                        "has no loaded model to fork traces from.")
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "samples"):  # what a run killed between a write and its rename left
        remove_atomic_leftovers(folder)
    check_run_key(out / "config.json", config.generation_key(), holds="samples made with other settings", later=LATER_KEY_FIELDS)
    if config.policies:
        check_policy_parameters(out / "policies.json", config.policies)
    loaded = [(task, task.load(data_dir, limit)) for task in tasks]
    total = sum(len(examples) * len(config.settings) * config.samples for _, examples in loaded)
    timings = {}
    with ProgressBar(progress, total, "evaluating", unit="samples") as bar:
        for task, examples in loaded:
            started = time.perf_counter()
            log = SampleLog(out / "samples" / f"{task.name}.jsonl")
            regraded = log.regrade(task, examples, judge)
            if regraded:
                earlier = ", ".join(f"{count} by {name}" for name, count in regraded.items())
                print(
                    f"{task.name}: re-graded {sum(regraded.values())} logged samples with {grader_name(task, judge)} "
                    f"(graded before {earlier}); their generations are reused.",
                    file=sys.stderr,
                )
            batches = _policy_batches if config.policies else _greedy_batches if config.greedy else _sampling_batches
            for batch_number, (count, compute) in enumerate(batches(backend, task, examples, config, log, judge)):
                if compute is not None:
                    log.append(compute())
                    if on_batch is not None:
                        on_batch(task.name, batch_number)
                bar.advance(count)
            timings[task.name] = round(time.perf_counter() - started, 3)
    results = summarize_run(loaded, config, {task.name: SampleLog(out / "samples" / f"{task.name}.jsonl").rows for task, _ in loaded}, backend_name=backend.name, limit=limit, judge=judge)
    write_outputs(out, results)
    _append_timings(out / "timings.json", timings)
    return results


def _greedy_batches(backend, task, examples, config, log, judge):
    """(samples in the batch, a function computing its rows or None when all are logged)."""
    settings = config.settings
    for start in range(0, len(examples), config.batch_size):
        batch = examples[start : start + config.batch_size]
        missing = any(not log.has((s.key, e.id, 0)) for e in batch for s in settings)

        def compute(batch=batch):
            budgets = [config.budget(s) for s in settings]
            if len(budgets) == 1:
                results = [[r] for r in backend.generate([e.prompt for e in batch], budgets[0])]
            else:
                results = backend.sweep([e.prompt for e in batch], budgets)
            return [sample_row(task, e, s, 0, results[i][j], judge) for i, e in enumerate(batch) for j, s in enumerate(settings)]

        yield len(batch) * len(settings), (compute if missing else None)


def _sampling_batches(backend, task, examples, config, log, judge):
    position = {e.id: i for i, e in enumerate(examples)}
    pairs = [(e, k) for e in examples for k in range(config.samples)]
    for setting in config.settings:
        for start in range(0, len(pairs), config.batch_size):
            batch = pairs[start : start + config.batch_size]
            missing = any(not log.has((setting.key, e.id, k)) for e, k in batch)

            def compute(batch=batch, setting=setting):
                # Per-prompt settings keep their own seeds: a sample's seed depends only on
                # (question, k), not on the batch it lands in.
                budgets = [config.budget(setting, seed=sample_seed(config.seed, position[e.id], k)) for e, k in batch]
                results = backend.generate([e.prompt for e, _ in batch], budgets)
                return [sample_row(task, e, setting, k, r, judge) for (e, k), r in zip(batch, results, strict=True)]

            yield len(batch), (compute if missing else None)


def _policy_batches(backend, task, examples, config, log, judge):
    """Per policy setting and sample k, batches of questions run by ``generate_with_policy``."""
    from t0s1.evaluation.grading import extract_answer
    from t0s1.policies.run import generate_with_policy

    def extract(text: str) -> str | None:
        return extract_answer(text, task.answer_kind)

    template_kwargs = getattr(backend, "chat_template_kwargs", None) or config.chat_template_kwargs
    for setting in config.settings:
        for k in range(config.samples):
            for start in range(0, len(examples), config.batch_size):
                batch = examples[start : start + config.batch_size]
                missing = any(not log.has((setting.key, e.id, k)) for e in batch)

                def compute(batch=batch, setting=setting, k=k):
                    # trace j of sample k: seed + SEED_STRIDE * k + j (the same for every question of the batch)
                    budget = config.budget(setting, seed=config.seed + SEED_STRIDE * k)
                    started = time.perf_counter()
                    outcomes = generate_with_policy(backend.lm, [e.prompt for e in batch], budget, setting.policy,
                                                    chat_template_kwargs=template_kwargs, extract=extract)
                    share = (time.perf_counter() - started) / len(batch)
                    return [policy_row(task, e, setting, k, o, share, judge) for e, o in zip(batch, outcomes, strict=True)]

                yield len(batch), (compute if missing else None)


def sample_seed(base: int, question: int, k: int) -> int:
    """The seed of sample ``k`` of question number ``question`` (also used by the harness model)."""
    return base + SEED_STRIDE * k + question + 1_000_000


# --------------------------------------------------------------------------------------------
# Results


def summarize_run(loaded, config: EvalConfig, rows_by_task: dict, *, backend_name: str, limit, judge=None) -> dict:
    results = {
        "model": config.model,
        "backend": backend_name,
        "config": {
            "max_thinking_tokens": config.max_thinking_tokens,
            "num_ignore": config.num_ignore,
            "ignore_str": config.ignore_str,
            "max_answer_tokens": config.max_answer_tokens,
            "samples": config.samples,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "seed": config.seed,
            "limit": limit,
        },
        "scaling_unit": metrics.SCALING_UNIT,
        "tasks": {},
    }
    if config.policies:
        results["config"]["policies"] = [policy.label() for policy in config.policies]
        results["scaling_unit"] = metrics.TOTAL_SCALING_UNIT
    for task, examples in loaded:
        results["tasks"][task.name] = _summarize_task(task, examples, config, rows_by_task[task.name], judge)
    return results


def _summarize_task(task: Task, examples: list[Example], config: EvalConfig, rows: dict, judge) -> dict:
    settings_out = []
    by_setting = {}
    for setting in config.settings:
        samples = [[rows[(setting.key, e.id, k)] for k in range(config.samples) if (setting.key, e.id, k) in rows] for e in examples]
        flat = [row for per_question in samples for row in per_question]
        by_setting[setting] = samples
        if not flat:
            continue
        entry = {
            "setting": setting.key,
            "max_thinking_tokens": setting.max_thinking_tokens,
            "num_ignore": setting.num_ignore,
            "samples": len(flat),
            "correct": sum(row["correct"] for row in flat),
            "accuracy": round(100.0 * sum(row["correct"] for row in flat) / len(flat), 4),
            "avg_thinking_tokens": round(sum(row["thinking_tokens"] for row in flat) / len(flat), 4),
            "avg_answer_tokens": round(sum(row["answer_tokens"] for row in flat) / len(flat), 4),
            "hit_budget": round(100.0 * sum(row["hit_budget"] for row in flat) / len(flat), 4),
            "no_answer": round(100.0 * sum(row["extracted"] is None for row in flat) / len(flat), 4),
            "control": round(metrics.control([(row["thinking_tokens"], setting.budget_limit) for row in flat]), 4),
        }
        entry.update(_token_fields(flat))
        if setting.policy is not None:
            entry["policy"] = setting.policy.label()
            seconds = [row.get("seconds") for row in flat]
            entry["seconds"] = None if None in seconds else round(sum(seconds), 4)
        if config.samples > 1:
            complete = [q for q in samples if len(q) == config.samples]
            entry["majority_vote"] = round(100.0 * sum(_majority_correct(q) for q in complete) / len(complete), 4) if complete else None
            entry["pass_at_k"] = {
                str(k): round(100.0 * sum(metrics.pass_at_k(len(q), sum(r["correct"] for r in q), k) for q in complete) / len(complete), 4)
                for k in _powers_of_two(config.samples)
            } if complete else {}
        settings_out.append(entry)

    tokens_field = "avg_total_tokens" if config.policies else "avg_thinking_tokens"

    def points(chosen: list[Setting]) -> tuple[list, list]:
        """The runs' (tokens, accuracy) points, and each run's (average thinking tokens, budget) for
        s1's Control."""
        pts, runs = [], []
        for setting in chosen:
            entry = next((s for s in settings_out if s["setting"] == setting.key), None)
            if entry is None:
                continue
            pts.append((entry[tokens_field], entry["accuracy"]))
            runs.append((entry["avg_thinking_tokens"], setting.budget_limit))
        return pts, runs

    methods = {}
    base_ignore = config.num_ignore[0]
    largest = _largest_budget(config.max_thinking_tokens)
    if config.policies:
        # s1's metrics per policy, over the budgets (and the Waits), against average total tokens
        for policy in config.policies:
            label = policy.label()
            methods[label] = metrics.summarize(*points([Setting(b, base_ignore, policy) for b in config.max_thinking_tokens]))
            if len(config.num_ignore) > 1:
                methods[f"{label} (Wait)"] = metrics.summarize(*points([Setting(largest, n, policy) for n in config.num_ignore]))
        methods = {name: m for name, m in methods.items() if m["points"]}
        return _task_summary(task, examples, judge, settings_out, methods)
    budget_settings = [Setting(b, base_ignore) for b in config.max_thinking_tokens]
    if len(budget_settings) > 1:
        methods["budget"] = metrics.summarize(*points(budget_settings))
    wait_settings = [Setting(largest, n) for n in config.num_ignore]
    if len(wait_settings) > 1:
        methods["wait"] = metrics.summarize(*points(wait_settings))
    if config.samples > 1:
        samples = by_setting[Setting(largest, base_ignore)]
        complete = [q for q in samples if len(q) == config.samples]
        if complete:
            pts = []
            for k in _powers_of_two(config.samples):
                accuracy = 100.0 * sum(_majority_correct(q[:k]) for q in complete) / len(complete)
                tokens = sum(sum(r["thinking_tokens"] for r in q[:k]) for q in complete) / len(complete)
                pts.append((tokens, accuracy))
            methods["majority_vote"] = metrics.summarize(pts)
    return _task_summary(task, examples, judge, settings_out, methods)


def _task_summary(task: Task, examples: list[Example], judge, settings_out: list[dict], methods: dict) -> dict:
    return {
        "examples": len(examples),
        "answer_kind": task.answer_kind,
        "prompt": "question and options A-D (shuffled per question)" if task.multiple_choice else "the bare question",
        "grader": grader_name(task, judge),
        "settings": settings_out,
        "methods": methods,
    }


def _token_fields(rows: list[dict]) -> dict:
    """Every token generated for the rows (a policy's: all its traces and probes; plain budget
    forcing's: thinking + answer), its average per sample and per correct answer (None: none right)."""
    total = sum(row.get("total_tokens", row["thinking_tokens"] + row["answer_tokens"]) for row in rows)
    correct = sum(row["correct"] for row in rows)
    return {
        "total_tokens": total,
        "avg_total_tokens": round(total / len(rows), 4),
        "tokens_per_correct": round(total / correct, 4) if correct else None,
    }


def _majority_correct(rows: list[dict]) -> bool:
    answer = metrics.majority_answer([row["extracted"] for row in rows])
    return answer is not None and any(row["correct"] for row in rows if row["extracted"] == answer)


def _powers_of_two(limit: int) -> list[int]:
    ks, k = [], 1
    while k < limit:
        ks.append(k)
        k *= 2
    return [*ks, limit]


def _largest_budget(budgets: list) -> int | str:
    return "auto" if "auto" in budgets else max(budgets)


def write_outputs(out: Path, results: dict) -> None:
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "results.md", markdown_report(results))
    for name, task in results["tasks"].items():
        if task["methods"]:
            with atomic_path(out / f"{name}.png") as temporary:
                if "policies" in results["config"]:  # one curve per policy (named by its label) against total tokens
                    plot_task(name, task["methods"], temporary, model=results["model"], x_label=TOTAL_TOKENS_LABEL, labels={})
                else:
                    plot_task(name, task["methods"], temporary, model=results["model"])
        else:  # nothing to plot now: an earlier run's plot would not match results.json
            (out / f"{name}.png").unlink(missing_ok=True)


def markdown_report(results: dict) -> str:
    lines = [f"# Evaluation of {results['model']} ({results['backend']} backend)", ""]
    for name, task in results["tasks"].items():
        lines += [f"## {name}", "", f"{task['examples']} questions; prompt: {task['prompt']}; grader: {task['grader']}.", ""]
        header = ["max thinking tokens", "num_ignore", "accuracy (%)", "avg thinking tokens", "hit budget (%)", "no answer (%)", "samples"]
        multi = any("majority_vote" in s for s in task["settings"])
        policies = any("policy" in s for s in task["settings"])
        if multi:
            header += ["majority vote (%)"]
        if policies:
            header = ["policy", *header, "total tokens", "tokens per correct", "seconds"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for s in task["settings"]:
            cells = [s["max_thinking_tokens"], s["num_ignore"], f"{s['accuracy']:.1f}", f"{s['avg_thinking_tokens']:.1f}", f"{s['hit_budget']:.0f}", f"{s['no_answer']:.0f}", s["samples"]]
            if multi:
                cells.append("" if s.get("majority_vote") is None else f"{s['majority_vote']:.1f}")
            if policies:
                cells = [s.get("policy", ""), *cells, s["total_tokens"], _fmt(s["tokens_per_correct"]), _fmt(s.get("seconds"), 2)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        if task["methods"]:
            lines += ["", f"| method | Control (%) | Scaling ({results['scaling_unit']}) | Performance (%) |", "| --- | --- | --- | --- |"]
            for method, m in task["methods"].items():
                cells = [method, _fmt(m["control"]), _fmt(m["scaling"], 2), _fmt(m["performance"])]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


RUN_KEY_VERSION = 2
"""Written in every run key. Keys without it come from earlier versions, which left out the fields
that were unset (None) and, before they were recorded, the ``later`` fields."""


def check_run_key(path: Path, key: dict, *, holds: str, retired: tuple[str, ...] = (), later: tuple[str, ...] = ()) -> None:
    """Write ``key`` (what the samples in ``path``'s folder depend on) on the first run; on a rerun,
    refuse a different one, naming the fields that changed. ``holds`` says what the folder holds
    ("samples made with other settings"); ``retired``: fields earlier versions wrote that no longer
    bind a rerun (they are ignored in a stored key); ``later``: fields the earliest versions did not
    write (a stored key of such a version is compared without them)."""
    key = {**key, "key_version": RUN_KEY_VERSION}
    if path.exists():
        stored = read_json_object(path)
        if stored is None:
            raise UserError(f"{path} is not readable JSON; it is not the settings file of a t0s1 run. Choose a new --out directory.")
        stored = {name: value for name, value in stored.items() if name not in retired}
        if "key_version" not in stored:
            key = _as_earlier_versions_wrote(key, stored, later)
        if stored != key:
            changed = sorted(name for name in set(stored) | set(key) if stored.get(name) != key.get(name))
            raise UserError(
                f"{path.parent} holds {holds} ({', '.join(changed)} differ); "
                "rerun with the same settings to resume, or choose a new --out directory."
            )
    else:
        write_text_atomic(path, json.dumps(key, indent=2) + "\n")


def check_policy_parameters(path: Path, policies: list[Policy]) -> None:
    """Rows are keyed by policy labels, which leave out parameters at their defaults: record each
    label's full parameters in ``path`` and refuse a rerun in which a recorded label stands for
    other values (a default changed since), naming them; new labels are added."""
    current = json.loads(json.dumps({policy.label(): policy.parameters() for policy in policies}))
    stored = read_json_object(path) if path.exists() else {}
    if stored is None:
        raise UserError(f"{path} is not readable JSON; it is not the policy file of a t0s1 run. Choose a new --out directory.")
    changed = []
    for label in sorted(current.keys() & stored.keys()):
        before = stored[label] if isinstance(stored[label], dict) else {}
        differ = [f"{name} {before.get(name)!r} then, {value!r} now" for name, value in current[label].items() if before.get(name) != value]
        differ += [f"{name} {before[name]!r} then, none now" for name in before.keys() - current[label].keys()]
        if differ:
            changed.append(f"{label}: {', '.join(differ)}")
    if changed:
        raise UserError(f"{path.parent} holds samples of policies whose defaults have changed since ({'; '.join(changed)}); "
                        "its rows are not reused for the new values: choose a new --out directory.")
    if current.keys() - stored.keys():
        write_text_atomic(path, json.dumps({**stored, **current}, indent=2) + "\n")


def _as_earlier_versions_wrote(key: dict, stored: dict, later: tuple[str, ...]) -> dict:
    """``key`` as a version before ``RUN_KEY_VERSION`` wrote it, to compare with a key it stored:
    no version, no field that was None, and no ``later`` field if ``stored`` has none of them."""
    recorded_later = any(name in stored for name in later)
    return {name: value for name, value in key.items()
            if name != "key_version" and (name in stored or (value is not None and (recorded_later or name not in later)))}


def _append_timings(path: Path, timings: dict) -> None:
    try:
        runs = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    except (json.JSONDecodeError, UnicodeDecodeError):
        runs = []  # timings are informative only; an unreadable file starts over
    if not isinstance(runs, list):
        runs = []
    runs.append({"seconds_per_task": timings, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_text_atomic(path, json.dumps(runs, indent=2) + "\n")
