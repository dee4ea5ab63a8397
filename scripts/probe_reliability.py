"""Reliability probe (issue 18): bad inputs, kill -9 and resume, and (slot) hostile viewer requests.

    .venv/bin/python scripts/probe_reliability.py [--work DIR] [--only inputs,kills,viewer] [-v]

Everything runs as a new user would: the `icl-circuits` command in a subprocess, on a tiny random
Llama saved to a local folder (so the probe takes minutes on a laptop and never needs the network;
the network is assumed unreachable, as in CI). It prints three counts:

- bad inputs tried / handled cleanly: handled = exit status 2, one line on stderr starting
  'error:' (progress bars aside), no traceback, naming the file or option at fault, and no
  network attempt for anything that is not a Hub id (each command runs with the network cut
  off: connects fail at once and are counted);
- kills survived with identical results: a run is killed with SIGKILL at a chosen point, rerun to
  the end, and its results compared with an uninterrupted run (timings aside);
- hostile viewer requests tried / refused: traversal, symlinks out of RUN_DIR, bad Host, huge URLs, other methods.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "new"), ("dark", "light"),
            ("hard", "soft"), ("tall", "short"), ("rich", "poor"), ("wet", "dry"), ("early", "late"), ("full", "empty")]  # fmt: skip
UPPER = [(w, w.upper()) for w in ("cat", "dog", "sun", "car", "tree", "book", "fish", "bird", "moon", "star", "milk", "rain")]
MANY = ANTONYMS + UPPER + [(y, x) for x, y in ANTONYMS + UPPER]
T = ["--n-prompts", "2", "--n-shots", "2", "--threads", "1", "--quiet"]
CLEAN = ["--n-prompts", "2", "--n-shots", "3", "--n-train", "4", "--n-eval", "4", "--max-steps", "30", "--patience", "200",
         "--threads", "1", "--quiet"]  # fmt: skip


# -- fixtures ------------------------------------------------------------------------------------
def build_fixtures(work: Path) -> dict[str, Path]:
    """A tiny Llama + word tokenizer folder, task files, and residual SAEs for layers 0 and 1."""
    import torch
    import transformers as tf
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
    from icl_circuits.sae.formats import save_sae

    torch.manual_seed(0)
    words = ["Follow", "the", "pattern:", "->", "X", "Y"] + [w for x, y in MANY for w in (x, y)]
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "\n": 3}
    for w in words:
        for piece in (w, " " + w):
            vocab.setdefault(piece, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| ?[^\s]+"), behavior="isolated")
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")
    cfg = tf.LlamaConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg)
    f = {"model": work / "model", "many": work / "many.json", "flipped": work / "flipped.json", "upper": work / "upper.json"}
    model.save_pretrained(f["model"])
    tok.save_pretrained(f["model"])
    f["many"].write_text(json.dumps([{"input": x, "output": y} for x, y in MANY]))
    f["flipped"].write_text(json.dumps([{"input": y, "output": x} for x, y in MANY]))
    f["upper"].write_text(json.dumps(dict(UPPER)))
    for layer in (0, 1):
        g = torch.Generator().manual_seed(layer)
        W_dec = torch.randn(24, 32, generator=g)
        W_dec = 3 * W_dec / W_dec.norm(dim=1, keepdim=True)
        t = dict(W_enc=W_dec.T.clone() / 9 + 0.1 * torch.randn(32, 24, generator=g), b_enc=0.1 * torch.randn(24, generator=g),
                 W_dec=W_dec, b_dec=0.05 * torch.randn(32, generator=g), threshold=torch.full((24,), 0.05))  # fmt: skip
        sae = JumpReLUSAE(SAEConfig(d_in=32, d_sae=24, site=f"resid_pre.{layer}", layer=layer, model=str(f["model"])), t)
        save_sae(sae, work / f"sae{layer}")
        f[f"sae{layer}"] = work / f"sae{layer}"
    return f


# The CLI with the network cut off: every connect / name lookup fails at once and is logged to $PROBE_NET_LOG.
_OFFLINE_CLI = """
import os, socket, sys
def refuse(*a, **k):
    if os.environ.get("PROBE_NET_LOG"):
        with open(os.environ["PROBE_NET_LOG"], "a") as f:
            f.write(repr(a[:1]) + "\\n")
    raise OSError(101, "Network is unreachable (probe)")
