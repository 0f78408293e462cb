"""Loss curves of a run, from its metrics.jsonl (the `--plot` flag of the three stages)."""
import json

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

LOSS_TERMS = ("loss", "mae_loss", "distill_loss", "cls_loss")


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, png_path: str) -> None:
    """One panel per logged loss term (against step), plus the learning rate."""
    rows = read_metrics(metrics_path)
    terms = [t for t in LOSS_TERMS if any(t in r for r in rows)]
    # `loss` equals the single term of a one-term stage; draw it only when it is a sum
    if len(terms) == 2 and "loss" in terms:
        terms.remove("loss")
    fig, axes = plt.subplots(1, len(terms) + 1, figsize=(4 * (len(terms) + 1), 3.2), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, term in zip(axes[0], terms + ["lr"]):
        ax.plot(steps, [r.get(term, float("nan")) for r in rows], marker="." if len(rows) < 30 else None)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
