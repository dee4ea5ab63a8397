"""The viewer over HTTP (urllib / http.client) and the static report, on a run made with a tiny model."""

from __future__ import annotations

import http.client
import json
import random
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from icl_circuits.ablation import FaithfulnessCurve
from icl_circuits.circuits import ERROR, Edge, NodeEffects, circuit_graph, save_graph
from icl_circuits.cleaning import CleaningConfig, CleaningResult
from icl_circuits.examples import ExampleConfig, build_example_store
from icl_circuits.report import write_report
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
from icl_circuits.steering import HeatmapConfig, HeatmapResult
from icl_circuits.storage import write_json
from icl_circuits.viewer import make_server

from .conftest import make_tiny, word_tokenizer

SCRIPT = "<script>alert(1)</script>"
EVIL_TASK = "<img src=x onerror=alert(2)>"
WORDS = ["hot", "cold", "big", "small", "fast", "slow", "up", "down", SCRIPT] + [f"w{i}" for i in range(30)]


def make_run(root: Path) -> Path:
    """A run directory as the other commands would leave it: an example store, a cleaned task
    vector, a circuit, a steering heatmap and a figure. Latent 0 fires on the <script> token."""
    lm, _ = make_tiny("llama")
    lm.tokenizer = word_tokenizer(WORDS)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS[:8] + WORDS[9:]) for _ in range(30)) for _ in range(20)]
    docs[3] = "w1 w2 " + SCRIPT + " " + docs[3]
    d_sae = 16
    g = torch.Generator().manual_seed(0)
    W = torch.randn(lm.d_model, d_sae, generator=g) * 15
    emb = lm.model.get_input_embeddings().weight[lm.tokenizer.convert_tokens_to_ids(" " + SCRIPT)].detach()
    W[:, 0] = 3 * emb / emb.norm() ** 2  # latent 0: act 3 on the <script> token (resid_pre.0 = its embedding)
    thr = torch.full((d_sae,), 0.1)
    thr[0] = 2.0
    cfg = SAEConfig(d_in=lm.d_model, d_sae=d_sae, model=lm.name, site="resid_pre.0", layer=0)
    sae = JumpReLUSAE(cfg, {"W_enc": W, "threshold": thr, "W_dec": torch.randn(d_sae, lm.d_model, generator=g)})
    ecfg = ExampleConfig(seq_len=16, batch_size=4, top_k=4, per_bin=2, context_before=6, context_after=3)
    build_example_store(lm, {"resid_0": sae}, docs, root / "examples" / "examples.sqlite", ecfg, progress=False)

    # every result file below is written by its real writer, from a small object
    scores = {"tv": {"l0": None, "nll": 2.0, "accuracy": 0.5, "relative_loss_decrease": 0.7},
              "tvc": {"l0": 2.0, "nll": 2.1, "accuracy": 0.5, "relative_loss_decrease": 0.61}}  # fmt: skip
    cleaning_result("antonyms", 0, "execution", {0: 1.5, 3: 0.7}, {0: 1.0, 3: 0.9, 5: 0.4, 7: 0.2}, d_sae, lm.d_model, scores).save(root / "antonyms")
    cleaning_result(EVIL_TASK, 0, "execution", {5: 0.3}, {0: 1.0, 3: 0.9, 5: 0.4, 7: 0.2}, d_sae, lm.d_model).save(root / "evil")
    # the circuit module's graph ('resid.0' names the SAE at resid_pre.0) and its faithfulness curve
    save_graph(circuit_graph_of("antonyms", d_sae), root / "antonyms" / "graph.json")
    write_json(root / "antonyms" / "faithfulness.json", FaithfulnessCurve("antonyms", [1, 3], [-1.0, -0.5], [-1.8, -1.9], -0.4, -2.0, [0, 0], 4).to_dict())
    # the steering module's heatmap (what run_heatmap writes)
    write_json(root / "heatmap.json", heatmap_result(["antonyms", "en_fr"], [0, 3], [[0.42, 0.11], [0.05, 0.0]], "execution", 0).to_dict())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from icl_circuits.storage import save_figure

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [0.4, 0.8, 0.9])
    ax.set_title("faithfulness")
    save_figure(fig, root / "antonyms" / "faithfulness")
    plt.close(fig)
    (root / "notes.txt").write_text(f"corpus says {SCRIPT}\n")
    return root


