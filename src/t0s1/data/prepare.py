"""Turn reasoning traces into the prompt/completion dataset that ``t0s1 train`` reads.

prompt     = the model's chat template of the user message, with the generation prompt
completion = thinking_start + thinking + thinking_end + "Answer: " + answer + end-of-turn token

in the model's profile (``t0s1.profiles``: s1's ``<|im_start|>think`` / ``<|im_start|>answer``, or
``<think>`` / ``</think>``; no thinking start when the template's generation prompt already opens
the thinking), so the completion-only loss trains the thinking, the answer and the end token,
never the prompt. A completion cut by the block size ends where it was cut, without an end token:
the model must not learn to stop in the middle of a thought.
The output directory holds the dataset (``save_to_disk``, split ``train``), ``preview.jsonl`` and
``prepare_report.json``; it is written to a temporary sibling and renamed into place, so a failure
never leaves a half-written directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t0s1.data.decontaminate import BenchmarkIndex
from t0s1.data.sources import Trace, Traces, load_traces
from t0s1.errors import UserError
from t0s1.files import left_by_dead_processes, umask, writing
from t0s1.models import resolve_model_source
from t0s1.profiles import ANSWER_PREFIX, S1, ModelProfile, detect_profile, profile_spec

PREPARE_REPORT = "prepare_report.json"
PREVIEW = "preview.jsonl"
PREVIEW_ROWS = 20
OVERFLOW_ACTIONS = ("truncate", "drop")
_ASSISTANT_TURN = "<|im_start|>assistant\n"  # where a ChatML ``text`` splits into prompt and completion
_USER_TURN = "<|im_start|>user\n"


@dataclass
class PrepareReport:
    source: str
    schema: str
    model: str
    reasoning_format: str
    end_token: str
    rows_in: int
    rows_out: int = 0
    block_size: int | None = None
    on_overflow: str = "truncate"
    over_block_size: int = 0
    truncated: int = 0
    dropped_over_block_size: int = 0
    token_lengths: dict = field(default_factory=dict)
    decontamination: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lengths = self.token_lengths
        lines = [
            f"source: {self.source} ({self.schema}); model: {self.model} ({self.reasoning_format} delimiters)",
            f"rows: {self.rows_in} in -> {self.rows_out} out",
            "tokens (prompt + completion): "
            + ", ".join(f"{key} {value:g}" for key, value in lengths.items()),
        ]
        if self.block_size:
            done = (
                f"{self.truncated} truncated, {self.dropped_over_block_size} dropped"
                if self.over_block_size
                else "nothing to do"
            )
            lines.append(f"block size {self.block_size}: {self.over_block_size} rows exceed it ({done})")
        contamination = self.decontamination
        if contamination.get("benchmarks"):
            dropped = contamination["dropped"]
            lines.append(
                f"decontamination (8-gram) against {', '.join(contamination['benchmarks'])}: "
                f"{len(dropped)} rows dropped"
            )
            for item in dropped[:20]:
                lines.append(f"  row {item['row']}: {item['benchmark']} {item['benchmark_id']}: \"{item['ngram']}\"")
            if len(dropped) > 20:
                lines.append(f"  ... {len(dropped) - 20} more in {PREPARE_REPORT}")
        return "\n".join(lines)


def end_of_turn(tokenizer) -> str:
    """The text the chat template writes right after an assistant message (``<|im_end|>`` for ChatML)."""
    sentinel = "T0S1_SENTINEL_CONTENT"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation: fall back to the eos token
        rendered = ""
    if sentinel in rendered:
        suffix = rendered.split(sentinel, 1)[1].strip()
        for token in tokenizer.all_special_tokens:
            if token and suffix.startswith(token):
                return token
        if suffix:
            return suffix.split()[0]
    if not tokenizer.eos_token:
        raise UserError("The tokenizer has neither a chat template end-of-turn token nor an eos token.")
    return tokenizer.eos_token


def render_prompt(tokenizer, question: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("The model's tokenizer has no chat template: use an instruct/chat model.")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def answer_text(attempt: str) -> str:
    """s1 writes "Answer: " before the attempt unless it already says "Answer:"."""
    return attempt if "Answer:" in attempt else ANSWER_PREFIX + attempt


def render_traces(traces: list[Trace], tokenizer, profile: ModelProfile, end_token: str) -> list[dict]:
    """``[{"prompt", "completion"}]`` for each trace, in the model's template and profile."""
    return [_render(trace, tokenizer, profile, end_token) for trace in traces]


