"""The viewer over HTTP (urllib / http.client) and the static report, on a run made with a tiny model."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from icl_circuits.methods.circuits import save_graph
from icl_circuits.viz.report import write_report
from icl_circuits.core.storage import write_json

from tests.helpers import EVIL_TASK, SCRIPT, cleaning_result, circuit_graph_of, heatmap_result, make_run, serving


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir) as srv:
        yield srv


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
    from icl_circuits.viz.viewer import RunData

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
    from icl_circuits.viz.viewer import RunData

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
    with serving(run) as srv:
        for path in ("/", "/circuits", "/circuit/0", "/tasks", "/feature/resid_0/0"):
            status, body, _ = get(srv, path)
            assert "LEAKED" not in body, (path, status)


def test_graph_json_is_read_through_its_type_stamped_or_not(tmp_path):
    """graph.json goes through CircuitGraph.from_dict: files written before the stamps (no schema, maybe no task)
    still read; a graph.json of another kind or a newer version is listed as a problem, not guessed at."""
    from icl_circuits.viz.viewer import RunData

    stamped = circuit_graph_of("named", 4)
    write_json(tmp_path / "new" / "graph.json", stamped)
    write_json(tmp_path / "old" / "graph.json", {k: v for k, v in stamped.items() if k not in ("schema", "task")})
    write_json(tmp_path / "future" / "graph.json", {**stamped, "schema": "graph/9"})
    write_json(tmp_path / "other" / "graph.json", {**stamped, "schema": "masses/1"})
    data = RunData(tmp_path)
    assert sorted(c.task for c in data.circuits) == ["named", "old"]  # the unnamed old graph is named by its folder
    c = next(c for c in data.circuits if c.task == "old")
    assert [n.latent for n in c.nodes].count(None) == 1 and len(c.edges) == 3 and c.metric == stamped["metric"]
    assert any(p.startswith("future/graph.json: not understood") and "version '9'" in p for p in data.problems)
    assert any(p.startswith("other/graph.json: not understood") and "holds a masses result" in p for p in data.problems)


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
    with serving(run_dir, "0.0.0.0") as srv:
        port = srv.server_address[1]
        assert get(srv, "/", headers={"Host": "evil.example"})[0] == 403
        assert get(srv, "/", headers={"Host": f"evil.example:{port}"})[0] == 403
        assert get(srv, "/", headers={"Host": f"localhost:{port}"})[0] == 200
    with serving(run_dir, "0.0.0.0", allow_hosts=["viewer.lan"]) as srv:
        port = srv.server_address[1]
        assert get(srv, "/", headers={"Host": "evil.example"})[0] == 403
        assert get(srv, "/", headers={"Host": f"viewer.lan:{port}"})[0] == 200
        assert get(srv, "/", headers={"Host": f"VIEWER.LAN:{port}"})[0] == 200
    with serving(run_dir) as srv:  # a named address answers itself only (plus loopback names)
        assert get(srv, "/", headers={"Host": "viewer.lan"})[0] == 403
