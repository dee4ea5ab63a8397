"""Figures of task detection: the detection-layer sweep (App. G) and the detector -> executor link (Fig. 11)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from icl_circuits.methods.link import LinkResult
from icl_circuits.viz.plots import plot_layer_sweep
from icl_circuits.viz.steering_plots import plot_feature_heatmap


def plot_detection_sweep(rows: list[dict], stem: str | Path) -> list[Path]:
    """Relative loss decrease of fake-pair steering with detection vectors, per layer; task mean in black."""
    return plot_layer_sweep(
        rows, stem, xlabel="layer (detection vector added to resid_pre at the fake pair's output)",
        ylabel="relative loss decrease vs. fake-pair prompt", title="Task detection: steering the fake pair 'X -> Y' (App. G)",
    )  # fmt: skip


def _link_title(cfg: dict) -> str:
    how = (f"subtracting {cfg.get('multiple', 50):g} x mean activation x unit direction" if cfg.get("ablation", "direction") == "direction"
           else "zeroing the latent")
    return (f"Ablating each task's top detector ({how}, at {cfg.get('ablate_at', 'all')} tokens, attention frozen):\n"
            f"drop of top executors at {cfg.get('measure_at', 'all')} tokens where active")


def plot_link(result: LinkResult, stem: str | Path, order: Sequence[str] | None = None) -> list[Path]:
    """Fig. 11: detector task (rows) x executor task (columns), effect = relative executor drop."""
    order = list(order) if order else result.detector_tasks
    rows = [result.detector_tasks.index(t) for t in order if t in result.detector_tasks]
    cols = [result.executor_tasks.index(t) for t in order if t in result.executor_tasks]
    m = result.drop[rows][:, cols]
    return plot_feature_heatmap(
        m, [f"{result.detector_tasks[r]} ({result.detectors[result.detector_tasks[r]]})" for r in rows],
        [f"{result.executor_tasks[c]} ({result.executors[result.executor_tasks[c]]})" for c in cols], stem,
        vmin=min(0.0, float(m.min())), vmax=max(1e-3, float(m.max())), cbar="Relative drop of executor activation",
        xlabel="Executor (task, feature)", ylabel="Detector (task, feature)",
        title=_link_title(result.config),
    )  # fmt: skip
