"""The viewer reads what the commands write: `clean`, `heatmap`, `circuit`, `sae train`, `examples` and
`dashboards` run on a tiny model saved to a folder (as in tests/test_cli.py), and their run directories go to the
viewer's data layer and HTTP handlers.

Every expected value is read back from the files the commands wrote (cleaning.json, heatmap.json,
graph.json, faithfulness.json, the SAE folder's config.json, and examples.sqlite / dashboards.sqlite through
plain sqlite3), not from the viewer, so a key the viewer misreads fails here.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import sqlite3
from pathlib import Path

import pytest

from icl_circuits.cli import main
from icl_circuits.viz.viewer import RunData

from tests.helpers import MANY, pair_lm, unit_sae, serving


def _fmt(x: float) -> str:
    """How the pages print a float (4 significant digits)."""
    return f"{x:.4g}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/clean/<task>/cleaning.json, RUN/heatmap/heatmap.json, RUN/circuit/many/graph.json, RUN/sae/ (a trained
    SAE), RUN/examples/examples.sqlite (the cleaning's SAE as resid_1, the trained one as `trained`) and
    RUN/examples/dashboards.sqlite (resid_1), by the CLI."""
    from icl_circuits.sae.formats import save_sae

    tmp = tmp_path_factory.mktemp("contract")
    lm = pair_lm("llama")
    model_dir = tmp / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    for layer in (0, 1):  # the circuit's two SAEs (edges run from resid.0 to resid.1); TVC uses resid.1
        sae = unit_sae(lm, layer=layer, scale=3.0, seed=layer)
        sae.cfg.model = str(model_dir)  # the name load_model gives a folder
        save_sae(sae, tmp / f"sae{layer}")
    tasks = []
    for name, pairs in (("many", MANY), ("flipped", [(y, x) for x, y in MANY])):
        (tmp / f"{name}.json").write_text(json.dumps(dict(pairs)))
        tasks.append(str(tmp / f"{name}.json"))
    root = tmp / "run"
    common = ["--model", str(model_dir), "--n-prompts", "2", "--n-shots", "3", "--quiet"]
    assert main(["clean", *common, "--tasks", ",".join(tasks), "--layer", "1", "--sae", str(tmp / "sae1"), "--n-train", "4", "--n-eval", "4",
                 "--max-steps", "6", "--patience", "3", "--l1", "1e-4", "--out", str(root / "clean")]) == 0  # fmt: skip
    assert main(["heatmap", "--model", str(model_dir), "--results", str(root / "clean"), "--n-eval", "4", "--scale-grid", "1,4",
                 "--out", str(root / "heatmap"), "--quiet"]) == 0  # fmt: skip
    assert main(["circuit", *common, "--task", tasks[0], "--layers", "0-1", "--kinds", "resid",
                 "--sae", f"resid.0={tmp / 'sae0'}", "--sae", f"resid.1={tmp / 'sae1'}",
                 "--edge-k", "2", "--ie-quality", "0", "--no-cross-task", "--out", str(root / "circuit")]) == 0  # fmt: skip
    rng = random.Random(0)
    words = [w for pair in MANY for w in pair]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}) + "\n" for _ in range(30)))
    assert main(["sae", "train", "--model", str(model_dir), "--saes", "resid:1", "--corpus", str(corpus), "--out", str(root / "sae"),
                 "--d-sae", "16", "--tokens", "400", "--batch-tokens", "64", "--seq-len", "16", "--eval-docs", "4",
                 "--param-dtype", "float32", "--quiet"]) == 0  # fmt: skip
    saes = f"resid_1={tmp / 'sae1'},trained={root / 'sae' / 'saes' / 'resid_1'}"
    assert main(["examples", "--model", str(model_dir), "--saes", saes, "--corpus", str(corpus), "--out", str(root / "examples"),
                 "--seq-len", "12", "--batch-size", "4", "--quiet"]) == 0  # fmt: skip
    assert main(["dashboards", "--model", str(model_dir), "--saes", f"resid_1={tmp / 'sae1'}", "--tasks", ",".join(tasks),
                 "--out", str(root / "examples"), "--n-prompts", "2", "--n-shots", "3", "--quiet"]) == 0  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(run: Path):
    with serving(run) as srv:
        yield srv


