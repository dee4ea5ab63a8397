"""The one SAE inference format every algorithm in this package uses: a JumpReLU SAE.

    pre       = (x * input_scale) @ W_enc + b_enc           # [..., d_sae]
    f         = relu(pre) * (pre > threshold)               # then, if k is set, keep the top-k per row
    decode(f) = (f @ W_dec + b_dec) / output_scale          # [..., d_out]
    forward(x) = decode(encode(x)) + x @ W_skip             # W_skip [d_in, d_out] is optional

W_skip is the affine skip path of "skip transcoders" (Gemma Scope 2 `affine_skip_connection`,
SAELens `jumprelu_skip_transcoder`): a linear map of the raw input, in the model's own units
(no input/output scale applies to it). decode(f, x) adds it when given the input x; decode(f)
alone is the latents' part only.

A ReLU SAE is threshold = 0, a TopK SAE is threshold = 0 plus k, a Gated SAE converts exactly
(`gated_to_jumprelu`), and SAEs that subtract b_dec before encoding fold it into b_enc
(`fold_b_dec_into_b_enc`). A transcoder is the same thing with d_out != d_in (or out_site set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

import torch
from torch import nn

from icl_circuits.core.sites import SAE_KINDS, Site  # SAE_KINDS re-exported: tests and sae/__init__ import it here
from icl_circuits.core.storage import tensor_digest

TENSOR_NAMES: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
OPTIONAL_TENSOR_NAMES: tuple[str, ...] = ("W_skip",)  # [d_in, d_out], skip transcoders only


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
    """What check_compatible needs from an LM (icl_circuits.core.model.LM has all three)."""

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
    if "W_skip" in tensors:
        assert cfg.d_out is not None
        got = tuple(tensors["W_skip"].shape)
        if got != (cfg.d_in, cfg.d_out):
            raise ValueError(f"{where}: 'W_skip' has shape {got}, expected [d_in, d_out] = {(cfg.d_in, cfg.d_out)}")
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
        device = next((t.device for t in tensors.values()), torch.device("cpu"))  # missing tensors join the given ones
        for name in TENSOR_NAMES:
            tensors.setdefault(name, torch.zeros(shapes[name], dtype=dtype, device=device))
        unknown = sorted(set(tensors) - set(TENSOR_NAMES) - set(OPTIONAL_TENSOR_NAMES))
        if unknown:
            raise ValueError(
                f"{where}: unexpected tensors {unknown}; "
                f"a JumpReLUSAE has {TENSOR_NAMES} (+ optional {OPTIONAL_TENSOR_NAMES})"
            )
        check_shapes(cfg, tensors, where)
        self.W_enc = nn.Parameter(tensors["W_enc"].detach().to(dtype).clone())  # [d_in, d_sae]
        self.b_enc = nn.Parameter(tensors["b_enc"].detach().to(dtype).clone())  # [d_sae]
        self.W_dec = nn.Parameter(tensors["W_dec"].detach().to(dtype).clone())  # [d_sae, d_out]
        self.b_dec = nn.Parameter(tensors["b_dec"].detach().to(dtype).clone())  # [d_out]
        self.threshold = nn.Parameter(tensors["threshold"].detach().to(dtype).clone())  # [d_sae]
        self.W_skip: nn.Parameter | None = (  # [d_in, d_out] or None
            nn.Parameter(tensors["W_skip"].detach().to(dtype).clone()) if "W_skip" in tensors else None
        )

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

    @property
    def has_skip(self) -> bool:
        return self.W_skip is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The five tensors (plus W_skip when present), detached (for saving and conversion)."""
        out = {name: getattr(self, name).detach() for name in TENSOR_NAMES}
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip.detach()
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        where = f"{c.site}->{c.out_site}" if c.out_site else c.site
        skip = " +W_skip" if self.W_skip is not None else ""
        return f"{c.kind} {where} d_in={c.d_in} d_sae={c.d_sae} d_out={c.d_out} k={c.k}{skip} model={c.model!r}"

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
        layers = [c.layer] + ([Site.parse(c.out_site).layer] if c.out_site else [])
        if max(layers) >= lm.n_layers:
            raise ValueError(f"SAE at {c.site} needs layer {max(layers)} but {lm.name!r} has {lm.n_layers} layers")
        out = c.out_site or c.site
        for what, dim, site in (("d_in", c.d_in, c.site), ("d_out", c.d_out, out)):
            width = _site_width(lm, site)  # d_model, or n_heads * head_dim at attn_z
            if dim != width:
                name = "n_heads*head_dim" if Site.parse(site).kind == "attn_z" else "d_model"
                raise ValueError(f"SAE {c.site}->{out} has {what}={dim} but {lm.name!r} has {name}={width} at {site}")

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

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> x @ W_skip [..., d_out] (zeros without a skip connection)."""
        self.check_input(x)
        if self.W_skip is None:
            return x.new_zeros((*x.shape[:-1], int(self.cfg.d_out or self.cfg.d_in)), dtype=self.dtype)
        return x.to(self.dtype) @ self.W_skip  # [..., d_out]

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """f: [..., d_sae] -> reconstruction [..., d_out] in the model's units.

        x: the input [..., d_in] the latents came from; with a W_skip it adds x @ W_skip.
        Without x, the skip path is left out (a decoded direction or a steering vector has no input).
        """
        if f.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"decode expects latents [..., d_sae={self.cfg.d_sae}], got shape {tuple(f.shape)}")
        out = f.to(self.dtype) @ self.W_dec + self.b_dec  # [..., d_out]
        out = out / self.cfg.output_scale if self.cfg.output_scale != 1.0 else out
        if x is not None and self.W_skip is not None:
            out = out + self.skip(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> the SAE's full output [..., d_out], skip path included."""
        return self.decode(self.encode(x), x)

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
        if "W_skip" in t:  # acts on raw inputs, in model units: untouched by the scales
            new["W_skip"] = t["W_skip"].clone()
        cfg = replace(self.cfg, input_scale=1.0, output_scale=1.0, extra=dict(self.cfg.extra))
        return JumpReLUSAE(cfg, new).to(self.device).requires_grad_(self.W_enc.requires_grad)


def _site_width(lm: ModelLike, site: str) -> int:
    fn = getattr(lm, "site_width", None)  # icl_circuits.core.model.LM has it; plain ModelLikes are all-d_model
    return int(fn(site)) if callable(fn) else int(lm.d_model)


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


def sae_digest(sae: JumpReLUSAE) -> str:
    """Identity of an SAE for resume keys: its site and a content hash of its tensors."""
    return f"{sae.cfg.site}:{tensor_digest(*sae.tensors().values())}"
