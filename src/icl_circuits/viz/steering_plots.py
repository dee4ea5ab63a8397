"""Steering figures: task x feature heatmaps (Fig. 22, 24, 25; Fig. 10 with the top features) and the
negative-steering heatmap (Fig. 23), with their CSV tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from icl_circuits.methods.heatmaps import HeatmapResult, cluster_order, column_order, normalize_effects
from icl_circuits.methods.negative import NegativeResult

def plot_feature_heatmap(
    values: torch.Tensor, tasks: Sequence[str], features: Sequence[int | str], stem: str | Path, *,
    in_tv: torch.Tensor | None = None, kept: torch.Tensor | None = None, title: str = "",
    cbar: str = "Effect strength", vmin: float | None = 0.0, vmax: float | None = None, cmap: str = "viridis",
    xlabel: str = "Feature", ylabel: str = "Task",
) -> list[Path]:  # fmt: skip
    """Tasks x features heatmap; red dots: feature in the task's raw TV, green: kept by cleaning (Fig. 22)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from icl_circuits.core.storage import save_figure

    n_t, n_f = values.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n_f + 3), max(4.0, 0.3 * n_t + 1.5)))
    im = ax.imshow(values.numpy(), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_f), [str(f) for f in features], rotation=90, fontsize=6)
    ax.set_yticks(range(n_t), list(tasks), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    handles = []
    if in_tv is not None and in_tv.any():
        r, c = in_tv.nonzero(as_tuple=True)
        handles.append(ax.scatter(c.numpy() - 0.18, r.numpy(), s=9, c="red", label="in raw task vector"))
    if kept is not None and kept.any():
        r, c = kept.nonzero(as_tuple=True)
        handles.append(ax.scatter(c.numpy() + 0.18, r.numpy(), s=9, c="lime", edgecolors="black", linewidths=0.3, label="kept by cleaning"))
    if handles:
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=7, frameon=False)
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.03, pad=0.01)
    if title:
        ax.set_title(title, fontsize=9, pad=18 if handles else 6)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def heatmap_figures(result: HeatmapResult, out_dir: str | Path, name: str = "heatmap", clip: float = 1.0, floor: float = 0.2,
                    min_effect: float = 0.0, what: str = "task-execution features") -> dict[str, Any]:
    """Raw and normalised heatmaps (PNG + SVG), ordered so similar tasks sit together; CSV tables."""
    from icl_circuits.core.storage import write_csv

    out = Path(out_dir)
    norm, kept_cols = normalize_effects(result.raw, clip, floor, min_effect)
    in_tv, kept = result.marks()
    basis = norm if norm.shape[1] else result.raw.clamp(max=clip)
    rows = cluster_order(basis)
    files: list[Path] = []
    cols = column_order(result.raw, rows)
    v = max(float(result.raw.max()), 0.05)  # symmetric colours: harmful steering shows blue, clipped at -v
    files += plot_feature_heatmap(
        result.raw[rows][:, cols], [result.tasks[r] for r in rows], [result.features[c] for c in cols], out / f"{name}_raw",
        in_tv=in_tv[rows][:, cols], kept=kept[rows][:, cols], vmin=-v, vmax=v, cmap="RdBu_r", cbar="Relative loss decrease",
        title=f"Steering with {what}: raw relative loss decrease (Fig. 24 style; colours clipped at +-{v:.2f})",
    )  # fmt: skip
    if norm.shape[1]:
        ncols = column_order(norm, rows)
        orig = [kept_cols[c] for c in ncols]
        files += plot_feature_heatmap(
            norm[rows][:, ncols], [result.tasks[r] for r in rows], [result.features[c] for c in orig], out / f"{name}_normalized",
            in_tv=in_tv[rows][:, orig], kept=kept[rows][:, orig], vmin=0.0, vmax=1.0,
            title=f"Steering with {what}: harm clipped to 0, per-task min-max, < {floor} -> 0 (Fig. 22 style)",
        )  # fmt: skip
    table = [
        dict(task=t, feature=f, scale=result.scales[j], relative_loss_decrease=round(float(result.raw[i, j]), 5),
             in_task_vector=bool(in_tv[i, j]), kept_by_cleaning=bool(kept[i, j]))
        for i, t in enumerate(result.tasks) for j, f in enumerate(result.features)
    ]  # fmt: skip
    files.append(write_csv(out / f"{name}.csv", table))
    return dict(files=files, row_order=[result.tasks[r] for r in rows], kept_features=[result.features[c] for c in kept_cols])


def plot_negative(neg: NegativeResult, stem: str | Path) -> list[Path]:
    """Fig. 23: accuracy decrease of each task (rows) when each feature (columns) is subtracted."""
    rows = cluster_order(neg.drop.clamp_min(0))
    cols = column_order(neg.drop, rows)
    kept = torch.tensor([[t in neg.owners.get(f, []) for f in neg.features] for t in neg.tasks]).reshape(neg.drop.shape)
    return plot_feature_heatmap(
        neg.drop[rows][:, cols], [neg.tasks[r] for r in rows], [f"{neg.features[c]} (x{neg.scales[c]:g})" for c in cols], stem,
        kept=kept[rows][:, cols], vmin=None, cbar="Accuracy decrease", cmap="magma",
        title="Negative steering on ICL prompts (every arrow), smallest scale lowering accuracy by >= 0.1 (Fig. 23 style)",
    )  # fmt: skip
