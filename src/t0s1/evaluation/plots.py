"""One PNG per task: accuracy against average thinking tokens, one curve per scaling method."""

from __future__ import annotations

from pathlib import Path

METHOD_LABELS = {
    "budget": "budget forcing (thinking cap sweep)",
    "wait": "budget forcing (Wait sweep, num_ignore)",
    "majority_vote": "parallel: majority vote",
}


def plot_task(task_name: str, methods: dict, path: Path, *, model: str = "") -> Path:
    """Draw ``methods`` (name -> {"points": [[tokens, accuracy], ...]}) and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for name, summary in methods.items():
        points = summary.get("points") or []
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", label=METHOD_LABELS.get(name, name))
    axes.set_xlabel("average thinking tokens per question")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{task_name}" + (f" - {model}" if model else ""))
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
