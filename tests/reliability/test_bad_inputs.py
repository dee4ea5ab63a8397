"""Issue 18: every bad input is a clear error (rc 2, one line, naming the file or option), never a
traceback, a silent wrong result, or a trip to the network for something that is plainly local."""

from __future__ import annotations

import json
import math

import pytest
import torch

from icl_circuits.cli import main, parse_layers

from ..helpers import MANY, one_line_error, saved_model, write_task


# -- task files ------------------------------------------------------------------------------------
def test_csv_with_another_header_is_refused_not_read_as_a_pair(tmp_path):
    """Issue 18 #4: 'question,answer' must not become the pair ('question', 'answer')."""
    from icl_circuits.data.tasks import TaskFormatError, load_task

    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhot,cold\nbig,small\n")
    with pytest.raises(TaskFormatError, match=r"qa.csv: .*header row 'input,output', got 'question,answer'"):
        load_task(path)


def test_task_file_that_is_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"input": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    assert main(["task-vectors", "--tasks", str(path), "--model", str(tmp_path / "m")]) == 2
    err = one_line_error(capsys)
    assert "latin1.json" in err and "UTF-8" in err


# -- options ---------------------------------------------------------------------------------------
def test_backwards_layer_range_says_so():
    with pytest.raises(SystemExit, match=r"range 5-2 runs backwards"):
        parse_layers("5-2", 18)
    with pytest.raises(SystemExit, match=r"--layers '99': layers \[99\] outside 0..17"):
        parse_layers("99", 18)


def test_layer_out_of_range_on_the_cli_is_rc2_one_line(tmp_path, capsys):
    _, model = saved_model(tmp_path)
    task = write_task(tmp_path / "many.json", MANY)
    assert main(["task-vectors", "--model", str(model), "--tasks", task, "--layers", "5-2", "--out", str(tmp_path / "o")]) == 2
    assert "runs backwards" in one_line_error(capsys)


