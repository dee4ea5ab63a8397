"""Sparse vs dense decode of a TopK SAE, forward + backward: `icl_circuits.sae.sparse` against `f @ W_dec`.

For each k and d_sae, a batch of TopK codes (idx, vals: [batch, k], distinct latents per row, vals
requiring grad) and a decoder W_dec [d_sae, d_out] (requiring grad) are decoded and back-propagated
through with a fixed upstream gradient g [batch, d_out]:

  dense  : f = zeros(batch, d_sae).scatter(-1, idx, vals); y = f @ W_dec; y.backward(g)
           (what a TopK trainer without a sparse decode does: SAELens's default TopK SAE, ours before)
  sparse : y = sparse_decode_topk(idx, vals, W_dec); y.backward(g)
           (CSR forward, sampled-dense-dense grad_vals, CSR^T grad_W_dec: only the k active rows per token)

It reports the median time of forward+backward (and of the forward alone) over --repeats calls after
one warm-up call, the speed-up dense/sparse, and checks that y, grad_vals and grad_W_dec agree
(max |difference| relative to the largest dense entry).

Usage:
  python benchmarks/bench_sparse_decode.py                      # k 16,32,64 x d_sae 4096,16384, batch 4096
  python benchmarks/bench_sparse_decode.py --ks 16 --d-saes 1024 --batch 256 --repeats 2 --threads 1   # quick
"""

from __future__ import annotations

import argparse

import torch
from _timing import timed

from icl_circuits.sae.sparse import sparse_decode_topk


def make_codes(batch: int, d_sae: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [batch, k] of distinct latents per row (top-k of random scores), vals [batch, k] > 0."""
    scores = torch.rand(batch, d_sae, generator=gen)
    idx = scores.topk(k, dim=-1).indices  # [batch, k]
    vals = torch.rand(batch, k, generator=gen) + 0.1  # [batch, k]
    return idx, vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="16,32,64")
    ap.add_argument("--d-saes", default="4096,16384")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-out", type=int, default=640, help="gemma-3-270m d_model: 640")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    print(f"batch {args.batch}, d_out {args.d_out}, fp32, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} calls after 1 warm-up; torch {torch.__version__}\n")  # fmt: skip
    print("| d_sae | k | dense fwd+bwd ms | sparse fwd+bwd ms | speed-up | dense fwd ms | sparse fwd ms "
          "| speed-up fwd | max rel. diff (y, grad vals, grad W_dec) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for d_sae in [int(v) for v in args.d_saes.split(",")]:
        W = (torch.randn(d_sae, args.d_out, generator=gen) / args.d_out**0.5).requires_grad_(True)  # [d_sae, d_out]
        g = torch.randn(args.batch, args.d_out, generator=gen)  # [batch, d_out] upstream gradient
        for k in [int(v) for v in args.ks.split(",")]:
            idx, vals0 = make_codes(args.batch, d_sae, k, gen)
            vals = vals0.clone().requires_grad_(True)

            def dense_fwd() -> torch.Tensor:
                f = torch.zeros(args.batch, d_sae).scatter(-1, idx, vals)  # [batch, d_sae]
                return f @ W

            def sparse_fwd() -> torch.Tensor:
                return sparse_decode_topk(idx, vals, W)

            def fwd_bwd(fwd) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                vals.grad = W.grad = None
                y = fwd()
                y.backward(g)
                return y.detach(), vals.grad.clone(), W.grad.clone()  # type: ignore[union-attr]

            t_dense, ref = timed(lambda: fwd_bwd(dense_fwd), args.repeats, warmup=True)
            t_sparse, got = timed(lambda: fwd_bwd(sparse_fwd), args.repeats, warmup=True)
            with torch.no_grad():
                f_dense, _ = timed(dense_fwd, args.repeats, warmup=True)
                f_sparse, _ = timed(sparse_fwd, args.repeats, warmup=True)
            diffs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, ref)]
            print(f"| {d_sae} | {k} | {t_dense * 1e3:.1f} | {t_sparse * 1e3:.1f} | **{t_dense / t_sparse:.2f}×** "
                  f"| {f_dense * 1e3:.1f} | {f_sparse * 1e3:.1f} | {f_dense / f_sparse:.2f}× "
                  f"| {', '.join(f'{d:.1e}' for d in diffs)} |")  # fmt: skip
            vals.grad = W.grad = None
    print("\n(the encoder, top-k selection and optimiser are not included: this is the decode alone)")


if __name__ == "__main__":
    main()
