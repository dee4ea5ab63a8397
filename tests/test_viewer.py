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

from safetensors.torch import save_file

from icl_circuits.examples import ExampleConfig, build_example_store
from icl_circuits.report import write_report
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
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

    weights, initial = [0.0] * d_sae, [0.0] * d_sae
    weights[0], weights[3] = 1.5, 0.7
    initial[0], initial[3], initial[5], initial[7] = 1.0, 0.9, 0.4, 0.2
    # TVC's format: JSON summary + the [d_sae] vectors in cleaning.safetensors
    write_json(root / "antonyms" / "cleaning.json", {
        "task": "antonyms", "layer": 0, "setting": "execution", "sae_spec": "resid:0", "config": {"l1": 0.01},
        "features": [{"index": 0, "weight": 1.5}, {"index": 3, "weight": 0.7}], "initial_l0": 4,
        "scores": {"cleaned": {"l0": 2, "relative_loss_decrease": 0.61}, "task_vector": {"l0": 16, "relative_loss_decrease": 0.7}},
    })  # fmt: skip
    save_file({"weights": torch.tensor(weights), "initial_weights": torch.tensor(initial), "vector": torch.zeros(lm.d_model)},
              str(root / "antonyms" / "cleaning.safetensors"))  # fmt: skip
    # an older / hand-written variant: vectors inline, features as plain ints
    write_json(root / "evil" / "cleaning.json", {"task": EVIL_TASK, "layer": 0, "sae_spec": "resid:0",
                                                 "weights": weights, "initial_weights": initial, "features": [5]})  # fmt: skip
    # the circuit module's graph format; 'resid.0' names the SAE at resid_pre.0
    write_json(root / "antonyms" / "graph.json", {
        "task": "antonyms", "metric": -1.2, "node_types": ["input", "arrow", "output"],
        "nodes": [{"id": 11, "name": "resid.0/0@arrow", "key": "resid.0", "kind": "resid", "layer": 0, "feature": 0, "token_type": "arrow", "effect": 0.5},
                  {"id": 12, "name": "resid.0/3@output", "key": "resid.0", "kind": "resid", "layer": 0, "feature": 3, "token_type": "output", "effect": -0.2},
                  {"id": 13, "name": "resid.0/error@arrow", "key": "resid.0", "kind": "resid", "layer": 0, "feature": "error", "token_type": "arrow", "effect": 0.1},
                  {"id": 21, "name": "attn.1/2@arrow", "key": "attn.1", "kind": "attn", "layer": 1, "feature": 2, "token_type": "arrow", "effect": 0.3}],
        "edges": [{"source": 11, "target": 21, "effect": 0.8}, {"source": 12, "target": 21, "effect": -0.1},
                  {"source": 13, "target": 21, "effect": 0.05}],
        "faithfulness": [{"n_nodes": 1, "faithfulness": 0.4}, {"n_nodes": 3, "faithfulness": 0.9}],
    })  # fmt: skip
    # the steering module's heatmap: raw is tasks x features
    write_json(root / "heatmap.json", {"tasks": ["antonyms", "en_fr"], "features": [0, 3], "raw": [[0.42, 0.11], [0.05, 0.0]],
                                       "config": {"setting": "execution", "layer": 0}, "owners": {"0": ["antonyms"]}})  # fmt: skip
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
    assert "weights, initial_weights" in text  # short parallel lists become the columns of one table
    assert "cleaning.safetensors" in text  # listed under other files
    assert "examples/examples.sqlite" in text  # other files listed


def test_data_layer_reads_what_is_there(tmp_path):
    """RunData without a server: one task in two settings, a heatmap per setting, unreadable files listed."""
    from icl_circuits.viewer import RunData

    for setting, layer, feats in (("execution", 12, [{"index": 4, "weight": 2.0}]), ("detection", 11, [{"index": 9, "weight": 1.0}])):
        write_json(tmp_path / setting / "antonyms" / "cleaning.json",
                   {"task": "antonyms", "layer": layer, "setting": setting, "sae_spec": f"resid:{layer}", "features": feats})  # fmt: skip
        write_json(tmp_path / setting / "heatmap.json", {"tasks": ["antonyms"], "features": [feats[0]["index"]], "raw": [[0.5]],
                                                         "config": {"setting": setting, "layer": layer}})  # fmt: skip
    (tmp_path / "broken.json").write_text("{not json")
    data = RunData(tmp_path)
    assert sorted(data.tasks) == ["antonyms (detection, layer 11)", "antonyms (execution, layer 12)"]
    assert data.task_steering("antonyms", "execution") == {4: 0.5} and data.task_steering("antonyms", "detection") == {9: 0.5}
    assert [h["sae"] for h in sorted(data.heatmaps, key=lambda h: h["file"])] == ["resid_11", "resid_12"]
    assert any("broken.json" in p for p in data.problems)
    # a latent index is only linked to the tasks of its own SAE
    assert [t["task"] for t in data.feature("resid_12", 4)["tasks"]] == ["antonyms (execution, layer 12)"]
    assert data.feature("resid_11", 4)["tasks"] == []


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
    write_json(outside / "graph.json", {"task": "LEAKED_GRAPH", "nodes": [{"id": 1, "name": "LEAKED_NODE"}], "edges": []})
    write_json(outside / "cleaning.json", {"task": "LEAKED_TASK", "layer": 0, "sae_spec": "resid:0", "features": [1]})
    write_json(outside / "token_types.json", [{"latent": 0, "arrow": "LEAKED_MASS"}])
    write_json(outside / "table.json", {"secret": "LEAKED_TABLE"})
    write_json(run / "real" / "graph.json", {"task": "real", "nodes": [{"id": 1, "name": "resid.0/0@arrow", "key": "resid.0", "feature": 0}], "edges": []})
    (run / "leak").mkdir(parents=True)
    (run / "leak" / "graph.json").symlink_to(outside / "graph.json")
    (run / "leak" / "cleaning.json").symlink_to(outside / "cleaning.json")
    (run / "token_types.json").symlink_to(outside / "token_types.json")
    (run / "real" / "extra.json").symlink_to(outside / "table.json")  # next to a real circuit: its page lists the folder's tables
    data = RunData(run)
    assert [c["task"] for c in data.circuits] == ["real"] and data.tasks == {} and data.masses == []
    assert sum("leads outside the run directory" in p for p in data.problems) == 4
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
