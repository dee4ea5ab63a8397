"""Does a bf16 model forward for harvesting hurt the SAE? Same tokens harvested in float32, one TopK SAE each.

Takes an existing `sae harvest` folder (bf16 forward), harvests the first N training tokens of one site
again with a float32 forward (the same documents in the same order, so the rows are the same tokens),
trains the same TopK SAE on both, and scores both on the folder's float32 held-out rows.

    python scripts/sae_harvest_dtype.py --cache runs/acts_v2 --site resid_pre.12 --rows 212992 --out runs/harvest_dtype
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from icl_circuits.data.corpus import harvest_docs
from icl_circuits.core.loading import load_model
from icl_circuits.sae.cache import harvest
from icl_circuits.sae.cache_reader import HarvestRun
from icl_circuits.sae.evaluation import held_out_stats
from icl_circuits.sae.training import TrainConfig, train_from_cache
from icl_circuits.core.sites import Site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="a `sae harvest` folder (bf16 forward)")
    ap.add_argument("--site", default="resid_pre.12")
    ap.add_argument("--rows", type=int, default=212_992, help="a multiple of the shard size (16384)")
    ap.add_argument("--train-rows", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/harvest_dtype"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = HarvestRun(args.cache)
    bf16, ev, s = run.train, run.eval, run.settings
    site = Site.parse(args.site)
    train, _ = harvest_docs(s["corpus"], s["eval_docs"], s["seed"], progress=False)
    fp32 = harvest(load_model(run.model), [site], train, args.out / "fp32_cache", n_tokens=args.rows, progress=False)
    same = torch.equal(fp32.load_shard(0, [site])["token_ids"], bf16.load_shard(0, [site])["token_ids"])
    if not same:
        raise SystemExit("the two harvests do not hold the same tokens; check --cache")
    spec = f"resid:{site.layer}" if site.kind == "resid_pre" else None
    if spec is None:
        raise SystemExit("--site must be a resid_pre site")
    out = {}
    for name, cache in (("float32", fp32), ("bfloat16", bf16)):
        cfg = TrainConfig(specs=[spec], arch="topk", k=args.k, d_sae=4096, n_tokens=args.train_rows, batch_tokens=1024,
                          dead_window=200, dead_steps=400, b_dec_init="mean", norm_centered=True, checkpoint_every=50,
                          trainer={"ghost_grads": False})  # fmt: skip
        sae = next(iter(train_from_cache(cache, cfg, args.out / f"sae_{name}", progress=False).values()))
        out[name] = held_out_stats(sae, ev)
        print(name, out[name], flush=True)
    (args.out / "result.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
