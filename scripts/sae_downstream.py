"""Several residual SAEs of one layer side by side on the ICL tasks: the TV, its SAE reconstruction, ITO.

For each task: the relative loss decrease (vs. zero-shot) of steering the evaluation prompts with the
raw task vector, with its plain SAE reconstruction, and with ITO-k (gradient pursuit, k latents), for
every SAE, on the same prompts (`experiments.clean.sae_downstream`; resumable per task).

    python scripts/sae_downstream.py --sae v1=path/to/v1/resid_12 --sae v2=starter --layer 12 --out runs/downstream
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from icl_circuits.experiments.clean import sae_downstream
from icl_circuits.core.loading import load_model
from icl_circuits.sae.formats import load_any
from icl_circuits.sae.suite import starter_sae
from icl_circuits.data.tasks import load_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--sae", action="append", required=True, metavar="NAME=PATH|starter")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--ito", default="20", help="comma-separated ITO target L0s")
    ap.add_argument("--out", type=Path, default=Path("runs/sae_downstream"))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_tasks(args.tasks)
    lm = load_model(args.model)
    saes = {}
    for item in args.sae:
        name, _, path = item.partition("=")
        saes[name] = starter_sae(lm, f"resid:{args.layer}") if path == "starter" else load_any(path).float()
    rows, files = sae_downstream(lm, saes, tasks, args.layer, args.out, ito_l0s=[int(k) for k in args.ito.split(",")])
    cols = [k for k in rows[0] if k != "task"]
    print("| task | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['task']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    print("wrote", *files)


if __name__ == "__main__":
    main()
