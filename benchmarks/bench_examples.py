"""Latency of a feature-page query from the example store, against scanning, in the same run.

A synthetic store in the real schema: N_SAES SAEs x D_SAE latents with top-k and binned examples of
WINDOW tokens each (>= 1M stored per-token activations). Measured:
  * store.examples(sae, latent)          -- one index range scan (what the viewer does)
  * the viewer's whole feature page       -- query + HTML rendering
  * baseline A: the same SQL on a copy of the table without its clustered key (a full table scan)
  * baseline B: loading every example into memory once, then filtering (the "load everything" design)

    python benchmarks/bench_examples.py [--latents 8192] [--examples-per-latent 60]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from icl_circuits.methods.examples import SCHEMA, ExampleConfig, ExampleStore
from icl_circuits.viz.viewer import RunData, feature_page


def build(path: Path, n_saes: int, d_sae: int, per_latent: int, window: int, seed: int = 0) -> int:
    """Fill a store with synthetic examples; returns the number of stored per-token activations."""
    rng = np.random.default_rng(seed)
    cfg = ExampleConfig(context_before=window - 9, context_after=8)
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)
    header = {"schema": 1, "model": "synthetic", "config": cfg.__dict__, "saes": {}, "docs_sha256": None}
    con.execute("INSERT INTO meta VALUES ('header', ?)", (json.dumps(header),))
    con.execute("INSERT INTO meta VALUES ('cursor', ?)", (json.dumps({"doc": 0, "chunk": 0, "rows": 0, "tokens": 10**7, "done": True}),))
    con.execute("INSERT INTO meta VALUES ('complete', 'synthetic')")
    con.executemany("INSERT INTO tokens VALUES (?, ?)", ((i, f" tok{i}") for i in range(5000)))
    n_acts = 0
    for s in range(n_saes):
        con.execute("INSERT INTO saes VALUES (?, ?, ?, ?, ?)", (s, f"sae_{s}", f"resid_pre.{s}", d_sae, "{}"))
        rows = []
        for lat in range(d_sae):
            acts = np.sort(rng.exponential(3.0, per_latent))[::-1]
            for j, a in enumerate(acts):
                b = -1 if j < 16 else int(a / 0.5)
                ids = rng.integers(0, 5000, window, dtype="<i4")
                w = (rng.random(window) * a).astype("<f2")
                rows.append((s, lat, b, -a if b < 0 else float(rng.integers(0, 2**32)), int(rng.integers(0, 2**40)),
                             float(a), j, 9, 1, ids.tobytes(), w.tobytes()))  # fmt: skip
                n_acts += window
            con.execute("INSERT OR IGNORE INTO latents VALUES (?, ?, ?, ?, ?)", (s, lat, per_latent, float(acts.sum()), float(acts[0])))
        con.executemany("INSERT OR IGNORE INTO examples VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        con.commit()
    # baseline A's table: the same rows, no key, no index
    con.execute("CREATE TABLE examples_noindex AS SELECT * FROM examples")
    con.commit()
    con.execute("ANALYZE")
    con.close()
    return n_acts


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_real(path: Path, n: int) -> None:
    """Feature-page queries on a store made by `icl-circuits examples`, vs loading every example."""
    store = ExampleStore(path)
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    n_ex, n_acts = con.execute("SELECT COUNT(*), SUM(LENGTH(ids)) / 4 FROM examples").fetchone()
    print(f"real store {path}: {n_ex:,} examples, {n_acts:,} per-token activations, {path.stat().st_size / 2**20:.0f} MiB")
    rng = random.Random(0)
    fired = [(s["name"], r["latent"]) for s in store.saes() for r in store.latent_table(s["name"])]
    picks = iter([rng.choice(fired) for _ in range(n)])
    sizes = []
    q = timed(lambda: sizes.append(len(store.examples(*next(picks)))), n)
    load = timed(lambda: con.execute("SELECT sae, latent, act, bin, doc, pos, start, ids, acts, uid FROM examples").fetchall(), 2)
    print(f"  store.examples(sae, latent): median {1e3 * statistics.median(q):.2f} ms, p95 {1e3 * sorted(q)[int(0.95 * (n - 1))]:.2f} ms "
          f"({statistics.mean(sizes):.0f} examples per latent on average)")
    print(f"  baseline, load every example: {1e3 * statistics.median(load):.0f} ms  "
          f"-> the indexed query is {statistics.median(load) / statistics.median(q):.0f}x faster\n")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saes", type=int, default=2)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--examples-per-latent", type=int, default=40)
    ap.add_argument("--window", type=int, default=33)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--store", type=Path, help="also time queries on a real store (e.g. runs/examples/examples.sqlite)")
    args = ap.parse_args()
    if args.store:
        bench_real(args.store, args.queries)

    tmp = Path(tempfile.mkdtemp(prefix="bench_examples_"))
    path = tmp / "run" / "examples.sqlite"
    path.parent.mkdir(parents=True)
    t = time.perf_counter()
    n_acts = build(path, args.saes, args.latents, args.examples_per_latent, args.window)
    n_ex = args.saes * args.latents * args.examples_per_latent
    print(f"synthetic store: {n_ex:,} examples, {n_acts:,} per-token activations, "
          f"{path.stat().st_size / 2**20:.0f} MiB, built in {time.perf_counter() - t:.0f} s")  # fmt: skip
    if n_acts < 1_000_000:
        print("warning: fewer than 1M stored activations")

    store = ExampleStore(path)
    rng = random.Random(0)
    picks = [(f"sae_{rng.randrange(args.saes)}", rng.randrange(args.latents)) for _ in range(args.queries)]
    it = iter(picks * 3)
    q = timed(lambda: store.examples(*next(it)), args.queries)
    data = RunData(path.parent)
    it = iter(picks * 3)
    page = timed(lambda: feature_page(data, *next(it), all_examples=True), args.queries // 4)

    con = sqlite3.connect(path)
    sql = "SELECT latent, act, bin, doc, pos, start, ids, acts, uid FROM examples_noindex WHERE sae = ? AND latent = ?"
    it = iter(picks)
    scan = timed(lambda: (lambda p: con.execute(sql, (int(p[0][4:]), p[1])).fetchall())(next(it)), 5)

    def load_all() -> list:
        rows = con.execute("SELECT sae, latent, act, bin, doc, pos, start, ids, acts, uid FROM examples").fetchall()
        return [r for r in rows if r[0] == 0 and r[1] == 7]

    load = timed(load_all, 2)

    med = statistics.median
    p95 = lambda xs: sorted(xs)[max(0, math.ceil(0.95 * len(xs)) - 1)]  # noqa: E731
    print(f"\n{'what':48s} {'median ms':>10s} {'p95 ms':>8s} {'vs store query':>15s}")
    base = med(q)
    for name, xs in [
        ("store.examples(sae, latent) (index range scan)", q),
        ("viewer feature page, all examples (query + HTML)", page),
        ("baseline A: same query, table without index", scan),
        ("baseline B: load every example, then filter", load),
    ]:
        print(f"{name:48s} {1e3 * med(xs):10.2f} {1e3 * p95(xs):8.2f} {med(xs) / base:14.0f}x")
    print(f"\nexamples per query: {len(store.examples(*picks[0]))}")


if __name__ == "__main__":
    main()