def cleaning_result(task: str, layer: int, setting: str, weights: dict[int, float], initial: dict[int, float], d_sae: int = 16,
                    d_model: int = 8, scores: dict | None = None) -> CleaningResult:  # fmt: skip
    """A small TVC result as clean_vector returns it (save() writes cleaning.json + cleaning.safetensors)."""
    w, w0 = torch.zeros(d_sae), torch.zeros(d_sae)
    w[list(weights)], w0[list(initial)] = torch.tensor(list(weights.values())), torch.tensor(list(initial.values()))
    return CleaningResult(
        task=task, layer=layer, setting=setting, sae_spec=f"resid:{layer}", config=CleaningConfig(l1_coeff=0.01, setting=setting).to_dict(),
        weights=w, initial_weights=w0, vector=torch.zeros(d_model), l0_history=[len(initial), len(weights)], train_loss=[2.5, 2.2],
        eval_loss=[(1, 2.4), (2, 2.1)], steps=2, stopped="patience", seconds=0.1, scores=scores or {},
        feature_effects=[{"index": i, "weight": v, "alone": 0.1 * v, "drop_without": 0.0, "bias_only": 0.0} for i, v in weights.items()],
    )  # fmt: skip


def heatmap_result(tasks: list[str], features: list[int], raw: list[list[float]], setting: str, layer: int) -> HeatmapResult:
    """A small steering heatmap (raw is tasks x features), every task owning every feature."""
    return HeatmapResult(
        tasks=tasks, features=features, raw=torch.tensor(raw, dtype=torch.float64), scales=[1.0] * len(features),
        owners={f: list(tasks) for f in features}, in_task_vector={f: list(tasks) for f in features}, baselines={t: 2.0 for t in tasks},
        grid={t: {f: [0.1] for f in features} for t in tasks}, config=HeatmapConfig(setting=setting, layer=layer).to_dict(),
    )  # fmt: skip