def test_clean_layer_out_of_range_refuses_before_any_sae_work(tmp_path, capsys, monkeypatch):
    """`clean --layer 99` started sampling a corpus to train a 'resid_99' SAE."""
    import icl_circuits.sae.suite as suite

    monkeypatch.setattr(suite, "starter_sae", lambda *a, **k: pytest.fail("an SAE was fetched/trained for a bad layer"))
    _, model = saved_model(tmp_path)
    task = write_task(tmp_path / "many.json", MANY)
    assert main(["clean", "--model", str(model), "--task", task, "--layer", "99", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "--layer 99 outside 0..1" in err


def test_infinite_l1_is_named_not_blamed_on_lr(tmp_path, capsys):
    from icl_circuits.methods.cleaning import CleaningConfig, CleaningDiverged, clean_vector

    from ..helpers import pair_lm, unit_sae, antonym_steerer

    lm = pair_lm()
    with pytest.raises(CleaningDiverged) as err:
        clean_vector(unit_sae(lm, scale=3.0), antonym_steerer(lm), 1, torch.randn(lm.d_model), CleaningConfig(l1_coeff=math.inf, max_steps=3))
    assert "l1_coeff=inf is not a finite number" in str(err.value) and "smaller lr" not in str(err.value)
    _, model = saved_model(tmp_path)
    task = write_task(tmp_path / "many.json", MANY)
    assert main(["clean", "--model", str(model), "--task", task, "--layer", "1", "--l1", "inf", "--out", str(tmp_path / "o")]) == 2
    assert "--l1 inf is not a finite number" in one_line_error(capsys)


def test_infinite_lr_partial_holds_the_last_finite_step():
    """Issue 18 #5: `lr=inf` raised CleaningDiverged whose partial weights were NaN."""
    from icl_circuits.methods.cleaning import CleaningConfig, CleaningDiverged, clean_vector

    from ..helpers import pair_lm, unit_sae, antonym_steerer

    lm = pair_lm()
    with pytest.raises(CleaningDiverged) as err:
        clean_vector(unit_sae(lm, scale=3.0), antonym_steerer(lm), 1, torch.randn(lm.d_model), CleaningConfig(lr=math.inf, max_steps=5))
    p = err.value.partial
    assert torch.isfinite(p.weights).all() and p.stopped == "diverged" and "lr=inf is not a finite number" in str(err.value)


def test_a_collapsed_cleaning_is_flagged_in_the_result_and_report(tmp_path, capsys):
    """Issue 18 #5: lr=1e6 ends at L0 = 0 with a loss worse than zero-shot; it must say so."""
    from icl_circuits.methods.cleaning import CleaningConfig, CleaningWarning, clean_vector, load_cleaning

    from ..helpers import pair_lm, unit_sae, antonym_steerer

    lm = pair_lm()
    v = torch.randn(lm.d_model) * 3
    with pytest.warns(CleaningWarning, match="collapsed"):
        r = clean_vector(unit_sae(lm, scale=3.0), antonym_steerer(lm), 1, v, CleaningConfig(lr=1e6, max_steps=20, patience=5), antonym_steerer(lm, n=4))
    assert r.l0 == 0 and r.collapsed and r.warnings and "collapsed" in r.warnings[0]
    r.save(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "cleaning.json").read_text())["collapsed"] is True
    assert load_cleaning(tmp_path / "r").warnings == r.warnings


# -- truncated / garbage files -----------------------------------------------------------------------
def _sae_folder(tmp_path, lm, model_dir):
    from icl_circuits.sae.formats import save_sae

    from ..helpers import unit_sae

    sae = unit_sae(lm, layer=1, scale=3.0)
    sae.cfg.model = str(model_dir)
    save_sae(sae, tmp_path / "sae")
    return tmp_path / "sae"


def test_truncated_sae_safetensors_is_rc2_one_line(tmp_path, capsys):
    lm, model = saved_model(tmp_path)
    folder = _sae_folder(tmp_path, lm, model)
    st = folder / "sae.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    task = write_task(tmp_path / "many.json", MANY)
    assert main(["clean", "--model", str(model), "--task", task, "--layer", "1", "--sae", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "safetensors" in one_line_error(capsys)


def test_garbage_sae_config_names_the_file(tmp_path, capsys):
    lm, model = saved_model(tmp_path)
    folder = _sae_folder(tmp_path, lm, model)
    (folder / "config.json").write_text('{"d_in": 32, "d_sae":')
    task = write_task(tmp_path / "many.json", MANY)
    assert main(["clean", "--model", str(model), "--task", task, "--layer", "1", "--sae", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert str(folder / "config.json") in err and "invalid JSON" in err


@pytest.mark.parametrize("content", [b'{"model_type": "llama", "hidden', b"\xff\xfe\x00garbage"])
def test_garbage_or_non_utf8_model_config_names_the_file(tmp_path, capsys, content):
    _, model = saved_model(tmp_path)
    (model / "config.json").write_bytes(content)
    task = write_task(tmp_path / "many.json", MANY)
    assert main(["task-vectors", "--model", str(model), "--tasks", task, "--out", str(tmp_path / "o")]) == 2
    assert str(model / "config.json") in one_line_error(capsys)


def test_truncated_cleaning_result_is_redone_on_resume(tmp_path):
    """A damaged finished result (kill during a copy, bad disk) is redone, not a crash on every rerun."""
    from icl_circuits.methods.cleaning import CleaningConfig
    from icl_circuits.experiments.clean import run_cleaning
    from icl_circuits.methods.task_vectors import TaskVectorConfig
    from icl_circuits.data.tasks import Task

    from ..helpers import pair_lm, unit_sae

    lm = pair_lm()
    sae = unit_sae(lm, scale=3.0)
    args = (lm, sae, [Task("many", tuple(MANY))], 1, tmp_path, CleaningConfig(n_train=4, n_eval=4, max_steps=4, patience=2),
            TaskVectorConfig(n_prompts=2, n_shots=3))  # fmt: skip
    (first,), _ = run_cleaning(*args, sae_spec="s", progress=False)
    st = tmp_path / "many" / "cleaning.safetensors"
    st.write_bytes(st.read_bytes()[:40])
    (again,), _ = run_cleaning(*args, sae_spec="s", progress=False)
    assert torch.equal(again.weights, first.weights)


# -- local paths never reach for the network ----------------------------------------------------------
def test_missing_local_model_fails_fast_without_network(no_network, tmp_path, capsys):
    from icl_circuits.core.loading import load_model

    # "fast" = no connection is ever attempted (the old code retried the hub for ~46 s); no wall-clock bound
    for spec in ("/no/such/model", "./no_such_model", "../no/such", "~/no_such_model_dir", str(tmp_path / "missing" / "m")):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            load_model(spec)
    assert no_network == []
    assert main(["task-vectors", "--tasks", "antonyms", "--model", "/no/such/model"]) == 2
    assert "--model /no/such/model: no such file or folder" in one_line_error(capsys)
    assert no_network == []


def test_partly_existing_path_is_local(no_network, tmp_path, monkeypatch, capsys):
    """runs/model where runs/ exists is a local path even though it looks like owner/name."""
    from icl_circuits.core.loading import load_model

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"runs exists, model does not"):
        load_model("runs/model")
    assert no_network == []


def test_missing_local_sae_fails_fast_without_network(no_network, tmp_path, capsys):
    task = write_task(tmp_path / "many.json", MANY)
    assert main(["clean", "--model", "/no/such/model", "--task", task, "--layer", "1", "--sae", "/no/such/sae"]) == 2
    assert "--sae /no/such/sae: no such file or folder" in one_line_error(capsys)
    assert no_network == []


def test_hub_id_with_the_network_down_fails_fast_and_clearly(no_network, capsys):
    assert main(["task-vectors", "--tasks", "antonyms", "--model", "nosuchdir/model"]) == 2
    err = one_line_error(capsys)
    assert "nosuchdir/model" in err and "not in the local Hugging Face cache" in err
    assert len(no_network) <= 2  # one reachability check, no retry loop


_OFFLINE = """
import socket, sys
def refuse(*a, **k):
    raise AssertionError("network touched")
socket.create_connection = socket.getaddrinfo = refuse
socket.socket.connect = lambda self, *a: refuse()
from icl_circuits.core.loading import load_model
lm = load_model("someone/tiny")
print("loaded", lm.n_layers)
from icl_circuits.cli import main
sys.exit(main(["task-vectors", "--tasks", "antonyms", "--model", "someone/not-cached"]))
"""


def test_hub_id_with_hf_hub_offline_uses_the_cache_and_never_the_network(tmp_path):
    """HF_HUB_OFFLINE: an id in the local HF cache loads; one that is not is a one-line error; no network either way."""
    import os
    import subprocess
    import sys

    _, model = saved_model(tmp_path)
    snap = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snap.parent.mkdir(parents=True)
    model.rename(snap)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _OFFLINE], capture_output=True, text=True, env=env, timeout=120)
    assert "loaded 2" in p.stdout, p.stderr[-2000:]
    assert p.returncode == 2 and "network touched" not in p.stderr
    err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "someone/not-cached" in err[0] and "HF_HUB_OFFLINE" in err[0]
