"""Interop with real SAELens, offline.

Forward: tests/fixtures/saelens/<arch>/ were written by SAELens's own classes (save_model), with
SAELens's encode / decode / forward outputs next to them (<arch>.io.safetensors); see
tests/fixtures/make_saelens_fixtures.py for the command and version. We load the folders with
our loader and must reproduce SAELens's numbers.

Reverse: tests/fixtures/saelens_reverse/<case>/ours/ is one of our SAEs (save_sae), <case>/saelens/
what our save_saelens wrote from it, and <case>.io.safetensors SAELens's own encode / decode /
forward outputs after SAE.load_from_disk read that folder (same script, `reverse` step). Every
run checks that (a) our current save_saelens, given <case>/ours/, writes exactly the committed
tensors and cfg.json that SAELens read, and (b) our own encode / decode / forward on the same
inputs equal SAELens's recorded outputs. test_reverse_with_real_saelens repeats the check live
where sae-lens is importable (it is not a test dependency).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

from icl_circuits.sae import JumpReLUSAE, SAEConfig, load_any, load_sae, load_saelens, save_saelens

FIXTURES = Path(__file__).parents[2] / "fixtures" / "saelens"
ARCHS = ["standard", "jumprelu", "topk", "topk_rescale", "gated", "transcoder", "jumprelu_transcoder",
         "jumprelu_skip_transcoder"]  # fmt: skip
TOL = dict(atol=2e-5, rtol=1e-5)
REVERSE = Path(__file__).parents[2] / "fixtures" / "saelens_reverse"
REVERSE_CASES = ["jumprelu", "jumprelu_scaled", "topk", "jumprelu_transcoder", "jumprelu_skip_transcoder",
                 "jumprelu_attn_z"]  # fmt: skip


def test_fixtures_record_their_saelens_version() -> None:
    version = json.loads((FIXTURES / "VERSION.json").read_text())
    assert version["sae_lens"].startswith("6.") and "make_saelens_fixtures.py" in version["command"]
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_made_files_load_exactly(arch: str) -> None:
    io = safetensors.torch.load_file(str(FIXTURES / f"{arch}.io.safetensors"))
    sae = load_any(FIXTURES / arch)
    assert sae.cfg.source == "saelens" and sae.cfg.model == "tiny-fixture"
    x = io["x"]
    f = sae.encode(x)
    assert (f > 0).sum() > 0 and (f == 0).sum() > 0
    assert_close(f, io["latents"], **TOL)
    # decode(f, x) is SAELens's decode for SAEs; for skip transcoders SAELens's decode leaves the skip out
    # and forward adds it, exactly as ours do
    assert_close(sae.decode(f), io["decoded"], **TOL)
    assert_close(sae(x), io["forward"], **TOL)
    if "transcoder" in arch:
        assert (sae.cfg.kind, sae.cfg.site, sae.cfg.out_site) == ("transcoder", "mlp_in.3", "mlp_out.3")
    else:
        assert (sae.cfg.kind, sae.cfg.site) == ("resid", "resid_pre.3")
    assert sae.has_skip == (arch == "jumprelu_skip_transcoder")


def test_topk_rescale_fixture_differs_from_ignoring_the_flag(tmp_path: Path) -> None:
    """The flag matters on these weights: reading the file as plain TopK gives other latents."""
    import shutil

    shutil.copytree(FIXTURES / "topk_rescale", tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    cfg["rescale_acts_by_decoder_norm"] = False
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(cfg))
    io = safetensors.torch.load_file(str(FIXTURES / "topk_rescale.io.safetensors"))
    wrong = load_saelens(tmp_path / "t").encode(io["x"])
    assert (wrong - io["latents"]).abs().max() > 0.1


def test_reverse_fixtures_record_their_saelens_version() -> None:
    version = json.loads((REVERSE / "VERSION.json").read_text())
    assert version["sae_lens"].startswith("6.") and "make_saelens_fixtures.py" in version["command"]
    assert sorted(p.name for p in REVERSE.iterdir() if p.is_dir()) == sorted(REVERSE_CASES)
    assert sorted(version["cases"]) == sorted(REVERSE_CASES)


@pytest.mark.parametrize("case", REVERSE_CASES)
def test_save_saelens_writes_the_files_real_saelens_read(tmp_path: Path, case: str) -> None:
    """(a) Our writer today, from the same SAE, gives the very tensors and cfg.json SAELens loaded."""
    committed = REVERSE / case / "saelens"
    path = save_saelens(load_sae(REVERSE / case / "ours"), tmp_path / "s")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in committed.iterdir())
    assert json.loads((path / "cfg.json").read_text()) == json.loads((committed / "cfg.json").read_text())
    new = safetensors.torch.load_file(str(path / "sae_weights.safetensors"))
    old = safetensors.torch.load_file(str(committed / "sae_weights.safetensors"))
    assert sorted(new) == sorted(old)
    for name in old:
        assert new[name].dtype == old[name].dtype and new[name].shape == old[name].shape, name
        assert torch.equal(new[name], old[name]), f"{case}: {name} differs from what SAELens read"


@pytest.mark.parametrize("case", REVERSE_CASES)
def test_ours_matches_what_real_saelens_computed_from_our_files(case: str) -> None:
    """(b) Our encode / decode / forward equal SAELens's recorded outputs on the same inputs.

    Measured with sae-lens 6.54.12: max abs difference 0 everywhere; the tolerance is TOL.
    """
    io = safetensors.torch.load_file(str(REVERSE / f"{case}.io.safetensors"))
    version = json.loads((REVERSE / "VERSION.json").read_text())["cases"][case]
    x = io["x"]  # [N, d_in]; SAELens was fed x_saelens ([N, heads, d_head] for the attn_z case)
    assert list(io["x_saelens"].shape) == version["saelens_input_shape"]
    assert torch.equal(io["x_saelens"].reshape(x.shape), x)
    ours, reread = load_sae(REVERSE / case / "ours"), load_saelens(REVERSE / case / "saelens")
    for sae in (ours, reread):  # the SAE itself, and our loader reading the folder SAELens read
        f = sae.encode(x)  # [N, d_sae]
        assert (f > 0).sum() > 0 and (f == 0).sum() > 0
        assert_close(f, io["latents"], **TOL)
        assert_close(sae.decode(f), io["decoded"], **TOL)  # SAELens's decode leaves the skip path out too
        assert_close(sae(x), io["forward"], **TOL)
    if case == "topk":
        assert int((io["latents"] > 0).sum(-1).max()) == ours.cfg.k < int((ours.pre_acts(x) > 0).sum(-1).min())
    assert ours.has_skip == (case == "jumprelu_skip_transcoder") == bool((io["forward"] != io["decoded"]).any())


def _ours(kind: str) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(3)
    d_out = 48 if kind != "resid" else 64
    t = {"W_enc": torch.randn(64, 128, generator=g) / 8, "b_enc": torch.randn(128, generator=g) * 0.2,
         "W_dec": torch.randn(128, d_out, generator=g) / 11, "b_dec": torch.randn(d_out, generator=g) * 0.2,
         "threshold": torch.rand(128, generator=g) * 0.5}  # fmt: skip
    if kind == "skip":
        t["W_skip"] = torch.randn(64, d_out, generator=g) * 0.1
    if kind == "resid":
        cfg = SAEConfig(d_in=64, d_sae=128, site="resid_pre.3", layer=3, input_scale=2.0, output_scale=0.5)
    else:
        cfg = SAEConfig(d_in=64, d_sae=128, d_out=d_out, kind="transcoder", site="mlp_in.3", out_site="mlp_out.3", layer=3)
    return JumpReLUSAE(cfg, t)


@pytest.mark.parametrize("kind", ["resid", "transcoder", "skip"])
def test_reverse_with_real_saelens(tmp_path: Path, kind: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")  # not installed in CI: see make_saelens_fixtures.py
    ours = _ours(kind)
    theirs = sae_lens.SAE.load_from_disk(str(save_saelens(ours, tmp_path / "s")))
    x = torch.randn(16, 64)
    assert_close(theirs.encode(x), ours.encode(x), **TOL)
    assert_close(theirs(x), ours(x), **TOL)


@pytest.mark.parametrize("kind", ["resid", "transcoder", "skip"])
def test_save_saelens_round_trip_keeps_w_skip(tmp_path: Path, kind: str) -> None:
    ours = _ours(kind)
    path = save_saelens(ours, tmp_path / "s")
    cfg = json.loads((path / "cfg.json").read_text())
    expected = {"resid": "jumprelu", "transcoder": "jumprelu_transcoder", "skip": "jumprelu_skip_transcoder"}[kind]
    assert cfg["architecture"] == expected and cfg["metadata"]["sae_lens_version"].startswith("6.")
    if kind == "skip":  # SAELens's layout: [d_out, d_in]
        assert tuple(safetensors.torch.load_file(str(path / "sae_weights.safetensors"))["W_skip"].shape) == (48, 64)
    back = load_saelens(path)
    x = torch.randn(16, 64)
    assert_close(back(x), ours(x), **TOL)
    assert_close(back.encode(x), ours.encode(x), **TOL)
    assert back.has_skip == (kind == "skip")
