"""The one SAE inference format every algorithm in this package uses: a JumpReLU SAE.

    pre       = (x * input_scale) @ W_enc + b_enc           # [..., d_sae]
    f         = relu(pre) * (pre > threshold)               # then, if k is set, keep the top-k per row
    decode(f) = (f @ W_dec + b_dec) / output_scale          # [..., d_out]

A ReLU SAE is threshold = 0, a TopK SAE is threshold = 0 plus k, a Gated SAE converts exactly
(`gated_to_jumprelu`), and SAEs that subtract b_dec before encoding fold it into b_enc
(`fold_b_dec_into_b_enc`). A transcoder is the same thing with d_out != d_in (or out_site set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

import torch
from torch import nn

from ..sites import Site

SAE_KINDS: tuple[str, ...] = ("resid", "attn", "transcoder")
TENSOR_NAMES: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


@dataclass(kw_only=True)
class SAEConfig:
    """What an SAE reads, what it writes, and how to scale both.

    d_out defaults to d_in (only transcoders differ). input_scale / output_scale follow the
    Anthropic normalisation: the SAE sees x * input_scale and its decoded output is divided
    by output_scale, so reconstructions come back in the model's own units.
    """

    d_in: int
    d_sae: int
    d_out: int | None = None
    kind: str = "resid"
    model: str = ""
    site: str
    out_site: str | None = None
    layer: int
    input_scale: float = 1.0
    output_scale: float = 1.0
    k: int | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        for name in ("d_in", "d_sae", "d_out"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.kind not in SAE_KINDS:
            raise ValueError(f"SAEConfig.kind must be one of {SAE_KINDS}, got {self.kind!r}")
        site = Site.parse(self.site)  # raises a ValueError naming the bad spec
        self.site = str(site)
        if self.layer != site.layer:
            raise ValueError(f"SAEConfig.layer = {self.layer} but site {self.site!r} is at layer {site.layer}")
        if self.kind == "transcoder":
            if self.out_site is None:
                raise ValueError("a transcoder needs out_site (where its output goes, e.g. 'mlp_out.12')")
            self.out_site = str(Site.parse(self.out_site))
        else:
            if self.out_site is not None:
                raise ValueError(f"out_site is only for transcoders, got {self.out_site!r} for kind {self.kind!r}")
            if self.d_out != self.d_in:
                raise ValueError(f"d_out ({self.d_out}) != d_in ({self.d_in}) is only allowed for kind 'transcoder'")
        if self.k is not None and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}")
        if not (self.input_scale > 0 and self.output_scale > 0):
            raise ValueError(f"scales must be > 0, got input_scale={self.input_scale} output_scale={self.output_scale}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAEConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


class ModelLike(Protocol):
    """What check_compatible needs from an LM (icl_circuits.model.LM has all three)."""

    name: str
    d_model: int
    n_layers: int


def _same_model(a: str, b: str) -> bool:
    # 'google/gemma-2-2b' and 'gemma-2-2b' name the same model
    return a.rsplit("/", 1)[-1].lower() == b.rsplit("/", 1)[-1].lower()


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    assert cfg.d_out is not None
    return {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_out),
        "b_dec": (cfg.d_out,),
        "threshold": (cfg.d_sae,),
    }


def check_shapes(cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise a ValueError naming `where` (a file) and the key when a tensor is missing or misshapen."""
    for name, shape in expected_shapes(cfg).items():
        if name not in tensors:
            raise ValueError(f"{where}: missing tensor {name!r} (have {sorted(tensors)})")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ValueError(
                f"{where}: {name!r} has shape {got}, expected {shape} "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out})"
            )


