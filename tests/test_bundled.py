"""The real bundled Gemma 3 270M: hook sites, tokenization, ICL and task-vector steering."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import Site, build_prompt, load_task
from icl_circuits.data.prompts import TOKEN_TYPES
from icl_circuits.methods.task_vectors import TaskVectorConfig, sweep_task

pytestmark = pytest.mark.bundled


def test_bundled_model_shape(bundled):
    assert (bundled.n_layers, bundled.d_model) == (18, 640)
    assert bundled.adapter.family == "gemma3"


def test_gemma_tokenization_hand_worked(bundled):
    p = build_prompt(bundled.tokenizer, [("Colombia", "Bogota"), ("Sweden", "Stockholm")])
    pieces = [bundled.tokenizer.decode([i]) for i in p.ids]
    assert pieces == ["<bos>", "Follow", " the", " pattern", ":", "\n", "Colombia", " ->", " Bog", "ota", "\n", "Sweden", " ->", " Stockholm"]
    assert [TOKEN_TYPES[t] for t in p.types] == [
        "bos", "prompt", "prompt", "prompt", "prompt", "newline",
        "input", "arrow", "extra", "output", "newline", "input", "arrow", "output",
    ]  # fmt: skip


@torch.no_grad()
def test_sites_and_resume_on_the_real_model(bundled):
    p = build_prompt(bundled.tokenizer, [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")])
    ids = torch.tensor([p.ids])
    ref = bundled.model(ids).logits
    out = bundled.run(ids, read=["resid_pre.12", "resid_mid.12", "attn_out.12"], full_logits=True)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    resumed = bundled.run(ids, start_layer=12, start_resid=out.acts[Site(12, "resid_pre")], full_logits=True)
    torch.testing.assert_close(resumed.logits, ref, rtol=1e-4, atol=1e-3)
    a = out.acts
    torch.testing.assert_close(a[Site(12, "resid_mid")], a[Site(12, "resid_pre")] + a[Site(12, "attn_out")])
    top = [bundled.tokenizer.decode([int(i)]) for i in ref[0, p.pairs[-1].arrow].topk(5).indices]
    assert " Madrid" in top, top  # (the 270M model's own top-1 here is ' Barcelona')


@pytest.mark.parametrize("task", ["country_capital", "present_simple_past_simple"])
def test_icl_works_and_layer_12_task_vector_helps(bundled, task):
    rows = sweep_task(bundled, load_task(task), [12], TaskVectorConfig())
    r = rows[0]
    assert r["icl_accuracy"] >= 0.6 and r["icl_accuracy"] - r["zero_shot_accuracy"] >= 0.5, r
    assert r["steered_nll"] < 0.85 * r["zero_shot_nll"], r  # the layer-12 TV lowers zero-shot NLL
    assert r["steered_accuracy"] > r["zero_shot_accuracy"], r


TEXT = [
    "The river flows past the old mill and into the valley, where farmers have grown wheat and barley "
    "for centuries. In spring the fields turn green, and by late summer the harvest begins.",
    "To install the package, create a virtual environment, activate it, and run the installer. "
    "If the command fails, check that your Python version is recent enough and try again.",
]


def test_shipped_starter_suite_loads_and_helps(bundled):
    from icl_circuits.sae.activations import token_batches
    from icl_circuits.sae.evaluation import evaluate_saes
    from icl_circuits.sae.suite import STARTER_SPECS, shipped_dir, starter_sae

    files = [f for f in shipped_dir("gemma-3-270m").rglob("*") if f.is_file()]
    assert {f.parent.name for f in files} == {s.replace(":", "_") for s in STARTER_SPECS}
    assert sum(f.stat().st_size for f in files) <= 96 * 2**20  # the budget for the shipped suite v2
    saes = [starter_sae(bundled, spec, train_if_missing=False) for spec in STARTER_SPECS]
    assert all(s.cfg.extra["suite_version"] == 2 and s.cfg.k == 64 for s in saes)
    results = evaluate_saes(bundled, saes, list(token_batches(bundled.tokenizer, TEXT, 64, 2)), progress=False)
    for spec, r in zip(STARTER_SPECS, results):
        assert r.l0 <= 64, (spec, r)
        # splicing any v2 SAE in is better than zero-ablating its site; residual SAEs far better
        # (held-out figures in docs/saes.md: 0.98-0.995 residual, 0.54-0.90 attention / transcoders)
        assert r.ce_loss_recovered > (0.8 if spec.startswith("resid") else 0.0), (spec, r)


def test_readme_python_quickstart_runs(bundled, monkeypatch, capsys):
    """The README's Python quickstart, as written (only load_model returns the already-loaded model): its
    names and signatures still exist, and its printed numbers say what the README says they are."""
    import ast
    import re
    from pathlib import Path

    import icl_circuits

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    monkeypatch.setattr(icl_circuits, "load_model", lambda name: bundled if name == "gemma-3-270m" else None)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    tv_effect, features, scores = float(out[-3]), ast.literal_eval(out[-2]), ast.literal_eval(out[-1])
    assert 0.05 < tv_effect < 1, out  # the TV lowers zero-shot loss (0.4-0.5 on country_capital, docs/results.md)
    assert 0 < len(features) < 64, out  # cleaning keeps a few of SAE(TV)'s 64 latents
    assert scores["tvc"] > max(v for k, v in scores.items() if k != "tvc"), out  # TVC beats the TV and every baseline
