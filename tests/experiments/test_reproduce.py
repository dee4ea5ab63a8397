"""`reproduce` end to end on a tiny random model, tiny SAEs and two tiny tasks: every stage of the paper's
pipeline, the claims report, resume after an interruption, and refusal of a changed stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from icl_circuits.cli import main
from icl_circuits.experiments.reproduce import ReproduceConfig, load_recipe, reproduce
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
from icl_circuits.sae.formats import save_sae
from icl_circuits.core.storage import ConfigMismatch

from tests.helpers import assert_recipes_refused, make_tiny, word_tokenizer

PAIRS = [(f"w{i}", f"w{(i + 1) % 36}") for i in range(36)]  # 18 training pairs (the detection sweep takes 16 shots); a small vocab


def _sae(d: int, layer: int, model: str, seed: int) -> JumpReLUSAE:
    """A random residual SAE whose decoder rows are unit-norm, so some latents fire on a tiny model."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(16, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    tensors = dict(W_enc=W_dec.T.clone() + 0.3 * torch.randn(d, 16, generator=g), b_enc=0.1 * torch.randn(16, generator=g),
                   W_dec=3 * W_dec, b_dec=0.05 * torch.randn(d, generator=g), threshold=torch.full((16,), 0.05))  # fmt: skip
    return JumpReLUSAE(SAEConfig(d_in=d, d_sae=16, site=f"resid_pre.{layer}", layer=layer, model=model), tensors)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("repro")
    lm, _ = make_tiny("llama")
    words = ["Follow", "the", "pattern:", "->", "X", "Y"] + [w for p in PAIRS for w in p]
    model_dir = root / "tiny"
    lm.model.save_pretrained(model_dir)
    word_tokenizer(words).save_pretrained(model_dir)
    tasks = []
    for name, pairs in (("fwd", PAIRS), ("back", [(y, x) for x, y in PAIRS])):
        (root / f"{name}.json").write_text(json.dumps(dict(pairs)))
        tasks.append(str(root / f"{name}.json"))
    saes = {}
    for layer in (0, 1):
        saes[layer] = root / f"sae{layer}"
        save_sae(_sae(lm.d_model, layer, str(model_dir), seed=layer), saes[layer])
    small = 'n_prompts = 2, n_shots = 3'
    clean = f'{small}, n_train = 4, n_eval = 4, max_steps = 4, patience = 2, l1 = 1e-4'
    recipe = root / "tiny.toml"
    recipe.write_text(f"""
title = "tiny"
tasks = "{','.join(tasks)}"
[[stage]]
name = "task_vectors"
command = "task-vectors"
args = {{ tasks = "{{tasks}}", layers = "0-1", {small}, n_eval = 4 }}
publish = ["best_layers.csv", "layer_sweep.png"]
[[stage]]
name = "detection_sweep"
command = "detectors"
args = {{ steps = "sweep", tasks = "{{tasks}}", sweep_layers = "0-1", {small} }}
publish = ["detection_layer_sweep.*"]
[[stage]]
name = "tvc_execution"
command = "clean"
args = {{ tasks = "{{tasks}}", layer = 1, sae = "{saes[1]}", {clean} }}
publish = ["summary.*"]
[[stage]]
name = "tvc_detection"
command = "clean"
args = {{ tasks = "{{tasks}}", layer = 0, setting = "detection", sae = "{saes[0]}", {clean} }}
[[stage]]
name = "heatmap_execution"
command = "heatmap"
args = {{ results = "{{stage:tvc_execution}}", n_eval = 4, scale_grid = "1,4", min_effect = 0 }}
publish = ["*.png", "*.csv"]
[[stage]]
name = "negative_steering"
command = "heatmap"
args = {{ results = "{{stage:tvc_execution}}", positive = "{{stage:heatmap_execution}}/heatmap.json", n_eval = 4, scale_grid = "1,4", min_effect = 0, negative = true, negative_features = "top", negative_prompts = 2, negative_shots = 3, negative_n_scales = 2 }}
publish = ["*negative*"]
[[stage]]
name = "heatmap_detection"
command = "heatmap"
args = {{ results = "{{stage:tvc_detection}}", top_only = true, n_eval = 4, scale_grid = "1,4" }}
[[stage]]
name = "detectors"
command = "detectors"
args = {{ steps = "masses,link", executors = "{{stage:tvc_execution}}", detectors = "{{stage:tvc_detection}}", exec_heatmap = "{{stage:heatmap_execution}}/heatmap.json", det_heatmap = "{{stage:heatmap_detection}}/heatmap.json", {small} }}
publish = ["masses.json", "link.json"]
[[stage]]
name = "circuits"
command = "circuit"
args = {{ tasks = "{{tasks}}", layers = "1", kinds = "resid", sae = ["resid.1={saes[1]}"], {small}, edge_k = 1, ie_quality = "2" }}
publish = ["summary.csv", "cross_task.json"]
[[stage]]
name = "circuits_10_17"
command = "circuit"
args = {{ tasks = "{{tasks}}", layers = "0-1" }}
optional = true
""")
    return dict(root=root, model=str(model_dir), recipe=recipe, tasks=tasks)