socket.create_connection = socket.getaddrinfo = refuse
socket.socket.connect = lambda self, *a: refuse(*a)
from icl_circuits.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(args: list[str], env: dict | None = None, timeout: float = 120) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", _OFFLINE_CLI, *map(str, args)], capture_output=True, text=True,
                           env=env or ENV, timeout=timeout, cwd=CWD)  # fmt: skip
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        return -1, "", f"timed out after {timeout} s: {(e.stderr or b'')[-300:]!r}", time.perf_counter() - t0


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip() and "it/s]" not in l and "s/it]" not in l and "Warning" not in l
            and not l.startswith("  ")]  # fmt: skip


# -- bad inputs ----------------------------------------------------------------------------------
def bad_inputs(f: dict[str, Path], work: Path) -> list[tuple[str, list[str], str, dict | None]]:
    """(what, argv, a substring the one-line error must contain, extra env)."""
    bad = work / "bad"
    bad.mkdir()

    def file(name: str, data: str | bytes) -> str:
        p = bad / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(p)

    def model_with(name: str, config: bytes | None) -> str:
        d = bad / name
        shutil.copytree(f["model"], d)
        if config is None:
            (d / "config.json").unlink()
        else:
            (d / "config.json").write_bytes(config)
        return str(d)

    def sae_with(name: str, change) -> str:  # noqa: ANN001
        d = bad / name
        shutil.copytree(f["sae1"], d)
        change(d)
        return str(d)

    M, TASK, OUT = str(f["model"]), str(f["many"]), str(bad / "out")
    tv = ["task-vectors", "--model", M, *T]
    cl = ["clean", "--model", M, "--layer", "1", "--sae", str(f["sae1"]), *CLEAN]
    trunc = lambda d: (d / "sae.safetensors").write_bytes((d / "sae.safetensors").read_bytes()[:300])  # noqa: E731
    garbage_cfg = lambda d: (d / "config.json").write_text('{"d_in": 32,')  # noqa: E731
    no_format = lambda d: [p.unlink() for p in d.iterdir()]  # noqa: E731
    offline = {**ENV, "HF_HUB_OFFLINE": "1"}
    afile = file("plain.txt", "x")
    cases = [
        ("unknown task name", [*tv, "--tasks", "no_such_task", "--out", OUT], "no_such_task", None),
        ("missing task file", [*tv, "--tasks", str(bad / "missing.json"), "--out", OUT], "missing.json", None),
        ("task file: invalid JSON", [*tv, "--tasks", file("broken.json", '[{"input": "a"'), "--out", OUT], "invalid JSON", None),
        ("task file: not UTF-8", [*tv, "--tasks", file("latin1.json", '{"caf\xe9": "x"}'.encode("latin-1")), "--out", OUT], "latin1.json", None),
        ("task file: empty list", [*tv, "--tasks", file("empty.json", "[]"), "--out", OUT], "empty.json", None),
        ("task file: a JSON string", [*tv, "--tasks", file("str.json", '"hello"'), "--out", OUT], "str.json", None),
        ("CSV with header question,answer", [*tv, "--tasks", file("qa.csv", "question,answer\nhot,cold\n"), "--out", OUT], "qa.csv", None),
        ("CSV with 3 columns", [*tv, "--tasks", file("three.csv", "input,output\na,b,c\n"), "--out", OUT], "three.csv", None),
        ("task file .txt", [*tv, "--tasks", file("task.txt", "a,b\n"), "--out", OUT], "task.txt", None),
        ("task file: every pair unusable", [*tv, "--tasks", file("allbad.json", '{"a -> b": "c", "d": ""}'), "--out", OUT], "allbad.json", None),
        ("--strict with some unusable pairs", [*tv, "--strict", "--tasks", file("somebad.json", json.dumps({**dict(MANY), "x": ""})),
                                               "--out", OUT], "somebad.json", None),
        ("two tasks of one name", [*tv, "--tasks", f"{TASK},{file('many.json', json.dumps(dict(UPPER)))}", "--out", OUT, "--layers", "0"],
         "many", None),
        ("--model /no/such/model", ["task-vectors", "--model", "/no/such/model", "--tasks", TASK, *T], "/no/such/model", None),
        ("--model ./relative/missing", ["task-vectors", "--model", "./no/such/model", "--tasks", TASK, *T], "./no/such/model", None),
        ("--model nosuchdir/model (Hub id, network down)", ["task-vectors", "--model", "nosuchdir/model", "--tasks", TASK, *T],
         "nosuchdir/model", None),
        ("--model Hub id with HF_HUB_OFFLINE=1", ["task-vectors", "--model", "someone/some-model", "--tasks", TASK, *T], "HF_HUB_OFFLINE", offline),
        ("model folder: garbage config.json", ["task-vectors", "--model", model_with("m_garbage", b'{"model_type": "ll'), "--tasks", TASK, *T],
         "config.json", None),
        ("model folder: config.json not UTF-8", ["task-vectors", "--model", model_with("m_utf", b"\xff\xfe\x00\x01"), "--tasks", TASK, *T],
         "config.json", None),
        ("model folder: no config.json", ["task-vectors", "--model", model_with("m_none", None), "--tasks", TASK, *T], "config.json", None),
        ("--model is a plain file", ["task-vectors", "--model", afile, "--tasks", TASK, *T], "plain.txt", None),
        ("--layers 5-2", [*tv, "--tasks", TASK, "--layers", "5-2", "--out", OUT], "--layers", None),
        ("--layers 99", [*tv, "--tasks", TASK, "--layers", "99", "--out", OUT], "--layers", None),
        ("--layers abc", [*tv, "--tasks", TASK, "--layers", "abc", "--out", OUT], "--layers", None),
        ("--layers ''", [*tv, "--tasks", TASK, "--layers", "", "--out", OUT], "--layers", None),
        ("--n-shots larger than the task", [*tv, "--tasks", TASK, "--layers", "0", "--n-shots", "500", "--out", OUT], "many", None),
        ("--out is a file", [*tv, "--tasks", TASK, "--layers", "0", "--out", afile], "plain.txt", None),
        ("clean --layer 99", ["clean", "--model", M, "--task", TASK, "--layer", "99", *CLEAN, "--out", OUT], "--layer 99", None),
        ("clean --l1 inf", [*cl, "--task", TASK, "--l1", "inf", "--out", OUT], "--l1", None),
        ("clean --lr nan", [*cl, "--task", TASK, "--lr", "nan", "--out", OUT], "--lr", None),
        ("clean --sae /no/such/sae", ["clean", "--model", M, "--task", TASK, "--layer", "1", "--sae", "/no/such/sae", *CLEAN], "/no/such/sae", None),
        ("clean --sae: truncated sae.safetensors", ["clean", "--model", M, "--task", TASK, "--layer", "1", "--sae", sae_with("s_trunc", trunc),
                                                    *CLEAN, "--out", OUT], "safetensors", None),
        ("clean --sae: garbage config.json", ["clean", "--model", M, "--task", TASK, "--layer", "1", "--sae", sae_with("s_cfg", garbage_cfg),
                                              *CLEAN, "--out", OUT], "config.json", None),
        ("clean --sae: folder of no known format", ["clean", "--model", M, "--task", TASK, "--layer", "1", "--sae", sae_with("s_none", no_format),
                                                    *CLEAN, "--out", OUT], "s_none", None),
        ("clean --sae for another layer", ["clean", "--model", M, "--task", TASK, "--layer", "0", "--sae", str(f["sae1"]), *CLEAN, "--out", OUT],
         "resid_pre.1", None),
        ("clean --n-train 1000 (too few held-out pairs)", [*cl, "--task", TASK, "--n-train", "1000", "--out", OUT], "many", None),
        ("sae eval --sae /no/such/sae", ["sae", "eval", "--model", M, "--sae", "/no/such/sae", "--corpus", str(bad / "c.jsonl")],
         "/no/such/sae", None),
        ("sae train --saes mlp:9 (layer out of range)", ["sae", "train", "--model", M, "--saes", "mlp:9", "--corpus", "generated:8",
                                                          "--out", OUT], "9", None),
        ("circuit --layers 7", ["circuit", "--model", M, "--tasks", TASK, "--layers", "7", "--out", OUT], "--layers", None),
    ]  # fmt: skip
    return cases


