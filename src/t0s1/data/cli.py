"""``t0s1 prepare``: reasoning traces -> prompt/completion SFT dataset + report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from t0s1.cli_support import exit_on_user_error
from t0s1.models import EMBEDDED_MODEL

console = Console()


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare_command)


@exit_on_user_error
def prepare_command(
    dataset: Annotated[
        str,
        typer.Option(
            help="simplescaling/s1K, simplescaling/s1K-1.1 (or their _tokenized variants), a saved dataset "
            "directory, or a JSONL / Parquet file."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory to write the prepared dataset to.")],
    model: Annotated[str, typer.Option(help="Model whose chat template and delimiters render the data.")] = (
        EMBEDDED_MODEL
    ),
    block_size: Annotated[
        int | None, typer.Option(help="Longest example in tokens (s1: 32768); longer ones are cut or dropped.")
    ] = None,
    on_overflow: Annotated[str, typer.Option(help="What to do with examples over --block-size: truncate or drop.")] = (
        "truncate"
    ),
    decontaminate: Annotated[
        str | None,
        typer.Option(help="Benchmarks to decontaminate against (8-gram), e.g. math500,aime24,gpqa_diamond."),
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="Directory of benchmark files (default: $T0S1_DATA_DIR, else the hub).")
    ] = None,
    trajectory: Annotated[
        str | None, typer.Option(help="s1K-1.1 only: which traces to train on, deepseek (default) or gemini.")
    ] = None,
    question_column: Annotated[str, typer.Option(help="Generic files: the question column.")] = "question",
    thinking_column: Annotated[str, typer.Option(help="Generic files: the thinking column.")] = "thinking",
    answer_column: Annotated[str, typer.Option(help="Generic files: the answer column.")] = "answer",
    reasoning_format: Annotated[
        str | None, typer.Option(help="Override the delimiters: chatml, think-tags or 'START,END'.")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to read from a hub or saved dataset.")] = "train",
) -> None:
    """Render s1K-style reasoning traces as a prompt/completion dataset for `t0s1 train`."""
    from t0s1.data.decontaminate import parse_benchmarks
    from t0s1.data.prepare import PREPARE_REPORT, prepare

    report = prepare(
        dataset,
        model,
        out,
        block_size=block_size,
        on_overflow=on_overflow,
        decontaminate=parse_benchmarks(decontaminate),
        data_dir=data_dir,
        trajectory=trajectory,
        question_column=question_column,
        thinking_column=thinking_column,
        answer_column=answer_column,
        reasoning_format=reasoning_format,
        split=split,
    )
    console.print(report.summary(), highlight=False, markup=False)
    console.print(f"Wrote {report.rows_out} rows to {out} (report: {out / PREPARE_REPORT})", highlight=False)