def test_reproduce_runs_every_stage_then_resumes_after_an_interruption(setup: dict, tmp_path: Path, capsys) -> None:
    out, docs = tmp_path / "run", tmp_path / "docs"
    calls: list[str] = []

    def interrupted(argv: list[str]) -> int:  # the 4th stage is killed half-way (after its command ran)
        calls.append(argv[0])
        rc = main(argv)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return rc

    cfg = ReproduceConfig(recipe=str(setup["recipe"]), out=out, docs=docs, model=setup["model"], threads=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, run_command=interrupted)
    done = [json.loads(l)["key"] for l in (out / "stages.jsonl").read_text().splitlines()[1:]]
    assert done == ["task_vectors", "detection_sweep", "tvc_execution"]  # the killed stage is not marked finished

    calls.clear()
    res = reproduce(cfg, run_command=lambda argv: calls.append(argv[0]) or main(argv))
    # finished stages were not redone; the interrupted one ran again (its command resumes its own units)
    assert calls == ["clean", "heatmap", "heatmap", "heatmap", "detectors", "circuit"]
    status = {s.name: s.status for s in res.stages}
    assert status == {"task_vectors": "done", "detection_sweep": "done", "tvc_execution": "done", "tvc_detection": "done",
                      "heatmap_execution": "done", "negative_steering": "done", "heatmap_detection": "done", "detectors": "done",
                      "circuits": "done",
                      "circuits_10_17": "skipped"}  # fmt: skip
    # the interrupted stage's wall time counts both attempts
    attempts = [json.loads(l)["key"] for l in (out / "attempts.jsonl").read_text().splitlines()[1:]]
    assert sum(k.startswith("tvc_detection#") for k in attempts) == 2

    # published files, the claims and the report
    assert (docs / "task_vectors" / "layer_sweep.png").stat().st_size > 1000
    assert (docs / "tvc_execution" / "summary.csv").is_file() and (docs / "circuits" / "summary.csv").is_file()
    claims = {c["key"]: c for c in json.loads((docs / "claims.json").read_text())}
    assert claims["sfc_10_17"]["holds"] == "not run" and "skipped" in claims["sfc_10_17"]["ours"]
    assert claims["ie_quality"]["holds"] == "not run" and "not in the recipe" in claims["ie_quality"]["ours"]
    measured = ["tv_layer", "detection_layer", "tvc", "specific_executors", "negative", "link", "sfc_11_12", "cross_task"]
    for key in measured:  # every claim whose stage ran has a verdict computed from its files
        assert claims[key]["holds"] in ("yes", "partly", "no", "no (reached, but with more nodes)"), claims[key]
    tvc = json.loads((out / "tvc_execution" / "summary.json").read_text())
    assert claims["tvc"]["ours"].endswith(f"on {sum(r['tvc'] > max(r['sae_reconstruction'], r['ito_5'], r['ito_20']) for r in tvc)}")
    report = (docs / "report.md").read_text()
    assert "| claim | where in the paper |" in report and "fwd (yours)" in report and "## Wall time per stage" in report
    assert "icl-circuits clean --tasks" in report  # every stage names its command
    assert (docs / "report.html").stat().st_size > 1000
    manifest = json.loads((docs / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]][:2] == ["task_vectors", "detection_sweep"]

    # a third run does nothing but the report
    calls.clear()
    reproduce(cfg, run_command=lambda argv: calls.append(argv[0]) or main(argv))
    assert calls == []


