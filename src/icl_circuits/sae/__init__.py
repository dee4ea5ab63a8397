"""Sparse autoencoders and transcoders: one JumpReLU inference format, loaders for published formats."""

from icl_circuits.sae.dictionary import (
    OPTIONAL_TENSOR_NAMES,
    SAE_KINDS,
    JumpReLUSAE,
    SAEConfig,
    check_shapes,
    expected_shapes,
    fold_b_dec_into_b_enc,
    gated_to_jumprelu,
)
from icl_circuits.sae.formats import (
    FORMAT_NAME,
    FORMAT_VERSION,
    detect_format,
    hub_path,
    load_any,
    load_dictionary_learning,
    load_gemma_scope,
    load_gemma_scope_2,
    load_sae,
    load_saelens,
    load_saelens_release,
    load_saex,
    normalise_saelens_cfg,
    resolve_saelens_release,
    same_site,
    save_sae,
    save_saelens,
    with_config,
)
from icl_circuits.sae.trainers import ARCHS, SAETrainer, TrainerConfig

# training/evaluation import the model stack; import them as icl_circuits.sae.training / .evaluation

__all__ = [
    "ARCHS", "FORMAT_NAME", "FORMAT_VERSION", "JumpReLUSAE", "OPTIONAL_TENSOR_NAMES", "SAEConfig", "SAE_KINDS",
    "check_shapes", "detect_format", "expected_shapes", "fold_b_dec_into_b_enc", "gated_to_jumprelu", "hub_path",
    "load_any", "load_dictionary_learning", "load_gemma_scope", "load_gemma_scope_2", "load_sae", "load_saelens",
    "load_saelens_release", "load_saex", "normalise_saelens_cfg", "resolve_saelens_release", "same_site",
    "save_sae", "save_saelens", "with_config", "SAETrainer", "TrainerConfig",
]  # fmt: skip
