"""Compare SAE recipes on the same cached rows at matched L0 (`icl-circuits sae compare`).

Every recipe trains on the same activation cache with the same token budget. Each finished run is
evaluated on held-out rows (FVE, L0, dead fraction), on held-out text (CE loss recovered), and on the
23 tasks' ICL prompts by token type (FVE at arrow, input and output tokens), then written to
`runs/<name>/result.json`, so an interrupted comparison resumes where it stopped.

TopK-family recipes hit a target L0 by construction (k = L0). Penalty recipes (gated, relu, jumprelu)
set L0 only indirectly: each runs at a few coefficients, and their FVE / CE loss recovered at a target
L0 is interpolated in log(L0) between the two runs that bracket it (never extrapolated).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.storage import read_json, write_csv, write_json
from icl_circuits.sae.cache import ActivationCache
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.sae.evaluation import TOKEN_TYPES_SCORED as TYPES, evaluate_saes, held_out_stats, icl_rows, icl_stats
from icl_circuits.sae.training import SAESpec, TrainConfig, cache_fingerprint, train_from_cache
from icl_circuits.viz.plots import plot_sae_compare

K_RECIPES = ("topk", "batchtopk", "matryoshka")
PENALTY_RECIPES = ("gated", "relu", "jumprelu")


@dataclass
class CompareConfig:
    spec: str = "resid:12"  # the SAE every recipe trains
    archs: tuple[str, ...] = ("topk", "batchtopk", "matryoshka", "jumprelu", "gated")
    l0_targets: tuple[int, ...] = (16, 32, 64)
    # coefficients per penalty arch (its L0 follows; results are interpolated to the targets)
    penalties: dict[str, tuple[float, ...]] = field(default_factory=dict)
    d_sae: int = 4096
    n_tokens: int = 300_000
    batch_tokens: int = 1024
    lr: float = 1e-3  # Adam, betas (0, 0.99) for every recipe (the paper's App. B)
    seed: int = 0
    # extra TrainerConfig fields for every run; JumpReLU's threshold starts near the activation scale, since
    # a short run cannot grow it from Gemma Scope's 0.001 (it is learned in log space at the SAE's lr)
    trainer: dict[str, Any] = field(default_factory=lambda: {"jumprelu_init_threshold": 1.0, "jumprelu_bandwidth": 0.1})

    def runs(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(arch, run name, TrainConfig overrides) for every run of the comparison."""
        out = []
        for arch in self.archs:
            if arch in K_RECIPES:
                out += [(arch, f"{arch}_k{k}", dict(k=k)) for k in self.l0_targets]
            else:
                coeffs = self.penalties.get(arch)
                if not coeffs:
                    raise ValueError(f"penalty recipe {arch!r} needs coefficients in CompareConfig.penalties")
                key = "l0_coeff" if arch == "jumprelu" else "l1_coeff"
                out += [(arch, f"{arch}_{key}{c:g}", {key: c}) for c in coeffs]
        return out


@dataclass
class RunResult:
    arch: str
    name: str
    settings: dict[str, Any]
    l0: float
    fve: float
    dead_fraction: float
    ce_loss_recovered: float
    tokens_per_s: float  # training rows / wall time of the training steps (data reading included)
    icl_fve: dict[str, float]  # token type -> FVE on ICL prompts
    icl_l0: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_config(cfg: CompareConfig, arch: str, overrides: dict[str, Any]) -> TrainConfig:
    trainer = dict(cfg.trainer)
    base = dict(specs=[cfg.spec], arch=arch, d_sae=cfg.d_sae, n_tokens=cfg.n_tokens, batch_tokens=cfg.batch_tokens,
                lr=cfg.lr, seed=cfg.seed, checkpoint_every=50, log_every=10, dead_window=200, dead_steps=400,
                b_dec_init="mean", norm_centered=True)  # fmt: skip
    if "l0_coeff" in overrides:
        trainer["l0_coeff"] = overrides.pop("l0_coeff")
    if arch == "topk":
        trainer.setdefault("ghost_grads", False)  # Gao et al.: AuxK alone revives dead latents
    return TrainConfig(**{**base, **overrides, "trainer": trainer or None})


