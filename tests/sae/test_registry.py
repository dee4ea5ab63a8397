"""SAERef: every spelling of an SAE parses to one ref, with the names result files have always used."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.methods.circuits import parse_key, sae_key
from icl_circuits.sae.dictionary import SAE_KINDS, JumpReLUSAE, SAEConfig
from icl_circuits.sae.formats import save_sae, with_config
from icl_circuits.sae.registry import KINDS, SAERef, parse_refs
from icl_circuits.sae.training import SAESpec
from icl_circuits.viz.viewer.formats import cleaning_sae, store_name as viewer_store_name

from tests.helpers import make_tiny

SPELLINGS = {
    SAERef("resid", 12): ["resid:12", "resid.12", "resid_12", "resid_pre.12", " resid:12 "],
    SAERef("attn", 3): ["attn:3", "attn.3", "attn_3", "attn_out.3"],
    SAERef("transcoder", 0): ["transcoder:0", "transcoder.0", "transcoder_0"],
    SAERef("resid", 1, path="runs/saes/saes/resid_1"): ["resid:1=runs/saes/saes/resid_1", "resid.1=runs/saes/saes/resid_1",
                                                         "resid_pre.1=runs/saes/saes/resid_1"],
}  # fmt: skip


@pytest.mark.parametrize("ref, spelling", [(r, s) for r, ss in SPELLINGS.items() for s in ss])
def test_every_spelling_parses_to_the_same_ref(ref, spelling):
    assert SAERef.parse(spelling) == ref


def test_kinds_are_the_sae_kinds():
    assert KINDS == SAE_KINDS


def test_canonical_names_are_the_ones_written_before():
    ref = SAERef.parse("resid_pre.12")
    assert (ref.name, ref.key, ref.spec, ref.store_name) == ("resid_12", "resid.12", "resid:12", "resid_12")
    assert ref.is_starter
    # circuits keys, training folder names and example-store names, as before the registry
    assert sae_key("attn", 11) == "attn.11" and parse_key("attn:11") == parse_key("attn.11") == ("attn", 11)
    assert SAESpec.parse("transcoder_12").name == "transcoder_12" and SAESpec.parse("transcoder:12").ref.spec == "transcoder:12"
    assert viewer_store_name("resid:12") == viewer_store_name("resid.12") == "resid_12"
    assert viewer_store_name("my sae-1") == "my_sae_1"  # free names keep their old normalisation
    assert viewer_store_name("attn_out_3") == "attn_out_3" and SAERef.parse("attn_out_3").path == "attn_out_3"
    assert cleaning_sae("resid:12", 12) == "resid_12" and cleaning_sae("/runs/my_sae", 7) == "resid_7"


def test_paths_and_named_paths():
    ref = SAERef.parse("runs/saes/saes/resid_1")
    assert (ref.kind, ref.layer, ref.path, ref.is_starter) == (None, None, "runs/saes/saes/resid_1", False)
    assert ref.spec == "runs/saes/saes/resid_1"
    with pytest.raises(ValueError, match="known only once loaded"):
        ref.name
    named = SAERef.parse("mine=some/sae")
    assert (named.path, named.store_name) == ("some/sae", "mine")
    assert SAERef.parse("resid.1=x").store_name == "resid.1"  # example stores keep NAME as written
    assert SAERef.parse("saelens:gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82").path.startswith("saelens:")
    assert parse_refs("resid:1,attn:1") == parse_refs(["resid:1", "attn.1"]) == [SAERef("resid", 1), SAERef("attn", 1)]


@pytest.mark.parametrize("bad", ["mlp:3", "resid:x", "", "   ", "=some/sae", "resid:3=", "resid:-1"])
def test_a_bad_spec_names_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="bad SAE spec") as e:
        SAERef.parse(bad)
    for form in ("KIND:LAYER", "KIND.LAYER", "resid_pre.12", "KIND:LAYER=PATH", "NAME=PATH", "Hub id"):
        assert form in str(e.value)


def test_training_and_circuits_refuse_paths():
    with pytest.raises(ValueError, match="kind and layer"):
        SAESpec.parse("runs/saes/resid_1")
    with pytest.raises(ValueError, match="bad SAE key"):
        parse_key("runs/saes/resid_1")


def _tiny_sae(lm, layer: int, d_in: int | None = None) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(layer)
    d = d_in or lm.d_model
    tensors = dict(W_enc=torch.randn(d, 8, generator=g), b_enc=torch.zeros(8), W_dec=torch.randn(8, d, generator=g),
                   b_dec=torch.zeros(d), threshold=torch.full((8,), 0.05))  # fmt: skip
    return JumpReLUSAE(SAEConfig(d_in=d, d_sae=8, site=f"resid_pre.{layer}", layer=layer, model=lm.name), tensors)


def test_resolve_a_folder_and_a_kind_layer(tmp_path, monkeypatch):
    lm, _ = make_tiny("llama")
    sae = _tiny_sae(lm, 1)
    save_sae(sae, tmp_path / "resid_1")
    for spec in (str(tmp_path / "resid_1"), f"resid:1={tmp_path / 'resid_1'}"):
        ref = SAERef.parse(spec)
        got = ref.resolve(lm)
        assert got.dtype == torch.float32 and got.W_enc.device == next(lm.model.parameters()).device
        assert torch.equal(got.W_enc.cpu(), sae.W_enc.float())
        assert ref.with_config(got).key == "resid.1" and ref.with_config(got).name == "resid_1"
    save_sae(_tiny_sae(lm, 0, d_in=lm.d_model + 1), tmp_path / "wide")
    with pytest.raises(ValueError, match="d_in"):
        SAERef.parse(str(tmp_path / "wide")).resolve(lm)
    # KIND:LAYER: the starter suite's SAE (here a shipped folder of the tiny model)
    from icl_circuits.sae import suite

    save_sae(with_config(sae, extra={"suite_version": suite.SUITE_VERSION}), tmp_path / "shipped" / "resid_1")
    monkeypatch.setattr(suite, "shipped_dir", lambda model: tmp_path / "shipped")
    assert torch.equal(SAERef.parse("resid_pre.1").resolve(lm).W_dec.cpu(), sae.W_dec.float())
    with pytest.raises(FileNotFoundError, match="no starter SAE 'attn_1'"):
        SAERef.parse("attn:1").resolve(lm, train_if_missing=False)
    with pytest.raises(ValueError, match="names a file"):
        suite.starter_sae(lm, str(tmp_path / "resid_1"))
