"""Hook sites and interventions on the residual stream.

A *site* names one activation of one layer, TransformerLens style:

    resid_pre[l]  -- input of block l (= resid_post[l-1])
    attn_z[l]     -- the heads' outputs concatenated, the input of the attention output
                     projection (o_proj / c_proj), TransformerLens hook_z flattened;
                     width n_heads * head_dim, which need not equal d_model
    attn_out[l]   -- what attention adds to the residual (after any post-attention norm)
    resid_mid[l]  -- resid_pre[l] + attn_out[l]
    mlp_in[l]     -- the MLP's input: the normalised resid_mid (Gemma 2/3
                     pre_feedforward_layernorm output, Llama post_attention_layernorm, GPT-2 ln_2)
    mlp_out[l]    -- what the MLP adds to the residual (after any post-feedforward norm)
    resid_post[l] -- resid_mid[l] + mlp_out[l]

Every site has shape [batch, seq, width]: width is d_model except for attn_z
(`LM.site_width(site)` gives it). SITE_KINDS lists the kinds in forward order; SAE_KIND_SITES
says which sites each SAE kind (resid, attn, transcoder) reads and writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

# forward order within a block (Site.order relies on it)
SITE_KINDS: tuple[str, ...] = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
# The one table of SAE kinds (keys in forward order within a layer) and, per kind, every (site read, site
# written) an SAE of that kind may have, the starter suite's first. Here, below every SAE module, so the SAE
# format, the registry, training and circuits all derive their views from it. Gemma Scope 2 SAEs read attn_z
# (the heads' outputs before o_proj) and transcoders read mlp_in (the normalised MLP input); resid_post.L-1
# is resid_pre.L (Site.canonical).
SAE_KIND_SITES: dict[str, tuple[tuple[str, str], ...]] = {
    "resid": (("resid_pre", "resid_pre"),),
    "attn": (("attn_out", "attn_out"), ("attn_z", "attn_z")),
    "transcoder": (("resid_mid", "mlp_out"), ("mlp_in", "mlp_out")),
}
SAE_KINDS: tuple[str, ...] = tuple(SAE_KIND_SITES)  # forward order within a layer
# TransformerLens hook names that differ from ours. TL's hook_mlp_in is the MLP block's input
# *before* ln2, i.e. our resid_mid; the normalised MLP input (our mlp_in) is ln2.hook_normalized.
_TL_ALIASES: dict[str, str] = {"attn.hook_z": "attn_z", "ln2.hook_normalized": "mlp_in", "hook_mlp_in": "resid_mid"}
_PATTERNS = (
    re.compile(r"^(?P<kind>[a-z_]+)\.(?P<layer>\d+)$"),  # resid_pre.12
    re.compile(r"^(?P<kind>[a-z_]+)\[(?P<layer>\d+)\]$"),  # resid_pre[12]
    re.compile(r"^blocks\.(?P<layer>\d+)\.(?:hook_)?(?P<kind>[a-z_]+)$"),  # blocks.12.hook_resid_pre
)
_TL_ALIAS = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<hook>attn\.hook_z|ln2\.hook_normalized|hook_mlp_in)$")


@dataclass(frozen=True, order=True)
class Site:
    """One activation site: a kind from SITE_KINDS at one layer."""

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; expected one of {SITE_KINDS}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass (layer, index within the block)."""
        return (self.layer, SITE_KINDS.index(self.kind))

    def canonical(self) -> "Site":
        """resid_post.L is the same tensor as resid_pre.L+1: one name for both (resid_pre)."""
        return Site(self.layer + 1, "resid_pre") if self.kind == "resid_post" else self

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, spec: "SiteLike") -> "Site":
        """Accept a Site, a (kind, layer) tuple, or 'resid_pre.12' / 'resid_pre[12]' / 'blocks.12.hook_resid_pre'."""
        if isinstance(spec, Site):
            return spec
        if isinstance(spec, tuple) and len(spec) == 2:
            kind, layer = spec
            return cls(layer=int(layer), kind=str(kind))
        if isinstance(spec, str):
            m = _TL_ALIAS.match(spec.strip())
            if m:
                return cls(layer=int(m["layer"]), kind=_TL_ALIASES[m["hook"]])
            for pattern in _PATTERNS:
                m = pattern.match(spec.strip())
                if m:
                    return cls(layer=int(m["layer"]), kind=m["kind"])
        raise ValueError(f"cannot parse site {spec!r}; use e.g. 'resid_pre.12' or ('resid_pre', 12)")