def run_bad_inputs(f: dict[str, Path], work: Path, verbose: bool) -> tuple[int, int]:
    cases = bad_inputs(f, work)
    bad = work / "bad"
    OUT = str(bad / "out")
    # resume under another config, and a second writer, need a run first
    ok_out = work / "resume"
    rc, _, err, _ = cli(["task-vectors", "--model", f["model"], "--tasks", f["many"], "--layers", "0", *T, "--out", ok_out])
    assert rc == 0, err
    cases.append(("resume under another config (--layers 1)", ["task-vectors", "--model", str(f["model"]), "--tasks", str(f["many"]),
                  "--layers", "1", *T, "--out", str(ok_out)], "layers: [0] -> [1]", None))  # fmt: skip
    cases.append(("--out holds another command's run", ["clean", "--model", str(f["model"]), "--task", str(f["many"]), "--layer", "1",
                  "--sae", str(f["sae1"]), *CLEAN, "--out", str(ok_out)], "holds a task-vectors sweep run", None))  # fmt: skip
    handled = 0
    for i, (what, argv, must, env) in enumerate(cases):
        argv = [str(bad / f"out{i}") if a == OUT else a for a in argv]  # each case its own --out
        net_log = bad / f"net{i}.log"
        rc, _, err, dt = cli(argv, {**(env or ENV), "PROBE_NET_LOG": str(net_log)}, timeout=300)
        lines = error_lines(err)
        tries = len(net_log.read_text().splitlines()) if net_log.exists() else 0
        hub_id = "Hub id" in what  # one reachability check allowed; local specs must never touch the network
        good = (rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err and must in lines[0]
                and tries <= (2 if hub_id else 0))  # fmt: skip  (wall time is not judged: shared CPUs; network is)
        handled += good
        if verbose or not good:
            print(f"  [{'ok' if good else 'NOT HANDLED'}] {what}: rc {rc}, {dt:.1f} s, {tries} network attempts: "
                  f"{(lines[-1] if lines else err.strip()[-200:])[:220]}")  # fmt: skip
    # a second writer while the first runs
    tried = len(cases) + 2
    for probe in (second_writer, disk_full):
        try:
            handled += probe(f, work, verbose)
        except Exception as e:  # noqa: BLE001 - a probe that breaks counts as not handled
            print(f"  [NOT HANDLED] {probe.__name__}: the probe itself failed: {e!r}")
    return tried, handled


