"""Plots of a training run (matplotlib, Agg backend): per-stage accuracy per epoch."""

from __future__ import annotations

import math
import os


def plot_accuracy(history: list[dict], path: str, title: str) -> None:
    """Per-stage test (else train) accuracy of ``history`` (Trainer.history) per epoch, written
    atomically to ``path`` (PNG)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    key = "test_acc" if all("test_acc" in r for r in history) else "train_acc"
    K = len(history[0][key])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    epochs = [r["epoch"] for r in history]
    for j in range(K):
        vals = [math.nan if r[key][j] is None else 100 * r[key][j] for r in history]
        ax.plot(epochs, vals, marker="o", ms=3, label=f"stage {j + 1}" + (" (network)" if j == K - 1 else ""))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(("test" if key == "test_acc" else "train") + " accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
