"""--device / --dtype everywhere (issue 14 §1), tested without a GPU.

No accelerator is available to the test suite, so the checks are of three kinds:
  1. the CLI: every command that loads a model takes --device and --dtype, and an unavailable device
     is one clear line and rc 2 before anything slow happens;
  2. every public entry point runs with the model in float32 and in bfloat16 and returns its tensors on
     the model's device, and a factory-call audit: while the entry points run, every torch.zeros / ones /
     full / empty / tensor / arange / rand* called from icl_circuits without `device=` is recorded, and
     only the call sites listed in CPU_BY_DESIGN (prompt building and CPU bookkeeping, moved to the
     model's device where they meet its tensors) may appear. A new device-less tensor in a hot path fails
     this test on a CPU machine, where it would otherwise only fail on a GPU;
  3. bf16 agrees with fp32 for TVC and circuit node effects within stated tolerances.
`scripts/gpu_smoke.py` is the end-to-end check on a real GPU (docs/gpu.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from icl_circuits import Task, zero_shot_prompts
from icl_circuits.cli import build_parser, main
from icl_circuits.core.loading import DTYPES, resolve_device, resolve_dtype

from tests.helpers import ANTONYMS, MANY, pair_lm, unit_sae, device_audit, make_tiny, tiny_saes, toy_batch

# -- 1. the CLI ---------------------------------------------------------------------------------

# commands that load no model: listing tasks, serving a finished run, copying SAE files
NO_MODEL = {("tasks",), ("view",), ("sae", "export")}
# the least each command needs to parse
REQUIRED: dict[tuple[str, ...], list[str]] = {
    ("heatmap",): ["--results", "r"],
    ("sae", "compare"): ["--cache", "c"],
    ("clean",): ["--task", "antonyms"],
}


def _commands() -> list[tuple[str, ...]]:
    import argparse

    out = []

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append(prefix)
        for a in subs:
            for name, sub in a.choices.items():
                walk(sub, (*prefix, name))

    walk(build_parser(), ())
    return out


MODEL_COMMANDS = [c for c in _commands() if c not in NO_MODEL]


def test_every_model_command_is_covered():
    assert set(MODEL_COMMANDS) == {
        ("task-vectors",), ("sae", "train"), ("sae", "harvest"), ("sae", "compare"), ("sae", "eval"), ("examples",),
        ("dashboards",), ("heatmap",), ("detectors",), ("clean",), ("circuit",), ("reproduce",),
    }  # a new command that loads a model must take --device / --dtype too (the test below)


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("device, dtype", [("cuda:1", "bfloat16"), ("mps", "float16"), ("cpu", "float32")])
def test_every_model_command_takes_device_and_dtype(command, device, dtype):
    args = build_parser().parse_args([*command, *REQUIRED.get(command, []), "--device", device, "--dtype", dtype])
    assert args.device == device and args.dtype == dtype


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
def test_defaults_cpu_and_float32_except_harvest(command):
    args = build_parser().parse_args([*command, *REQUIRED.get(command, [])])
    assert args.device == "cpu"
    # `sae harvest --dtype` kept its documented meaning and default: the forward's dtype, bfloat16
    assert args.dtype == ("bfloat16" if command == ("sae", "harvest") else "float32")


def test_bad_dtype_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["circuit", "--dtype", "float64"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_and_rc_2(capsys, monkeypatch):
    import icl_circuits.core.loading as loading

    def no_load(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("the device must be refused before any model load")

    monkeypatch.setattr(loading, "load_model", no_load)
    for argv in (["task-vectors", "--tasks", "antonyms", "--device", "cuda"], ["sae", "eval", "--starter", "--device", "cuda:0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --device cuda") and "CUDA is not available" in err and "\n" not in err


def test_unknown_device_is_rc_2(capsys):
    assert main(["circuit", "--device", "tpu"]) == 2
    assert "error: --device" in capsys.readouterr().err


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("nonsense", "meta"):
        with pytest.raises(ValueError, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
    if not (torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="MPS"):
            resolve_device("mps")
    assert [resolve_dtype(d) for d in DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError):
        resolve_dtype("float64")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_load_model_refuses_missing_cuda():
    from icl_circuits.core.loading import load_model

    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model("does-not-matter", device="cuda")


# -- 2. entry points keep tensors on the model's device -----------------------------------------

def _on_model(t: torch.Tensor, lm) -> bool:  # noqa: ANN001
    return t.device == lm.device


def _entry_points(dtype: torch.dtype) -> dict[str, object]:
    """Run every public entry point on a tiny model in `dtype`; returns what they produced."""
    from icl_circuits.methods.circuits import SplicedModel, faithfulness_curve
    from icl_circuits.methods.circuits import CircuitConfig, circuit_saes, edge_effects_from, edge_targets, node_effects
    from icl_circuits.methods.cleaning import CleaningConfig
    from icl_circuits.methods.cleaning_task import clean_task
    from icl_circuits.methods.masses import MassConfig, activation_masses
    from icl_circuits.methods.link import link_on_batch
    from icl_circuits.methods.ito import ito_weights
    from icl_circuits.data.prompts import icl_prompts
    from icl_circuits.sae.activations import ActivationStore
    from icl_circuits.sae.dictionary import SAEConfig
    from icl_circuits.sae.evaluation import evaluate_saes
    from icl_circuits.sae.trainers import SAETrainer, TrainerConfig
    from icl_circuits.core.sites import Site
    from icl_circuits.interventions.steer import Steerer, feature_directions
    from icl_circuits.methods.task_vectors import TaskVectorConfig, extract_task_vectors

    out: dict[str, object] = {}
    lm = pair_lm("gemma3", dtype)
    task = Task("many", tuple(MANY))
    sae = unit_sae(lm).float().to(lm.device)  # the CLI's SAEs: float32 on the model's device
    # task vectors and steering
    icl = icl_prompts(lm.tokenizer, task, 3, 3, seed=0)
    out["tv"] = extract_task_vectors(lm, icl, [1])[1]
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 4, seed=1)
    out["steered_logprobs"] = Steerer(lm, zero, [1]).logprobs(1, out["tv"])
    ps = Steerer(lm, zero, [1])
    out["prompt_steering"] = ps.score(1, feature_directions(sae, [0, 1]), need_accuracy=True).nll
    # TVC with its baselines (ITO) and per-feature effects
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = clean_task(lm, sae, task, 1, CleaningConfig(n_train=3, n_eval=3, max_steps=4, patience=2, init="encode_mean"),
                       TaskVectorConfig(n_prompts=2, n_shots=2), sae_spec="tiny", ito_l0s=(2,))  # fmt: skip
    out["tvc_weights"] = r.weights
    out["ito"] = ito_weights(sae, out["tv"], 2)
    # detection: token-type masses and the detector -> executor link (frozen attention)
    out["masses"] = activation_masses(lm, [task], {"x": (sae, {"many": [0, 1, 2]})}, MassConfig(n_prompts=2, n_shots=2), progress=False)
    out["link"] = link_on_batch(lm, icl, [0, 1], [2, 3], unit_sae(lm, layer=0).float(), sae)[0]
    # circuits: node and edge effects, ablations, faithfulness
    clm, _ = make_tiny("gemma3")
    clm.model.to(dtype)
    ccfg = CircuitConfig(layers=(0, 1))
    saes = circuit_saes(clm, ccfg, tiny_saes(clm, (0, 1), ccfg.kinds))
    batch, _ = toy_batch()
    eff = node_effects(clm, batch, saes, ccfg, keep_grads=True)
    out["node_effects"] = eff.flat()
    out["edges"] = edge_effects_from(clm, batch, saes, eff, "resid.0", edge_targets(eff, 1)[:2])
    spliced = SplicedModel(clm, batch, saes, ccfg)
    out["faithfulness"] = faithfulness_curve(spliced, eff, sizes=(2, 8))
    # SAE training (a few steps) and evaluation
    sae_cfg = SAEConfig(d_in=lm.d_model, d_sae=16, site="resid_pre.1", layer=1, k=4)
    trainer = SAETrainer(TrainerConfig(d_in=lm.d_model, d_sae=16, arch="topk", k=4), sae_cfg).to(lm.device)
    store = ActivationStore(lm, ["resid_pre.1"], [" ".join(w for p in MANY for w in p)] * 4, seq_len=16, batch_size=2, buffer_batches=2)
    for _ in range(3):
        x = store.next(16)[Site(1, "resid_pre")]  # [16, d_model] on the store's (= the model's) device
        assert _on_model(x, lm)
        trainer.step(x)
    out["trained"] = trainer.to_jumprelu()
    out["eval"] = evaluate_saes(lm, [sae], [(icl.input_ids, icl.attention_mask)], progress=False)
    out["lm"] = lm
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_entry_points_on_the_models_device_and_dtype(dtype, one_thread):
    torch.manual_seed(0)
    with device_audit(check=False) as audit:
        out = _entry_points(dtype)
    lm = out["lm"]
    # vectors read off the model are in its dtype; optimised / SAE-side tensors are float32 by design
    assert out["tv"].dtype == dtype and _on_model(out["tv"], lm)
    for key in ("steered_logprobs", "tvc_weights", "ito", "link", "prompt_steering", "node_effects"):
        t = out[key]
        assert torch.isfinite(t).all(), key
        assert t.device.type == lm.device.type, key
    assert out["tvc_weights"].dtype == torch.float32 and out["ito"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in out["edges"].values())
    assert out["trained"].device == torch.device("cpu")  # exported on the CPU, moved by whoever uses it
    assert out["masses"] and out["eval"][0].n_tokens > 0
    audit.check()


def _examples_run(tmp_path: Path) -> None:
    from tests.helpers import EXAMPLE_WORDS, cli_examples_end_to_end, random_docs, word_lm

    cli_examples_end_to_end(word_lm(EXAMPLE_WORDS), random_docs(EXAMPLE_WORDS), tmp_path)  # `icl-circuits examples`


def _dashboards_run(tmp_path: Path) -> None:
    from tests.helpers import real_run

    real_run()  # build_dashboards: logit lens, density, ICL-prompt masses, neighbours


@pytest.mark.parametrize("run", [_examples_run, _dashboards_run], ids=["examples", "dashboards"])
def test_examples_and_dashboards_make_no_stray_cpu_tensors(run, tmp_path, one_thread):
    with device_audit():
        run(tmp_path)


# -- 3. bf16 agrees with fp32 -------------------------------------------------------------------


def _planted_tvc(dtype: torch.dtype, targets: torch.Tensor | None = None):  # noqa: ANN202
    """TVC on the planted-directions task of test_cleaning (a vector that clearly steers), model in dtype."""
    from icl_circuits.methods.cleaning import CleaningConfig, clean_vector
    from icl_circuits.interventions.steer import Steerer

    lm = pair_lm("gemma3", dtype)
    sae = unit_sae(lm, d_sae=24, seed=4, scale=4.0).float()  # the CLI's SAEs stay float32 with a bf16 model
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 8, seed=1)
    w_true = torch.zeros(24)
    w_true[[1, 7, 20]] = torch.tensor([3.0, 2.5, 2.0])
    tv = w_true @ sae.W_dec.detach() + sae.b_dec.detach()  # [d_model]
    st = Steerer(lm, zero, layers=[1])
    if targets is None:  # the task: whatever the planted vector makes the fp32 model say
        with torch.no_grad():
            targets = st.logprobs(1, tv).argmax(-1)
    st.scoring.targets = targets
    r = clean_vector(sae, st, 1, tv, CleaningConfig(l1_coeff=0.02, lr=0.3, max_steps=600, init="encode_mean"))
    with torch.no_grad():
        steered = st.loss(1, r.weights @ sae.W_dec + sae.b_dec).item()
    return targets, (st.baseline.nll - steered) / st.baseline.nll, r


def test_tvc_bf16_agrees_with_fp32(one_thread):
    # measured (CPU, torch 2.13): relative loss decrease 0.0423 in both, relative error 1e-4; the same
    # 3 features (the planted ones) in the same number of steps (151); weights' relative L2 error 0.0038
    targets, rld32, r32 = _planted_tvc(torch.float32)
    _, rld16, r16 = _planted_tvc(torch.bfloat16, targets)
    assert rld32 > 0.02  # the vector really steers, so the comparison means something
    assert abs(rld16 - rld32) / abs(rld32) < 1e-2
    assert set(r16.features) == set(r32.features) == {1, 7, 20}
    assert ((r16.weights - r32.weights).norm() / r32.weights.norm()).item() < 5e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_node_effects_bf16_agree_with_fp32(seed, one_thread):
    # measured over seeds 0-4 (CPU, torch 2.13): metric relative error <= 1e-4; node effects' relative
    # L2 error 0.013-0.028; top-20 nodes by |effect| identical (overlap 1.0) of 468 nodes
    from icl_circuits.methods.circuits import CircuitConfig, circuit_saes, node_effects

    def run(dtype: torch.dtype):  # noqa: ANN202
        lm, _ = make_tiny("gemma3", seed=seed)
        lm.model.to(dtype)
        cfg = CircuitConfig(layers=(0, 1))
        saes = circuit_saes(lm, cfg, tiny_saes(lm, (0, 1), cfg.kinds, seed=seed))  # cast to the model's dtype
        batch, _ = toy_batch(seed=seed)
        e = node_effects(lm, batch, saes, cfg)
        return e.metric, e.flat()

    m32, f32 = run(torch.float32)
    m16, f16 = run(torch.bfloat16)
    assert abs(m16 - m32) / abs(m32) < 2e-3
    assert ((f16 - f32).norm() / f32.norm()).item() < 0.1
    k = 20
    top32 = set(f32.abs().argsort(descending=True)[:k].tolist())
    top16 = set(f16.abs().argsort(descending=True)[:k].tolist())
    assert len(top32 & top16) / k >= 0.8


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "gated", "jumprelu"])
def test_sae_trainer_to_moves_every_tensor(arch):
    """SAETrainer.to after some steps: parameters, Adam's moments and every counter follow (checked on the
    'meta' device, which needs no GPU: anything left behind would still be on the CPU)."""
    from icl_circuits.sae.dictionary import SAEConfig
    from icl_circuits.sae.trainers import SAETrainer, TrainerConfig

    tr = SAETrainer(TrainerConfig(d_in=8, d_sae=16, arch=arch, k=4), SAEConfig(d_in=8, d_sae=16, site="resid_pre.0", layer=0))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tr.step(torch.randn(32, 8, generator=g))
    tr.to("meta")
    assert all(p.device.type == "meta" for p in tr.params.values())
    moments = [v for st in tr.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    assert moments and all(v.device.type == "meta" for v in moments)
    left = [k for k, v in vars(tr).items() if isinstance(v, torch.Tensor) and v.device.type != "meta"]
    assert not left, left


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_smoke_script_refuses_a_missing_device(capsys):
    """scripts/gpu_smoke.py exits 2 with one clear line (its full CPU run, ~75 s, is in docs/gpu.md)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke", Path(__file__).parents[1] / "scripts" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(smoke)  # type: ignore[union-attr]
    assert smoke.main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
