"""Zero-shot steering evaluation: ours vs. a plain transformers forward with full logits.

Task: score a steering vector added at the arrow of 32 zero-shot prompts (NLL + accuracy of
the first output token), at one layer. Both sides compute the same numbers (checked below).

  naive   : HF CausalLM forward from layer 0, a forward-pre-hook adds the vector, full-vocab
            logits at every position, then pick the scored positions.
  ours    : ZeroShotSteering: resid_pre[L] cached once, each evaluation runs blocks L..end
            and log-softmaxes only the scored positions.

Prints medians over repeats and the ratios. Usage:
  python benchmarks/bench_steering.py [--model gemma-3-270m] [--task country_capital] [--layer 12]
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import timed

from icl_circuits import load_model, load_task, zero_shot_prompts
from icl_circuits.methods.task_vectors import TaskVectorConfig, ZeroShotSteering, extract_task_vectors, task_batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="country_capital")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    task = load_task(args.task)
    icl, _ = task_batches(lm, task, TaskVectorConfig())
    tv = extract_task_vectors(lm, icl, [args.layer])[args.layer]
    zero = zero_shot_prompts(lm.tokenizer, task.split(0.5)[1], args.n_prompts, seed=1)
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
        s = ZeroShotSteering(lm, zero, [args.layer]).evaluate(args.layer, tv)
        return s.nll, s.accuracy

    steering = ZeroShotSteering(lm, zero, [args.layer])

    def ours_eval() -> tuple[float, float]:
        s = steering.evaluate(args.layer, tv)
        return s.nll, s.accuracy

    naive()  # warm-up
    ours_eval()
    t_naive, r_naive = timed(naive, args.repeats)
    t_ours, r_ours = timed(ours_eval, args.repeats)
    t_ours_full, _ = timed(ours_setup_and_eval, args.repeats)
    assert abs(r_naive[0] - r_ours[0]) < 1e-3 * abs(r_naive[0]) and r_naive[1] == r_ours[1], (r_naive, r_ours)

    # a layer sweep: one evaluation per layer of the same batch
    layers = list(range(lm.n_layers))
    t = time.perf_counter()
    tvs = extract_task_vectors(lm, icl, layers)
    sweep_steering = ZeroShotSteering(lm, zero, layers)
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
    print(f"  all {len(layers)} layers (sweep, TV extraction excluded from naive, included in ours):")
    print(f"    naive {t_sweep_naive:6.2f} s   ours {t_sweep_ours:6.2f} s   speed-up {t_sweep_naive / t_sweep_ours:5.2f}x")


if __name__ == "__main__":
    main()
