"""Feature-page latency over HTTP: the viewer package (this version) against the one-file viewer it replaced.

One real run is built with the package's own writers (tiny random Gemma 3, tiny SAEs, TVC cleaning,
steering heatmap, circuit, example store, and `build_dashboards`; see tests/test_dashboards.py), with
a `--d-sae`-latent SAE. Both viewers serve the same run directory; each is asked for `--requests`
feature pages of random latents (one warm-up round first). The old viewer is `git show
6887d51:src/icl_circuits/viz/viewer.py` (the last one-file viewer, with dashboards), loaded from a temp file
as a module of the package.

    python benchmarks/bench_viewer.py [--d-sae 4096] [--requests 300]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OLD = "6887d51"  # the last commit with the one-file viewer.py

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the real-run builder


def old_viewer(tmp: Path):
    """The one-file viewer of OLD, as module icl_circuits._viewer_old (its relative imports resolve in the package)."""
    src = subprocess.run(["git", "show", f"{OLD}:src/icl_circuits/viz/viewer.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    path = tmp / "viewer_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("icl_circuits._viewer_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def measure(make_server, run_dir: Path, paths: list[str]) -> tuple[list[float], int]:
    srv = make_server(run_dir, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    times, size = [], 0
    try:
        for round_ in (0, 1):  # a warm-up round, then the measured one
            for p in paths:
                t = time.perf_counter()
                con = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                con.request("GET", p)
                r = con.getresponse()
                body = r.read()
                con.close()
                assert r.status == 200, (p, r.status)
                if round_:
                    times.append(time.perf_counter() - t)
                    size += len(body)
    finally:
        srv.shutdown()
        srv.server_close()
    return times, size // max(len(paths), 1)


def p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from icl_circuits.viz.viewer import make_server
    from tests.helpers import SAE_NAME, make_real_run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_real_run(tmp / "run", d_sae=args.d_sae)
        build_s = time.perf_counter() - t
        old = old_viewer(tmp)
        rng = random.Random(0)
        paths = [f"/feature/{SAE_NAME}/{rng.randrange(args.d_sae)}" for _ in range(args.requests)]
        rows = []
        for name, mk in ((f"one-file viewer ({OLD})", old.make_server), ("viewer package (this version)", make_server)):
            times, size = measure(mk, tmp / "run", paths)
            rows.append((name, statistics.median(times) * 1e3, p95(times) * 1e3, size))
        db = (tmp / "run" / "dashboards.sqlite").stat().st_size
    print(f"run with a {args.d_sae}-latent SAE built in {build_s:.1f} s (dashboards.sqlite {db / 2**20:.1f} MB); {args.requests} feature pages each")
    print(f"{'page':22s} {'median ms':>10s} {'p95 ms':>8s} {'bytes':>8s}")
    for name, med, p, size in rows:
        print(f"{name:22s} {med:10.2f} {p:8.2f} {size:8d}")


if __name__ == "__main__":
    main()
