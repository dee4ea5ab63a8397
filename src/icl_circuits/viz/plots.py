"""Figures (matplotlib, headless). Each function takes result rows and an output stem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from icl_circuits.core.storage import save_figure  # noqa: E402


def plot_layer_sweep(
    rows: list[dict], stem: str | Path, xlabel: str = "layer (task vector added to resid_pre)",
    ylabel: str = "relative loss decrease vs. zero-shot", title: str = "Original task vector: steering effect by layer",
) -> list[Path]:  # fmt: skip
    """Fig. 2 style: relative loss decrease of steering vs. layer, per task and task mean."""
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
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


def plot_sae_compare(results: list[dict], stem: str | Path) -> list[Path]:
    """SAE recipes against L0: held-out FVE, CE loss recovered, and FVE at ICL arrow tokens, one line per recipe."""
    archs = list(dict.fromkeys(r["arch"] for r in results))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("fve", "held-out FVE"), ("ce_loss_recovered", "CE loss recovered"), ("icl_fve.arrow", "FVE at ICL arrow tokens"))
    for arch in archs:
        rs = sorted((r for r in results if r["arch"] == arch), key=lambda r: r["l0"])
        for ax, (key, _) in zip(axes, panels):
            ys = [r["icl_fve"]["arrow"] if key == "icl_fve.arrow" else r[key] for r in rs]
            ax.plot([r["l0"] for r in rs], ys, marker="o", label=arch)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xscale("log")
        ax.set_xlabel("L0 (held-out)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


# -- Task Vector Cleaning (Sec. 3.1, App. D) ------------------------------------------------------
METHOD_STYLE = {
    "tv": ("original task vector", "black"),
    "sae_reconstruction": ("SAE reconstruction", "tab:orange"),
    "ito_5": ("ITO (5)", "tab:green"),
    "ito_20": ("ITO (20)", "tab:olive"),
    "tvc": ("cleaning (TVC)", "tab:blue"),
}


def plot_cleaning_curves(result, stem: str | Path) -> list[Path]:  # type: ignore[no-untyped-def]
    """One cleaning run: L0 and training / evaluation NLL against the optimisation step."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = range(1, len(result.l0_history) + 1)
    a.plot(steps, result.l0_history, color="tab:blue")
    a.set_title(f"{result.task}: L0 of the cleaned weights")
    a.set_xlabel("step")
    b.plot(steps, result.train_loss, label="train NLL", color="tab:blue")
    if result.eval_loss:
        b.plot([s for s, _ in result.eval_loss], [v for _, v in result.eval_loss], "o-", ms=3, label="eval NLL", color="tab:red")
    for m, ls in (("zero_shot", ":"), ("tv", "--")):
        if m in result.scores:
            b.axhline(result.scores[m]["nll"], color="grey", ls=ls, lw=1, label=f"{m} (eval)")
    b.set_xlabel("step")
    b.set_title("loss")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_cleaning_summary(rows: list[dict], stem: str | Path) -> list[Path]:
    """Per task: relative loss decrease of every method (bars), and L0 before/after cleaning."""
    tasks = [r for r in rows if r["task"] != "mean"]
    methods = [m for m in METHOD_STYLE if tasks and m in tasks[0]]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(8, 0.55 * len(rows)), 7), sharex=True)
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        label, color = METHOD_STYLE[m]
        a.bar([i + j * width for i in range(len(rows))], [r.get(m, float("nan")) for r in rows], width, label=label, color=color)
    a.axhline(0, color="grey", lw=0.8)
    a.set_ylabel("relative loss decrease vs. zero-shot")
    a.legend(fontsize=7, ncol=len(methods))
    a.grid(axis="y", alpha=0.3)
    x = [i + 0.4 - width / 2 for i in range(len(rows))]
    b.bar([i - 0.15 for i in x], [r["l0_tv"] for r in rows], 0.3, label="L0 of SAE(TV)", color="tab:orange")
    b.bar([i + 0.15 for i in x], [r["l0_tvc"] for r in rows], 0.3, label="L0 after cleaning", color="tab:blue")
    b.set_ylabel("active SAE latents")
    b.legend(fontsize=7)
    b.set_xticks(x)
    b.set_xticklabels([r["task"] for r in rows], rotation=60, ha="right", fontsize=7)
    b.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_l1_sweep(rows: list[dict], stem: str | Path) -> list[Path]:
    """Fig. 3 / 17: task-mean relative loss decrease and fraction of the TV's latents kept, vs. λ (± std of the mean)."""
    tvc = [r for r in rows if r["method"] == "tvc"]
    l1s = sorted({r["l1_coeff"] for r in tvc})
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((a, "relative_loss_decrease", "mean relative loss decrease"), (b, "l0_fraction", "mean TV L0 fraction")):
        means, errs = [], []
        for l1 in l1s:
            v = [r[key] for r in tvc if r["l1_coeff"] == l1]
            m = sum(v) / len(v)
            means.append(m)
            errs.append((sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5 / len(v) ** 0.5)
        ax.errorbar(range(len(l1s)), means, yerr=errs, marker="o", capsize=3, color="tab:blue", label="TVC")
        if key == "relative_loss_decrease":
            tv = [r[key] for r in rows if r["method"] == "tv"]
            ax.axhline(sum(tv) / len(tv), color="black", ls="--", lw=1, label="original TV")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(l1s)))
        ax.set_xticklabels([f"{x:g}" for x in l1s], rotation=30)
        ax.set_xlabel("L1 coefficient λ")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(f"TVC λ sweep, {len({r['task'] for r in rows})} tasks", fontsize=10)
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_tv_loss_delta(rows: list[dict], stem: str | Path) -> list[Path]:
    """Fig. 14: TV loss delta (L_TV - L_method) / L_zero vs. fraction of the TV's latents used, TVC vs. ITO."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color, pick in (("ITO", "tab:green", lambda m: m.startswith("ito_")), ("TVC", "tab:blue", lambda m: m == "tvc")):
        pts = [r for r in rows if pick(r["method"])]
        ax.scatter([r["l0_fraction"] for r in pts], [r["tv_loss_delta"] for r in pts], s=12, alpha=0.6, color=color, label=method)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("TV L0 fraction (latents used / latents in SAE(TV))")
    ax.set_ylabel("TV loss delta (higher = better than the TV)")
    ax.legend()
    ax.grid(alpha=0.3)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_layer_comparison(rows: list[dict], stem: str | Path) -> list[Path]:
    """Fig. 2: task-mean relative loss change of every reconstruction type at each layer that has an SAE."""
    layers = sorted({r["layer"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, (label, color) in METHOD_STYLE.items():
        ys = []
        for l in layers:
            v = [r["relative_loss_decrease"] for r in rows if r["layer"] == l and r["method"] == m]
            ys.append(sum(v) / len(v) if v else float("nan"))
        ax.plot(layers, ys, marker="o", label=label, color=color)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean relative loss decrease vs. zero-shot")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_latent_density(store: Any, stem: str | Path) -> list[Path]:
    """Histograms of every SAE's latent firing densities and max activations in an ExampleStore."""
    import numpy as np

    tokens = max(store.progress()["tokens"], 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for s in store.saes():
        table = store.latent_table(s["name"])
        if table:
            axes[0].hist(np.log10(np.array([r["n_fired"] / tokens for r in table])), bins=50, histtype="step", label=s["name"])
            axes[1].hist([r["max_act"] for r in table], bins=50, histtype="step", label=s["name"])
    axes[0].set_xlabel("log10 firing density (share of tokens)")
    axes[1].set_xlabel("max activation")
    for ax in axes:
        ax.set_ylabel("latents")
        ax.legend()
    fig.suptitle(f"Latents on {tokens:,} corpus tokens")
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths
