"""The figures of sparse feature circuits (matplotlib, headless): the circuit graph (Fig. 12), faithfulness
curves (Fig. 7), the IE-quality scatter and correlations (Fig. 20, 21) and the cross-task heatmap (Fig. 8).
Each function takes results of icl_circuits.methods.circuits and an output stem, and returns the files written."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from icl_circuits.core.storage import save_figure  # noqa: E402
from icl_circuits.methods.circuits.config import ERROR, SAE_KINDS  # noqa: E402
from icl_circuits.methods.circuits.cross_task import CrossTask  # noqa: E402
from icl_circuits.methods.circuits.edges import CircuitGraph, GraphNode, as_graph  # noqa: E402
from icl_circuits.methods.circuits.faithfulness_curves import FaithfulnessCurve  # noqa: E402
from icl_circuits.methods.circuits.ie_check import ie_correlations, pearson  # noqa: E402

TYPE_COLORS = {"prompt": "#999999", "input": "#2ca02c", "arrow": "#1f77b4", "output": "#ff7f0e", "newline": "#9467bd", "extra": "#8c564b"}


def draw_graph(graph: CircuitGraph | dict, stem: str | Path, title: str = "") -> list[Path]:
    """Fig. 12 style: SAE sites bottom (early) to top (late), nodes coloured by token type,
    edges blue (positive) / red (negative) with width ~ |effect|. `graph`: a CircuitGraph or its dict."""
    g = as_graph(graph)
    rows = sorted({(n.layer, SAE_KINDS.index(n.kind)) for n in g.nodes})
    row_of = {r: i for i, r in enumerate(rows)}
    by_row: dict[int, list[GraphNode]] = {}
    for n in g.nodes:
        by_row.setdefault(row_of[(n.layer, SAE_KINDS.index(n.kind))], []).append(n)
    pos = {}
    width = max((len(v) for v in by_row.values()), default=1)
    for r, ns in by_row.items():
        ns.sort(key=lambda n: (g.node_types.index(n.token_type), -abs(n.effect)))
        for j, n in enumerate(ns):
            pos[n.id] = ((j + 0.5) * width / len(ns), r)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * width), 1.6 + 1.5 * len(rows)))
    emax = max((abs(e.effect) for e in g.edges), default=1.0) or 1.0
    for e in g.edges:
        (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
        ax.annotate("", (x1, y1 - 0.12), (x0, y0 + 0.12), arrowprops=dict(
            arrowstyle="-|>", lw=0.3 + 3.5 * abs(e.effect) / emax, alpha=0.6,
            color="#1f77b4" if e.effect > 0 else "#d62728", shrinkA=0, shrinkB=0))  # fmt: skip
    nmax = max((abs(n.effect) for n in g.nodes), default=1.0) or 1.0
    for n in g.nodes:
        x, y = pos[n.id]
        feat = "err" if n.is_error else str(n.feature)
        ax.scatter([x], [y], s=120 + 900 * math.sqrt(abs(n.effect) / nmax), color=TYPE_COLORS[n.token_type],
                   edgecolor="black" if n.effect > 0 else "red", linewidth=1.2, zorder=3)  # fmt: skip
        ax.text(x, y, feat, ha="center", va="center", fontsize=6, zorder=4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{SAE_KINDS[k]} L{l}" for l, k in rows])
    ax.set_xticks([])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=t) for t, c in TYPE_COLORS.items()
               if t in g.node_types]  # fmt: skip
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="token type")
    ax.set_title(title or "sparse feature circuit (node size ~ |effect|; black rim +, red rim -; edge blue +, red -)", fontsize=9)
    for spine in ("top", "right", "bottom"):
        ax.spines[spine].set_visible(False)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_faithfulness(curves: Sequence[FaithfulnessCurve], stem: str | Path) -> list[Path]:
    """Fig. 7: faithfulness of C (top-N kept) and of M \\ C (top-N ablated) vs N, per task and mean."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # the mean is taken at the sizes every curve has (plus the largest), so grids may differ between tasks
    grid = sorted(set.intersection(*(set(c.sizes) for c in curves)) | {max(n for c in curves for n in c.sizes)}) if curves else []
    for ax, attr, ideal in ((axes[0], "faith_C", 1.0), (axes[1], "faith_M", 0.0)):
        for c in curves:
            ax.plot([max(n, 0.5) for n in c.sizes], getattr(c, attr), lw=0.9, alpha=0.6, label=c.task)
        mean = []
        for n in grid:  # a task's curve is flat after its last (all non-zero nodes) point
            vals = [getattr(c, attr)[max(i for i, s in enumerate(c.sizes) if s <= n)] for c in curves]
            mean.append(sum(vals) / len(vals))
        ax.plot([max(n, 0.5) for n in grid], mean, lw=3, color="black", label="mean over tasks")
        ax.axhline(ideal, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        by = curves[0].rank_by if curves else "signed"
        ax.set_xlabel(f"number of nodes N (top by {'|effect|' if by == 'abs' else 'signed effect'}; N=0 drawn at 0.5)")
        ax.grid(alpha=0.3)
    axes[0].axhline(0.6, color="red", ls=":", lw=0.8)
    if curves:
        fig.suptitle("error nodes always kept, N counts feature nodes (the authors' method)" if curves[0].keep_errors
                     else "error nodes ranked and zero-ablated with the features", fontsize=10)  # fmt: skip
    axes[0].set_title("faithfulness of circuit C (top-N nodes kept; ideal 1)")
    axes[1].set_title("faithfulness of complement M \\ C (top-N nodes ablated; ideal 0)")
    axes[0].set_ylabel("faithfulness (eq. 4)")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_ie_quality(rows: Sequence[dict], stem: str | Path) -> list[Path]:
    """Fig. 20/21: estimated vs. actual single-node effects; correlation per layer and per SAE type."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    colors = {"resid": "#1f77b4", "attn": "#2ca02c", "transcoder": "#d62728"}
    for kind, c in colors.items():
        for err in (False, True):
            rs = [r for r in rows if r["kind"] == kind and (str(r["feature"]) == ERROR) == err]
            axes[0].scatter([r["estimate"] for r in rs], [r["actual"] for r in rs], s=40 if err else 8, alpha=0.7, color=c,
                            marker="x" if err else "o", label=f"{kind} {'error nodes' if err else 'features'}")  # fmt: skip
    lim = max([abs(r["estimate"]) for r in rows] + [abs(r["actual"]) for r in rows] + [1e-6])
    axes[0].plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    thresh = 10 ** math.floor(math.log10(lim / 1e3))
    ticks = [t for e in range(3, -1, -1) for t in (-(10**e) * thresh,)] + [0.0] + [(10**e) * thresh for e in range(0, 4)]
    ticks = sorted({round(t, 12) for t in ticks if abs(t) <= lim * 10})
    for set_scale, set_ticks in ((axes[0].set_xscale, axes[0].set_xticks), (axes[0].set_yscale, axes[0].set_yticks)):
        set_scale("symlog", linthresh=thresh)
        set_ticks(ticks, [f"{t:g}" for t in ticks])
    axes[0].tick_params(labelsize=7)
    axes[0].set_xlabel("attribution estimate (grad . value)")
    axes[0].set_ylabel("actual: m(M) - m(M without node)")
    feats = [r for r in rows if str(r["feature"]) != ERROR]
    axes[0].set_title(f"single-node ablations ({len(feats)} feature nodes, r={pearson([r['estimate'] for r in feats], [r['actual'] for r in feats]):.2f})")
    axes[0].legend(fontsize=6)
    by_layer = ie_correlations(rows)
    xs = range(len(by_layer))
    axes[1].bar([x - 0.2 for x in xs], [r["r"] for r in by_layer], width=0.4, color="black", label="feature nodes (the paper's metric)")
    axes[1].bar([x + 0.2 for x in xs], [r["r_with_errors"] for r in by_layer], width=0.4, color="grey", label="with error nodes (diagnostic)")
    axes[1].set_xticks(list(xs), [str(r["layer"]) for r in by_layer])
    axes[1].set_title("Fig. 20: correlation per layer (all SAE types)")
    axes[1].set_xlabel("layer")
    axes[1].legend(fontsize=7)
    by_kind = ie_correlations(rows, ("kind", "layer"))
    labels = [f"{r['kind']}\nL{r['layer']}" for r in by_kind]
    xs = range(len(by_kind))
    axes[2].bar([x - 0.2 for x in xs], [r["r"] for r in by_kind], width=0.4, color=[colors[r["kind"]] for r in by_kind], label="feature nodes")
    axes[2].bar([x + 0.2 for x in xs], [r["r_with_errors"] for r in by_kind], width=0.4, color=[colors[r["kind"]] for r in by_kind],
                alpha=0.45, hatch="//", label="with error nodes")  # fmt: skip
    axes[2].set_xticks(list(xs), labels, fontsize=7)
    axes[2].set_title("Fig. 21: correlation per SAE type and layer")
    axes[2].legend(fontsize=7)
    finite = [v for r in by_kind + by_layer for v in (r["r"], r["r_with_errors"]) if not math.isnan(v)]
    for ax in axes[1:]:
        ax.set_ylabel("Pearson r (estimate vs actual)")
        ax.set_ylim(min([0.0, *finite]) - 0.05, 1.05)
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_cross_task(ct: CrossTask, stem: str | Path, note: str = "") -> list[Path]:
    """Fig. 8: faithfulness change of tested task B when task A's top nodes are ablated."""
    n = len(ct.tasks)
    fig, ax = plt.subplots(figsize=(2 + 0.55 * n, 1.5 + 0.5 * n))
    m = torch.tensor(ct.change, dtype=torch.float32)
    vmax = float(torch.nan_to_num(m).abs().max()) or 1.0
    im = ax.imshow(m.numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax)
    ax.set_xticks(range(n), ct.tasks, rotation=90, fontsize=7)
    ax.set_yticks(range(n), [f"{t} ({ct.n_ablated[t]}{'' if ct.reached.get(t, True) else ', all: target not reached'})" for t in ct.tasks],
                  fontsize=7)  # fmt: skip
    for i in range(n):
        for j in range(n):
            if not math.isnan(ct.change[i][j]):
                ax.text(j, i, f"{ct.change[i][j]:.2f}", ha="center", va="center", fontsize=5)
    ax.set_xlabel("tested task B")
    ax.set_ylabel("ablated task A (nodes ablated)")
    ax.set_title(f"faithfulness change of B when A's top nodes are ablated (A to {ct.target})" + (f"\n{note}" if note else ""), fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7, label="faithfulness change")
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths
