"""Harvesting in bfloat16 vs float32: activation error and speed, on real text with the bundled model.

For the same token batches (default 4 batches of 16 x 128 tokens of the corpus, BOS + 127 tokens,
as harvest cuts them), runs the float32 model and a bfloat16 copy and reports, per site:
  rel_err             ||bf16 - fp32||_F / ||fp32||_F over every real (non-BOS, non-pad) token
  row_rel_err_median  the median over tokens of the per-token relative error
  cos_min             the smallest per-token cosine similarity
  storage_rel_err     the error of merely storing the fp32 activations in bf16 (the floor of a bf16 cache)
and the tokens/s of one LM.activations pass reading all sites (stops after the last layer needed),
with 1 and 2 threads (real tokens, BOS included; one warm-up batch first; fp32 and bf16 passes interleaved, best pass).

Usage:
  python benchmarks/bench_harvest_dtype.py [--corpus debian:dict-gcide+debian:python3-doc] [--n-batches 4]
  (short dictionary entries leave most of a 16 x 128 batch as padding; for speed alone, full rows:
   --corpus debian:python3-doc)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random

import torch
from _timing import timed

from icl_circuits.data.corpus import from_spec
from icl_circuits.core.loading import load_model
from icl_circuits.sae.activations import token_batches
from icl_circuits.sae.cache import compare_forward_dtypes
from icl_circuits.core.sites import Site

SITES = ["resid_pre.6", "resid_pre.12", "attn_out.12", "mlp_out.12"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--corpus", default="debian:dict-gcide+debian:python3-doc")
    ap.add_argument("--n-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", default="1,2", help="thread counts to time, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per dtype (best one counts)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    fp32 = load_model(args.model)
    bf16 = load_model(args.model, dtype=torch.bfloat16)
    docs = list(from_spec(args.corpus, fp32, progress=False))
    random.Random(0).shuffle(docs)  # a mix of the sources, not only the first one's documents
    sites = [Site.parse(s) for s in SITES]
    stream = token_batches(fp32.tokenizer, docs, args.seq_len, args.batch_size)
    batches = list(itertools.islice(stream, args.n_batches + 1))
    warm, timed_batches = batches[0], batches[1:]
    n_tok = sum(int(m.sum()) for _, m in timed_batches)

    torch.set_num_threads(max(int(t) for t in args.threads.split(",")))
    errors = compare_forward_dtypes(fp32, bf16, sites, timed_batches)
    result: dict[str, object] = {"corpus": args.corpus, "tokens": n_tok, "errors": errors, "tokens_per_s": {}}
    print(f"{n_tok} real tokens in {len(timed_batches)} batches of {args.batch_size} x {args.seq_len}")
    for site, e in errors.items():
        print(f"  {site:14s} rel_err {e['rel_err']:.4f}  median row rel_err {e['row_rel_err_median']:.4f}  "
              f"min cos {e['cos_min']:.5f}  (bf16 storage alone: {e['storage_rel_err']:.4f})")  # fmt: skip

    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        best = {"float32": float("inf"), "bfloat16": float("inf")}
        for lm in (fp32, bf16):  # warm-up
            with torch.no_grad():
                lm.activations(warm[0], sites, attention_mask=warm[1])
        for _ in range(args.repeats):  # interleaved, best pass: robust to other load on the machine
            for name, lm in (("float32", fp32), ("bfloat16", bf16)):

                def run(lm=lm) -> None:
                    with torch.no_grad():
                        for ids, mask in timed_batches:
                            lm.activations(ids, sites, attention_mask=mask)

                sec, _ = timed(run, 1)
                best[name] = min(best[name], sec)
        for name, sec in best.items():
            result["tokens_per_s"][f"{name}/{threads}t"] = n_tok / sec  # type: ignore[index]
            print(f"  {name:9s} {threads} thread(s): {n_tok / sec:8.0f} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
