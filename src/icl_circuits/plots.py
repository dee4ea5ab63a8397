"""Figures (matplotlib, headless). Each function takes result rows and an output stem."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .storage import save_figure  # noqa: E402


def plot_layer_sweep(rows: list[dict], stem: str | Path) -> list[Path]:
    """Fig. 2 style: relative loss decrease of TV steering vs. layer, per task and task mean."""
    tasks = sorted({r["task"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20", max(len(tasks), 1))
    for i, task in enumerate(tasks):
        rs = sorted((r for r in rows if r["task"] == task), key=lambda r: r["layer"])
        ax.plot([r["layer"] for r in rs], [r["relative_loss_decrease"] for r in rs], lw=0.8, alpha=0.55, color=cmap(i), label=task)
    mean = [sum(r["relative_loss_decrease"] for r in rows if r["layer"] == l) / len(tasks) for l in layers]
    ax.plot(layers, mean, lw=3, color="black", marker="o", label="mean over tasks")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer (task vector added to resid_pre)")
    ax.set_ylabel("relative loss decrease vs. zero-shot")
    ax.set_title("Original task vector: steering effect by layer")
    ax.set_xticks(layers)
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_training_curves(records: list[dict], stem: str | Path) -> list[Path]:
    """SAE training: loss, L0, dead fraction and FVE against tokens, one line per SAE."""
    names = sorted({r["sae"] for r in records})
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for name in names:
        rs = [r for r in records if r["sae"] == name]
        x = [r["tokens"] for r in rs]
        for ax, key in zip(axes, ("loss", "l0", "dead_fraction", "fve")):
            ax.plot(x, [r[key] for r in rs], label=name, lw=1)
    for ax, title in zip(axes, ("loss", "L0 (active latents / token)", "dead fraction", "FVE (train batch)")):
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths
