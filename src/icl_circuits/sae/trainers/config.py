"""The hyper-parameters of one SAE / transcoder run (TrainerConfig) and the per-architecture
defaults (the paper's App. B)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch


ARCHS: tuple[str, ...] = ("gated", "relu", "topk", "batchtopk", "jumprelu", "matryoshka")
TOPK_FAMILY: tuple[str, ...] = ("topk", "batchtopk", "matryoshka")  # archs that use k and AuxK

# Default coefficient of the decoder-norm-weighted L1 penalty, on Anthropic-normalised inputs
# (E||x|| = sqrt(d_in), reconstruction error summed over dimensions); not swept (the paper does no
# sweeps either). Conerly et al. (2024) also warm lambda up over the first 5% of training; we do not.
DEFAULT_L1: dict[str, float] = {
    # Conerly et al. (2024) report lambda = 5 for exactly this loss and normalisation.
    "relu": 5.0,
    # Twice ReLU's: the penalty acts on the gate path only while two reconstruction terms (magnitude
    # path, gate path) pull on the shared encoder; on planted toy data gated needed ~5x ReLU's
    # coefficient for the same L0, so 2x is conservative.
    "gated": 10.0,
    # TopK / BatchTopK / Matryoshka BatchTopK set L0 directly through k: no penalty.
    "topk": 0.0,
    "batchtopk": 0.0,
    "matryoshka": 0.0,
    # JumpReLU is penalised on L0 instead (TrainerConfig.l0_coeff), as in Gemma Scope: no L1.
    "jumprelu": 0.0,
}

# JumpReLU's L0 coefficient per output dimension: l0_coeff = DEFAULT_L0_PER_DIM * d_out unless set.
# The reconstruction error is summed over d_out dimensions of inputs with E||x||^2 ~ d, so the price of
# one active latent must grow with d to mean the same thing: 0.002 * d keeps a latent on a token only if
# it removes more than ~0.2% of the token's squared norm (a start for a sweep; Gemma Scope's lambda on
# unit-mean-square inputs, rescaled to these units, is of this order).
DEFAULT_L0_PER_DIM: float = 0.002

_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(kw_only=True)
class TrainerConfig:
    """Hyper-parameters of one SAE / transcoder run (defaults follow the paper's App. B).

    Fields left None are resolved in __post_init__, so `to_dict()` records the values actually used.
    """

    arch: str = "gated"
    d_in: int
    d_sae: int
    d_out: int | None = None  # = d_in unless a transcoder
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.99)
    l1_coeff: float | None = None  # None -> DEFAULT_L1[arch]
    k: int = 32  # topk: active latents per row; batchtopk / matryoshka: mean active latents per row
    # Ghost grads (Rajamanoharan's softplus variant). None -> on for gated / relu / topk (as before the
    # split), off for batchtopk / matryoshka (AuxK revives their dead latents) and jumprelu (Gemma Scope
    # uses neither).
    ghost_grads: bool | None = None
    dead_window: int = 1000  # batches in the density buffer
    dead_density: float = 5e-6  # dead if fires/tokens over a full window is below this
    dead_steps: int = 2000  # ... or if it has not fired for this many steps
    param_dtype: str = "bfloat16"  # storage dtype of W_enc, W_dec, r_mag; biases are always float32
    normalize: bool = True
    norm_batches: int = 10
    # The encoder reads centred inputs: x - b_dec for SAEs (as in the Gated SAE paper), x - b_in
    # (a learned input bias) for transcoders. On Gemma's residual stream one dimension carries most
    # of ||x||, so without centring short runs waste their capacity on the mean.
    center_input: bool = True
    b_dec_init: str = "zeros"  # 'zeros' (paper, App. B) or 'mean': b_dec (and b_in) = data mean of the first batch
    # Anthropic normalisation scales inputs to E||x|| = sqrt(d). With norm_centered the scale uses
    # E||x - batch mean|| instead: on Gemma 3 a near-constant massive dimension holds ~90% of ||x||,
    # which otherwise leaves the varying part tiny and makes the sparsity penalty ~20x too strong.
    norm_centered: bool = False
    seed: int = 0
    # -- AuxK (topk, batchtopk, matryoshka; Gao et al. 2024) --------------------------------------
    aux_k: int | None = None  # dead latents used to model the residual; None -> d_in // 2 (Gao et al.)
    aux_coeff: float = 1 / 32  # alpha of L = recon + alpha * aux (Gao et al.); 0 turns AuxK off
    # -- BatchTopK / Matryoshka (Bussmann et al. 2024, 2025) -------------------------------------
    # The inference threshold is an exponential moving average of the smallest activation kept by the
    # batch top-k: theta <- m * theta + (1 - m) * min_kept (the first batch sets it).
    threshold_momentum: float = 0.99
    # Matryoshka prefix sizes (strictly increasing, the last = d_sae); None -> d_sae / 16, /8, /4, /2, 1.
    matryoshka_groups: tuple[int, ...] | None = None
    # -- JumpReLU (Rajamanoharan et al. 2024, "Jumping ahead"; Gemma Scope) -----------------------
    l0_coeff: float | None = None  # None -> DEFAULT_L0_PER_DIM * d_out (jumprelu only)
    jumprelu_bandwidth: float = 0.001  # width of the rectangle kernel of the straight-through estimators
    jumprelu_init_threshold: float = 0.001

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"TrainerConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.l1_coeff is None:
            self.l1_coeff = DEFAULT_L1[self.arch]
        if self.ghost_grads is None:
            self.ghost_grads = self.arch in ("gated", "relu", "topk")
        if self.b_dec_init not in ("zeros", "mean"):
            raise ValueError(f"TrainerConfig.b_dec_init must be 'zeros' or 'mean', got {self.b_dec_init!r}")
        if self.param_dtype not in _DTYPES:
            raise ValueError(f"TrainerConfig.param_dtype must be one of {sorted(_DTYPES)}, got {self.param_dtype!r}")
        for name in ("d_in", "d_sae", "d_out", "dead_window", "dead_steps", "norm_batches"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainerConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.arch in TOPK_FAMILY:
            if not 0 < self.k <= self.d_sae:
                raise ValueError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}")
            if self.aux_k is None:
                self.aux_k = max(1, self.d_in // 2)
            if not 0 < self.aux_k <= self.d_sae:
                raise ValueError(f"TrainerConfig.aux_k must be in 1..d_sae={self.d_sae}, got {self.aux_k}")
            if not self.aux_coeff >= 0:
                raise ValueError(f"TrainerConfig.aux_coeff must be >= 0, got {self.aux_coeff}")
        if self.arch in ("batchtopk", "matryoshka") and not 0 <= self.threshold_momentum < 1:
            raise ValueError(f"TrainerConfig.threshold_momentum must be in [0, 1), got {self.threshold_momentum}")
        if self.arch == "matryoshka":
            if self.matryoshka_groups is None:
                sizes = {self.d_sae // m for m in (16, 8, 4, 2, 1)}
                self.matryoshka_groups = tuple(sorted(s for s in sizes if s > 0))
            groups = tuple(int(g) for g in self.matryoshka_groups)
            if not groups or groups[-1] != self.d_sae or any(b <= a for a, b in zip((0,) + groups, groups)):
                raise ValueError(
                    f"TrainerConfig.matryoshka_groups must be strictly increasing positive prefix sizes ending "
                    f"at d_sae={self.d_sae}, got {self.matryoshka_groups!r}"
                )
            self.matryoshka_groups = groups
        if self.arch == "jumprelu":
            if self.l0_coeff is None:
                self.l0_coeff = DEFAULT_L0_PER_DIM * self.d_out
            for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
                if not getattr(self, name) > 0:
                    raise ValueError(f"TrainerConfig.{name} must be > 0, got {getattr(self, name)!r}")
            if not self.l0_coeff >= 0:
                raise ValueError(f"TrainerConfig.l0_coeff must be >= 0, got {self.l0_coeff}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)  # plain types only (torch.load(weights_only=True))
        if self.matryoshka_groups is not None:
            d["matryoshka_groups"] = list(self.matryoshka_groups)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerConfig":
        """Inverse of to_dict; keys this version does not know raise, missing ones take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainerConfig keys {unknown}")
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.0, 0.99)))
        if d.get("matryoshka_groups") is not None:
            d["matryoshka_groups"] = tuple(d["matryoshka_groups"])
        return cls(**d)

