"""The circuit's configuration and SAE set: bad settings and SAEs that do not fit are clear errors."""

from __future__ import annotations

import pytest

from icl_circuits.methods.circuits import CircuitConfig, circuit_saes, parse_key
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig

from tests.helpers import make_tiny, tiny_saes


def test_bad_inputs_are_clear_errors():
    lm, _ = make_tiny("gemma3")
    with pytest.raises(ValueError, match="empty"):
        CircuitConfig(layers=())
    with pytest.raises(ValueError, match="kinds"):
        CircuitConfig(layers=(0,), kinds=("mlp",))
    cfg = CircuitConfig(layers=(0,), kinds=("resid",))
    wrong_d = SAEConfig(d_in=lm.d_model + 1, d_sae=4, kind="resid", model=lm.name, site="resid_pre.0", layer=0)
    with pytest.raises(ValueError, match="d_in"):
        circuit_saes(lm, cfg, {"resid.0": JumpReLUSAE(wrong_d)})
    wrong_site = SAEConfig(d_in=lm.d_model, d_sae=4, kind="resid", model=lm.name, site="resid_pre.1", layer=1)
    with pytest.raises(ValueError, match="must read resid_pre.0"):
        circuit_saes(lm, cfg, {"resid:0": JumpReLUSAE(wrong_site)})
    with pytest.raises(ValueError, match="no SAE given"):
        circuit_saes(lm, CircuitConfig(layers=(0, 1), kinds=("resid",)), tiny_saes(lm, (0,), ("resid",)))
    with pytest.raises(ValueError, match="outside"):
        circuit_saes(lm, CircuitConfig(layers=(5,), kinds=("resid",)), {})
    with pytest.raises(ValueError, match="bad SAE key"):
        parse_key("mlp.3")
