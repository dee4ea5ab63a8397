"""Activation harvesting throughput: our LM.activations / cache harvest() (fp32 and bf16 forwards) vs.
plain transformers forwards with output_hidden_states, plus the error of the bf16 activations.

Task: read the activations an SAE/transcoder run at layer 12 needs, i.e. the sites
resid_pre.11, resid_pre.12, attn_out.12, resid_mid.12, mlp_out.12 of the bundled gemma-3-270m,
for the same token batches (default 8 batches of 16 x 128 tokens from the offline corpus
'generated:512+python-docs', cut by our token_batches: BOS + 127 tokens, right-padded).

  ours, LM.activations fp32 / bf16 : one hooked forward that reads all five sites and stops right
                              after layer 12's MLP (13 of 18 layers, no final norm, no LM head); this
                              is what ActivationStore and harvest() call per token batch. bf16: the
                              same model loaded with load_model(..., dtype=torch.bfloat16).
  ours, cache harvest() fp32 / bf16 : end to end into an on-disk ActivationCache (tokenise, forward,
                              drop BOS/pads, cast to bf16, write safetensors shards + sha256 +
                              manifest), from an empty folder, for the rows of n_batches token batches
                              (the first n_batches batches of the corpus; timed on their tokens).
  HF base model fp32 (/ bf16): lm.model.model(..., output_hidden_states=True, use_cache=False): all
                              18 layers, no LM head: the fair plain-transformers baseline (the bf16
                              row uses the bf16 copy's HF model, --skip-hf-bf16 drops it).
  HF CausalLM fp32 (as written): lm.model(input_ids, attention_mask=..., output_hidden_states=True)
                              under no_grad: all 18 layers, a KV cache (use_cache defaults on) and
                              full-vocabulary (262k) logits at every position.
  ours, ActivationStore fp32: end to end (tokenise the documents, forward, drop BOS/pads, shuffle),
                              from a fresh store until its buffer holds ~n_batches batches of rows;
                              it reads the same documents in the same order, timed on its own token
                              count (it may read a few more batches, as it fills by rows).

The plain forwards return only the residual stream (hidden_states[l] = resid_pre.l, the last one
after the final norm); attn_out / resid_mid / mlp_out would need hooks or a recomputation.
tokens/s counts real (unpadded) tokens, BOS included; one warm-up batch is run first and not timed.

bf16 error: over the real non-BOS tokens of the timed batches, per site, the relative error of each
row r = ||a_bf16 - a_fp32|| / ||a_fp32|| (a = LM.activations of the bf16 and fp32 models): its mean
and max over rows, and the pooled ||A_bf16 - A_fp32||_F / ||A_fp32||_F; for scale, the pooled error
of merely rounding the fp32 rows to bf16 (what any bf16 cache stores).

Usage:
  python benchmarks/bench_harvest.py [--n-batches 8] [--batch-size 16] [--seq-len 128] [--threads 2]
  python benchmarks/bench_harvest.py --corpus debian:dict-gcide+debian:python3-doc   # the v2 harvest's corpus
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from icl_circuits.data.corpus import from_spec
from icl_circuits.core.loading import load_model
from icl_circuits.sae.activations import ActivationStore, token_batches
from icl_circuits.sae.cache import harvest
from icl_circuits.core.sites import Site

SITES = ["resid_pre.11", "resid_pre.12", "attn_out.12", "resid_mid.12", "mlp_out.12"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--corpus", default="generated:512+python-docs")
    ap.add_argument("--n-batches", type=int, default=8, help="timed token batches per method")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="passes over the batches per method (median pass)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-causal-lm", action="store_true", help="skip the full-logits CausalLM forward")
    ap.add_argument("--skip-hf-bf16", action="store_true", help="skip the HF base model bf16 row")
    ap.add_argument("--skip-store", action="store_true", help="skip the ActivationStore row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    lm16 = load_model(args.model, dtype=torch.bfloat16)
    docs = from_spec(args.corpus, lm, progress=False)
    if not isinstance(docs, list):
        docs = list(docs)  # read many times, in the same order
    sites = [Site.parse(s) for s in SITES]
    stream = token_batches(lm.tokenizer, docs, args.seq_len, args.batch_size)
    batches = list(itertools.islice(stream, args.n_batches + 1))
    if len(batches) < 2:
        raise SystemExit(f"corpus {args.corpus} gives fewer than 2 token batches")
    warm, timed_batches = batches[0], batches[1:]
    n_tok = sum(int(m.sum()) for _, m in timed_batches)
    n_pad = sum(ids.numel() for ids, _ in timed_batches)

    def ours_with(model):
        @torch.no_grad()
        def ours(ids, mask):
            return model.activations(ids, sites, attention_mask=mask)

        return ours

    ours, ours16 = ours_with(lm), ours_with(lm16)

    @torch.no_grad()
    def hf_causal(ids, mask):
        return lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    def hf_base_with(model):
        @torch.no_grad()
        def hf_base(ids, mask):
            return model.model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)

        return hf_base

    hf_base, hf_base16 = hf_base_with(lm), hf_base_with(lm16)

    # same numbers: resid_pre.l == hidden_states[l]
    a, h = ours(*warm), hf_base(*warm).hidden_states
    m = warm[1].bool()
    for s in sites:
        if s.kind == "resid_pre":
            err = (a[s][m] - h[s.layer][m]).abs().max().item() / h[s.layer][m].abs().max().item()
            assert err < 1e-4, (s, err)
    del a, h

    # bf16 vs fp32 activations at the sites read, real non-BOS tokens of the timed batches
    row_err: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    num = {s: 0.0 for s in sites}
    den = {s: 0.0 for s in sites}
    rnd = {s: 0.0 for s in sites}
    for ids, mask in timed_batches:
        a32, a16 = ours(ids, mask), ours16(ids, mask)
        keep = mask.bool().clone()
        keep[:, 0] = False  # BOS (harvest drops it too)
        for s in sites:
            x, y = a32[s][keep].float(), a16[s][keep].float()  # [n, d_model]
            row_err[s].append((y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12))
            num[s] += float((y - x).pow(2).sum())
            den[s] += float(x.pow(2).sum())
            rnd[s] += float((x.bfloat16().float() - x).pow(2).sum())
        del a32, a16

    def time_pass(fn) -> float:
        fn(*warm)  # warm-up, untimed
        passes = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for ids, mask in timed_batches:
                out = fn(ids, mask)
                del out
            passes.append(time.perf_counter() - t)
        return statistics.median(passes)

    # (name, dtype, what it gives, seconds, tokens)
    results: list[tuple[str, str, str, float, int]] = []
    results.append(("ours: LM.activations", "fp32", "the 5 sites, stops after L12 MLP", time_pass(ours), n_tok))
    results.append(("ours: LM.activations", "bf16", "the 5 sites, stops after L12 MLP", time_pass(ours16), n_tok))

    # harvest() end to end into an empty cache folder: the rows (BOS dropped) of the first n_batches batches
    h_batches = batches[: args.n_batches]
    h_tokens = sum(int(m.sum()) for _, m in h_batches)
    h_rows = h_tokens - sum(ids.shape[0] for ids, _ in h_batches)
    for name, model in (("fp32", lm), ("bf16", lm16)):
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="bench_harvest_") as tmp:
                t = time.perf_counter()
                cache = harvest(model, SITES, docs, Path(tmp) / "cache", n_tokens=h_rows, seq_len=args.seq_len,
                                batch_size=args.batch_size, corpus_id=f"bench:{args.corpus}", progress=False)  # fmt: skip
                times.append(time.perf_counter() - t)
                assert cache.n_rows == h_rows, (cache.n_rows, h_rows)
        gives = f"5 sites -> bf16 shards on disk ({len(h_batches)} batches)"
        results.append(("ours: cache harvest()", name, gives, statistics.median(times), h_tokens))

    results.append(("HF base model", "fp32", "resid_pre/post only, 18 layers", time_pass(hf_base), n_tok))
    if not args.skip_hf_bf16:
        results.append(("HF base model", "bf16", "resid_pre/post only, 18 layers", time_pass(hf_base16), n_tok))
    if not args.skip_causal_lm:
        gives = "resid only, 18 layers + 262k logits"
        results.append(("HF CausalLM (plain)", "fp32", gives, time_pass(hf_causal), n_tok))

    # ActivationStore end to end, from a fresh store over the same documents
    if not args.skip_store:
        store_times, store_rows, store_fw = [], 0, 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            store = ActivationStore(lm, SITES, docs, seq_len=args.seq_len, batch_size=args.batch_size,
                                    buffer_batches=args.n_batches, seed=0)  # fmt: skip
            store.next(1)  # first read fills the buffer (~n_batches forwards of rows), then shuffles
            store_times.append(time.perf_counter() - t)
            store_fw, store_rows = store.forwards, store.rows_left + 1
            del store
        fw_batches = itertools.islice(token_batches(lm.tokenizer, docs, args.seq_len, args.batch_size), store_fw)
        store_tokens = sum(int(m.sum()) for _, m in fw_batches)
        gives = f"5 sites, end to end ({store_fw} batches)"
        results.append(("ours: ActivationStore", "fp32", gives, statistics.median(store_times), store_tokens))

    print(f"model {args.model}, corpus {args.corpus}, {torch.get_num_threads()} threads, "
          f"{args.n_batches} timed batches of {args.batch_size} x <= {args.seq_len} tokens "
          f"({n_tok} real tokens, {n_pad} incl. padding), median of {args.repeats} pass(es)")  # fmt: skip
    print(f"sites: {', '.join(SITES)}  (fp32 resid_pre.11/12 checked equal to HF hidden_states[11/12])")
    print(f"cache harvest(): {h_rows} rows from {h_tokens} tokens (the first {len(h_batches)} batches)")
    if not args.skip_store:
        print(f"ActivationStore served {store_rows} rows (BOS and padding dropped) from {store_tokens} tokens")
    print()
    rate = {(name, dt): tok / sec for name, dt, _, sec, tok in results}
    refs = [r for r in (("HF base model", "fp32"), ("HF CausalLM (plain)", "fp32")) if r in rate]
    print("| method | dtype | what it gives | tokens | seconds | tokens/s | "
          + " | ".join(f"vs {n} {d}" for n, d in refs) + " |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(refs))
    for name, dt, gives, sec, tok in results:
        cells = []
        for ref in refs:
            r = rate[(name, dt)] / rate[ref]
            cells.append("1" if (name, dt) == ref else (f"**{r:.2f}×**" if name.startswith("ours") else f"{r:.2f}×"))
        print(f"| {name} | {dt} | {gives} | {tok} | {sec:.2f} | {tok / sec:.0f} | " + " | ".join(cells) + " |")

    n_rows = sum(int(t.numel()) for t in row_err[sites[0]])
    print(f"\nbf16 forward vs fp32 forward, {n_rows} rows (real tokens, BOS dropped); row error "
          "||a_bf16 - a_fp32|| / ||a_fp32||:\n")
    print("| site | mean row rel. error | max row rel. error | pooled rel. error | bf16 rounding alone (pooled) |")
    print("|---|---:|---:|---:|---:|")
    for s in sites:
        e = torch.cat(row_err[s])
        print(f"| {s} | {e.mean().item():.4f} | {e.max().item():.4f} | {math.sqrt(num[s] / den[s]):.4f} "
              f"| {math.sqrt(rnd[s] / den[s]):.4f} |")  # fmt: skip
    print("\nnote: the plain forwards give only resid_pre/resid_post (hidden_states); attn_out, resid_mid and")
    print("mlp_out.12 are not among their outputs. Ours stops after layer 12 (13/18 layers) and skips the LM head.")
    print("harvest() also casts to bf16, writes the shards and hashes them; the others keep rows in memory.")


if __name__ == "__main__":
    main()
