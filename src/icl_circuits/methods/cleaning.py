"""Task Vector Cleaning (Sec. 3.1, App. D, Alg. 1): a task vector as a sparse sum of SAE latents.

    θ ← pre-activations of the SAE encoding of the task vector          # [d_sae]
    repeat (Adam, lr 0.15):
        w   = JumpReLU(θ)                                                 # active latents, >= 0
        v   = decode(w)                                                   # [d_model], with b_dec
        L   = NLL(outputs | v added at the steering positions) + λ ||w||_1
    until L0(w) has not changed for `patience` steps, or `max_steps`.

As in the authors' code, θ lives in pre-activation space and passes through the SAE's own
activation: a latent whose pre-activation falls below its threshold is exactly zero, so L0
really drops (Adam on raw weights would only make them small). Latents are measured with the
decoder rows scaled to unit norm (`unit_norm_latents`), as the paper's SAEs have. The steering setting is a
`Steerer`: the query arrow of zero-shot prompts for task execution, or the fake
pair's output for task detection (App. G). Only blocks L.. run at each step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from icl_circuits.data.prompts import N_SCORE_TOKENS, SETTINGS
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.core.sites import Site, same_site
from icl_circuits.core.storage import atomic_write_bytes, check_schema, read_json, stamp, write_json
from icl_circuits.interventions.steer import Score, Steerer

INITS: tuple[str, ...] = ("auto", "encode_mean", "mean_encode", "ito")
# λ when none is given. Execution: Alg. 1's value for our units (docs/tvc.md). Detection: 10x smaller, chosen
# by measurement (docs/tvc.md, "detection λ"): at 0.01, 9 of 23 detection vectors on the bundled model lost
# every latent; the authors' detection run also used a much smaller λ than their execution runs.
DEFAULT_L1: dict[str, float] = {"execution": 0.01, "detection": 1e-3}


@dataclass(frozen=True)
class CleaningConfig:
    l1_coeff: float | None = None  # λ (paper grid 1e-5..0.1); None: DEFAULT_L1[setting], set on creation
    unit_norm_latents: bool = True  # optimise w_i * ||W_dec[i]||: λ and lr then mean the same for any SAE (see below)
    lr: float = 0.15  # Adam learning rate (paper, Gemma 1)
    patience: int = 50  # stop when L0 has not changed for this many steps (paper: 50)
    max_steps: int = 1000
    n_train: int = 24  # zero-shot prompts optimised on (paper: 24)
    n_eval: int = 24  # held-out zero-shot prompts evaluated on (paper: 24)
    n_score_tokens: int = N_SCORE_TOKENS  # first n tokens of each scored output (the authors': 2)
    eval_every: int = 10  # evaluation loss recorded every n steps (0: only at the end)
    train_unembed: str = "bfloat16"  # dtype of the unembedding in training steps ('float32': exact; bf16 ~3x faster
    #                                 on CPU, logits within ~0.1). Every reported score is computed in the model's dtype.
    setting: str = "execution"  # 'execution' (query arrow) or 'detection' (fake pair's output, App. G)
    init: str = "auto"  # TVC's starting point: 'encode_mean' (SAE encoding of the vector, Alg. 1), 'mean_encode'
    #                     (mean of the encodings of the tokens averaged into it, App. D), 'ito' (gradient pursuit
    #                     with ito_k latents). 'auto' = the authors' choice: encode_mean for execution, ito for detection.
    ito_k: int = 7  # latents of the ITO start (the authors' detection TVC: grad pursuit, k = 7)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.l1_coeff is None:  # resolved here, so to_dict() and run fingerprints hold the number used
            object.__setattr__(self, "l1_coeff", DEFAULT_L1[self.setting])
        if not (self.l1_coeff >= 0 and self.lr > 0 and self.patience > 0 and self.max_steps > 0):
            raise ValueError(f"need l1_coeff >= 0, lr > 0, patience > 0, max_steps > 0; got {self}")
        if not isinstance(getattr(torch, self.train_unembed, None), torch.dtype) or not getattr(torch, self.train_unembed).is_floating_point:
            raise ValueError(f"train_unembed must name a torch float dtype ('float32', 'bfloat16'), got {self.train_unembed!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.ito_k < 1:
            raise ValueError(f"ito_k must be >= 1, got {self.ito_k}")
        if self.n_train < 1 or self.n_eval < 1:
            raise ValueError(f"need n_train >= 1 and n_eval >= 1, got {self.n_train}, {self.n_eval}")

    @property
    def start(self) -> str:
        """The starting point actually used ('auto' resolved by the setting)."""
        if self.init != "auto":
            return self.init
        return "ito" if self.setting == "detection" else "encode_mean"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CleaningResult:
    """What one cleaning run produced; `save`/`load_cleaning` round-trip it (JSON + safetensors)."""

    task: str
    layer: int
    setting: str
    sae_spec: str  # e.g. 'resid:12', or the SAE's folder
    config: dict[str, Any]
    weights: torch.Tensor  # [d_sae] cleaned latent weights (>= 0, zero = inactive)
    initial_weights: torch.Tensor  # [d_sae] SAE(vector): the SAE encoding of the raw vector, whatever the start
    vector: torch.Tensor  # [d_model] the raw task (or detection) vector
    l0_history: list[int]  # L0 after each step
    train_loss: list[float]  # NLL on the training prompts at each step (without the L1 term)
    eval_loss: list[tuple[int, float]]  # (step, NLL on the evaluation prompts)
    steps: int
    stopped: str  # 'patience' | 'max_steps'
    seconds: float
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> l0, nll, accuracy, relative_loss_decrease
    feature_effects: list[dict[str, float]] = field(default_factory=list)  # per active feature
    warnings: list[str] = field(default_factory=list)  # e.g. a collapse to L0 = 0; shown in the CLI and report
    start_weights: torch.Tensor | None = None  # [d_sae] where the optimisation started (None: = initial_weights)

    @property
    def collapsed(self) -> bool:
        """Cleaning ended with no active latent although the vector had some (lr/λ far too large)."""
        return self.l0 == 0 and len(self.initial_features) > 0

    @property
    def features(self) -> list[int]:
        """Active cleaned latents, largest weight first."""
        idx = torch.nonzero(self.weights > 0).flatten()
        return [int(i) for i in idx[self.weights[idx].argsort(descending=True)]]

    @property
    def initial_features(self) -> list[int]:
        idx = torch.nonzero(self.initial_weights > 0).flatten()
        return [int(i) for i in idx[self.initial_weights[idx].argsort(descending=True)]]

    @property
    def l0(self) -> int:
        return int((self.weights > 0).sum())

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not isinstance(v, torch.Tensor) and k != "start_weights"}
        d["features"] = [dict(index=i, weight=float(self.weights[i])) for i in self.features]
        d["initial_l0"] = len(self.initial_features)
        d["start_l0"] = len(self.initial_features) if self.start_weights is None else int((self.start_weights > 0).sum())
        d["collapsed"] = self.collapsed
        return stamp("cleaning", d)

    def save(self, folder: str | Path) -> Path:
        """Write cleaning.safetensors, then cleaning.json (the json's presence marks a complete result)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weights": self.weights, "initial_weights": self.initial_weights, "vector": self.vector}
        if self.start_weights is not None:
            tensors["start_weights"] = self.start_weights
        tmp = folder / "cleaning.safetensors.tmp"
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        atomic_write_bytes(folder / "cleaning.safetensors", tmp.read_bytes())
        tmp.unlink()
        write_json(folder / "cleaning.json", self.to_json())
        return folder


def load_cleaning(folder: str | Path) -> CleaningResult:
    folder = Path(folder)
    if not (folder / "cleaning.json").is_file() or not (folder / "cleaning.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no cleaning.json + cleaning.safetensors (not a cleaning result)")
    d = check_schema("cleaning", read_json(folder / "cleaning.json"), str(folder / "cleaning.json"))
    t = load_file(str(folder / "cleaning.safetensors"))
    d.pop("features", None)
    d.pop("initial_l0", None)
    d.pop("collapsed", None)
    d.pop("start_l0", None)
    d["eval_loss"] = [tuple(x) for x in d["eval_loss"]]
    return CleaningResult(**d, weights=t["weights"], initial_weights=t["initial_weights"], vector=t["vector"],
                          start_weights=t.get("start_weights"))  # fmt: skip


class CleaningWarning(UserWarning):
    """A cleaning result that finished but is not a useful result (collapsed, or worse than zero-shot)."""


class CleaningDiverged(FloatingPointError):
    """The loss became NaN/inf; `.partial` holds the result up to the last finite step."""

    def __init__(self, message: str, partial: CleaningResult) -> None:
        super().__init__(message)
        self.partial = partial


def jumprelu_at(theta: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU of pre-activations θ [..., d_sae] with per-latent thresholds [d_sae]: ReLU gated at the threshold."""
    return torch.relu(theta) * (theta > threshold)


def jumprelu(sae: JumpReLUSAE, theta: torch.Tensor) -> torch.Tensor:
    """The SAE's own activation applied to pre-activations θ [..., d_sae]."""
    return jumprelu_at(theta, sae.threshold.detach().to(theta.dtype))


def frozen_decoder(sae: JumpReLUSAE) -> Callable[[torch.Tensor], torch.Tensor]:
    """decode(w) with the SAE's weights detached in float32: optimising θ never touches the SAE."""
    W = sae.W_dec.detach().float()  # [d_sae, d_out]
    b = sae.b_dec.detach().float()  # [d_out]
    scale = sae.cfg.output_scale

    def decode(w: torch.Tensor) -> torch.Tensor:  # [d_sae] -> [d_out]
        return (w @ W + b) / scale

    return decode


def check_steering_sae(sae: JumpReLUSAE, steering: Steerer, layer: int) -> None:
    """The SAE must read the residual stream the vector is added to."""
    sae.check_compatible(steering.lm)
    if sae.cfg.kind != "resid" or not same_site(sae.cfg.site, Site(layer, "resid_pre")):  # resid_post.L-1 counts
        raise ValueError(
            f"cleaning steers resid_pre.{layer}, but the SAE reads {sae.cfg.site} ({sae.cfg.kind}); "
            f"use a residual SAE trained on resid_pre.{layer}"
        )


def clean_vector(
    sae: JumpReLUSAE,
    train: Steerer,
    layer: int,
    vector: torch.Tensor,  # [d_model]
    cfg: CleaningConfig = CleaningConfig(),
    evaluation: Steerer | None = None,
    *,
    task: str = "",
    sae_spec: str = "",
    progress: bool = False,
    init: torch.Tensor | None = None,  # [d_sae] starting latents (SAE units, >= 0); default: encode(vector)
) -> CleaningResult:
    """Alg. 1: optimise SAE latent weights so their decoding steers `train` like (or better than) `vector`."""
    import time

    check_steering_sae(sae, train, layer)
    if vector.shape != (sae.cfg.d_in,):
        raise ValueError(f"vector must be [d_model={sae.cfg.d_in}], got {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise ValueError("the vector to clean has NaN/inf entries")
    # θ, the SAE and the steered model share one device (a vector from load_cleaning is on the CPU)
    vector = vector.to(sae.device)  # [d_model]
    init = None if init is None else init.to(sae.device)  # [d_sae]
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    decode = frozen_decoder(sae)
    # SAEs trained with a decoder-norm-weighted penalty (App. B) need not have unit-norm decoder rows, so
    # their latents come in arbitrary units (the starter suite's rows have norm ~0.17, latents ~10).
    # Optimising u = w * ||W_dec[i]|| (the same SAE with unit-norm rows) gives Adam's step size and λ
    # one meaning for every SAE; for unit-norm decoders it is exactly the paper's θ and ||θ||_1.
    unit = sae.W_dec.detach().float().norm(dim=1).clamp_min(1e-8) if cfg.unit_norm_latents else torch.ones(sae.cfg.d_sae, device=sae.device)  # [d_sae]
    threshold = sae.threshold.detach().float() * unit  # [d_sae]

    def act(u: torch.Tensor) -> torch.Tensor:  # the SAE's JumpReLU in unit-norm coordinates
        return jumprelu_at(u, threshold)

    with torch.no_grad():
        # SAE(vector), kept apart from the start: the "in raw task vector" marks and L0 fractions refer to it
        initial = sae.encode(vector.float()).float()  # [d_sae]
        if init is None and sae.cfg.k is not None:
            # Alg. 1 starts from the SAE's actual encoding; for a TopK SAE that is the top k latents,
            # not every latent with a positive pre-activation (hundreds of them)
            init = initial
        if init is None:
            theta0 = sae.pre_acts(vector.float()).float() * unit  # [d_sae]
        else:
            if init.shape != (sae.cfg.d_sae,) or not torch.isfinite(init).all() or (init < 0).any():
                raise ValueError(f"init must be finite non-negative latents [d_sae={sae.cfg.d_sae}]")
            u0 = init.float() * unit
            # active latents start just above their threshold at least; inactive ones below it (they stay off)
            theta0 = torch.where(u0 > 0, torch.maximum(u0, threshold + 1e-4), torch.full_like(u0, -1.0))
    start = act(theta0) / unit  # [d_sae], SAE units: where the optimisation starts
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)

    l0s: list[int] = []
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    last_good = start.clone()
    same, last_l0, stopped = 0, int((start > 0).sum()), "max_steps"

    def result(weights: torch.Tensor, steps: int, why: str) -> CleaningResult:
        return CleaningResult(
            task=task, layer=layer, setting=cfg.setting, sae_spec=sae_spec, config=cfg.to_dict(),
            weights=weights.detach().clone(), initial_weights=initial.detach().clone(), vector=vector.detach().float().clone(),
            start_weights=start.detach().clone(),
            l0_history=list(l0s), train_loss=list(losses), eval_loss=list(evals), steps=steps, stopped=why,
            seconds=time.perf_counter() - t0,
        )  # fmt: skip

    bar = tqdm(range(cfg.max_steps), desc=f"cleaning {task or 'vector'}", disable=not progress, leave=False)
    step = 0

    # evaluation snapshots: scored after the loop (or on divergence) in batches by `Steerer.score`, not one
    # by one every eval_every steps; they do not feed back into the optimisation, so the result is the same
    pending: list[tuple[int, torch.Tensor]] = []  # (step, weights [d_sae])

    def flush_evals() -> list[Score]:
        scores: list[Score] = []
        if pending and evaluation is not None:
            with torch.no_grad():
                vectors = torch.stack([decode(w) for _, w in pending])  # [n_snapshots, d_model]
                scores = evaluation.score(layer, vectors, need_accuracy=True).as_scores()
            evals.extend((at, sc.nll) for (at, _), sc in zip(pending, scores))
        pending.clear()
        return scores

    def diverged(what: str, at: int) -> CleaningDiverged:
        flush_evals()
        bad = [f"{n}={v}" for n, v in (("l1_coeff", cfg.l1_coeff), ("lr", cfg.lr)) if not math.isfinite(v)]
        hint = f"{' and '.join(bad)} is not a finite number" if bad else f"try a smaller lr (lr={cfg.lr}, l1_coeff={cfg.l1_coeff})"
        return CleaningDiverged(
            f"cleaning {task or 'vector'}: {what} at step {at}; {hint}. "
            f"The result up to the last finite step ({at}) is in .partial",
            result(last_good, at, "diverged"),
        )

    for step in bar:
        u = act(theta)  # [d_sae]
        nll = train.loss(layer, decode(u / unit))
        loss = nll + cfg.l1_coeff * u.sum()  # u >= 0, so this is ||u||_1
        if not torch.isfinite(loss):
            raise diverged(f"loss became {loss.item()}", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_new = act(theta) / unit  # SAE units
            if not torch.isfinite(w_new).all():  # the step itself blew up: keep the last finite weights
                raise diverged("the latent weights became NaN/inf", step)
            l0 = int((w_new > 0).sum())
        last_good = w_new.detach()
        l0s.append(l0)
        losses.append(nll.item())
        if evaluation is not None and cfg.eval_every and step % cfg.eval_every == 0:
            pending.append((step + 1, w_new))
        bar.set_postfix(l0=l0, nll=f"{losses[-1]:.3f}")
        # Alg. 1's early stopping: count steps since L0 last changed
        if l0 != last_l0:
            last_l0, same = l0, 0
        else:
            same += 1
            if same >= cfg.patience:
                stopped = "patience"
                break
    steps = step + 1
    score: Score | None = None
    if evaluation is not None:
        # the final weights are scored in the same batch as the snapshots (once, if the last snapshot is them)
        if pending and pending[-1][0] == steps:
            pending.pop()
        pending.append((steps, last_good))
        score = flush_evals()[-1]
    out = result(last_good, steps, stopped)
    if score is not None:
        out.scores["tvc"] = method_score(evaluation, score, out.l0)
        zero = evaluation.baseline.nll
        if math.isfinite(score.nll) and math.isfinite(zero) and score.nll > zero + 0.01 * abs(zero):  # >1% worse
            out.warnings.append(
                f"the cleaned vector's loss {score.nll:.4g} is worse than the zero-shot loss {zero:.4g} "
                f"(lr={cfg.lr}, l1_coeff={cfg.l1_coeff})"
            )
    if out.collapsed:
        out.warnings.insert(0, f"collapsed: no latent left active (L0 {len(out.initial_features)} -> 0); "
                               f"lr={cfg.lr} or l1_coeff={cfg.l1_coeff} is too large")  # fmt: skip
    for w in out.warnings:
        warnings.warn(f"cleaning {task or 'vector'}: {w}", CleaningWarning, stacklevel=2)
    out.seconds = time.perf_counter() - t0
    return out


def method_score(steering: Steerer, score: Score, l0: int | None) -> dict[str, float | None]:
    """Scores of one steering vector on the evaluation prompts; l0 is None for a dense vector (the raw TV)."""
    rel = steering.relative_loss_decrease(score)
    return dict(
        l0=None if l0 is None else float(l0),
        nll=score.nll,
        accuracy=score.accuracy,
        relative_loss_decrease=rel if math.isfinite(rel) else float("nan"),
    )