def circuit_graph_of(task: str, d_sae: int) -> dict:
    """circuit_graph of resid.0 -> attn.1 (3 latents each): two resid.0 latents and its error node feed attn.1 #2."""
    types = ("input", "arrow", "output")
    eff = NodeEffects(["resid.0", "attn.1"], types, {"resid.0": torch.zeros(3, d_sae + 1), "attn.1": torch.zeros(3, 4)}, -1.2)
    eff.effects["resid.0"][1, 0], eff.effects["resid.0"][2, 3], eff.effects["resid.0"][1, d_sae] = 0.5, -0.2, 0.1
    eff.effects["attn.1"][1, 2] = 0.3
    to = eff.flat_id("attn.1", 2, "arrow")
    edges = [Edge(eff.flat_id("resid.0", 0, "arrow"), to, 0.8), Edge(eff.flat_id("resid.0", 3, "output"), to, -0.1),
             Edge(eff.flat_id("resid.0", ERROR, "arrow"), to, 0.05)]  # fmt: skip
    return {**circuit_graph(eff, edges), "task": task}  # run_circuit_task adds the task name


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def server(run_dir):
    srv = make_server(run_dir, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(server, path: str, headers: dict | None = None) -> tuple[int, str, dict]:
    """A raw request: http.client sends the path exactly as given (no '..' normalisation)."""
    con = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    con.request("GET", path, headers=headers or {})
    r = con.getresponse()
    body = r.read().decode("utf-8", "replace")
    con.close()
    return r.status, body, dict(r.getheaders())


def test_pages_render(server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    index = urllib.request.urlopen(base + "/").read().decode()
    assert "antonyms" in index and "resid_0" in index and "Circuits (1)" in index
    task = urllib.request.urlopen(base + "/task/antonyms").read().decode()
    assert "/feature/resid_0/0" in task and "/feature/resid_0/3" in task and "/feature/resid_0/5" in task
    assert "0.42" in task  # steering effect from the heatmap
    feat = urllib.request.urlopen(base + "/feature/resid_0/0").read().decode()
    assert "Max-activating examples" in feat and "class='ex'" in feat and "antonyms" in feat and "/circuit/0" in feat
    assert "0.42" in feat and "en_fr" in feat  # heatmap row
    for path in ("/circuit/0", "/plots", "/features", "/sae/resid_0", "/feature/resid_0/0/examples", "/tasks", "/circuits"):
        assert urllib.request.urlopen(base + path).status == 200, path
    circuit = urllib.request.urlopen(base + "/circuit/0").read().decode()
    assert "<svg" in circuit and "href='/feature/resid_0/0'" in circuit and "faithfulness" in circuit
    assert circuit.count("class='node'") == 2  # latents of resid_0 link; the error node and attn_1 (no store) do not
    assert "resid.0/error@arrow" in circuit and "relative_loss_decrease" in task
    api = json.loads(urllib.request.urlopen(base + "/api/examples/resid_0/0").read())
    assert api[0]["tokens"][api[0]["target"]] == " " + SCRIPT and api[0]["act"] == pytest.approx(3.0, rel=1e-3)


def test_corpus_text_is_escaped(server):
    status, body, headers = get(server, "/feature/resid_0/0")
    assert status == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "<script" not in body.lower()  # neither the example nor anything else is a script
    assert "script-src 'none'" in headers["Content-Security-Policy"]
    status, body, _ = get(server, "/")
    assert "&lt;img src=x onerror=alert(2)&gt;" in body and "<img src=x" not in body  # task names too
    status, body, _ = get(server, "/task/" + urllib.request.quote(EVIL_TASK, safe=""))
    assert status == 200 and "<img src=x" not in body


@pytest.mark.parametrize("path", [
    "/files/../../../../etc/passwd", "/../../etc/passwd", "/files/%2e%2e/%2e%2e/etc/passwd",
    "/files/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "/files/..%5c..%5cetc%5cpasswd", "/files/antonyms/../../x",
    "/task/..", "/files/./notes.txt",
])  # fmt: skip
def test_traversal_is_refused(server, path):
    status, body, _ = get(server, path)
    assert status == 403, (path, status)
    assert "root:" not in body


def test_files_inside_only(server, run_dir, tmp_path):
    status, body, headers = get(server, "/files/antonyms/cleaning.json")
    assert status == 200 and json.loads(body)["task"] == "antonyms"
    status, _, headers = get(server, "/files/antonyms/faithfulness.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (run_dir / "link.txt").symlink_to(outside)  # a symlink out of the run is not followed
    try:
        status, body, _ = get(server, "/files/link.txt")
        assert status == 404 and "secret" not in body
        status, body, _ = get(server, "/files/" + urllib.request.quote(str(outside)))
        assert status in (403, 404) and "secret" not in body
    finally:
        (run_dir / "link.txt").unlink()
    assert get(server, "/files/nope.txt")[0] == 404
    assert get(server, "/feature/resid_0/notanumber")[0] == 404
    assert get(server, "/circuit/7")[0] == 404


def test_foreign_host_header_is_refused(server):
    assert get(server, "/", headers={"Host": "evil.example:80"})[0] == 403


def test_report_is_static_and_escaped(run_dir):
    write_json(run_dir / "long" / "vectors.json", {"task": "x", "weights": [0.0] * 4000 + [1.0, 2.0], "initial": [1.0] * 4002})
    path = write_report(run_dir, f"Run <{SCRIPT}>")
    text = path.read_text()
    assert "<script" not in text.lower() and "&lt;script&gt;" in text
    assert "src='antonyms/faithfulness.png'" in text and (run_dir / "antonyms/faithfulness.png").is_file()
    assert "heatmap.json" in text and "0.42" in text  # a JSON table
    assert "[4002 numbers, 2 non-zero]" in text  # long weight vectors summarised, not dumped
    assert "sizes, m_C, m_M" in text  # short parallel lists (faithfulness.json) become the columns of one table
    assert "cleaning.safetensors" in text  # listed under other files
    assert "examples/examples.sqlite" in text  # other files listed


def test_data_layer_reads_what_is_there(tmp_path):
    """RunData without a server: one task in two settings, a heatmap per setting, unreadable files listed."""
    from icl_circuits.viewer import RunData

    for setting, layer, latent in (("execution", 12, 4), ("detection", 11, 9)):
        cleaning_result("antonyms", layer, setting, {latent: 2.0}, {latent: 1.0, 1: 0.5}).save(tmp_path / setting / "antonyms")
        write_json(tmp_path / setting / "heatmap.json", heatmap_result(["antonyms"], [latent], [[0.5]], setting, layer).to_dict())
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "cleaning.json").write_text((tmp_path / "execution" / "antonyms" / "cleaning.json").read_text())  # no .safetensors
    data = RunData(tmp_path)
    assert sorted(data.tasks) == ["antonyms (detection, layer 11)", "antonyms (execution, layer 12)"]
    assert data.task_steering("antonyms", "execution") == {4: 0.5} and data.task_steering("antonyms", "detection") == {9: 0.5}
    assert [h.sae for h in sorted(data.heatmaps, key=lambda h: h.file)] == ["resid_11", "resid_12"]
    assert any("broken.json" in p for p in data.problems)
    assert any("lonely/cleaning.json" in p and "cleaning.safetensors" in p for p in data.problems)
    # a latent index is only linked to the tasks of its own SAE
    assert [t["task"] for t in data.feature("resid_12", 4)["tasks"]] == ["antonyms (execution, layer 12)"]
    assert data.feature("resid_11", 4)["tasks"] == []
    t = data.tasks["antonyms (execution, layer 12)"]
    assert [(f.latent, f.weight, f.initial_weight) for f in t.features] == [(4, 2.0, 1.0)]
    assert [(f.latent, f.kept) for f in t.tv_features] == [(4, True), (1, False)]


# -- issue 18: the viewer never leaves its folder, and every response is well-formed and carries the CSP --------
def _raw(server, request: bytes) -> bytes:
    """Send raw bytes, read the whole response (the server closes the connection: HTTP/1.0)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


def _headers_of(raw: bytes) -> tuple[list[bytes], dict[str, str]]:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return head, {k.decode().lower(): v.decode().strip() for k, _, v in (h.partition(b":") for h in head[1:])}


def test_symlinked_json_out_of_the_run_is_never_read(tmp_path):
    """A JSON symlinked from outside RUN_DIR is refused by the data layer, as the file server refuses it."""
    from icl_circuits.viewer import RunData

    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    save_graph(circuit_graph_of("LEAKED_GRAPH", 4), outside / "graph.json")
    cleaning_result("LEAKED_TASK", 0, "execution", {1: 1.0}, {1: 1.0}).save(outside)
    write_json(outside / "table.json", {"secret": "LEAKED_TABLE"})
    save_graph(circuit_graph_of("real", 4), run / "real" / "graph.json")
    (run / "leak").mkdir(parents=True)
    (run / "leak" / "graph.json").symlink_to(outside / "graph.json")
    (run / "leak" / "cleaning.json").symlink_to(outside / "cleaning.json")
    (run / "leak" / "cleaning.safetensors").symlink_to(outside / "cleaning.safetensors")
    (run / "real" / "extra.json").symlink_to(outside / "table.json")  # next to a real circuit: its page lists the folder's tables
    (run / "half").mkdir()  # a cleaning.json inside whose vectors lead outside: not read either
    (run / "half" / "cleaning.json").write_text((outside / "cleaning.json").read_text())
    (run / "half" / "cleaning.safetensors").symlink_to(outside / "cleaning.safetensors")
    data = RunData(run)
    assert [c.task for c in data.circuits] == ["real"] and data.tasks == {}
    assert sum("leads outside the run directory" in p for p in data.problems) == 6  # 5 links, and half/cleaning.json
    assert any(p.startswith("half/cleaning.json: not understood") for p in data.problems)
    srv = make_server(run, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for path in ("/", "/circuits", "/circuit/0", "/tasks", "/feature/resid_0/0"):
            status, body, _ = get(srv, path)
            assert "LEAKED" not in body, (path, status)
    finally:
        srv.shutdown()
        srv.server_close()


def test_goto_with_a_bad_latent_sends_one_status_line(server):
    raw = _raw(server, b"GET /goto?sae=resid_0&latent=abc HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.0 ") == 1, raw[:300]
    head, headers = _headers_of(raw)
    assert head[0].startswith(b"HTTP/1.0 400") and "script-src 'none'" in headers["content-security-policy"]
    raw = _raw(server, b"GET /goto?sae=resid_0&latent=7 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    head, headers = _headers_of(raw)
    assert raw.count(b"HTTP/1.0 ") == 1 and head[0].startswith(b"HTTP/1.0 303") and headers["location"] == "/feature/resid_0/7"


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /goto?sae=resid_0&latent=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"303"),
    (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", b"501"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"414"),
])  # fmt: skip
def test_every_response_carries_the_csp(server, request_bytes, status):
    head, headers = _headers_of(_raw(server, request_bytes))
    assert head[0].split(b" ")[1] == status, head[0]
    assert "script-src 'none'" in headers.get("content-security-policy", ""), head
    assert headers.get("x-content-type-options") == "nosniff"


def test_wildcard_bind_keeps_the_host_check(run_dir):
    """--host 0.0.0.0 answers loopback names, this machine's names and the names allowed, nothing else."""
    srv = make_server(run_dir, "0.0.0.0", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        assert get(srv, "/", headers={"Host": "evil.example"})[0] == 403
        assert get(srv, "/", headers={"Host": f"evil.example:{port}"})[0] == 403
        assert get(srv, "/", headers={"Host": f"localhost:{port}"})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
    srv = make_server(run_dir, "0.0.0.0", 0, allow_hosts=["viewer.lan"])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        assert get(srv, "/", headers={"Host": "evil.example"})[0] == 403
        assert get(srv, "/", headers={"Host": f"viewer.lan:{port}"})[0] == 200
        assert get(srv, "/", headers={"Host": f"VIEWER.LAN:{port}"})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
    srv = make_server(run_dir, "127.0.0.1", 0)  # a named address answers itself only (plus loopback names)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert get(srv, "/", headers={"Host": "viewer.lan"})[0] == 403
    finally:
        srv.shutdown()
        srv.server_close()