def _render(trace: Trace, tokenizer, profile: ModelProfile, end_token: str) -> dict:
    question = trace.question
    if trace.text is None:
        thinking, answer = trace.thinking, answer_text(trace.answer)
    else:  # an s1 ``_tokenized`` row: a whole ChatML conversation in s1's delimiters
        question, assistant = split_chatml_text(trace)
        thinking, answer = S1.split(assistant)
    # The prompt is rendered with this model's template (s1 rendered it with Qwen's system prompt).
    prompt = render_prompt(tokenizer, question)
    opened = prompt.rstrip().endswith(profile.thinking_start)  # the template prefills the start
    if trace.text is not None and profile.name == S1.name:
        completion = assistant  # already in this model's delimiters: keep it verbatim
    else:
        completion = profile.assistant_content(thinking, answer, with_start=not opened)
    return {"prompt": prompt, "completion": completion + end_token}


def split_chatml_text(trace: Trace) -> tuple[str, str]:
    """A ``_tokenized`` row is a whole ChatML conversation: (user question, assistant turn without
    its end token), split at the assistant turn."""
    text = trace.text or ""
    start = text.rfind(_ASSISTANT_TURN)
    user = text.rfind(_USER_TURN, 0, max(start, 0))
    if start < 0 or user < 0:
        raise UserError(
            f"Row {trace.row}: the text has no ChatML user and assistant turns "
            f"({_USER_TURN.strip()!r} ... {_ASSISTANT_TURN.strip()!r}), so it cannot be split into prompt "
            "and completion."
        )
    question = text[user + len(_USER_TURN) : start].rstrip()
    question = question.removesuffix("<|im_end|>").rstrip("\n")
    assistant = text[start + len(_ASSISTANT_TURN) :].rstrip()
    for stop in ("<|im_end|>", "<|endoftext|>"):
        assistant = assistant.removesuffix(stop).rstrip()
    return question, assistant


