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
