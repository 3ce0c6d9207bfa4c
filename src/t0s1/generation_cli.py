"""``t0s1 generate``: budget forcing from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from t0s1.cli_support import (
    BUDGET_DEFAULTS,
    AnswerPrefixOption,
    ChatTemplateKwargsOption,
    DeviceOption,
    DtypeOption,
    EndPhraseOption,
    IgnoreStrOption,
    MaxAnswerOption,
    MaxThinkingOption,
    ModelOption,
    NOption,
    NumIgnoreOption,
    PolicyArgOption,
    PolicyOption,
    ReasoningFormatOption,
    StreamPrinter,
    TemperatureOption,
    ThinkingOption,
    TopPOption,
    TrustRemoteCodeOption,
    budget_from_flags,
    exit_on_user_error,
    parse_chat_template_kwargs,
)
from t0s1.errors import UserError
from t0s1.files import atomic_path, check_output_file, remove_atomic_leftovers
from t0s1.forcing import BudgetForcing, generate
from t0s1.jsonl import read_jsonl
from t0s1.models import EMBEDDED_MODEL, load_model


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)


@exit_on_user_error
def generate_command(
    prompt: Annotated[str | None, typer.Argument(help="The question. Omit it when using --file.")] = None,
    model: ModelOption = EMBEDDED_MODEL,
    max_thinking_tokens: MaxThinkingOption = str(BUDGET_DEFAULTS.max_thinking_tokens),
    num_ignore: NumIgnoreOption = BUDGET_DEFAULTS.num_ignore,
    ignore_str: IgnoreStrOption = BUDGET_DEFAULTS.ignore_str,
    max_answer_tokens: MaxAnswerOption = BUDGET_DEFAULTS.max_answer_tokens,
    temperature: TemperatureOption = BUDGET_DEFAULTS.temperature,
    top_p: TopPOption = BUDGET_DEFAULTS.top_p,
    seed: Annotated[int, typer.Option(help="Seed for sampling; prompt i of a file uses seed + i (with --policy, its trace j "
                                           "seed + i + j).")] = BUDGET_DEFAULTS.seed,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result fields.")] = False,
    file: Annotated[
        Path | None, typer.Option(help="JSONL file of prompts (field 'prompt'): generated in batches, JSONL out.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="With --file: write the JSONL here instead of standard output (when every prompt is done; an earlier file stays until then).")] = None,
    batch_size: Annotated[int, typer.Option(help="With --file: prompts per batch.")] = 8,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="auto (llama.cpp for a .gguf file or the embedded default when there is no GPU, else transformers), "
            "transformers (PyTorch), llamacpp (a .gguf file on llama.cpp), or vllm (vLLM offline inference; the "
            "text is printed when the generation is complete).",
        ),
    ] = "auto",
    reasoning_format: ReasoningFormatOption = None,
    end_phrase: EndPhraseOption = None,
    answer_prefix: AnswerPrefixOption = None,
    thinking: ThinkingOption = None,
    chat_template_kwargs: ChatTemplateKwargsOption = None,
    explain_format: Annotated[
        bool, typer.Option("--explain-format", help="Print the model profile detected (delimiters, forced end) and why, then exit.")
    ] = False,
    trust_remote_code: TrustRemoteCodeOption = False,
    policy: PolicyOption = None,
    n: NOption = None,
    policy_arg: PolicyArgOption = None,
) -> None:
    """Answer a question with budget forcing: cap the thinking, or extend it with "Wait".
    With --policy, run a test-time policy (several traces, early exit, votes) over it."""
    if explain_format:
        # The profile is the tokenizer's (vLLM's too): read here without starting vLLM.
        lm = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, reasoning_format=reasoning_format,
                        backend="auto" if backend == "vllm" else backend)
        print(lm.detection.explain())
        return
    if (prompt is None) == (file is None):
        raise UserError("Give either a PROMPT or --file prompts.jsonl (not both).")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    if json_output and file is not None:
        raise UserError("--json prints one PROMPT's result as JSON; --file writes a JSON row per prompt already: leave --json out.")
    if out is not None:
        if file is None:
            raise UserError("--out writes the rows of --file prompts.jsonl; for one PROMPT use --json and redirect the output.")
        check_output_file(out)
    settings = budget_from_flags(max_thinking_tokens, num_ignore, ignore_str, max_answer_tokens, temperature, top_p, seed,
                                 end_phrase=end_phrase, answer_prefix=answer_prefix)
    template_kwargs = parse_chat_template_kwargs(chat_template_kwargs, thinking)
    prompts = [prompt] if file is None else read_prompts(file)
    if prompt is not None and not prompt.strip():
        raise UserError("The prompt is empty: give the question to answer.")
    if policy is not None or n is not None or policy_arg:
        from t0s1.policies import make_policy, parse_policy_args

        chosen = make_policy(policy or "vote", parse_policy_args(policy_arg), n=n)
        if backend == "vllm":
            raise UserError("--policy runs on the engine backends (transformers, llama.cpp), which give the log-probabilities "
                            "and forks policies need; vLLM serves budget forcing through its plugin (docs/vllm.md).")
        lm = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, reasoning_format=reasoning_format,
                        backend=backend)
        if file is not None:
            from t0s1.forcing_rules import per_prompt_settings
            from t0s1.policies.run import generate_with_policy

            def run_policy(batch, batch_settings):  # prompt i of the file: its traces j use seed + i + j
                return generate_with_policy(lm, batch, per_prompt_settings(batch_settings, len(batch)), chosen,
                                            chat_template_kwargs=template_kwargs)

            _generate_file(run_policy, prompts, settings, out, batch_size)
        else:
            _generate_with_policy(lm, prompts[0], settings, chosen, template_kwargs, json_output=json_output)
        return
    if backend == "vllm":
        from t0s1.backends import make_backend

        engine = make_backend("vllm", model, dtype=dtype, reasoning_format=reasoning_format, trust_remote_code=trust_remote_code,
                              chat_template_kwargs=template_kwargs)

        def run(batch, batch_settings, on_delta=None):
            results = engine.generate(batch, batch_settings)
            if on_delta is not None:  # vLLM returns whole continuations: the text comes when it is complete
                on_delta(0, "thinking", results[0].thinking)
                on_delta(0, "answer", results[0].answer)
            return results
    else:
        lm = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, reasoning_format=reasoning_format,
                        backend=backend)

        def run(batch, batch_settings, on_delta=None):
            return generate(lm, batch, batch_settings, chat_template_kwargs=template_kwargs, on_delta=on_delta)
    if file is not None:
        _generate_file(run, prompts, settings, out, batch_size)
    elif json_output:
        print(json.dumps(run(prompts, settings)[0].to_dict(), ensure_ascii=False))
    else:
        _generate_streaming(run, prompt, settings)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file with a ``prompt`` field per line."""
    prompts = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{path}, line {number}: no 'prompt' field with a non-empty string.")
        prompts.append(row["prompt"])
    if not prompts:
        raise UserError(f"{path} holds no prompts.")
    return prompts


