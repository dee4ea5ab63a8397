"""Zero-shot steering evaluation: ours vs. a plain transformers forward with full logits, and the two
batched paths of `Steerer.score` against each other.

Task: score a steering vector added at the arrow of 32 zero-shot prompts (NLL + accuracy of
the first output token), at one layer. Both sides compute the same numbers (checked below).

  naive   : HF CausalLM forward from layer 0, a forward-pre-hook adds the vector, full-vocab
            logits at every position, then pick the scored positions.
  ours    : Steerer: resid_pre[L] cached once, each evaluation runs blocks L..end
            and log-softmaxes only the scored positions.

Batched (a heatmap's work: --n-vectors directions at the TV's norm, scored together, 8 per pass):
  ours    : Steerer.score: the (cut) batch from layer L on one copy per vector (the former heatmap scorer's path).
  prefix  : the former TVC batch scorer (`PrefixCache.hidden_many`, reproduced here): each prompt's prefix
            keys/values cached, only the tokens from the steered one to the last scored one re-run, the
            suffixes and a deep copy of the prefix keys/values repeated once per vector.

Prints medians over repeats and the ratios. Usage:
  python benchmarks/bench_steering.py [--model gemma-3-270m] [--task country_capital] [--layer 12] [--n-vectors 64]
"""

from __future__ import annotations

import argparse
import time

import copy

import torch
from _timing import timed

from icl_circuits import load_model, load_task, zero_shot_prompts
from icl_circuits.data.tasks import DEFAULT_EVAL_SHARE
from icl_circuits.interventions.steer import Steerer, add_vectors
from icl_circuits.methods.task_vectors import TaskVectorConfig, extract_task_vectors, icl_batch


