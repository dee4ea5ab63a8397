"""Read SAEs from the formats people publish them in, always into a JumpReLUSAE (one module per format).

    ours                 dir/ sae.safetensors + config.json            load_sae / save_sae
    SAELens              dir/ cfg.json + sae_weights.safetensors       load_saelens / save_saelens
    SAELens release      saelens:RELEASE/SAE_ID (needs sae-lens)        load_saelens_release
    Gemma Scope          params.npz (metadata passed by the caller)    load_gemma_scope
    Gemma Scope 2        dir/ params.safetensors [+ config.json]       load_gemma_scope_2
    saex (the paper's)   dir/ cfg.json + sae_weights.safetensors       load_saex
                         with s_gate / b_gate / mean_norm tensors
    dictionary_learning  dir/ ae.pt + config.json                      load_dictionary_learning
    any of the above     (detected from the files present)             load_any

Every loader takes **overrides: SAEConfig fields that replace what the files say (e.g.
site="resid_mid.3" when a hook name has no icl_circuits site). A site= / out_site= that
contradicts the hook the file itself names is refused unless force_site=True is passed too
(resid_post.L and resid_pre.L+1 count as the same site). Loaded SAEs are frozen
(requires_grad False); call .requires_grad_(True) to fine-tune one. docs/sae_formats.md
lists what each format's hooks map to.

One module per format (ours, saelens, gemma_scope, saex, dictionary_learning); hub fetches Hub ids
and SAELens release names, detect picks the loader (load_any), common holds what they share.
"""

from icl_circuits.core.sites import same_site
from icl_circuits.sae.formats.common import PathLike
from icl_circuits.sae.formats.detect import EXPECTED_LAYOUTS, detect_format, load_any
from icl_circuits.sae.formats.dictionary_learning import load_dictionary_learning
from icl_circuits.sae.formats.gemma_scope import GS2_REPO_RE, load_gemma_scope, load_gemma_scope_2
from icl_circuits.sae.formats.hub import hub_path, load_saelens_release, resolve_saelens_release
from icl_circuits.sae.formats.ours import FORMAT_NAME, FORMAT_VERSION, load_sae, save_sae, with_config
from icl_circuits.sae.formats.saelens import SAELENS_WRITE_VERSION, load_saelens, normalise_saelens_cfg, save_saelens
from icl_circuits.sae.formats.saex import load_saex

__all__ = [
    "EXPECTED_LAYOUTS", "FORMAT_NAME", "FORMAT_VERSION", "GS2_REPO_RE", "PathLike", "SAELENS_WRITE_VERSION",
    "detect_format", "hub_path", "load_any", "load_dictionary_learning", "load_gemma_scope", "load_gemma_scope_2",
    "load_sae", "load_saelens", "load_saelens_release", "load_saex", "normalise_saelens_cfg",
    "resolve_saelens_release", "same_site", "save_sae", "save_saelens", "with_config",
]  # fmt: skip
