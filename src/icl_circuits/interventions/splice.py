"""Splicing an SAE (or transcoder) into the forward pass: the one mechanism every caller uses.

At the SAE's output site y, with x the SAE's input (y itself, or an earlier site of the same pass
for a transcoder: mlp_in / resid_mid -> mlp_out), f = encode(x) and the error e = y - decode(f, x):

    error kept (keep_error=True):     out = y         - decode_linear(f * ablate) - ablate_error * e
    error dropped (the default):      out = decode(f, x) - decode_linear(f * ablate)

decode_linear(g) = g @ W_dec / output_scale is the decoder without its bias: zeroing latents removes
only their rows. The error-kept form is written as y minus what is removed, so with nothing removed
the spliced model is the original one, bit for bit.

Gradients (grad=...):
    'through' -- through the SAE, as computed (the default);
    'leaves'  -- zero leaves are added to the latents and the error (out += decode_linear(latent_leaf)
                 + error_leaf): after backward, latent_leaf.grad = dm/df and error_leaf.grad = dm/de,
                 for attribution; the recorded latents and error are detached;
    'stop'    -- the output is detached: nothing upstream is reached through this site (the latents and
                 error recorded keep their graph, so they can be differentiated towards earlier leaves).

The splice is an `Intervention` (mode 'fn'): pass it to `LM.run(interventions=[...])`. After a pass it
holds what the SAE saw there: `latents`, `error` (computed on first use), `latent_leaf`, `error_leaf`.

Used by sae/evaluation.py (CE loss recovered), methods/circuits/spliced.py (the spliced model of faithfulness
and IE quality), methods/circuits/edges.py (edge effects) and methods/link.py (latent ablation of the detector ->
executor link).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch

from icl_circuits.core.sites import Intervention, Site, SiteLike

if TYPE_CHECKING:  # the SAE layer imports this module (sae/evaluation.py): no import at run time
    from icl_circuits.sae.dictionary import JumpReLUSAE

Grad = Literal["through", "leaves", "stop"]
GRADS: tuple[str, ...] = ("through", "leaves", "stop")


def in_out_sites(sae: JumpReLUSAE, canonical: bool = False) -> tuple[Site, Site]:
    """(site the SAE reads, site its output replaces).

    Gemma Scope 2 style SAEs: an attn_z SAE reads and replaces attn_z (o_proj then carries the
    change on to attn_out); a transcoder reads mlp_in (or resid_mid) and replaces mlp_out.
    canonical=True writes resid_post.L as resid_pre.L+1 (the same tensor, see Site.canonical).
    """
    cfg = sae.cfg
    src, dst = Site.parse(cfg.site), Site.parse(cfg.out_site or cfg.site)
    return (src.canonical(), dst.canonical()) if canonical else (src, dst)


def sparse_matmul(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """f [..., d_sae] (mostly zeros: SAE latents) @ w [d_sae, d] -> [..., d]; ~4x faster than dense on CPU."""
    if f.device.type not in ("cpu", "cuda"):  # MPS has no sparse matmul; the dense product is the same
        return f @ w
    flat = f.reshape(-1, f.shape[-1])
    return torch.sparse.mm(flat.to_sparse(), w).reshape(*f.shape[:-1], w.shape[-1])


class SAESplice(Intervention):
    """An SAE spliced in at its output site (an Intervention, mode 'fn'); build it with `splice`."""

    def __init__(
        self,
        sae: JumpReLUSAE,
        positions: torch.Tensor,  # [batch, seq] bool
        sites: tuple[Site, Site],  # (input site, output site)
        keep_error: bool,
        removed: Callable[[torch.Tensor], torch.Tensor] | None,  # f -> decode_linear(ablated latents) (`_removal`)
        ablate_error: torch.Tensor | None,  # [..., 1], None when no error is ablated
        grad: Grad,
    ) -> None:
        # fn must not hold self: a bound method would make a reference cycle, and every pass's latents
        # ([batch, seq, d_sae] per SAE) would then live until the garbage collector happens to run
        # (~3 GB per metrics call with 24 SAEs: the out-of-memory kills of `circuit --layers 10-17`)
        spliced = weakref.WeakMethod(self._spliced)
        super().__init__(sites[1], positions, mode="fn", fn=lambda y, value_of: spliced()(y, value_of))  # type: ignore[misc]
        self.sae, self.in_site, self.keep_error, self.grad = sae, sites[0], keep_error, grad
        self._removed, self.ablate_error = removed, ablate_error
        # filled in by each pass
        self.x: torch.Tensor | None = None  # [batch, seq, d_in] the SAE's input
        self.y: torch.Tensor | None = None  # [batch, seq, d_out] the site's value before the splice
        self.latents: torch.Tensor | None = None  # [batch, seq, d_sae]
        self.latent_leaf: torch.Tensor | None = None  # [batch, seq, d_sae] zeros (grad='leaves')
        self.error_leaf: torch.Tensor | None = None  # [batch, seq, d_out] zeros (grad='leaves')
        self._error: torch.Tensor | None = None

    @property
    def error(self) -> torch.Tensor:
        """[batch, seq, d_out] y - decode(f, x) of the last pass (a skip transcoder's x @ W_skip is not error)."""
        if self.latents is None:
            raise RuntimeError(f"splice at {self.site}: no pass has reached it yet")
        if self._error is None:
            err = self.y - self.sae.decode(self.latents, self.x)
            self._error = err.detach() if self.grad == "leaves" else err  # (the SAE's own parameters may require grad)
        return self._error

    def _reconstruction(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """decode(f, x) [..., d_out] with the sparse product (the same value as sae.decode up to rounding).

        Only for ablated error nodes, on the many-pattern path; `error` keeps sae.decode, so every caller's
        numbers are bit for bit what they were before the splice was shared."""
        sae = self.sae
        x_hat = (sparse_matmul(f, sae.W_dec) + sae.b_dec) / sae.cfg.output_scale
        return x_hat + sae.skip(x) if sae.W_skip is not None else x_hat

    def _spliced(self, y: torch.Tensor, value_of: Callable[[Site], torch.Tensor]) -> torch.Tensor:
        """y [batch, seq, d_out] -> the spliced value [batch, seq, d_out] (Intervention.apply picks the positions)."""
        sae = self.sae
        x = value_of(self.in_site) if self.in_site != self.site else y  # [batch, seq, d_in]
        f = sae.encode(x)  # [batch, seq, d_sae]
        leaves = self.grad == "leaves"
        self.x, self.y, self.latents = (x.detach(), y.detach(), f.detach()) if leaves else (x, y, f)
        self._error = None
        out = y if self.keep_error else sae.decode(f, x)
        if self._removed is not None:
            out = out - self._removed(f).to(out.dtype)
        if self.ablate_error is not None:
            a_e = self.ablate_error.to(y.dtype)  # [..., 1]
            out = out - a_e * (y - self._reconstruction(f, x).to(y.dtype))
        if leaves:
            self.latent_leaf = torch.zeros_like(f, requires_grad=True)
            self.error_leaf = torch.zeros_like(y, requires_grad=True)
            out = out + (self.latent_leaf @ sae.W_dec) / sae.cfg.output_scale + self.error_leaf
        return out.detach() if self.grad == "stop" else out


def _removal(
    sae: JumpReLUSAE, ablate: torch.Tensor | Sequence[int] | None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """f [..., d_sae] -> decode_linear of the ablated latents [..., d_out], or None when nothing is ablated."""
    if ablate is None:
        return None
    if not isinstance(ablate, torch.Tensor) or not (ablate.is_floating_point() or ablate.dtype == torch.bool):
        # a few latent ids, the same at every position: gather their decoder rows (cheap for a handful), and
        # remove them in float32 so a bf16 model loses exactly those latents (detection's link ablation)
        idx = torch.as_tensor(list(ablate) if not isinstance(ablate, torch.Tensor) else ablate, dtype=torch.long)
        if idx.dim() != 1 or (idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < sae.cfg.d_sae):
            raise ValueError(f"ablate: latent ids must be a list in 0..{sae.cfg.d_sae - 1}, got {idx.tolist()}")
        idx = idx.to(sae.W_dec.device)
        rows = sae.W_dec.detach()[idx].float() / sae.cfg.output_scale  # [k, d_out]
        return lambda f: f[..., idx].float() @ rows  # [..., k] @ [k, d_out]
    # a per-position pattern [..., d_sae] (1 / True = zeroed), e.g. one node pattern per batch copy: mostly
    # zeros, and run for thousands of patterns (faithfulness curves), hence the sparse product
    if ablate.shape[-1] != sae.cfg.d_sae:
        raise ValueError(f"ablate mask must be [..., d_sae={sae.cfg.d_sae}], got {tuple(ablate.shape)}")
    return lambda f: sparse_matmul(f * ablate.to(f.dtype), sae.W_dec) / sae.cfg.output_scale


def splice(
    sae: JumpReLUSAE,
    positions: torch.Tensor,  # [batch, seq] bool
    *,
    keep_error: bool = False,
    ablate: torch.Tensor | Sequence[int] | None = None,
    ablate_error: torch.Tensor | None = None,
    grad: Grad = "through",
    sites: tuple[SiteLike, SiteLike] | None = None,
) -> SAESplice:
    """Splice `sae` in at its output site, at `positions` [batch, seq] (elsewhere the site is untouched).

    keep_error: False replaces the site by the SAE's output sae(x) (skip path included); True keeps the
        error, so the site stays y except for what `ablate` / `ablate_error` remove.
    ablate: latents to zero: a list of ids (the same at every position; removed in float32), or a mask
        [..., d_sae] broadcastable to [batch, seq, d_sae] (1 / True = zeroed; removed with a sparse product).
    ablate_error: [..., 1] mask broadcastable to [batch, seq, 1], 1 where the error is zeroed (keep_error only).
    grad: 'through', 'leaves' or 'stop' (module docstring).
    sites: (input site, output site); default the SAE config's, as written (`in_out_sites`).
    """
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if ablate_error is not None and not keep_error:
        raise ValueError("ablate_error needs keep_error=True (without it the error is dropped everywhere)")
    in_site, out_site = in_out_sites(sae) if sites is None else (Site.parse(s) for s in sites)
    if ablate_error is not None and not ablate_error.any():
        ablate_error = None  # nothing to ablate: skip the reconstruction the error term needs
    return SAESplice(sae, positions, (in_site, out_site), keep_error, _removal(sae, ablate), ablate_error, grad)
