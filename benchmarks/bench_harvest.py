"""Activation harvesting throughput: our ActivationStore / LM.activations vs. plain transformers forwards.

Task: read the activations an SAE/transcoder run at layer 12 needs, i.e. the sites
resid_pre.11, resid_pre.12, attn_out.12, resid_mid.12, mlp_out.12 of the bundled gemma-3-270m,
for the same token batches (default 8 batches of 16 x 128 tokens from the offline corpus
'generated:512+python-docs', cut by our token_batches: BOS + 127 tokens, right-padded).

  ours, LM.activations      : one hooked forward that reads all five sites and stops right after
                              layer 12's MLP (13 of 18 layers, no final norm, no LM head); this is
                              exactly what ActivationStore calls per token batch.
  HF CausalLM (as written)  : lm.model(input_ids, attention_mask=..., output_hidden_states=True)
                              under no_grad: all 18 layers, a KV cache (use_cache defaults on) and
                              full-vocabulary (262k) logits at every position.
  HF base model             : lm.model.model(..., output_hidden_states=True, use_cache=False): all
                              18 layers, no LM head: the fairer plain-transformers variant.
  ours, ActivationStore     : end to end (tokenise the documents, forward, drop BOS/pads, shuffle),
                              from a fresh store until its buffer holds ~n_batches batches of rows;
                              it reads the same documents in the same order, timed on its own token
                              count (it may read a few more batches, as it fills by rows).

The plain forwards return only the residual stream (hidden_states[l] = resid_pre.l, the last one
after the final norm); attn_out / resid_mid / mlp_out would need hooks or a recomputation.
tokens/s counts real (unpadded) tokens, BOS included; one warm-up batch is run first and not timed.

Usage:
  python benchmarks/bench_harvest.py [--n-batches 8] [--batch-size 16] [--seq-len 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from icl_circuits.corpus import from_spec
from icl_circuits.loading import load_model
from icl_circuits.sae.activations import ActivationStore, token_batches
from icl_circuits.sites import Site

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    docs = from_spec(args.corpus, lm, progress=False)
    sites = [Site.parse(s) for s in SITES]
    stream = token_batches(lm.tokenizer, docs, args.seq_len, args.batch_size)
    batches = list(itertools.islice(stream, args.n_batches + 1))
    warm, timed_batches = batches[0], batches[1:]
    n_tok = sum(int(m.sum()) for _, m in timed_batches)
    n_pad = sum(ids.numel() for ids, _ in timed_batches)

    @torch.no_grad()
    def ours(ids, mask):
        return lm.activations(ids, sites, attention_mask=mask)

    @torch.no_grad()
    def hf_causal(ids, mask):
        return lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    @torch.no_grad()
    def hf_base(ids, mask):
        return lm.model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)

    # same numbers: resid_pre.l == hidden_states[l]
    a, h = ours(*warm), hf_base(*warm).hidden_states
    m = warm[1].bool()
    for s in sites:
        if s.kind == "resid_pre":
            err = (a[s][m] - h[s.layer][m]).abs().max().item() / h[s.layer][m].abs().max().item()
            assert err < 1e-4, (s, err)
    del a, h

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

    results: list[tuple[str, str, float, int]] = []  # (name, what it gives, seconds, tokens)
    t = time_pass(ours)
    results.append(("ours: LM.activations", "the 5 sites, stops after L12 MLP", t, n_tok))
    t = time_pass(hf_base)
    results.append(("HF base model", "resid_pre/post only, 18 layers", t, n_tok))
    if not args.skip_causal_lm:
        t = time_pass(hf_causal)
        results.append(("HF CausalLM (plain)", "resid only, 18 layers + 262k logits", t, n_tok))

    # ActivationStore end to end, from a fresh store over the same documents
    store_times, store_tokens, store_rows, store_fw = [], 0, 0, 0
    for _ in range(args.repeats):
        t = time.perf_counter()
        store = ActivationStore(lm, SITES, docs, seq_len=args.seq_len, batch_size=args.batch_size,
                                buffer_batches=args.n_batches, seed=0)  # fmt: skip
        rows = store.next(1)  # first read fills the buffer (~n_batches forwards of rows), then shuffles
        store_times.append(time.perf_counter() - t)
        store_fw, store_rows = store.forwards, store.rows_left + 1
        del rows, store
    fw_batches = itertools.islice(token_batches(lm.tokenizer, docs, args.seq_len, args.batch_size), store_fw)
    store_tokens = sum(int(m.sum()) for _, m in fw_batches)
    t = statistics.median(store_times)
    results.append(("ours: ActivationStore", f"5 sites, end to end ({store_fw} batches)", t, store_tokens))

    print(f"model {args.model}, corpus {args.corpus}, {torch.get_num_threads()} threads, "
          f"{args.n_batches} timed batches of {args.batch_size} x <= {args.seq_len} tokens "
          f"({n_tok} real tokens, {n_pad} incl. padding), median of {args.repeats} pass(es)")  # fmt: skip
    print(f"sites: {', '.join(SITES)}  (resid_pre.11/12 checked equal to HF hidden_states[11/12])")
    print(f"ActivationStore served {store_rows} rows (BOS and padding dropped) from {store_tokens} tokens\n")
    hdr = f"{'method':<24} {'gives':<40} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}"
    print(hdr)
    print("-" * len(hdr))
    for name, gives, sec, tok in results:
        print(f"{name:<24} {gives:<40} {tok:>7} {sec:>8.2f} {tok / sec:>9.0f}")
    rate = {name: tok / sec for name, _, sec, tok in results}
    print("\nratios (tokens/s, ours / plain):")
    for o in ("ours: LM.activations", "ours: ActivationStore"):
        for p in ("HF base model", "HF CausalLM (plain)"):
            if p in rate:
                print(f"  {o:<22} vs {p:<20} {rate[o] / rate[p]:5.2f}x")
    print("\nnote: the plain forwards give only resid_pre/resid_post (hidden_states); attn_out, resid_mid and")
    print("mlp_out.12 are not among their outputs. Ours stops after layer 12 (13/18 layers) and skips the LM head.")


if __name__ == "__main__":
    main()
