"""``t0s1 eval`` (budget sweeps over benchmarks) and ``t0s1 grade`` (grade existing outputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from t0s1.cli_support import (
    BUDGET_DEFAULTS,
    AnswerPrefixOption,
    BackendOption,
    ChatTemplateKwargsOption,
    ContextLengthOption,
    EndPhraseOption,
    NOption,
    PolicyArgOption,
    ReasoningFormatOption,
    ThinkingOption,
    exit_on_user_error,
    parse_chat_template_kwargs,
    parse_int_list,
)
from t0s1.errors import UserError
from t0s1.evaluation.tasks import DATA_DIR_ENV, TASKS, get_task, parse_task_list
from t0s1.files import check_output_directory, check_output_file, write_text_atomic
from t0s1.jsonl import read_jsonl
from t0s1.models import EMBEDDED_MODEL

console = Console()

EvalPolicyOption = Annotated[
    str | None,
    typer.Option(
        "--policy",
        help="Test-time policies to compare, comma-separated: budget, vote, deepconf, early-exit, probe, short-m-of-k "
        "(docs/policies.md). Each is a sweep dimension beside the budgets and num_ignore; --policy-arg values "
        "separated by commas (keep_percent=10,90) are swept too. Default: plain budget forcing.",
    ),
]


def parse_policies(policy: str | None, n: int | None, policy_arg: list[str] | None) -> list:
    """The policies of ``--policy a,b --n N --policy-arg K=V1,V2`` (none without --policy)."""
    if policy is None:
        if n is not None or policy_arg:
            raise UserError("--n and --policy-arg set a policy's parameters; give the policies with --policy, e.g. --policy vote,deepconf.")
        return []
    from t0s1.evaluation.runner import expand_policies
    from t0s1.policies import parse_policy_args

    return expand_policies(policy.split(","), parse_policy_args(policy_arg), n)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("grade")(grade_command)


def _weights_dtype(engine) -> str | None:
    """The dtype of the loaded PyTorch weights (what ``--dtype auto`` chose here); None for
    backends without them (llama.cpp's GGUF, an endpoint)."""
    dtype = getattr(getattr(getattr(engine, "lm", None), "model", None), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _judge(judge_model: str | None, judge_base_url: str | None):
    if not judge_model:
        return None
    from t0s1.evaluation.judge import LLMJudge

    return LLMJudge(judge_model, base_url=judge_base_url)


@exit_on_user_error
def eval_command(
    model: str = typer.Option(EMBEDDED_MODEL, "--model", "-m", help="Model directory, .gguf file, hub id, or the served model name (--backend openai)."),
    tasks: str = typer.Option(None, "--tasks", "-t", help=f"Comma-separated tasks: {', '.join(TASKS)}."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (rerun with the same one to resume)."),
    max_thinking_tokens: str = typer.Option(str(BUDGET_DEFAULTS.max_thinking_tokens), "--max-thinking-tokens", help="Thinking budgets to sweep, e.g. 256,512,1024 (or auto)."),
    num_ignore: str = typer.Option(str(BUDGET_DEFAULTS.num_ignore), "--num-ignore", help="Numbers of ignored ends of thinking ('Wait') to sweep, e.g. 0,1,2."),
    ignore_str: str = typer.Option(BUDGET_DEFAULTS.ignore_str, "--ignore-str", help="String appended when the end of thinking is ignored."),
    max_answer_tokens: int = typer.Option(BUDGET_DEFAULTS.max_answer_tokens, "--max-answer-tokens", help="Tokens allowed for the answer after the thinking."),
    limit: int = typer.Option(None, "--limit", help="Evaluate only the first N questions of each task."),
    samples: int = typer.Option(1, "--samples", help="Samples per question (majority vote and pass@k); needs --temperature > 0."),
    temperature: float = typer.Option(BUDGET_DEFAULTS.temperature, "--temperature", help="0: greedy (budget sweeps share one thinking trace)."),
    top_p: float = typer.Option(BUDGET_DEFAULTS.top_p, "--top-p"),
    seed: int = typer.Option(BUDGET_DEFAULTS.seed, "--seed", help="Base seed; each (question, sample) has its own seed derived from it."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions generated together."),
    backend: BackendOption = "auto",
    base_url: str = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint for --backend openai, e.g. http://localhost:8000/v1."),
    api_key: str = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="API key for --base-url (default: $OPENAI_API_KEY)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer for --backend openai (default: --model)."),
    context_length: ContextLengthOption = None,
    data_dir: Path = typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV, help=f"Folder with the benchmark JSONL files (default: ${DATA_DIR_ENV}; else the hub)."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    reasoning_format: ReasoningFormatOption = None,
    end_phrase: EndPhraseOption = None,
    answer_prefix: AnswerPrefixOption = None,
    thinking: ThinkingOption = None,
    chat_template_kwargs: ChatTemplateKwargsOption = None,
    policy: EvalPolicyOption = None,
    n: NOption = None,
    policy_arg: PolicyArgOption = None,
    judge_model: str = typer.Option(None, "--judge-model", help="Grade with an LLM judge (s1: gpt-4o-mini) instead of the rules."),
    judge_base_url: str = typer.Option(None, "--judge-base-url", help="OpenAI-compatible endpoint of the judge (default: OpenAI)."),
    list_tasks: bool = typer.Option(False, "--list-tasks", help="List the tasks and exit."),
) -> None:
    """Evaluate budget forcing on benchmarks: a sweep of budgets and Waits, s1 metrics and plots."""
    if list_tasks:
        _print_tasks()
        return
    from t0s1.backends import make_backend
    from t0s1.evaluation.runner import EvalConfig, run_eval

    if not tasks:
        raise UserError(f"Give --tasks, e.g. --tasks math500,aime24. Known tasks: {', '.join(TASKS)}.")
    if out is None:
        raise UserError("Give --out DIR: where the samples, results.json, the tables and plots go.")
    chosen = parse_task_list(tasks)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit}.")
    from t0s1.models import choose_backend

    config = EvalConfig(
        model=model,
        backend=choose_backend(model, device, backend),  # recorded as what ran: auto differs from machine to machine
        max_thinking_tokens=parse_int_list(max_thinking_tokens, "--max-thinking-tokens", allow_auto=True),
        num_ignore=parse_int_list(num_ignore, "--num-ignore"),
        ignore_str=ignore_str,
        max_answer_tokens=max_answer_tokens,
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        end_phrase=end_phrase,
        answer_prefix=answer_prefix,
        chat_template_kwargs=parse_chat_template_kwargs(chat_template_kwargs, thinking),
        policies=parse_policies(policy, n, policy_arg),
        reasoning_format=reasoning_format,
        tokenizer=tokenizer,
        context_length=context_length,
    )
    for task in chosen:  # fail on missing data before loading a model
        task.load(data_dir, limit=1)
    check_output_directory(out)
    engine = make_backend(
        backend, model, device=device, dtype=dtype, base_url=base_url, api_key=api_key, tokenizer=tokenizer,
        reasoning_format=reasoning_format, chat_template_kwargs=config.chat_template_kwargs, context_length=context_length,
    )
    config.dtype = _weights_dtype(engine)
    results = run_eval(engine, chosen, config, out, data_dir=data_dir, limit=limit, judge=_judge(judge_model, judge_base_url))
    _print_results(results)
    console.print(f"Wrote {out}/results.json, results.md, samples/<task>.jsonl and a plot per task.", highlight=False)


@exit_on_user_error
def grade_command(
    task: str = typer.Option(..., "--task", "-t", help=f"The task the predictions answer: {', '.join(TASKS)}."),
    predictions: Path = typer.Option(..., "--predictions", "-p", help="JSONL with `output` and `id` (the task's own id) or `index`."),
    out: Path = typer.Option(None, "--out", "-o", help="Write one JSONL verdict per prediction: id, extracted, gold, correct."),
    data_dir: Path = typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV, help=f"Folder with the benchmark JSONL files (default: ${DATA_DIR_ENV})."),
    judge_model: str = typer.Option(None, "--judge-model", help="Grade with an LLM judge instead of the rules."),
    judge_base_url: str = typer.Option(None, "--judge-base-url"),
) -> None:
    """Grade existing outputs against a task's gold answers and print the accuracy."""
    from t0s1.evaluation.runner import grade_output

    chosen = get_task(task)
    if out is not None:
        check_output_file(out)
    rows = read_predictions(predictions)
    examples = chosen.load(data_dir)
    by_id = {e.id: e for e in examples}
    judge = _judge(judge_model, judge_base_url)
    verdicts = []
    for number, row in rows:
        example = _example_for(row, number, predictions, by_id, examples, chosen.name)
        verdicts.append({"id": example.id, **grade_output(chosen, example, row["output"], judge)})
    correct = sum(v["correct"] for v in verdicts)
    if out is not None:
        write_text_atomic(out, "".join(json.dumps(verdict, ensure_ascii=False) + "\n" for verdict in verdicts))
    accuracy = 100.0 * correct / len(verdicts)
    console.print(f"{chosen.name}: accuracy {accuracy:.2f}% ({correct}/{len(verdicts)})", highlight=False)


def read_predictions(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-empty line; UserError with the line number on bad rows."""
    if not path.is_file():
        raise UserError(f"No predictions file at {path}.")
    rows = read_jsonl(path)
    for number, row in rows:
        if not isinstance(row.get("output"), str):
            raise UserError(f"{path}, line {number}: missing the field `output` (the model's text, a string).")
        if "id" not in row and "index" not in row:
            raise UserError(f"{path}, line {number}: missing `id` (the task's own id) or `index` (position in the task).")
    if not rows:
        raise UserError(f"{path} holds no predictions.")
    return rows


def _example_for(row, number, path, by_id, examples, task_name):
    if "id" in row:
        example = by_id.get(str(row["id"]))
        if example is None:
            raise UserError(f"{path}, line {number}: id {row['id']!r} is not in {task_name} (ids look like {examples[0].id!r}).")
        return example
    index = row["index"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(examples):
        raise UserError(f"{path}, line {number}: index {index!r} is out of range (0..{len(examples) - 1}).")
    return examples[index]


def _print_tasks() -> None:
    table = Table(title="t0s1 eval tasks")
    for column in ("task", "local file", "hub dataset", "grader", "description"):
        table.add_column(column, no_wrap=column in ("task", "grader"))
    for task in TASKS.values():
        hub = task.hub_id + (f" ({task.hub_config})" if task.hub_config else "") + f" [{task.split}]"
        table.add_row(task.name, task.local_file, hub, task.answer_kind, task.description)
    console.print(table)


def _print_results(results: dict) -> None:
    for name, task in results["tasks"].items():
        table = Table(title=f"{name} ({task['examples']} questions)")
        policies = any("policy" in s for s in task["settings"])
        columns = ["budget", "num_ignore", "accuracy %", "avg thinking tokens", "hit budget %"]
        if policies:
            columns = ["policy", *columns, "avg total tokens", "tokens per correct"]
        for column in columns:
            if column == "policy":
                table.add_column(column, overflow="fold")  # labels are long: wrap them, never cut them
            else:
                table.add_column(column, justify="right")
        for s in task["settings"]:
            cells = [str(s["max_thinking_tokens"]), str(s["num_ignore"]), f"{s['accuracy']:.1f}", f"{s['avg_thinking_tokens']:.1f}", f"{s['hit_budget']:.0f}"]
            if policies:
                per_correct = "n/a" if s["tokens_per_correct"] is None else f"{s['tokens_per_correct']:.0f}"
                cells = [escape(s["policy"]), *cells, f"{s['avg_total_tokens']:.1f}", per_correct]
            table.add_row(*cells)
        console.print(table)
        unit = "total generated tokens" if policies else "thinking tokens"
        for method, m in task["methods"].items():
            scaling = "n/a" if m["scaling"] is None else f"{m['scaling']:.2f}"
            control = "n/a" if m["control"] is None else f"{m['control']:.0f}%"
            performance = "n/a" if m["performance"] is None else f"{m['performance']:.1f}%"
            console.print(f"  {escape(method)}: Control {control}, Scaling {scaling} (accuracy points per 1,000 {unit}), Performance {performance}", highlight=False)
