"""Attention patterns frozen at their clean values (App. G, Fig. 11).

To ask "how much does feature A, through the values it writes, drive feature B later?" the
paper ablates A while keeping every attention pattern as it was on the clean prompt, so the
ablation cannot act by moving attention around. `FrozenAttention` does this for any family in
`adapters.py`:

    with FrozenAttention(lm, layers=[11]) as fa:
        fa.record()                      # next passes save each layer's softmax pattern
        clean = lm.run(...)
        fa.freeze()                      # next passes reuse the saved patterns; only values change
        ablated = lm.run(..., interventions=[...])

Inside the context the chosen layers' attention runs through the family's own eager attention
function (the one `transformers` uses for attn_implementation='eager'), registered under a name
of ours in `transformers`' AttentionInterface; the config is switched to that name and restored
on exit. Frozen passes must use the same batch (same shapes) as the recorded one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from icl_circuits.core.model import LM

IMPLEMENTATION = "icl_circuits_frozen"


class _LayerState:
    """What one attention module does inside the context, and what it last saw."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.mode = "off"  # 'off' (plain eager), 'record' or 'freeze'
        self.pattern: torch.Tensor | None = None  # [batch, heads, q, k] recorded clean pattern
        self.used: torch.Tensor | None = None  # [batch, heads, q, k] pattern used by the last pass


def _eager_for(module: nn.Module) -> Any:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(f"{type(module).__name__}: its modeling file has no eager_attention_forward")
    return fn


def _attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's eager attention; in 'freeze' mode the softmax pattern is swapped for the recorded one."""
    out, pattern = _eager_for(module)(module, query, key, value, attention_mask, **kwargs)  # pattern [b, h, q, k]
    state: _LayerState | None = getattr(module, "_icl_frozen_state", None)
    if state is None:
        return out, pattern
    if state.mode == "record":
        state.pattern = pattern.detach()
    elif state.mode == "freeze":  # out = pattern_clean @ V, heads of grouped-query attention share their K/V head
        if state.pattern is None:
            raise RuntimeError(f"layer {state.layer}: freeze() before any recorded pass")
        if state.pattern.shape != pattern.shape:
            raise ValueError(
                f"layer {state.layer}: recorded pattern {tuple(state.pattern.shape)} but this pass has "
                f"{tuple(pattern.shape)}; run the frozen pass on the same batch as the recorded one"
            )
        pattern = state.pattern.to(value.dtype)
        v = value.repeat_interleave(pattern.shape[1] // value.shape[1], dim=1)  # [b, h, k, d_head]
        out = torch.matmul(pattern, v).transpose(1, 2).contiguous()  # [b, q, h, d_head]
    state.used = pattern.detach()
    return out, pattern


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # eager attention adds a 4D float mask


def _attention_module(block: nn.Module) -> nn.Module:
    """The module inside a block that calls the attention function (has q/k/v and a config)."""
    for name in ("self_attn", "attn", "attention"):
        m = getattr(block, name, None)
        if isinstance(m, nn.Module) and hasattr(m, "config"):
            return m
    raise NotImplementedError(f"{type(block).__name__}: cannot find its attention module (self_attn / attn)")


class FrozenAttention:
    """Context manager: record clean attention patterns at `layers`, then replay them."""

    def __init__(self, lm: LM, layers: Iterable[int]) -> None:
        self.lm = lm
        self.layers = sorted(set(layers))
        if not self.layers:
            raise ValueError("FrozenAttention needs at least one layer")
        bad = [l for l in self.layers if not 0 <= l < lm.n_layers]
        if bad:
            raise ValueError(f"layers {bad} outside 0..{lm.n_layers - 1}")
        self.modules = {l: _attention_module(lm._blocks[l]) for l in self.layers}
        self.states = {l: _LayerState(l) for l in self.layers}
        self._saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> "FrozenAttention":
        configs = [self.lm.model.config] + [m.config for m in self.modules.values()]
        seen: set[int] = set()
        for c in configs:
            if id(c) not in seen:
                seen.add(id(c))
                self._saved.append((c, c._attn_implementation))
                c._attn_implementation = IMPLEMENTATION
        for l, m in self.modules.items():
            m._icl_frozen_state = self.states[l]
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.modules.values():
            if hasattr(m, "_icl_frozen_state"):
                del m._icl_frozen_state
        for c, impl in reversed(self._saved):
            c._attn_implementation = impl
        self._saved.clear()

    def record(self) -> None:
        """The next passes compute attention normally and save each layer's pattern."""
        for s in self.states.values():
            s.mode = "record"

    def freeze(self) -> None:
        """The next passes reuse the saved patterns (the batch must be the recorded one)."""
        for s in self.states.values():
            if s.pattern is None:
                raise RuntimeError(f"layer {s.layer}: nothing recorded yet; call record() and run a clean pass first")
            s.mode = "freeze"

    def release(self) -> None:
        """The next passes compute attention normally (still via eager attention)."""
        for s in self.states.values():
            s.mode = "off"

    def patterns(self) -> dict[int, torch.Tensor]:
        """{layer: recorded clean pattern [batch, heads, q, k]}."""
        return {l: s.pattern for l, s in self.states.items() if s.pattern is not None}

    def used_patterns(self) -> dict[int, torch.Tensor]:
        """{layer: pattern [batch, heads, q, k] the last pass actually used}."""
        return {l: s.used for l, s in self.states.items() if s.used is not None}