def get(server, path: str) -> str:
    con = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=20)
    con.request("GET", path)
    r = con.getresponse()
    body = r.read().decode("utf-8")
    con.close()
    assert r.status == 200, (path, r.status, body[:300])
    return body


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_data_layer_reads_every_result_file(run: Path):
    data = RunData(run)
    assert not [p for p in data.problems if re.search(r"(cleaning|graph|heatmap|faithfulness)\.json", p)], data.problems
    assert sorted(data.tasks) == ["flipped", "many"]
    for name, t in data.tasks.items():
        written = _json(run / "clean" / name / "cleaning.json")
        assert (t.task, t.layer, t.setting) == (written["task"], written["layer"], written["setting"])
        assert [(f.latent, _fmt(f.weight)) for f in t.features] == [(f["index"], _fmt(f["weight"])) for f in written["features"]]
        assert len(t.tv_features) == written["initial_l0"] and t.scores == written["scores"]
        assert t.summary["steps"] == written["steps"] and t.curves["l0_history"] == written["l0_history"]
    heat = _json(run / "heatmap" / "heatmap.json")
    (h,) = data.heatmaps
    assert h.tasks == heat["tasks"] and h.features == heat["features"] and h.sae == f"resid_{heat['config']['layer']}"
    for i, task in enumerate(heat["tasks"]):
        assert data.task_steering(task, "execution") == pytest.approx(dict(zip(heat["features"], heat["raw"][i])))
    graph = _json(run / "circuit" / "many" / "graph.json")
    (c,) = data.circuits
    assert c.task == graph["task"] == "many" and [n.label for n in c.nodes] == [n["name"] for n in graph["nodes"]]
    assert [(e.source, e.target, e.weight) for e in c.edges] == [(str(e["source"]), str(e["target"]), e["effect"]) for e in graph["edges"]]
    faith = _json(run / "circuit" / "many" / "faithfulness.json")
    finite = [(x, y) for x, y in zip(faith["sizes"], faith["faith_C"]) if y == y]
    shown = c.curve.get("circuit C_N", [])
    assert [x for x, _ in shown] == [x for x, _ in finite] and [y for _, y in shown] == pytest.approx([y for _, y in finite])


def test_task_page_shows_the_written_values(run: Path, server):
    heat = _json(run / "heatmap" / "heatmap.json")
    for name in ("many", "flipped"):
        written = _json(run / "clean" / name / "cleaning.json")
        body = get(server, f"/task/{name}")
        tvc = written["scores"]["tvc"]["relative_loss_decrease"]
        assert "<td>tvc</td>" in body and f"<td>{_fmt(tvc)}</td>" in body  # the TVC score, in the scores table
        assert f"<td>{_fmt(written['scores']['tv']['relative_loss_decrease'])}</td>" in body
        i = heat["tasks"].index(name)
        for f in written["features"]:  # each cleaned feature: its weight and its steering effect from the heatmap
            effect = heat["raw"][i][heat["features"].index(f["index"])]
            link = f"<a href='/feature/resid_1/{f['index']}'>resid_1 #{f['index']}</a>"  # the examples store holds resid_1
            row = rf"{link}</td><td>{re.escape(_fmt(f['weight']))}</td><td>[^<]*</td><td>{re.escape(_fmt(effect))}</td>"
            assert re.search(row, body), f
        assert "id='tvc-curves'" in body and "class='chart tvc-l0'" in body
    index = get(server, "/")
    assert "Tasks (2)" in index and "Circuits (1)" in index and "Files not shown" not in index


def test_circuit_and_feature_pages_show_the_written_values(run: Path, server):
    graph = _json(run / "circuit" / "many" / "graph.json")
    body = get(server, "/circuit/0")
    assert graph["edges"], "resid.0 -> resid.1 edges"
    assert f"{len(graph['nodes'])} nodes, {len(graph['edges'])} edges" in body
    for n in graph["nodes"]:  # a resid.1 node links to its feature page (the examples store holds resid_1), resid.0 has none
        feature = f"<a href='/feature/resid_1/{n['feature']}'>[^<]*</a>" if n["key"] == "resid.1" else "[^<]*"
        assert re.search(rf"<td>{re.escape(n['name'])}</td><td>{feature}</td><td>{n['layer']}</td><td>{n['token_type']}</td>"
                         rf"<td>{re.escape(_fmt(n['effect']))}</td>", body), n  # fmt: skip
    assert "id='faithfulness-curve'" in body and "faithfulness.json" in body
    heat = _json(run / "heatmap" / "heatmap.json")
    latent = heat["features"][0]
    body = get(server, f"/feature/resid_1/{latent}")
    assert "id='steering'" in body and all(t in body for t in heat["tasks"])  # the heatmap row of this feature
    assert "In cleaned task vectors" in body