@torch.no_grad()
def prefix_suffixes_many(st: Steerer, layer: int, vectors: torch.Tensor, per: int) -> torch.Tensor:
    """[k] NLL of each vector [k, d_model], the other batched way: per chunk of `per` vectors, each prefix group's
    suffix tokens and keys/values repeated once per vector (the removed `PrefixCache.hidden_many`)."""
    pc, nll = st.prefix, []
    for i in range(0, len(vectors), per):
        chunk = vectors[i : i + per]  # [c, d_model]
        c, parts = len(chunk), []
        for g in pc.groups:
            n, s, e = len(g.rows), g.start, g.end
            cache = None
            if g.cache is not None:
                cache = copy.deepcopy(g.cache)
                cache.reorder_cache(torch.arange(n, device=st.lm.device).repeat(c))  # [c*n]: copy j of prompt i = row j*n + i
            out = st.lm.run(
                pc.input_ids[g.rows, s:e].repeat(c, 1), start_layer=layer, start_resid=st.cache[layer][g.rows, s:e].repeat(c, 1, 1),
                interventions=[add_vectors(layer, st.steer_at[g.rows, s:e], chunk)], logprob_positions=pc.scored[g.rows, s:e].repeat(c, 1),
                past_key_values=cache, unembed=False,
            )  # fmt: skip
            parts.append(out.hidden.reshape(c, -1, out.hidden.shape[-1]))  # [c, scored in group, d_model]
        hidden = torch.cat(parts, 1)[:, pc.inverse]  # [c, n_scored, d_model]
        lp = st.lm.logprobs_of(hidden.flatten(0, 1)).view(c, hidden.shape[1], -1)  # [c, n_scored, vocab]
        nll += [st.scoring.nll(x).cpu() for x in lp]
    return torch.stack(nll)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="country_capital")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-vectors", type=int, default=64)
    ap.add_argument("--vectors-per-pass", type=int, default=8)
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    task = load_task(args.task)
    icl = icl_batch(lm, task, TaskVectorConfig())
    tv = extract_task_vectors(lm, icl, [args.layer])[args.layer]
    zero = zero_shot_prompts(lm.tokenizer, task.split(DEFAULT_EVAL_SHARE)[1], args.n_prompts, seed=1)
    scoring = zero.scoring("last")
    arrow = zero.arrow_mask("last")
    block = lm.adapter.blocks(lm.model)[args.layer]

    @torch.no_grad()
    def naive() -> tuple[float, float]:
        def add_tv(module, a, kw):
            h = a[0] + arrow.unsqueeze(-1).to(a[0].dtype) * tv
            return (h, *a[1:]), kw

        handle = block.register_forward_pre_hook(add_tv, with_kwargs=True)
        try:
            logits = lm.model(input_ids=zero.input_ids, attention_mask=zero.attention_mask, use_cache=False).logits
        finally:
            handle.remove()
        logp = torch.log_softmax(logits.float(), -1)[scoring.positions]
        return scoring.nll(logp).item(), scoring.accuracy(logp).item()

    def ours_setup_and_eval() -> tuple[float, float]:
        s = Steerer(lm, zero, [args.layer]).evaluate(args.layer, tv)
        return s.nll, s.accuracy

    steering = Steerer(lm, zero, [args.layer])

    def ours_eval() -> tuple[float, float]:
        s = steering.evaluate(args.layer, tv)
        return s.nll, s.accuracy

    naive()  # warm-up
    ours_eval()
    t_naive, r_naive = timed(naive, args.repeats)
    t_ours, r_ours = timed(ours_eval, args.repeats)
    t_ours_full, _ = timed(ours_setup_and_eval, args.repeats)
    assert abs(r_naive[0] - r_ours[0]) < 1e-3 * abs(r_naive[0]) and r_naive[1] == r_ours[1], (r_naive, r_ours)

    # batched: the same vectors through both paths of Steerer.score
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(args.n_vectors, lm.d_model, generator=gen)
    vecs = (dirs / dirs.norm(dim=1, keepdim=True) * tv.norm()).to(lm.device)  # [n_vectors, d_model] at the TV's norm
    t_ours_many, s_ours = timed(lambda: steering.score(args.layer, vecs, vectors_per_pass=args.vectors_per_pass), args.repeats)
    t_prefix, nll_prefix = timed(lambda: prefix_suffixes_many(steering, args.layer, vecs, args.vectors_per_pass), args.repeats)
    rel_ours, rel_prefix = steering.relative_loss_decrease(s_ours.nll), steering.relative_loss_decrease(nll_prefix)
    d_batched = float((rel_ours - rel_prefix).abs().max())
    assert d_batched < 1e-4, d_batched

    # a layer sweep: one evaluation per layer of the same batch
    layers = list(range(lm.n_layers)) if not args.skip_sweep else []
    t_sweep_ours = t_sweep_naive = 0.0
    if layers:
        t = time.perf_counter()
        tvs = extract_task_vectors(lm, icl, layers)
        sweep_steering = Steerer(lm, zero, layers)
        for l in layers:
            sweep_steering.evaluate(l, tvs[l])
        t_sweep_ours = time.perf_counter() - t
        t = time.perf_counter()
        for l in layers:
            block, tv = lm.adapter.blocks(lm.model)[l], tvs[l]  # naive() reads these at call time
            naive()
        t_sweep_naive = time.perf_counter() - t

    print(f"model {args.model}, task {args.task}, {args.n_prompts} zero-shot prompts, seq {zero.input_ids.shape[1]}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  NLL naive {r_naive[0]:.5f} vs ours {r_ours[0]:.5f}; accuracy {r_naive[1]:.3f} vs {r_ours[1]:.3f} (same numbers)")
    print(f"  one steered evaluation at layer {args.layer}:")
    print(f"    naive full forward + full logits : {t_naive * 1000:8.1f} ms")
    print(f"    ours (cached resid_pre, L..end)  : {t_ours * 1000:8.1f} ms   speed-up {t_naive / t_ours:5.2f}x")
    print(f"    ours incl. building the cache    : {t_ours_full * 1000:8.1f} ms   speed-up {t_naive / t_ours_full:5.2f}x")
    print(f"  {args.n_vectors} vectors scored together at layer {args.layer}, {args.vectors_per_pass} per pass "
          f"(max |difference| of the relative loss decrease {d_batched:.2g}):")
    print(f"    prefix-cached suffixes per vector: {t_prefix * 1000:8.1f} ms")
    print(f"    ours (batch copies from layer L) : {t_ours_many * 1000:8.1f} ms   speed-up {t_prefix / t_ours_many:5.2f}x", flush=True)
    if layers:
        print(f"  all {len(layers)} layers (sweep, TV extraction excluded from naive, included in ours):")
        print(f"    naive {t_sweep_naive:6.2f} s   ours {t_sweep_ours:6.2f} s   speed-up {t_sweep_naive / t_sweep_ours:5.2f}x")


if __name__ == "__main__":
    main()
