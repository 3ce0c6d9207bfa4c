"""One progress bar for long work (evaluating samples, generating requests, writing traces): a rich
bar on stderr with the count, the elapsed time and the ETA, or nothing when switched off."""

from __future__ import annotations


class ProgressBar:
    """``with ProgressBar(enabled, total, "evaluating", unit="samples") as bar: bar.advance(n)``.

    Nothing is shown when ``enabled`` is false or ``total`` is 0; ``advance`` and ``update`` are
    then no-ops, so callers never branch on it. ``completed``: where the count starts (a resumed
    run); ``fields``: values the ``unit`` text shows as ``{task.fields[NAME]}``, changed by ``update``.
    """

    def __init__(self, enabled: bool, total: int, label: str, unit: str = "", completed: int = 0, **fields):
        self.enabled, self.total, self.label, self.unit = enabled and total > 0, total, label, unit
        self.completed, self.fields = completed, fields
        self.bar = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            columns = [TextColumn(self.label), BarColumn(), MofNCompleteColumn()]
            if self.unit:
                columns.append(TextColumn(self.unit))
            columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
            self.bar = Progress(*columns, console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, completed=self.completed, **self.fields)
        return self

    def advance(self, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, count)

    def update(self, completed: int | None = None, **fields) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, **fields)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        return False
