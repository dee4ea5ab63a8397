"""Sparse autoencoders and transcoders: one JumpReLU inference format, loaders for published formats."""

from .dictionary import (
    SAE_KINDS,
    JumpReLUSAE,
    SAEConfig,
    check_shapes,
    expected_shapes,
    fold_b_dec_into_b_enc,
    gated_to_jumprelu,
)
from .formats import (
    FORMAT_NAME,
    FORMAT_VERSION,
    detect_format,
    load_any,
    load_dictionary_learning,
    load_gemma_scope,
    load_sae,
    load_saelens,
    save_sae,
    save_saelens,
    with_config,
)
from .trainers import SAETrainer, TrainerConfig

# training/evaluation import the model stack; import them as icl_circuits.sae.training / .evaluation

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "JumpReLUSAE", "SAEConfig", "SAE_KINDS", "check_shapes",
    "detect_format", "expected_shapes", "fold_b_dec_into_b_enc", "gated_to_jumprelu", "load_any",
    "load_dictionary_learning", "load_gemma_scope", "load_sae", "load_saelens", "save_sae",
    "save_saelens", "with_config", "SAETrainer", "TrainerConfig",
]  # fmt: skip