def _generate_file(run, prompts: list[str], settings: BudgetForcing, out: Path | None, batch_size: int) -> None:
    """One JSON row per prompt, to standard output as each batch finishes, or to ``out`` when all
    have: the rows go to a temporary file beside it, renamed over it at the end, so a failed or
    interrupted run leaves an earlier file there as it was (and its temporary file, which the next
    run writing ``out`` removes)."""
    if out is None:
        _write_rows(run, prompts, settings, batch_size, sys.stdout)
        return
    remove_atomic_leftovers(out.parent, [out.name])  # what a run killed before its rename left
    with atomic_path(out) as temporary, temporary.open("w", encoding="utf-8") as sink:
        _write_rows(run, prompts, settings, batch_size, sink)


def _write_rows(run, prompts: list[str], settings: BudgetForcing, batch_size: int, sink) -> None:
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("prompts", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            results = run(batch, _with_seed(settings, start))
            for offset, result in enumerate(results):
                row = {"index": start + offset, "prompt": batch[offset], **result.to_dict()}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            progress.advance(task, len(batch))


def _with_seed(settings: BudgetForcing, offset: int) -> BudgetForcing:
    """Batches of a file keep the per-prompt seeds of one big call (seed + prompt index)."""
    from dataclasses import replace

    return settings if settings.seed is None else replace(settings, seed=settings.seed + offset)


def _generate_streaming(run, prompt: str, settings: BudgetForcing) -> None:
    console = Console(highlight=False)
    on_delta = StreamPrinter(console)
    result = run([prompt], settings, on_delta=on_delta)[0]
    ending = "forced by the budget" if result.hit_budget else "ended by itself"
    console.print(
        f"\n\n[dim]{result.thinking_tokens} thinking tokens ({ending}, {result.num_ignored} x "
        f"{settings.ignore_str!r}), {result.answer_tokens} answer tokens, "
        f"{result.seconds:.1f} s, {result.tokens_per_second:.1f} tokens/s, finish: {result.finish_reason}[/]"
    )


def _generate_with_policy(lm, prompt: str, settings: BudgetForcing, policy, template_kwargs: dict | None, *,
                          json_output: bool) -> None:
    """One prompt under a policy: the JSON object, or the reply and a line per trace."""
    from t0s1.policies.run import generate_with_policy

    [result] = generate_with_policy(lm, [prompt], settings, policy, chat_template_kwargs=template_kwargs, progress=True)
    if json_output:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    console = Console(highlight=False)
    console.print(Text(result.result.thinking, style="dim"))
    console.print(Text(result.answer))
    console.print(f"\n[bold]voted:[/] {result.voted!r} ({result.policy}, {len(result.traces)} traces, {result.total_tokens} tokens "
                  f"generated, {result.probes} branches, {result.seconds:.1f} s)")
    for j, trace in enumerate(result.traces):
        flags = ", stopped early" if trace.stopped_early else ""
        score = "" if trace.confidence is None else f", confidence {trace.confidence:.3f}"
        vote = "" if trace.voted else ", not voting"
        console.print(f"[dim]  trace {j}: {trace.answer!r}, {trace.result.thinking_tokens} thinking tokens{score}{flags}{vote}[/]")