def run_compare(
    lm: LM, cfg: CompareConfig, train_cache: ActivationCache, eval_cache: ActivationCache,
    eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], out_dir: str | Path, progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train and evaluate every run of cfg (resumable); returns the summary table rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # what every run shares; the recipes, targets and coefficients only name runs, so they may grow
    shared = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in ("archs", "l0_targets", "penalties")}
    header = {"config": shared, "train_cache": cache_fingerprint(train_cache), "eval_cache": cache_fingerprint(eval_cache)}
    cfg_path = out / "compare_config.json"
    if cfg_path.is_file() and (old := read_json(cfg_path)) != header:
        diff = sorted(k for k in {**old["config"], **header["config"]} if old["config"].get(k) != header["config"].get(k))
        diff += [k for k in ("train_cache", "eval_cache") if old[k] != header[k]]
        raise ValueError(f"{out} holds a comparison made under other settings ({', '.join(diff)}); use a new --out")
    write_json(cfg_path, header)
    spec = SAESpec.parse(cfg.spec)
    icl_path = out / "icl_rows.pt"
    if icl_path.is_file():
        icl = torch.load(icl_path, weights_only=True, map_location="cpu")  # icl_stats moves rows to the SAE's device
    else:
        icl = icl_rows(lm, spec.in_site, spec.out_site)
        from icl_circuits.core.storage import atomic_write_bytes
        import io

        buf = io.BytesIO()
        torch.save(icl, buf)
        atomic_write_bytes(icl_path, buf.getvalue())

    mine: list[tuple[str, str, dict[str, Any], JumpReLUSAE, float]] = []
    for arch, name, overrides in cfg.runs():
        if (out / "runs" / name / "result.json").is_file() or not _claim(out / "runs" / name):
            continue  # done, or another `sae compare` process on this folder trains it
        tcfg = train_config(cfg, arch, dict(overrides))
        sae = train_from_cache(train_cache, tcfg, out / "runs" / name, progress=progress, device=lm.device)[spec.name].to(lm.device)
        tok_s = read_json(out / "runs" / name / "timing-rank0.json")["tokens_per_s"]  # summed over resumes
        mine.append((arch, name, overrides, sae, tok_s))
    if mine:  # evaluated together: one clean and one zero-ablated pass serve every run
        ces = evaluate_saes(lm, [m[3] for m in mine], eval_batches, progress=progress)
        for (arch, name, overrides, sae, tok_s), ce in zip(mine, ces):
            held = held_out_stats(sae, eval_cache)
            fve_t, l0_t = icl_stats(sae, icl)
            r = RunResult(arch, name, overrides, held["l0"], held["fve"], held["dead_fraction"], ce.ce_loss_recovered,
                          tok_s, fve_t, l0_t).to_dict()  # fmt: skip
            write_json(out / "runs" / name / "result.json", r)
    results = [read_json(out / "runs" / n / "result.json") for _, n, _ in cfg.runs() if (out / "runs" / n / "result.json").is_file()]
    missing = [name for _, name, _ in cfg.runs() if not (out / "runs" / name / "result.json").is_file()]
    if missing:
        print(f"{len(missing)} runs are still being trained by other processes ({', '.join(missing)}); "
              "rerun this command when they finish to write the table")
    rows = summary(results, cfg.l0_targets)
    write_json(out / "compare.json", {"runs": results, "at_target_l0": rows})
    write_csv(out / "runs.csv", [_flat(r) for r in results])
    write_csv(out / "compare.csv", rows)
    plot_sae_compare(results, out / "compare")
    return rows


def _claim(run_dir: Path) -> bool:
    """Mark a run as this process's (so several processes can share one comparison); a claim whose
    process has died is taken over."""
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "claimed_by"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return True
            if pid and _alive(pid):
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flat(r: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in r.items() if not isinstance(v, dict)}
    row["settings"] = json.dumps(r["settings"])
    for t in TYPES:
        row[f"icl_fve_{t}"] = r["icl_fve"][t]
    return row


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation in log(x) between the two points that bracket x; NaN if none do."""
    pts = sorted(p for p in points if p[0] > 0 and math.isfinite(p[1]))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return float("nan")


def summary(results: list[dict[str, Any]], targets: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (arch, target L0): the run itself for TopK recipes, interpolated for penalty ones."""
    rows = []
    keys = ["fve", "ce_loss_recovered", "dead_fraction", "tokens_per_s"] + [f"icl_fve_{t}" for t in TYPES]
    for arch in dict.fromkeys(r["arch"] for r in results):
        mine = [_flat(r) for r in results if r["arch"] == arch]
        for target in targets:
            if arch in K_RECIPES:
                match = [r for r in mine if json.loads(r["settings"]).get("k") == target]
                if not match:
                    continue
                row = {"arch": arch, "target_l0": target, "l0": match[0]["l0"], "how": "k"}
                row.update({k: match[0][k] for k in keys})
            else:
                row = {"arch": arch, "target_l0": target, "l0": float(target), "how": "interpolated"}
                row.update({k: _interp([(r["l0"], r[k]) for r in mine], target) for k in keys})
            rows.append(row)
    return rows


def winner(rows: list[dict[str, Any]], by: str = "ce_loss_recovered") -> str:
    """The arch with the best mean `by` over the target L0s it reached (ties: FVE)."""
    score: dict[str, list[float]] = {}
    for r in rows:
        if math.isfinite(r[by]):
            score.setdefault(r["arch"], []).append(r[by])
    return max(score, key=lambda a: sum(score[a]) / len(score[a]))
