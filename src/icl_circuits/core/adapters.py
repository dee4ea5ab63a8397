"""Per-family knowledge of where things live inside a `transformers` causal LM.

Each adapter names the decoder stack and the two modules whose outputs are exactly what a
block adds to the residual stream. That is all we need: resid_pre is the block input,
resid_mid / resid_post are sums we form ourselves, so sites are exact by construction.

Gemma 2/3 put a norm after attention and after the MLP (post_attention_layernorm,
post_feedforward_layernorm); their outputs are attn_out / mlp_out. In Llama-style
models `post_attention_layernorm` is the MLP *input* norm, hence the per-family table.

Two more sites are module *inputs*: attn_z is the input of the attention output projection
(heads concatenated, width n_heads * head_dim) and mlp_in is the input of the MLP (the
normalised residual: Gemma 2/3 pre_feedforward_layernorm, Llama post_attention_layernorm, GPT-2 ln_2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    family: str
    base: str  # attribute path from the CausalLM to the decoder-only base model
    layers: str  # attribute of the base model holding the ModuleList of blocks
    attn_out: str  # module inside a block whose output is what attention adds to the residual
    mlp_out: str  # module inside a block whose output is what the MLP adds to the residual
    o_proj: str = "self_attn.o_proj"  # attention output projection: its *input* is attn_z
    mlp: str = "mlp"  # the MLP itself: its *input* is mlp_in (the normalised residual)

    def base_model(self, model: nn.Module) -> nn.Module:
        return _getattr_path(model, self.base)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.base_model(model), self.layers)

    def attn_module(self, block: nn.Module) -> nn.Module:
        return _getattr_path(block, self.attn_out)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        return _getattr_path(block, self.mlp_out)

    def o_proj_module(self, block: nn.Module) -> nn.Module:
        return _getattr_path(block, self.o_proj)

    def mlp_in_module(self, block: nn.Module) -> nn.Module:
        return _getattr_path(block, self.mlp)

    def z_width(self, block: nn.Module) -> int:
        """n_heads * head_dim: the input width of the output projection (may differ from d_model)."""
        proj = self.o_proj_module(block)
        if hasattr(proj, "in_features"):  # nn.Linear
            return int(proj.in_features)
        return int(proj.weight.shape[0])  # GPT-2's Conv1D stores its weight as [in, out]


def _getattr_path(obj: object, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


_LLAMA_LIKE = dict(base="model", layers="layers", attn_out="self_attn", mlp_out="mlp")
_GEMMA_POSTNORM = dict(
    base="model", layers="layers", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm"
)

ADAPTERS: dict[str, Adapter] = {
    "gemma": Adapter("gemma", **_LLAMA_LIKE),
    "gemma2": Adapter("gemma2", **_GEMMA_POSTNORM),
    "gemma3_text": Adapter("gemma3", **_GEMMA_POSTNORM),
    "gemma3": Adapter("gemma3", **{**_GEMMA_POSTNORM, "base": "model.language_model"}),
    "llama": Adapter("llama", **_LLAMA_LIKE),
    "mistral": Adapter("llama", **_LLAMA_LIKE),
    "qwen2": Adapter("qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter("qwen2", **_LLAMA_LIKE),
    # Phi-3 adds dropout(attn) / dropout(mlp): hooking the dropouts gives exactly what is added.
    "phi3": Adapter("phi3", base="model", layers="layers", attn_out="resid_attn_dropout", mlp_out="resid_mlp_dropout"),
    "gpt2": Adapter("gpt2", base="transformer", layers="h", attn_out="attn", mlp_out="mlp", o_proj="attn.c_proj"),
}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported; supported: {sorted(ADAPTERS)}. "
            "Add an Adapter entry naming its decoder blocks and the attention/MLP output modules."
        )
    return ADAPTERS[model_type]


def logit_softcap(model: nn.Module) -> float | None:
    """Gemma 2 squashes final logits with cap * tanh(logits / cap)."""
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "final_logit_softcapping", None)


def first_tensor(output: object) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first element is the hidden state."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def replace_first(output: object, tensor: torch.Tensor) -> object:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor
