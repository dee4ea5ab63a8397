"""A causal LM with named hook sites: read, change and differentiate any site in one pass.

`LM.run` is the one primitive everything else uses. It registers hooks for one forward pass,
skips blocks before `start_layer` (when resuming from a cached resid_pre), stops as soon as
the last site anyone needs has been produced, and computes log-probs only at the positions a
loss needs, never full-vocabulary logits everywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from icl_circuits.core.adapters import Adapter, adapter_for, first_tensor, logit_softcap, replace_first
from icl_circuits.core.sites import Intervention, Site, SiteLike


@dataclass
class RunOutput:
    """What one forward pass produced.

    acts: site -> activation [batch, seq, width] as the model used it (after interventions);
        width is d_model, or n_heads * head_dim at attn_z (LM.site_width).
    probes: site -> zero tensor [batch, seq, width] added at the site; after backward its
        .grad is d(metric)/d(site).
    logprobs: [n_positions, vocab] log-softmax at the positions asked for, in the row-major
        order of the mask (i.e. torch.nonzero order), or None.
    target_logprobs: [n_positions] log-prob of the given targets, when targets were passed
        (computed in chunks, so [n_positions, vocab] never exists at once).
    logits: [batch, seq, vocab] only when full_logits=True (tests and baselines).
    hidden: [n_positions, d_model] final (normed) hidden states at logprob_positions, when
        unembed=False: the caller unembeds several runs at once (one pass over the vocabulary).
    """

    acts: dict[Site, torch.Tensor] = field(default_factory=dict)
    probes: dict[Site, torch.Tensor] = field(default_factory=dict)
    logprobs: torch.Tensor | None = None
    target_logprobs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def grad(self, site: SiteLike) -> torch.Tensor:
        g = self.probes[Site.parse(site)].grad
        if g is None:
            raise RuntimeError(f"no gradient at {site}: call backward on a metric of this run first")
        return g


class _StopForward(Exception):
    """Raised by a hook once every needed site is computed, to skip the remaining blocks."""


class _SkipBlock(nn.Module):
    """Stands in for a block before start_layer: passes the residual through untouched."""

    def __init__(self, like: nn.Module) -> None:
        super().__init__()
        self.attention_type = getattr(like, "attention_type", None)  # some models read it per block

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


class _Pass:
    """Per-run state shared by the hooks of one forward pass."""

    def __init__(
        self,
        read: set[Site],
        probe: set[Site],
        interventions: Sequence[Intervention],
        stop_at: Site | None,
        start_layer: int,
        start_resid: torch.Tensor | None,
    ) -> None:
        self.read, self.probe, self.stop_at = read, probe, stop_at
        self.start_layer, self.start_resid = start_layer, start_resid
        self.by_site: dict[Site, list[Intervention]] = {}
        for iv in interventions:
            self.by_site.setdefault(iv.site, []).append(iv)
        self.out = RunOutput()
        self.resid_pre: dict[int, torch.Tensor] = {}
        self.resid_mid: dict[int, torch.Tensor] = {}
        # module-input sites, kept so that 'fn' interventions can read them (a transcoder
        # spliced at mlp_out.l reads mlp_in.l) even when nobody asked to read them
        self.attn_z: dict[int, torch.Tensor] = {}
        self.mlp_in: dict[int, torch.Tensor] = {}

    def touches(self, site: Site) -> bool:
        return site in self.read or site in self.probe or site in self.by_site

    def value_of(self, site: Site) -> torch.Tensor:
        """A site already computed in this pass (for 'fn' interventions)."""
        kept = {
            "resid_pre": self.resid_pre, "resid_mid": self.resid_mid, "attn_z": self.attn_z, "mlp_in": self.mlp_in,
        }  # fmt: skip
        found = kept.get(site.kind, {}).get(site.layer)
        if found is None:
            found = self.out.acts.get(site)
        if found is None:
            raise ValueError(f"{site} is not available yet in this pass (read it, or use an earlier site)")
        return found

    def apply(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        """Intervene, add the gradient probe, record; then stop if nothing later is needed."""
        for iv in self.by_site.get(site, ()):
            x = iv.apply(x, self.value_of)
        if site in self.probe:
            p = torch.zeros_like(x, requires_grad=True)
            self.out.probes[site] = p
            x = x + p
        if site in self.read:
            self.out.acts[site] = x
        if site == self.stop_at:
            raise _StopForward
        return x


class LM:
    """Tokenizer + causal LM + the per-family adapter that locates the hook sites."""

    def __init__(self, model: nn.Module, tokenizer: object | None = None, name: str = "model") -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # we differentiate w.r.t. activations, never the LM's weights
        self.tokenizer = tokenizer
        self.name = name
        self.adapter: Adapter = adapter_for(model)
        self._blocks = self.adapter.blocks(model)
        self._base = self.adapter.base_model(model)
        self._lm_head: nn.Module = model.get_output_embeddings()
        self._unembed_copies: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._softcap = logit_softcap(model)
        # transformers 5.x renames the KV-cache argument `past_key_values` -> `cache` (the old name warns)
        params = inspect.signature(self._base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    # -- basic facts -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self._blocks)

    @property
    def d_model(self) -> int:
        return int(self._lm_head.weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self._lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._lm_head.weight.dtype

    @property
    def d_z(self) -> int:
        """Width of attn_z (n_heads * head_dim), the input of each attention output projection."""
        return self.adapter.z_width(self._blocks[0])

    def site_width(self, site: SiteLike) -> int:
        """Last dimension of a site's activations: d_model, or n_heads * head_dim for attn_z."""
        s = Site.parse(site)
        if s.kind == "attn_z":
            return self.adapter.z_width(self._blocks[min(s.layer, self.n_layers - 1)])
        return self.d_model

    def sites(self, kinds: Iterable[str], layers: Iterable[int] | None = None) -> list[Site]:
        layers = range(self.n_layers) if layers is None else layers
        return [Site(layer, kind) for layer in layers for kind in kinds]

    # -- the primitive -----------------------------------------------------------------------
    def run(
        self,
        input_ids: torch.Tensor,  # [batch, seq]
        attention_mask: torch.Tensor | None = None,  # [batch, seq]
        *,
        read: Iterable[SiteLike] = (),
        probe: Iterable[SiteLike] = (),
        interventions: Sequence[Intervention] = (),
        start_layer: int = 0,
        start_resid: torch.Tensor | None = None,  # [batch, seq, d_model] = resid_pre[start_layer]
        logprob_positions: torch.Tensor | None = None,  # [batch, seq] bool
        targets: torch.Tensor | None = None,  # [n_positions] token ids, one per True in logprob_positions
        full_logits: bool = False,
        past_key_values: object | None = None,  # an HF cache holding the keys/values of earlier tokens
        unembed: bool = True,
    ) -> RunOutput:
        """One forward pass with hooks. Gradients flow unless the caller uses torch.no_grad().

        With past_key_values, input_ids (and start_resid) are the tokens that follow the cached
        ones; the cache is updated in place, as in transformers.

        With targets, only their log-probs are returned (RunOutput.target_logprobs), computed
        chunk by chunk: use this for next-token loss over many positions.
        """
        read_s = {Site.parse(s) for s in read}
        probe_s = {Site.parse(s) for s in probe}
        touched = read_s | probe_s | {iv.site for iv in interventions}
        self._check_inputs(input_ids, attention_mask, touched, start_layer, start_resid, logprob_positions)

        needs_output = logprob_positions is not None or full_logits
        stop_at = None if needs_output else max(read_s | probe_s, key=lambda s: s.order, default=None)
        if stop_at is None and not needs_output:
            raise ValueError("run() needs something to return: read/probe sites or logprob_positions")
        state = _Pass(read_s, probe_s, interventions, stop_at, start_layer, start_resid)

        hook_layers = {s.layer for s in touched} | ({start_layer} if start_resid is not None else set())
        hidden: torch.Tensor | None = None
        with self._hooks(state, hook_layers), self._skipping(start_layer):
            try:
                cache = {} if past_key_values is None else {self._cache_kwarg: past_key_values}
                out = self._base(
                    input_ids=input_ids.to(self.device),
                    attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                    use_cache=past_key_values is not None,
                    **cache,
                )
                hidden = out.last_hidden_state  # [batch, seq, d_model], final norm applied
            except _StopForward:
                pass

        result = state.out
        if hidden is not None and logprob_positions is not None:
            selected = hidden[logprob_positions.to(hidden.device)]  # [n, d_model]
            if not unembed:
                result.hidden = selected
            elif targets is None:
                result.logprobs = self._logprobs(selected)
            else:
                result.target_logprobs = self._target_logprobs(selected, targets.to(hidden.device))
        if hidden is not None and full_logits:
            result.logits = self._logits(hidden)
        return result

    # -- conveniences over run() -------------------------------------------------------------
    @torch.no_grad()
    def activations(self, input_ids: torch.Tensor, sites: Iterable[SiteLike], **kwargs: object) -> dict[Site, torch.Tensor]:
        """Read sites in one no-grad pass that stops after the last one."""
        return self.run(input_ids, read=sites, **kwargs).acts  # type: ignore[arg-type]

    def gradients(
        self,
        input_ids: torch.Tensor,
        metric: Callable[[RunOutput], torch.Tensor],
        sites: Iterable[SiteLike],
        **kwargs: object,
    ) -> tuple[torch.Tensor, dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
        """(metric value, activations, d metric / d site) for each site, from one forward+backward."""
        sites = [Site.parse(s) for s in sites]
        with torch.enable_grad():
            out = self.run(input_ids, read=sites, probe=sites, **kwargs)  # type: ignore[arg-type]
            value = metric(out)
            value.backward()
        acts = {s: a.detach() for s, a in out.acts.items()}
        return value.detach(), acts, {s: out.grad(s) for s in sites}

    # -- internals ---------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if dtype is None or dtype == self.dtype:
            logits = self._lm_head(hidden)
        else:  # a cached low-precision copy of the output matrix (see logprobs_of)
            if dtype not in self._unembed_copies:
                bias = getattr(self._lm_head, "bias", None)
                self._unembed_copies[dtype] = (self._lm_head.weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
            W, b = self._unembed_copies[dtype]
            logits = nn.functional.linear(hidden.to(dtype), W, b)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # log-softmax over a large vocab needs at least fp32
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def logprobs_of(self, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Final hidden states [n, d_model] (RunOutput.hidden) -> log-probs [n, vocab], differentiable.

        dtype=torch.bfloat16 multiplies by a bf16 copy of the output matrix: on CPUs with bf16 units
        ~3x faster, since reading the [vocab, d_model] matrix dominates a few-position step, but
        logits are off by up to ~0.1. Good for optimisation steps, not for reported scores.
        """
        return torch.log_softmax(self._logits(hidden, dtype), dim=-1)

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self._logits(hidden), dim=-1)

    def _target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """hidden [n, d_model], targets [n] -> [n]; at most [chunk, vocab] logits alive at once."""
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"targets must be [n_positions={hidden.shape[0]}], got {tuple(targets.shape)}")
        out = []
        for i in range(0, hidden.shape[0], chunk):
            lp = self._logprobs(hidden[i : i + chunk])  # [chunk, vocab]
            out.append(lp.gather(-1, targets[i : i + chunk, None])[:, 0])
        return torch.cat(out) if out else hidden.new_zeros(0)

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        touched: set[Site],
        start_layer: int,
        start_resid: torch.Tensor | None,
        logprob_positions: torch.Tensor | None,
    ) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
        if attention_mask is not None and tuple(attention_mask.shape) != shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {shape}")
        for site in touched:
            if site.layer >= self.n_layers:
                raise ValueError(f"site {site} is past the last layer ({self.n_layers - 1})")
            if site.layer < start_layer:
                raise ValueError(f"site {site} comes before start_layer={start_layer}, which is skipped")
        if not 0 <= start_layer < self.n_layers:
            raise ValueError(f"start_layer must be in [0, {self.n_layers}), got {start_layer}")
        if start_layer > 0 and start_resid is None:
            raise ValueError("start_layer > 0 needs start_resid (the cached resid_pre of that layer)")
        if start_resid is not None and tuple(start_resid.shape) != (*shape, self.d_model):
            raise ValueError(
                f"start_resid must be [batch, seq, d_model] = {(*shape, self.d_model)}, got {tuple(start_resid.shape)}"
            )
        if logprob_positions is not None and (
            logprob_positions.dtype != torch.bool or tuple(logprob_positions.shape) != shape
        ):
            raise ValueError(f"logprob_positions must be a bool mask of shape {shape}")

    @contextmanager
    def _skipping(self, start_layer: int) -> Iterator[None]:
        """Temporarily swap blocks before start_layer for pass-throughs (indices stay intact)."""
        saved = [self._blocks[i] for i in range(start_layer)]
        try:
            for i in range(start_layer):
                self._blocks[i] = _SkipBlock(saved[i])
            yield
        finally:
            for i, block in enumerate(saved):
                self._blocks[i] = block

    @contextmanager
    def _hooks(self, state: _Pass, layers: set[int]) -> Iterator[None]:
        handles = []
        try:
            for layer in sorted(layers):
                block = self._blocks[layer]
                handles.append(block.register_forward_pre_hook(self._pre_hook(state, layer), with_kwargs=True))
                # module-input sites: pre-hooks on the output projection and on the MLP
                z_hook = self._input_hook(state, Site(layer, "attn_z"), state.attn_z)
                handles.append(self.adapter.o_proj_module(block).register_forward_pre_hook(z_hook, with_kwargs=True))
                mlp_hook = self._input_hook(state, Site(layer, "mlp_in"), state.mlp_in)
                handles.append(self.adapter.mlp_in_module(block).register_forward_pre_hook(mlp_hook, with_kwargs=True))
                handles.append(self.adapter.attn_module(block).register_forward_hook(self._attn_hook(state, layer)))
                handles.append(self.adapter.mlp_module(block).register_forward_hook(self._mlp_hook(state, layer)))
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _pre_hook(state: _Pass, layer: int) -> Callable:
        site = Site(layer, "resid_pre")

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = args[0] if args else kwargs["hidden_states"]  # [batch, seq, d_model]
            if layer == state.start_layer and state.start_resid is not None:
                x = state.start_resid.to(device=x.device, dtype=x.dtype)
            x = state.apply(site, x) if state.touches(site) else x
            state.resid_pre[layer] = x
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    @staticmethod
    def _input_hook(state: _Pass, site: Site, keep: dict[int, torch.Tensor]) -> Callable:
        """Pre-hook for a site that is a module's first input (attn_z, mlp_in)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            key = None if args else next(iter(kwargs))  # HF passes these positionally; be safe anyway
            x = args[0] if args else kwargs[key]  # [batch, seq, width]
            x = state.apply(site, x) if state.touches(site) else x
            keep[site.layer] = x
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, key: x}

        return hook

    @staticmethod
    def _attn_hook(state: _Pass, layer: int) -> Callable:
        attn_site, mid_site = Site(layer, "attn_out"), Site(layer, "resid_mid")

        def hook(module: nn.Module, args: tuple, output: object) -> object:
            a = first_tensor(output)  # [batch, seq, d_model]
            if state.touches(attn_site):
                a = state.apply(attn_site, a)
            pre = state.resid_pre[layer]
            mid = pre + a  # kept for resid_post and for 'fn' interventions (e.g. transcoders)
            if state.touches(mid_site):
                new_mid = state.apply(mid_site, mid)
                if new_mid is not mid:
                    a, mid = new_mid - pre, new_mid  # the block re-adds pre, giving new_mid
            state.resid_mid[layer] = mid
            return replace_first(output, a)

        return hook

    @staticmethod
    def _mlp_hook(state: _Pass, layer: int) -> Callable:
        mlp_site, post_site = Site(layer, "mlp_out"), Site(layer, "resid_post")

        def hook(module: nn.Module, args: tuple, output: object) -> object:
            m = first_tensor(output)  # [batch, seq, d_model]
            if state.touches(mlp_site):
                m = state.apply(mlp_site, m)
            if state.touches(post_site):
                mid = state.resid_mid[layer]
                post = mid + m
                new_post = state.apply(post_site, post)
                if new_post is not post:
                    m = new_post - mid
            return replace_first(output, m)

        return hook