def token_lengths(rows: list[dict], tokenizer) -> list[int]:
    """Tokens of prompt + completion as the trainer tokenizes them."""
    texts = [row["prompt"] + row["completion"] for row in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "min": ordered[0],
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def tokenize_rows(rows, tokenizer, max_length: int | None) -> list[dict]:
    """``{"input_ids", "completion_mask"}`` per prompt/completion row, as the trainer reads them:
    the rendered text's ids with no special tokens added (the chat template writes its own BOS, as
    at inference: a tokenizer that adds one too gave two). The completion starts where the ids of
    prompt and prompt + completion diverge, and a row longer than ``max_length`` is cut there with
    no end token appended (TRL would append one to a completion that does not end with it: a
    truncated trace must not teach the model to stop)."""
    out = []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        start = 0
        while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
            start += 1
        mask = [0] * start + [1] * (len(ids) - start)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        if any(mask):  # a prompt that fills max_length alone trains nothing
            out.append({"input_ids": ids, "completion_mask": mask})
    return out


def truncate_row(row: dict, tokenizer, block_size: int) -> dict | None:
    """Cut the completion so prompt + completion fit in ``block_size`` tokens (None: the prompt alone
    does not fit)."""
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
    prefix = 0
    while prefix < min(len(prompt_ids), len(full_ids)) and prompt_ids[prefix] == full_ids[prefix]:
        prefix += 1
    if prefix >= block_size:
        return None
    end = block_size
    completion = tokenizer.decode(full_ids[prefix:end], skip_special_tokens=False)
    # A byte-level token may hold part of a character: cut before it rather than end on U+FFFD
    # (a character is at most 4 bytes, so at most 3 tokens go).
    while completion.endswith("\ufffd") and end > prefix and block_size - end < 3:
        end -= 1
        completion = tokenizer.decode(full_ids[prefix:end], skip_special_tokens=False)
    return {"prompt": row["prompt"], "completion": completion}


def build(
    traces: Traces,
    tokenizer,
    profile: ModelProfile,
    *,
    model_name: str,
    block_size: int | None = None,
    on_overflow: str = "truncate",
    benchmark_index: BenchmarkIndex | None = None,
) -> tuple[list[dict], PrepareReport]:
    """Render, decontaminate and fit to the block size: (rows, report). Shared by prepare and train."""
    if on_overflow not in OVERFLOW_ACTIONS:
        raise UserError(f"Unknown --on-overflow {on_overflow!r}: use {' or '.join(OVERFLOW_ACTIONS)}.")
    if block_size is not None and block_size < 1:
        raise UserError(f"--block-size must be a positive number of tokens, got {block_size}.")
    end_token = end_of_turn(tokenizer)
    report = PrepareReport(
        source=traces.source,
        schema=traces.schema,
        model=model_name,
        reasoning_format=profile_spec(profile),
        end_token=end_token,
        rows_in=len(traces.traces),
        block_size=block_size,
        on_overflow=on_overflow,
    )
    rows = render_traces(traces.traces, tokenizer, profile, end_token)

    if benchmark_index is not None:
        dropped, kept_rows = [], []
        for trace, row in zip(traces.traces, rows, strict=True):
            question = trace.question if trace.text is None else split_chatml_text(trace)[0]
            hit = benchmark_index.match(trace.row, question)
            if hit:
                dropped.append(hit.to_dict())
            else:
                kept_rows.append(row)
        rows = kept_rows
        report.decontamination = {
            "ngram": 8,
            "benchmarks": list(benchmark_index.sizes),
            "benchmark_questions": benchmark_index.sizes,
            "dropped": dropped,
        }

    lengths = token_lengths(rows, tokenizer)
    report.token_lengths = percentiles(lengths)
    if block_size is not None:
        fitted = []
        for row, length in zip(rows, lengths, strict=True):
            if length <= block_size:
                fitted.append(row)
                continue
            report.over_block_size += 1
            cut = truncate_row(row, tokenizer, block_size) if on_overflow == "truncate" else None
            if cut is None:
                report.dropped_over_block_size += 1
            else:
                report.truncated += 1
                fitted.append(cut)
        rows = fitted
    report.rows_out = len(rows)
    if not rows:
        raise UserError(
            f"No rows left to train on ({report.rows_in} in): every row was dropped. "
            + report.summary().replace("\n", "; ")
        )
    return rows, report


def prepare(
    dataset: str,
    model: str,
    out: str | Path,
    *,
    block_size: int | None = None,
    on_overflow: str = "truncate",
    decontaminate: list[str] | None = None,
    data_dir: str | None = None,
    trajectory: str | None = None,
    question_column: str = "question",
    thinking_column: str = "thinking",
    answer_column: str = "answer",
    reasoning_format: str | None = None,
    split: str = "train",
) -> PrepareReport:
    """Read ``dataset``, render it for ``model`` and write the SFT dataset to ``out``."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_prepared_dir(out))):
        raise UserError(f"{str(out)!r} exists and is not a directory written by prepare: choose another --out.")
    traces = load_traces(
        dataset,
        split=split,
        trajectory=trajectory,
        question_column=question_column,
        thinking_column=thinking_column,
        answer_column=answer_column,
    )
    tokenizer = load_tokenizer(model)
    profile = detect_profile(tokenizer, reasoning_format).profile
    index = BenchmarkIndex.load(decontaminate, data_dir) if decontaminate else None
    rows, report = build(
        traces, tokenizer, profile, model_name=model, block_size=block_size, on_overflow=on_overflow, benchmark_index=index
    )
    write_atomically(rows, report, out)
    return report


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """The tokenizer alone (no weights): prepare needs only the chat template and the vocabulary.
    ``revision``: the hub revision (branch, tag or commit) of a hub id."""
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model_source(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if revision:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"Could not load the tokenizer of {name_or_path!r}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_prepared_dir(path: str | Path) -> bool:
    return (Path(path) / PREPARE_REPORT).is_file()


def read_report(path: str | Path) -> dict:
    return json.loads((Path(path) / PREPARE_REPORT).read_text(encoding="utf-8"))


def write_atomically(rows: list[dict], report: PrepareReport, out: Path) -> None:
    """Write everything into a temporary sibling directory, then rename it to ``out``. What a
    killed run left beside ``out`` is repaired first (``_recover``)."""
    from datasets import Dataset, DatasetDict

    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.writing-{os.getpid()}-"))
    os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private; the result is an ordinary directory
    previous = None
    try:
        with writing(out, f"{out} is unchanged."):
            DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(staging))
            with (staging / PREVIEW).open("w", encoding="utf-8") as handle:
                for row in rows[:PREVIEW_ROWS]:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            (staging / PREPARE_REPORT).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        if out.exists():  # an earlier prepare output (checked by the caller) or an empty directory
            previous = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, previous)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None and not out.exists():
            os.replace(previous, out)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _recover(out: Path) -> None:
    """Repair what a killed prepare left beside ``out``: put back the earlier output it had moved
    aside (killed between its two renames), and remove its staging folders (gigabytes for a large
    dataset). Those of a prepare still running (its process id is in their name) are left alone."""
    for kind in ("old", "writing"):
        for folder in left_by_dead_processes(out.parent, f".{out.name}.{kind}-"):
            if kind == "old" and not out.exists() and (folder / PREPARE_REPORT).is_file():
                os.replace(folder, out)
            else:
                shutil.rmtree(folder, ignore_errors=True)
