"""What every command shares: user errors become one red line and exit code 2."""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from t0s1.errors import UserError

stderr = Console(stderr=True)


def exit_on_user_error(command):
    """Decorate a typer command so that a ``UserError`` prints its message and exits with code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            stderr.print(f"[bold red]Error:[/] {error}", highlight=False)
            raise typer.Exit(code=2) from None

    return wrapper


def parse_thinking_budget(text: str) -> int | str:
    """A thinking budget from the command line: a non-negative integer or "auto"."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    try:
        budget = int(value)
    except ValueError:
        raise UserError(f"The thinking budget must be a non-negative integer or 'auto', got {text!r}.") from None
    if budget < 0:
        raise UserError(f"The thinking budget must be a non-negative integer or 'auto', got {text!r}.")
    return budget


def parse_thinking_budgets(text: str) -> list[int | str]:
    """A comma-separated list of thinking budgets, e.g. "256,512,1024"."""
    budgets = [parse_thinking_budget(part) for part in text.split(",") if part.strip()]
    if not budgets:
        raise UserError(f"No thinking budget in {text!r}: give e.g. 256,512,1024.")
    return budgets
