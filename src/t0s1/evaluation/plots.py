"""One PNG per task: accuracy against average thinking tokens, one curve per scaling method (with
test-time policies: against average total generated tokens, one curve per policy, on one chart)."""

from __future__ import annotations

from pathlib import Path

METHOD_LABELS = {
    "budget": "budget forcing (thinking cap sweep)",
    "wait": "budget forcing (Wait sweep, num_ignore)",
    "majority_vote": "parallel: majority vote",
}
THINKING_TOKENS_LABEL = "average thinking tokens per question"
TOTAL_TOKENS_LABEL = "average total generated tokens per question (every trace and probe)"


def plot_task(task_name: str, methods: dict, path: Path, *, model: str = "", x_label: str | None = None,
              labels: dict | None = None) -> Path:
    """Draw ``methods`` (name -> {"points": [[tokens, accuracy], ...]}) and save a PNG.

    ``labels``: the legend's name of each method (default ``METHOD_LABELS``; the name itself when
    absent). A method ``NAME (Wait)`` drawn after ``NAME`` takes its colour, dashed. With many
    curves the legend goes beside the axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = METHOD_LABELS if labels is None else labels
    drawn = [name for name, summary in methods.items() if summary.get("points")]
    beside = len(drawn) > 6
    figure, axes = plt.subplots(figsize=(9.5 if beside else 6, 4), dpi=120)
    colours = {}
    for name in drawn:
        xs, ys = zip(*methods[name]["points"], strict=True)
        base = name.removesuffix(" (Wait)")
        style = {"color": colours[base], "linestyle": "--"} if base != name and base in colours else {}
        (line,) = axes.plot(xs, ys, marker="o", label=labels.get(name, name), **style)
        colours.setdefault(name, line.get_color())
    axes.set_xlabel(x_label or THINKING_TOKENS_LABEL)
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{task_name}" + (f" - {model}" if model else ""))
    axes.grid(True, alpha=0.3)
    if drawn:
        if beside:
            axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        else:
            axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