SiteLike = Site | str | tuple[str, int]


# fn(x, value_of) -> new site value; value_of(site) returns a site already computed in this pass
# (e.g. a transcoder spliced at mlp_out.l reads resid_mid.l).
SiteFn = Callable[[torch.Tensor, Callable[["Site"], torch.Tensor]], torch.Tensor]


@dataclass
class Intervention:
    """Change a site at chosen token positions, differentiably.

    positions: bool mask [batch, seq] (True where the change applies).
    value: broadcastable to [batch, seq, width], e.g. a vector [width] or one row
        per position [batch, seq, width] (width = d_model, or n_heads * head_dim at attn_z).
        Unused when mode='fn'.
    mode: 'add' adds value; 'replace' overwrites the site with value; 'fn' replaces it with
        fn(x, value_of) computed during the pass (used to splice SAEs in).
    """

    site: Site
    positions: torch.Tensor  # [batch, seq] bool
    value: torch.Tensor | None = None  # [width] or broadcastable to [batch, seq, width]
    mode: Literal["add", "replace", "fn"] = "add"
    fn: SiteFn | None = None

    def __post_init__(self) -> None:
        self.site = Site.parse(self.site)
        if self.mode not in ("add", "replace", "fn"):
            raise ValueError(f"mode must be 'add', 'replace' or 'fn', got {self.mode!r}")
        if (self.mode == "fn") != (self.fn is not None) or (self.mode != "fn" and self.value is None):
            raise ValueError("mode 'fn' takes fn=...; modes 'add' and 'replace' take value=...")
        if self.positions.dtype != torch.bool or self.positions.dim() != 2:
            raise ValueError(
                f"positions must be a bool mask [batch, seq], got dtype {self.positions.dtype} "
                f"shape {tuple(self.positions.shape)}"
            )

    def apply(self, x: torch.Tensor, value_of: Callable[[Site], torch.Tensor] | None = None) -> torch.Tensor:
        """x: [batch, seq, width] -> same shape with the change applied."""
        if self.positions.shape != x.shape[:2]:
            raise ValueError(
                f"intervention at {self.site}: positions mask has shape {tuple(self.positions.shape)} "
                f"but the activation is [batch, seq] = {tuple(x.shape[:2])}"
            )
        if self.mode == "fn":
            assert self.fn is not None and value_of is not None
            value = self.fn(x, value_of)
        else:
            value = self.value  # type: ignore[assignment]
        if value.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"intervention at {self.site}: value has last dim {value.shape[-1]}, site has width {x.shape[-1]}"
            )
        mask = self.positions.to(x.device).unsqueeze(-1)  # [batch, seq, 1]
        value = value.to(device=x.device, dtype=x.dtype)
        if self.mode == "add":
            return x + mask.to(x.dtype) * value
        return torch.where(mask, value.expand_as(x), x)


def same_site(a: SiteLike, b: SiteLike) -> bool:
    """a and b hold the same tensor: equal, or resid_post.L vs resid_pre.L+1."""
    return Site.parse(a).canonical() == Site.parse(b).canonical()


def add_at(site: SiteLike, positions: torch.Tensor, vector: torch.Tensor) -> Intervention:
    """Shorthand: add `vector` [width] at `positions` [batch, seq] of `site`."""
    return Intervention(Site.parse(site), positions, vector, "add")