class JumpReLUSAE(nn.Module):
    """A JumpReLU SAE / transcoder. Missing tensors start at zero (threshold 0 = ReLU SAE)."""

    def __init__(
        self,
        cfg: SAEConfig,
        tensors: dict[str, torch.Tensor] | None = None,
        *,
        where: str = "JumpReLUSAE",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        shapes = expected_shapes(cfg)
        tensors = dict(tensors or {})
        floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if dtype is None:  # one dtype for all; mixed files (bf16 weights, fp32 biases) compute in fp32
            dtype = floats.pop() if len(floats) == 1 else torch.float32
        for name in TENSOR_NAMES:
            tensors.setdefault(name, torch.zeros(shapes[name], dtype=dtype))
        unknown = sorted(set(tensors) - set(TENSOR_NAMES))
        if unknown:
            raise ValueError(f"{where}: unexpected tensors {unknown}; a JumpReLUSAE has {TENSOR_NAMES}")
        check_shapes(cfg, tensors, where)
        self.W_enc = nn.Parameter(tensors["W_enc"].detach().to(dtype).clone())  # [d_in, d_sae]
        self.b_enc = nn.Parameter(tensors["b_enc"].detach().to(dtype).clone())  # [d_sae]
        self.W_dec = nn.Parameter(tensors["W_dec"].detach().to(dtype).clone())  # [d_sae, d_out]
        self.b_dec = nn.Parameter(tensors["b_dec"].detach().to(dtype).clone())  # [d_out]
        self.threshold = nn.Parameter(tensors["threshold"].detach().to(dtype).clone())  # [d_sae]

    # -- facts -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def tensors(self) -> dict[str, torch.Tensor]:
        """The five tensors, detached (for saving and conversion)."""
        return {name: getattr(self, name).detach() for name in TENSOR_NAMES}

    def extra_repr(self) -> str:
        c = self.cfg
        where = f"{c.site}->{c.out_site}" if c.out_site else c.site
        return f"{c.kind} {where} d_in={c.d_in} d_sae={c.d_sae} d_out={c.d_out} k={c.k} model={c.model!r}"

    # -- checks ------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE for {self.cfg.site} expects inputs [..., d_in={self.cfg.d_in}], "
                f"got shape {tuple(x.shape)}"
            )

    def check_compatible(self, lm: ModelLike) -> None:
        """Raise a ValueError when this SAE cannot read `lm`'s activations."""
        c = self.cfg
        if c.model and not _same_model(c.model, lm.name):
            raise ValueError(f"SAE at {c.site} was trained for model {c.model!r}, not {lm.name!r}")
        if c.d_in != lm.d_model:
            raise ValueError(f"SAE at {c.site} has d_in={c.d_in} but {lm.name!r} has d_model={lm.d_model}")
        if c.kind == "transcoder" and c.d_out != lm.d_model:
            raise ValueError(
                f"transcoder {c.site}->{c.out_site} has d_out={c.d_out} but {lm.name!r} has d_model={lm.d_model}"
            )
        layers = [c.layer] + ([Site.parse(c.out_site).layer] if c.out_site else [])
        if max(layers) >= lm.n_layers:
            raise ValueError(f"SAE at {c.site} needs layer {max(layers)} but {lm.name!r} has {lm.n_layers} layers")

    # -- the computation ---------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> encoder pre-activations [..., d_sae]."""
        self.check_input(x)
        x = x.to(self.dtype)
        if self.cfg.input_scale != 1.0:
            x = x * self.cfg.input_scale
        return x @ self.W_enc + self.b_enc  # [..., d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> latents f [..., d_sae]."""
        pre = self.pre_acts(x)  # [..., d_sae]
        f = torch.relu(pre) * (pre > self.threshold)  # [..., d_sae]
        if self.cfg.k is not None:
            top = f.topk(self.cfg.k, dim=-1)
            f = torch.zeros_like(f).scatter(-1, top.indices, top.values)  # [..., d_sae]
        return f

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f: [..., d_sae] -> reconstruction [..., d_out] in the model's units."""
        if f.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"decode expects latents [..., d_sae={self.cfg.d_sae}], got shape {tuple(f.shape)}")
        out = f.to(self.dtype) @ self.W_dec + self.b_dec  # [..., d_out]
        return out / self.cfg.output_scale if self.cfg.output_scale != 1.0 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- equivalent rewrites -----------------------------------------------------------------
    @torch.no_grad()
    def folded(self) -> "JumpReLUSAE":
        """An equivalent SAE with input_scale = output_scale = 1 (scales moved into the weights)."""
        t = self.tensors()
        s_in, s_out = self.cfg.input_scale, self.cfg.output_scale
        new = {
            "W_enc": t["W_enc"] * s_in,  # (x * s) @ W = x @ (s * W)
            "b_enc": t["b_enc"].clone(),
            "W_dec": t["W_dec"] / s_out,
            "b_dec": t["b_dec"] / s_out,
            "threshold": t["threshold"].clone(),
        }
        cfg = replace(self.cfg, input_scale=1.0, output_scale=1.0, extra=dict(self.cfg.extra))
        return JumpReLUSAE(cfg, new).to(self.device).requires_grad_(self.W_enc.requires_grad)


def fold_b_dec_into_b_enc(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """b_enc' such that (x - b_dec) @ W_enc + b_enc == x @ W_enc + b_enc' (SAELens apply_b_dec_to_input).

    W_enc: [d_in, d_sae], b_enc: [d_sae], b_dec: [d_in] -> [d_sae]. The threshold is unchanged,
    since the pre-activations themselves are identical.
    """
    if b_dec.shape != (W_enc.shape[0],):
        raise ValueError(f"cannot subtract b_dec {tuple(b_dec.shape)} from inputs of size {W_enc.shape[0]}")
    return b_enc - b_dec @ W_enc


def gated_to_jumprelu(
    W_enc: torch.Tensor,  # [d_in, d_sae]
    b_gate: torch.Tensor,  # [d_sae]
    b_mag: torch.Tensor,  # [d_sae]
    r_mag: torch.Tensor,  # [d_sae]
    W_dec: torch.Tensor,  # [d_sae, d_out]
    b_dec: torch.Tensor,  # [d_out]
    cfg: SAEConfig,
    b_dec_on_input: bool,
) -> JumpReLUSAE:
    """Exact conversion of a Gated SAE (Rajamanoharan et al. 2024) into a JumpReLU SAE.

    Gated: x' = x - b_dec (if b_dec_on_input) else x, e = x' @ W_enc,
        gate = e + b_gate, mag = exp(r_mag) * e + b_mag, f = 1[gate > 0] * relu(mag).
    Since exp(r_mag) > 0, e = (mag - b_mag) / exp(r_mag), so
        gate > 0  <=>  mag > b_mag - exp(r_mag) * b_gate =: threshold.
    Hence f = relu(mag) * (mag > threshold): a JumpReLU whose pre-activation is mag, i.e.
    W_enc' = W_enc * exp(r_mag), b_enc' = b_mag (minus b_dec @ W_enc' when b_dec is subtracted).
    A negative threshold is fine: relu already zeroes mag <= 0, exactly as 1[gate>0]*relu(mag) does.
    """
    scale = torch.exp(r_mag)  # [d_sae]
    W = W_enc * scale  # [d_in, d_sae]
    b_enc = fold_b_dec_into_b_enc(W, b_mag, b_dec) if b_dec_on_input else b_mag.clone()
    threshold = b_mag - scale * b_gate  # [d_sae]
    tensors = {"W_enc": W, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
    return JumpReLUSAE(cfg, tensors, where="gated_to_jumprelu")
