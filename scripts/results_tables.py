"""Markdown tables for docs/results.md from the run folders of scripts/regenerate_results.sh, with the
archived v1 numbers (docs/archive/v1) next to the new ones where both exist.

    python scripts/results_tables.py tvc docs/results/tvc/execution docs/archive/v1/tvc/execution
    python scripts/results_tables.py circuits runs/v2/circuits docs/archive/v1/circuits
    python scripts/results_tables.py heatmap docs/results/heatmaps/execution_cleaned_specificity.csv
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def _csv(path: Path) -> dict[str, dict]:
    return {r["task"]: r for r in csv.DictReader(open(path))} if path.is_file() else {}


def _f(x: object, nd: int = 3) -> str:
    try:
        return f"{float(x):.{nd}f}"
    except (TypeError, ValueError):
        return "–"


def _pair(old: str, new: str) -> str:
    return new if old in ("", "–", new) else f"{old} → **{new}**"


def tvc(new_dir: str, old_dir: str) -> None:
    new, old = _csv(Path(new_dir) / "summary.csv"), _csv(Path(old_dir) / "summary.csv")
    cols = ("tv", "sae_reconstruction", "ito_5", "ito_20", "tvc")
    print("| task | L0 of SAE(TV) → after TVC | TV | SAE rec. | ITO-5 | ITO-20 | TVC | TVC / TV |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = [r for t, r in sorted(new.items()) if t != "mean"]
    for r in rows:
        o = old.get(r["task"], {})
        l0 = _pair(f"({o['l0_tv']} → {o['l0_tvc']})" if o else "", f"{r['l0_tv']} → {r['l0_tvc']}")
        vals = [_pair(_f(o.get(c)) if o else "", _f(r[c])) for c in cols]
        ratio = _pair(_f(float(o["tvc"]) / float(o["tv"]), 2) if o else "", _f(float(r["tvc"]) / float(r["tv"]), 2))
        print(f"| {r['task']} | {l0} | " + " | ".join(vals) + f" | {ratio} |")
    mean = {c: statistics.mean(float(r[c]) for r in rows) for c in cols}
    omean = {c: statistics.mean(float(old[r["task"]][c]) for r in rows if r["task"] in old) for c in cols} if old else {}
    l0s = (statistics.mean(float(r["l0_tv"]) for r in rows), statistics.mean(float(r["l0_tvc"]) for r in rows))
    print(f"| **mean ({len(rows)})** | {l0s[0]:.1f} → {l0s[1]:.1f} | " + " | ".join(_pair(_f(omean.get(c)), _f(mean[c])) for c in cols)
          + f" | {_pair(_f(omean['tvc'] / omean['tv'], 2) if omean else '', _f(mean['tvc'] / mean['tv'], 2))} |")
    beats = {c: sum(float(r["tvc"]) > float(r[c]) for r in rows) for c in ("sae_reconstruction", "ito_5", "ito_20")}
    keep = sum(float(r["tvc"]) >= 0.9 * float(r["tv"]) for r in rows)
    frac = statistics.median(float(r["l0_tvc"]) / max(float(r["l0_tv"]), 1) for r in rows)
    print(f"\nTVC beats SAE reconstruction on {beats['sae_reconstruction']}/{len(rows)} tasks, ITO-5 on {beats['ito_5']}, "
          f"ITO-20 on {beats['ito_20']}; keeps >= 90% of the TV's effect on {keep}; median L0 kept {frac:.2f} of SAE(TV)'s.")


def circuits(new_dir: str, old_dir: str) -> None:
    new = Path(new_dir)
    old = _csv(Path(old_dir) / "summary.csv")
    print("| task | m(M) | m(∅), features ablated | non-zero nodes | feature nodes for 0.6 | F(C) at 10 / 100 / 1000 | F(M∖C) at 10 / 100 | F(C) with every positive-effect node (N) | v1: nodes for 0.6 (error nodes ranked) |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|")
    for s in sorted(new.glob("*/summary.json")):
        d = json.loads(s.read_text())
        c = json.loads((s.parent / "faithfulness.json").read_text())
        at = lambda vals, n: _f(vals[max(i for i, k in enumerate(c["sizes"]) if k <= n)], 2)  # noqa: E731
        pos = c["faith_C"][-1]
        o = old.get(d["task"], {})
        print(f"| {d['task']} | {d['metric_eval']:.2f} | {d['metric_empty']:.2f} | {d['n_nonzero_nodes']:,} | {d['nodes_for_target'] or 'never'} | "
              f"{at(c['faith_C'], 10)} / {at(c['faith_C'], 100)} / {at(c['faith_C'], 1000)} | {at(c['faith_M'], 10)} / {at(c['faith_M'], 100)} | "
              f"{pos:.2f} ({c['sizes'][-1]:,}) | {o.get('nodes_for_faith', '–')} |")


def heatmap(spec_csv: str) -> None:
    rows = list(csv.DictReader(open(spec_csv)))
    print("| task | top feature | own effect | best other (task) | specific |")
    print("|---|---:|---:|---|---|")
    for r in rows:
        if not r["top_feature"]:
            print(f"| {r['task']} | – | – | – | – |")
            continue
        print(f"| {r['task']} | {r['top_feature']} | {_f(r['own_effect'])} | {_f(r['best_other_effect'])} ({r['best_other_task']}) | "
              f"{'**yes**' if r['specific'] == 'True' else 'no'} |")
    n = sum(r["specific"] == "True" for r in rows)
    print(f"\nTask-specific (own > 0.05 and at least twice the best other): {n} of {len(rows)}.")


if __name__ == "__main__":
    {"tvc": tvc, "circuits": circuits, "heatmap": heatmap}[sys.argv[1]](*sys.argv[2:])