def second_writer(f: dict[str, Path], work: Path, verbose: bool) -> bool:
    out = work / "busy"
    first = subprocess.Popen([sys.executable, "-m", "icl_circuits.cli", "clean", "--model", str(f["model"]), "--tasks",
                              f"{f['many']},{f['flipped']}", "--layer", "1", "--sae", str(f["sae1"]), *CLEAN, "--max-steps", "400",
                              "--out", str(out)], env=ENV, cwd=CWD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: (out / "cleaning_config.json").is_file() or first.poll() is not None, 900)
        rc, _, err, _ = cli(["clean", "--model", f["model"], "--task", f["many"], "--layer", "1", "--sae", f["sae1"], *CLEAN,
                             "--max-steps", "400", "--out", out])  # fmt: skip
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lines = error_lines(err)
    good = rc == 2 and len(lines) == 1 and "in use by another run" in lines[0]
    if verbose or not good:
        print(f"  [{'ok' if good else 'NOT HANDLED'}] second writer into a busy --out: rc {rc}: {(lines or [err[-200:]])[-1][:200]}")
    return good


_DISK_FULL = """
import errno, os, sys
import icl_circuits.core.storage as s
real = os.fdopen
class Full:
    def __init__(self, fd, mode="r", *a, **k): self.f = real(fd, mode, *a, **k)
    def write(self, data):
        if len(data) > 2000: raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)
    def __getattr__(self, n): return getattr(self.f, n)
    def __enter__(self): return self
    def __exit__(self, *e): self.f.close()
s.os.fdopen = Full
from icl_circuits.cli import main
sys.exit(main(sys.argv[1:]))
"""


def disk_full(f: dict[str, Path], work: Path, verbose: bool) -> bool:
    """Every write of more than 2 kB fails with ENOSPC (a patched writer): one line, no partial file left."""
    out = work / "full"
    p = subprocess.run([sys.executable, "-c", _DISK_FULL, "task-vectors", "--model", str(f["model"]), "--tasks", str(f["many"]),
                        "--layers", "0-1", *T, "--out", str(out)], capture_output=True, text=True, env=ENV, cwd=CWD)  # fmt: skip
    lines = error_lines(p.stderr)
    leftovers = [x for x in out.rglob("*.tmp")] if out.exists() else []
    good = p.returncode == 2 and len(lines) == 1 and "disk full" in lines[0] and not leftovers
    if verbose or not good:
        print(f"  [{'ok' if good else 'NOT HANDLED'}] disk full: rc {p.returncode}, leftovers {leftovers}: {(lines or [p.stderr[-200:]])[-1][:200]}")
    return good