def test_reproduce_refuses_a_changed_stage_until_rerun(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "one.toml"
    text = f'tasks = "{setup["tasks"][0]}"\n[[stage]]\nname = "task_vectors"\ncommand = "task-vectors"\n' \
           'args = {{ tasks = "{{tasks}}", layers = "{layers}", n_prompts = 2, n_shots = 3, n_eval = 4 }}\n'  # fmt: skip
    recipe.write_text(text.format(layers="0"))
    cfg = ReproduceConfig(recipe=str(recipe), out=out, model=setup["model"], threads=1, progress=False)
    reproduce(cfg)
    recipe.write_text(text.format(layers="0-1"))
    with pytest.raises(ConfigMismatch, match="stage task_vectors .* --layers 0 .* --layers 0-1"):
        reproduce(cfg)
    assert json.loads((out / "task_vectors" / "sweep.json").read_text())["layers"] == [0]  # nothing was touched
    res = reproduce(ReproduceConfig(**{**cfg.__dict__, "rerun": ("task_vectors",)}))  # the old folder is moved aside, not lost
    (aside,) = out.glob("task_vectors.replaced-*")
    assert json.loads((aside / "sweep.json").read_text())["layers"] == [0]
    assert res.stages[0].status == "done"
    assert json.loads((out / "task_vectors" / "sweep.json").read_text())["layers"] == [0, 1]
    # another model, seed or dtype in the same --out is refused by the run directory
    with pytest.raises(ConfigMismatch):
        reproduce(ReproduceConfig(**{**cfg.__dict__, "seed": 1}))


def test_a_default_changed_since_a_stage_ran_is_refused(setup: dict, tmp_path: Path) -> None:
    """A finished stage logs its options as parsed then, defaults included: a default that changed in a later
    version (simulated by editing the record: 1 scored token then, 2 now) is named, though the recipe's
    command line is the same; an option the old version did not have is not."""
    out = tmp_path / "run"
    recipe = tmp_path / "one.toml"
    recipe.write_text(f'tasks = "{setup["tasks"][0]}"\n[[stage]]\nname = "task_vectors"\ncommand = "task-vectors"\n'
                      'args = { tasks = "{tasks}", layers = "0", n_prompts = 2, n_shots = 3, n_eval = 4 }\n')  # fmt: skip
    cfg = ReproduceConfig(recipe=str(recipe), out=out, model=setup["model"], threads=1, progress=False)
    reproduce(cfg)
    log = out / "stages.jsonl"
    header, rec = [json.loads(line) for line in log.read_text().splitlines()]
    assert rec["value"]["options"]["n_score_tokens"] == "2"  # the default, logged though the recipe does not set it

    def old_version(**options: str) -> None:
        opts = {k: v for k, v in {**rec["value"]["options"], **options}.items() if v is not None}
        log.write_text("\n".join(json.dumps(x) for x in (header, {**rec, "value": {**rec["value"], "options": opts}})) + "\n")

    old_version(arrows=None)  # a record from before --arrows existed: still the same run
    calls: list[list[str]] = []
    assert reproduce(cfg, run_command=calls.append).stages[0].status == "done" and calls == []
    old_version(n_score_tokens="1")
    with pytest.raises(ConfigMismatch, match=r"\(--n-score-tokens was 1, now 2\); pass --rerun task_vectors"):
        reproduce(cfg, run_command=calls.append)
    assert calls == []


def test_a_library_default_beneath_the_options_is_logged_and_compared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """clean's λ is filled in by the library from --setting (the option itself stays None): a stage's record
    holds the resolved configs too, so a library default that moves is named like a changed option."""
    from icl_circuits.experiments.recipe import _parsed
    from icl_circuits.experiments.reproduce import _stage_changes
    from icl_circuits.methods import cleaning

    argv = ["clean", "--tasks", "antonyms", "--layers", "11", "--setting", "detection"]
    then = _parsed(argv)
    assert then["l1"] == "None" and then["cleaning.l1_coeff"] == "0.001" and then["task_vector.n_prompts"] == "16"
    assert _parsed(argv[:-2])["cleaning.l1_coeff"] == "0.01"  # execution keeps its own
    assert _parsed([*argv, "--l1", "0.02"])["cleaning.l1_coeff"] == "0.02"
    record = dict(argv=argv, options=then)
    assert _stage_changes(record, argv, tmp_path) == []
    monkeypatch.setitem(cleaning.DEFAULT_L1, "detection", 0.005)  # a later version's default
    assert _stage_changes(record, argv, tmp_path) == ["cleaning.l1_coeff was 0.001, now 0.005"]
    assert _parsed([*argv, "--l1", "nan"])["l1"] == "nan"  # refused by the command when it runs, not here


def test_recipes_are_checked_before_anything_runs(tmp_path: Path) -> None:
    for name in ("paper", "demo"):
        r = load_recipe(name)  # the shipped recipes name real commands and options
        assert r.stages and all(s.command for s in r.stages)
    bad = {
        "unknown command": '[[stage]]\nname = "x"\ncommand = "nope"\n',
        "has no option --layerz": '[[stage]]\nname = "x"\ncommand = "clean"\nargs = { layerz = 3 }\n',
        "is not an earlier stage": '[[stage]]\nname = "x"\ncommand = "heatmap"\nargs = { results = "{stage:y}" }\n',
        "set by `reproduce` itself": '[[stage]]\nname = "x"\ncommand = "clean"\nargs = { model = "gpt2" }\n',
        "not valid TOML": '[[stage]\n',
        "two stages named": '[[stage]]\nname = "x"\ncommand = "tasks"\n[[stage]]\nname = "x"\ncommand = "tasks"\n',
    }
    assert_recipes_refused(tmp_path, bad)
    assert main(["reproduce", "--recipe", "no_such_recipe"]) == 2


def test_parallel_stages_wait_for_the_stages_they_read(setup: dict, tmp_path: Path) -> None:
    """--jobs 2: independent stages overlap, a stage reading another's folder starts after it."""
    import threading
    import time

    recipe = tmp_path / "par.toml"
    recipe.write_text('[[stage]]\nname = "a"\ncommand = "tasks"\n[[stage]]\nname = "b"\ncommand = "tasks"\n'
                      '[[stage]]\nname = "c"\ncommand = "heatmap"\nargs = { results = "{stage:a}" }\n')  # fmt: skip
    log: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    def fake(argv: list[str]) -> int:
        name = "c" if argv[0] == "heatmap" else None
        with lock:
            log.append(("start", name or threading.current_thread().name, time.perf_counter()))
        time.sleep(0.2)
        with lock:
            log.append(("end", name or threading.current_thread().name, time.perf_counter()))
        return 0

    res = reproduce(ReproduceConfig(recipe=str(recipe), out=tmp_path / "run", model=setup["model"], jobs=2, progress=False),
                    run_command=fake)  # fmt: skip
    assert [s.status for s in res.stages] == ["done", "done", "done"]
    starts = [t for kind, _, t in log if kind == "start"]
    ends = [t for kind, _, t in log if kind == "end"]
    assert starts[1] < ends[0]  # a and b ran side by side
    c_start = next(t for kind, n, t in log if kind == "start" and n == "c")
    assert c_start >= min(ends)  # c waited for a


def test_a_moved_run_folder_resumes(setup: dict, tmp_path: Path) -> None:
    """Stage records hold paths relative to the run folder, and options are compared as parsed values."""
    import shutil

    recipe = tmp_path / "one.toml"
    recipe.write_text(f'tasks = "{setup["tasks"][0]}"\n[[stage]]\nname = "task_vectors"\ncommand = "task-vectors"\n'
                      'args = { tasks = "{tasks}", layers = "0", n_prompts = 2, n_shots = 3, n_eval = 4 }\n')  # fmt: skip
    cfg = ReproduceConfig(recipe=str(recipe), out=tmp_path / "a", model=setup["model"], threads=1, progress=False)
    reproduce(cfg)
    shutil.move(tmp_path / "a", tmp_path / "b")
    calls: list[list[str]] = []
    res = reproduce(ReproduceConfig(**{**cfg.__dict__, "out": tmp_path / "b", "threads": 2}), run_command=calls.append)
    assert calls == [] and res.stages[0].status == "done"  # nothing re-ran: another --threads changes no result


def test_a_failed_parallel_stage_stops_new_launches(setup: dict, tmp_path: Path) -> None:
    from icl_circuits.experiments.reproduce import StageFailed

    recipe = tmp_path / "par.toml"
    recipe.write_text('[[stage]]\nname = "a"\ncommand = "tasks"\n[[stage]]\nname = "c"\ncommand = "heatmap"\n'
                      'args = { results = "{stage:a}" }\n')  # fmt: skip
    calls: list[str] = []

    def fails(argv: list[str]) -> int:
        calls.append(argv[0])
        return 2

    out = tmp_path / "run"
    with pytest.raises(StageFailed, match="stage a failed .exit code 2"):
        reproduce(ReproduceConfig(recipe=str(recipe), out=out, model=setup["model"], jobs=2, progress=False), run_command=fails)
    assert calls == ["tasks"]  # c, which reads a's folder, never started
    assert (out / "attempts.jsonl").read_text().count('"a#') == 1 and '"a"' not in (out / "stages.jsonl").read_text()


def test_a_relative_and_an_absolute_out_are_the_same_run(setup: dict, tmp_path: Path, monkeypatch) -> None:
    recipe = tmp_path / "one.toml"
    recipe.write_text(f'tasks = "{setup["tasks"][0]}"\n[[stage]]\nname = "task_vectors"\ncommand = "task-vectors"\n'
                      'args = { tasks = "{tasks}", layers = "0", n_prompts = 2, n_shots = 3, n_eval = 4 }\n')  # fmt: skip
    monkeypatch.chdir(tmp_path)
    reproduce(ReproduceConfig(recipe=str(recipe), out=Path("run"), model=setup["model"], threads=1, progress=False))
    calls: list[list[str]] = []
    reproduce(ReproduceConfig(recipe=str(recipe), out=tmp_path / "run", model=setup["model"], threads=1, progress=False),
              run_command=calls.append)  # fmt: skip
    assert calls == []
