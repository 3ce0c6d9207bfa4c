"""``t0s1 eval``: run tasks over a grid of budget forcing settings, grade, summarise, plot.

The grid is every ``max_thinking_tokens`` x every ``num_ignore``. Under greedy decoding each batch
of questions runs the whole grid with one prefix-sharing sweep (``Backend.sweep``); with sampling
(``samples`` K, temperature > 0) every (question, k) pair is generated per setting with its own seed.

Files in the output directory:
- ``samples/<task>.jsonl``: one row per (setting, question, k), appended and flushed per batch:
  prompt, thinking, output, token counts, extracted answer, gold, verdict.
- ``results.json``: accuracy per setting and the s1 metrics per method; it depends only on the
  samples, so a run killed and rerun gives the same file as one that ran through.
- ``results.md``: a markdown table per task; ``<task>.png``: the scaling plot.
- ``config.json``: the settings the samples were made with (a rerun must match them);
  ``timings.json``: wall time per task of each invocation.

Resuming: rows already logged are skipped by their (setting, id, k) key. Work is done in fixed
batches (the same questions in the same order every time), and a batch with any row missing is
recomputed as a whole, so every sample comes from the same computation in both cases.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t0s1.backends import Backend
from t0s1.errors import UserError
from t0s1.evaluation import metrics
from t0s1.evaluation.grading import Verdict
from t0s1.evaluation.plots import plot_task
from t0s1.evaluation.tasks import Example, Task
from t0s1.forcing import BudgetForcing, Result
from t0s1.jsonl import drop_partial_last_line
from t0s1.progress import ProgressBar

SEED_STRIDE = 1_000_003  # seeds of sample k and k+1 of one question are this far apart


@dataclass(frozen=True)
class Setting:
    max_thinking_tokens: int | str
    num_ignore: int

    @property
    def key(self) -> str:
        return f"budget={self.max_thinking_tokens},ignore={self.num_ignore}"

    @property
    def budget_limit(self) -> int | None:
        return self.max_thinking_tokens if isinstance(self.max_thinking_tokens, int) else None


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
        for setting in self.settings:  # validate every combination now, before any generation
            self.budget(setting)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def settings(self) -> list[Setting]:
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
        """The fields a rerun in the same directory must share (the rest may change)."""
        data = asdict(self)
        keys = ["model", "backend", "ignore_str", "max_answer_tokens", "temperature", "top_p", "seed", "batch_size"]
        keys += [key for key in ("end_phrase", "answer_prefix", "chat_template_kwargs") if data[key] is not None]
        return {key: data[key] for key in keys}


# --------------------------------------------------------------------------------------------
# Grading a sample


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
        complete = drop_partial_last_line(self.path)  # a run killed mid-write leaves a partial last line
        for number, line in enumerate(complete.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.rows[(row["setting"], row["id"], row["sample"])] = row
            except (json.JSONDecodeError, KeyError):
                raise UserError(f"{self.path}, line {number}: not a sample row of t0s1 eval; use a fresh --out directory.") from None

    def has(self, key: tuple[str, str, int]) -> bool:
        return key in self.rows

    def append(self, rows: list[dict]) -> None:
        rows = [row for row in rows if (row["setting"], row["id"], row["sample"]) not in self.rows]
        if not rows:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            handle.flush()
        for row in rows:
            self.rows[(row["setting"], row["id"], row["sample"])] = row


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
    row.update(grade_output(task, example, result.answer, judge))
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
    out.mkdir(parents=True, exist_ok=True)
    check_run_key(out / "config.json", config.generation_key(), holds="samples made with other settings")
    loaded = [(task, task.load(data_dir, limit)) for task in tasks]
    total = sum(len(examples) * len(config.settings) * config.samples for _, examples in loaded)
    timings = {}
    with ProgressBar(progress, total, "evaluating", unit="samples") as bar:
        for task, examples in loaded:
            started = time.perf_counter()
            log = SampleLog(out / "samples" / f"{task.name}.jsonl")
            batches = _greedy_batches if config.greedy else _sampling_batches
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
        if config.samples > 1:
            complete = [q for q in samples if len(q) == config.samples]
            entry["majority_vote"] = round(100.0 * sum(_majority_correct(q) for q in complete) / len(complete), 4) if complete else None
            entry["pass_at_k"] = {
                str(k): round(100.0 * sum(metrics.pass_at_k(len(q), sum(r["correct"] for r in q), k) for q in complete) / len(complete), 4)
                for k in _powers_of_two(config.samples)
            } if complete else {}
        settings_out.append(entry)

    def points(chosen: list[Setting]) -> tuple[list, list]:
        pts, budget_samples = [], []
        for setting in chosen:
            entry = next((s for s in settings_out if s["setting"] == setting.key), None)
            if entry is None:
                continue
            pts.append((entry["avg_thinking_tokens"], entry["accuracy"]))
            budget_samples += [(row["thinking_tokens"], setting.budget_limit) for q in by_setting[setting] for row in q]
        return pts, budget_samples

    methods = {}
    base_ignore = config.num_ignore[0]
    budget_settings = [Setting(b, base_ignore) for b in config.max_thinking_tokens]
    if len(budget_settings) > 1:
        methods["budget"] = metrics.summarize(*points(budget_settings))
    largest = _largest_budget(config.max_thinking_tokens)
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
    return {
        "examples": len(examples),
        "answer_kind": task.answer_kind,
        "prompt": "question and options A-D (shuffled per question)" if task.multiple_choice else "the bare question",
        "grader": "LLM judge" if judge is not None else f"rules ({task.answer_kind})",
        "settings": settings_out,
        "methods": methods,
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
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown_report(results), encoding="utf-8")
    for name, task in results["tasks"].items():
        if task["methods"]:
            plot_task(name, task["methods"], out / f"{name}.png", model=results["model"])


def markdown_report(results: dict) -> str:
    lines = [f"# Evaluation of {results['model']} ({results['backend']} backend)", ""]
    for name, task in results["tasks"].items():
        lines += [f"## {name}", "", f"{task['examples']} questions; prompt: {task['prompt']}; grader: {task['grader']}.", ""]
        header = ["max thinking tokens", "num_ignore", "accuracy (%)", "avg thinking tokens", "hit budget (%)", "no answer (%)", "samples"]
        multi = any("majority_vote" in s for s in task["settings"])
        if multi:
            header += ["majority vote (%)"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for s in task["settings"]:
            cells = [s["max_thinking_tokens"], s["num_ignore"], f"{s['accuracy']:.1f}", f"{s['avg_thinking_tokens']:.1f}", f"{s['hit_budget']:.0f}", f"{s['no_answer']:.0f}", s["samples"]]
            if multi:
                cells.append("" if s.get("majority_vote") is None else f"{s['majority_vote']:.1f}")
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


def check_run_key(path: Path, key: dict, *, holds: str) -> None:
    """Write ``key`` (what the samples in ``path``'s folder depend on) on the first run; on a rerun,
    refuse a different one, naming the fields that changed. ``holds`` says what the folder holds
    ("samples made with other settings")."""
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != key:
            changed = sorted(name for name in set(stored) | set(key) if stored.get(name) != key.get(name))
            raise UserError(
                f"{path.parent} holds {holds} ({', '.join(changed)} differ); "
                "rerun with the same settings to resume, or choose a new --out directory."
            )
    else:
        path.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")


def _append_timings(path: Path, timings: dict) -> None:
    runs = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    runs.append({"seconds_per_task": timings, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    path.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