# -- kills ---------------------------------------------------------------------------------------
def wait_for(cond, timeout: float) -> None:  # noqa: ANN001
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _results(out: Path, kind: str) -> str:
    if kind == "tv":
        return json.dumps(json.loads((out / "sweep.json").read_text())["rows"], sort_keys=True)
    rows = json.loads((out / "summary.json").read_text())
    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows], sort_keys=True)


def run_kills(f: dict[str, Path], work: Path, verbose: bool) -> tuple[int, int]:
    tasks = f"{f['many']},{f['flipped']},{f['upper']}"
    tv = ["task-vectors", "--model", f["model"], "--tasks", tasks, "--layers", "0-1", *T]
    cl = ["clean", "--model", f["model"], "--tasks", f"{f['many']},{f['flipped']}", "--layer", "1", "--sae", f["sae1"], *CLEAN,
          "--max-steps", "300"]  # fmt: skip
    ref = {"tv": work / "ref_tv", "clean": work / "ref_clean"}
    for kind, argv in (("tv", tv), ("clean", cl)):
        rc, _, err, _ = cli([*argv, "--out", ref[kind]], timeout=600)
        assert rc == 0, err
    points = [
        ("task-vectors: after the first task is logged", "tv", tv, lambda o: _lines(o / "partial.jsonl") >= 2),
        ("task-vectors: after two tasks are logged", "tv", tv, lambda o: _lines(o / "partial.jsonl") >= 3),
        ("task-vectors: while the run config is being written", "tv", tv, lambda o: (o / "run.json").exists()),
        ("clean: during the first task's optimisation", "clean", cl, lambda o: (o / "cleaning_config.json").exists()),
        ("clean: just after the first task's result is saved", "clean", cl, lambda o: (o / "many" / "cleaning.json").exists()),
        ("clean: during the second task", "clean", cl, lambda o: (o / "many" / "unit.json").exists()),
    ]
    survived = 0
    for i, (what, kind, argv, cond) in enumerate(points):
        out = work / f"kill{i}"
        p = subprocess.Popen([sys.executable, "-m", "icl_circuits.cli", *map(str, argv), "--out", str(out)], env=ENV, cwd=CWD,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for(lambda: cond(out) or p.poll() is not None, 1800)
        finally:
            killed = p.poll() is None
            p.send_signal(signal.SIGKILL)
            p.wait()
        rc, _, err, _ = cli([*argv, "--out", out], timeout=600)
        same = rc == 0 and _results(out, kind) == _results(ref[kind], kind)
        leftovers = list(out.rglob("*.tmp"))
        good = same and killed and not leftovers
        survived += good
        if verbose or not good:
            print(f"  [{'ok' if good else 'FAILED'}] kill -9 {what}: killed mid-run {killed}, rerun rc {rc}, identical {same}, "
                  f"leftover tmp files {len(leftovers)} {error_lines(err)[-1:] if rc else ''}")  # fmt: skip
    return len(points), survived


# -- viewer ----------------------------------------------------------------------------------------
def run_viewer_requests(work: Path, verbose: bool) -> tuple[int, int] | None:
    """Hostile requests to a local viewer over a run folder that holds a secret outside it (reached
    through a symlinked JSON and a symlinked folder): traversal in every spelling, absolute paths,
    symlinks, bad Host headers, huge URLs, methods the viewer does not serve, malformed parameters.
    Refused = an error status (or a redirect) that carries the CSP header and never the secret."""
    import http.client
    import threading

    from icl_circuits.viz.viewer import make_server

    run = work / "viewer_run"
    outside = work / "viewer_outside"
    run.mkdir(exist_ok=True)
    outside.mkdir(exist_ok=True)
    secret = "TOP-SECRET-7f3a"
    (outside / "secret.json").write_text(json.dumps({"task": secret, "layer": 12, "weights": [1.0]}))
    (outside / "secret.txt").write_text(secret)
    (run / "heatmap.json").write_text(json.dumps({"tasks": ["a"], "features": [1], "raw": [[0.5]]}))
    for link, target in (("linked.json", outside / "secret.json"), ("linked_dir", outside)):
        if not (run / link).is_symlink():
            (run / link).symlink_to(target)
    server = make_server(run, "127.0.0.1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rel = os.path.relpath(outside / "secret.txt", run)
    probes: list[tuple[str, str, dict]] = [
        ("GET", f"/files/{rel}", {}), ("GET", "/files/../viewer_outside/secret.txt", {}),
        ("GET", "/files/%2e%2e/viewer_outside/secret.txt", {}), ("GET", "/files/%2E%2E%2Fviewer_outside%2Fsecret.txt", {}),
        ("GET", "/files/..%2fviewer_outside%2fsecret.txt", {}), ("GET", "/files/....//viewer_outside/secret.txt", {}),
        ("GET", f"/files/{outside / 'secret.txt'}", {}), ("GET", "/files//etc/passwd", {}), ("GET", "/files/%2fetc%2fpasswd", {}),
        ("GET", "/files/linked.json", {}), ("GET", "/files/linked_dir/secret.txt", {}), ("GET", "/files/linked_dir/secret.json", {}),
        ("GET", "/files/./linked.json", {}), ("GET", "/files/heatmap.json%00.png", {}), ("GET", "/files/%00", {}),
        ("GET", "/files/\\..\\viewer_outside\\secret.txt", {}),
        ("GET", "/task/linked", {}), ("GET", "/task/..%2f..%2fetc%2fpasswd", {}), ("GET", "/feature/../../etc/passwd/0", {}),
        ("GET", "/feature/x/-1", {}), ("GET", "/feature/x/99999999999999999999999", {}), ("GET", "/feature/%3Cscript%3E/0", {}),
        ("GET", "/goto?sae=x&latent=abc", {}), ("GET", "/goto?sae=../../etc&latent=1", {}), ("GET", "/goto", {}),
        ("GET", "/circuit/99", {}), ("GET", "/circuit/-1", {}), ("GET", "/" + "a" * 70000, {}),
        ("GET", "/", {"Host": "evil.example"}), ("GET", "/", {"Host": "127.0.0.1.evil.example:80"}),
        ("GET", "/files/heatmap.json", {"Host": "attacker.test"}),
        ("POST", "/", {}), ("PUT", "/files/heatmap.json", {}), ("DELETE", "/files/heatmap.json", {}),
        ("OPTIONS", "/", {}), ("TRACE", "/", {}),
    ]
    refused = 0
    for method, path, headers in probes:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=bool(headers.get("Host")))
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
            ok = (resp.status >= 400 or resp.status in (301, 302, 303)) and secret not in body \
                and "default-src" in (resp.getheader("Content-Security-Policy") or "")
            status = resp.status
        except (OSError, http.client.HTTPException) as e:  # the server closing on garbage is a refusal too
            ok, status = True, type(e).__name__
        finally:
            conn.close()
        refused += ok
        if verbose or not ok:
            print(f"  [{'refused' if ok else 'NOT REFUSED'}] {method} {path[:70]} {headers or ''} -> {status}")
    server.shutdown()
    return len(probes), refused


def main() -> int:
    global CWD
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="scratch folder (default: a new temporary one, removed afterwards)")
    ap.add_argument("--only", default="inputs,kills,viewer")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="probe_reliability."))
    work.mkdir(parents=True, exist_ok=True)
    CWD = str(work)
    t0 = time.time()
    f = build_fixtures(work)
    only = set(args.only.split(","))
    lines = []
    if "inputs" in only:
        tried, handled = run_bad_inputs(f, work, args.verbose)
        lines.append(f"bad inputs: {tried} tried, {handled} handled cleanly (rc 2, one line naming the file/option, no network for local paths)")
    if "kills" in only:
        n, ok = run_kills(f, work, args.verbose)
        lines.append(f"kills: {ok}/{n} survived with identical results (kill -9, rerun, compare with an uninterrupted run)")
    if "viewer" in only:
        v = run_viewer_requests(work, args.verbose)
        lines.append(f"hostile viewer requests: {v[0]} tried, {v[1]} refused (error status with the CSP header, secret never shown)")
    print("\n".join(lines))
    print(f"({time.time() - t0:.0f} s)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


CWD = str(ROOT)

if __name__ == "__main__":
    raise SystemExit(main())