def _rows(db: Path, query: str, *args) -> list[tuple]:
    """Rows of a store the CLI wrote, read with plain sqlite3 (read-only), not through the viewer or the store classes."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def test_data_layer_reads_the_example_store_dashboards_and_trained_sae(run: Path):
    data = RunData(run)
    assert not data.problems, data.problems  # no file of any command (the SAE folder's JSON included) is misread
    store, dash = run / "examples" / "examples.sqlite", run / "examples" / "dashboards.sqlite"
    written = {name: (i, site, d) for i, name, site, d in _rows(store, "SELECT id, name, site, d_sae FROM saes")}
    assert sorted(written) == ["resid_1", "trained"] and sorted(data.sae_names()) == sorted(written)
    cfg = _json(run / "sae" / "saes" / "resid_1" / "config.json")  # the SAE `sae train` wrote
    info = data.sae_info("trained")
    assert written["trained"][1:] == (cfg["site"], cfg["d_sae"]) == (info["site"], info["d_sae"])
    heat = _json(run / "heatmap" / "heatmap.json")
    cleaned = {n: {f["index"] for f in _json(run / "clean" / n / "cleaning.json")["features"]} for n in ("many", "flipped")}
    checked = {"resid_1": 0, "trained": 0}
    for sae, latents in (("resid_1", heat["features"]), ("trained", range(cfg["d_sae"]))):
        sid = written[sae][0]
        for latent in latents:
            examples = _rows(store, "SELECT act FROM examples WHERE sae = ? AND latent = ?", sid, latent)
            if not examples:
                continue
            (n_fired, max_act), = _rows(store, "SELECT n_fired, max_act FROM latents WHERE sae = ? AND latent = ?", sid, latent)
            f = data.feature(sae, latent, limit=None)
            assert f["has_store"] and f["info"]["site"] == written[sae][1]
            assert sorted(e.act for e in f["examples"]) == pytest.approx(sorted(a for (a,) in examples))
            assert f["stats"]["n_fired"] == n_fired and f["stats"]["max_act"] == pytest.approx(max_act)
            assert all(e.tokens and len(e.tokens) == len(e.acts) for e in f["examples"])
            if sae == "trained":  # no dashboard and no cleaned task for the trained SAE: nothing joins it
                assert f["dashboard"] is None and not f["tasks"] and not f["heatmap_rows"]
            else:  # the cleaning's SAE: the store joins the cleaned tasks, the heatmap row and the dashboard
                assert sorted(t["task"] for t in f["tasks"]) == sorted(n for n, fs in cleaned.items() if latent in fs)
                assert [r["values"] for r in f["heatmap_rows"]] and f["has_dashboard"]
                (d_fired, density, d_max), = _rows(
                    dash, "SELECT f.n_fired, f.density, f.max_act FROM features f JOIN saes s ON s.id = f.sae "
                    "WHERE s.name = ? AND f.latent = ?", sae, latent)  # fmt: skip
                d = f["dashboard"]
                assert (d.sae, d.latent, d.n_fired) == (sae, latent, d_fired)
                assert (d.density, d.max_act) == pytest.approx((density, d_max))
            checked[sae] += 1
    assert checked["resid_1"] > len(heat["features"]) // 2 and checked["trained"] > 0  # they fired on the corpus


def test_feature_page_shows_the_stored_examples(run: Path, server):
    heat = _json(run / "heatmap" / "heatmap.json")
    store = run / "examples" / "examples.sqlite"
    latent, _ = max(_rows(store, "SELECT e.latent, count(*) FROM examples e JOIN saes s ON s.id = e.sae WHERE s.name = 'resid_1' "
                                 "GROUP BY e.latent"), key=lambda r: (r[0] in heat["features"], r[1]))  # fmt: skip
    body = get(server, f"/feature/resid_1/{latent}")
    assert "id='examples'" in body and "No example store" not in body and "never fired" not in body
    assert "id='logit-lens'" in body and "id='density'" in body  # the dashboard's panels
    all_body = get(server, f"/feature/resid_1/{latent}/examples")
    assert "Max-activating examples" in all_body and "<h3>Top " in all_body
