"""Negative steering (App. F.1): ours vs. the previous implementation vs. a plain transformers forward.

Task: for a few SAE features x scales, subtract scale x the feature's unit direction at every arrow of
16 ICL prompts (32 shots) of one task at resid_pre[layer], and count how often each output's first token
is the argmax at its arrow. All three compute the same accuracies (checked below).

  naive : HF CausalLM forward from layer 0 (2 prompts a pass), a forward-pre-hook subtracts the
          direction, full-vocab logits at every position, log-softmax, argmax at the arrows.
  before: the generic steering scorer, Steerer(scoring='all', prefix_cache=False) (resid_pre[layer] cached,
          blocks layer..end, one vector a pass), fp32 log-softmax over the vocabulary at both scored tokens of
          every output (the implementation this replaced also ran 2 prompts a pass).
  ours  : negative_steering: ArrowAccuracy (cut after the last arrow, prompts sorted by length, several
          vectors a pass, only the arrows unembedded) + ArgmaxCheck (bf16 screen with an error bound,
          exact fp32 logits for the few tokens that may beat the target).

Timed twice: the whole run (building the caches included; min_drop above 1, so every scale of every
feature is evaluated), and the evaluations alone with the caches built. The naive way is timed on one
evaluation (it takes a minute). Wall and CPU seconds: on a shared machine CPU time is the steadier one.
Usage:
  python benchmarks/bench_negative.py [--task country_capital] [--features 3] [--scales 300,1200] [--threads 1] [--no-naive]
"""

from __future__ import annotations

import argparse
import time

import torch

from icl_circuits import load_model, load_task
from icl_circuits.data.prompts import icl_prompts
from icl_circuits.data.tasks import DEFAULT_EVAL_SHARE
from icl_circuits.interventions.steer import Steerer, feature_directions
from icl_circuits.methods.heatmaps import FeatureSet
from icl_circuits.methods.negative import ArgmaxCheck, ArrowAccuracy, NegativeConfig, negative_steering
from icl_circuits.sae.registry import SAERef


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="country_capital")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--features", type=int, default=3, help="how many SAE features (the first ones of the starter SAE)")
    ap.add_argument("--scales", default="300,1200", help="comma-separated scales (unit directions; residual norm ~3,500)")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--n-shots", type=int, default=32)
    ap.add_argument("--vectors-per-pass", type=int, default=NegativeConfig.vectors_per_pass)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True, help="also time one plain forward (slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    sae = SAERef.parse(f"resid:{args.layer}").resolve(lm, train_if_missing=False)
    task = load_task(args.task)
    feats = list(range(args.features))
    scales = tuple(float(s) for s in args.scales.split(","))
    dirs = feature_directions(sae, feats)  # [n_features, d_model]
    cfg = NegativeConfig(layer=args.layer, n_prompts=args.n_prompts, n_shots=args.n_shots, scales=scales, min_drop=2.0,
                         vectors_per_pass=args.vectors_per_pass)  # min_drop > 1: every scale is evaluated  # fmt: skip
    batch = icl_prompts(lm.tokenizer, task.split(DEFAULT_EVAL_SHARE, cfg.seed)[0], cfg.n_prompts, cfg.n_shots, seed=cfg.seed)
    arrows = batch.arrow_mask("all")  # [batch, seq]
    n_evals = len(feats) * len(scales)

    vectors = torch.stack([-s * dirs[i] for i in range(len(feats)) for s in scales])  # [n_evals, d_model], feature-major

    def ours_run() -> list[float]:  # the whole command, caches included
        res = negative_steering(lm, [task], {task.name: FeatureSet(task.name, feats)}, sae, cfg, progress=False)
        return [res.baseline_accuracy[task.name] - float(d) for d in res.drop[0]]  # accuracy at the last scale

    def before_run() -> list[float]:  # the previous negative_steering loop, for one task
        st = Steerer(lm, batch, [args.layer], steer_at=arrows, prefix_cache=False, scoring="all")
        acc = [float(st.score(args.layer, v[None], need_accuracy=True).accuracy[0]) for v in vectors]  # type: ignore[index]
        return acc[len(scales) - 1 :: len(scales)]

    @torch.no_grad()
    def naive_one(vec: torch.Tensor) -> float:
        block = lm.adapter.blocks(lm.model)[args.layer]
        hits = 0
        for b in range(0, len(batch), 2):
            at = arrows[b : b + 2]

            def sub(module, a, kw):  # noqa: ANN001, ANN202
                return (a[0] + at.unsqueeze(-1).to(a[0].dtype) * vec, *a[1:]), kw

            handle = block.register_forward_pre_hook(sub, with_kwargs=True)
            try:
                logits = lm.model(input_ids=batch.input_ids[b : b + 2], attention_mask=batch.attention_mask[b : b + 2]).logits
            finally:
                handle.remove()
            pred = torch.log_softmax(logits.float(), -1).argmax(-1)[at]  # [n]
            hits += int((pred == batch.input_ids[b : b + 2, 1:][at[:, :-1]]).sum())
        return hits / int(arrows.sum())

    def clock(fn, *a):  # noqa: ANN001, ANN202
        w, c = time.perf_counter(), time.process_time()
        out = fn(*a)
        return time.perf_counter() - w, time.process_time() - c, out

    rows = []  # (what, wall s, cpu s, evaluations)
    w, c, ref = clock(ours_run)
    rows.append(("ours, whole run (caches included)", w, c, n_evals))
    w, c, acc = clock(before_run)
    rows.append(("before, whole run (caches included)", w, c, n_evals))
    assert all(abs(a - b) < 1e-6 for a, b in zip(acc, ref)), (acc, ref)
    # per evaluation, caches already built
    ev = ArrowAccuracy(lm, batch, args.layer, ArgmaxCheck(lm), cfg.prompts_per_pass, cfg.vectors_per_pass)
    st = Steerer(lm, batch, [args.layer], steer_at=arrows, prefix_cache=False, scoring="all")
    w, c, acc_ours = clock(ev.accuracy, vectors)
    rows.append(("ours, evaluations only", w, c, n_evals))
    w, c, acc_before = clock(lambda: [float(st.score(args.layer, v[None], need_accuracy=True).accuracy[0]) for v in vectors])  # type: ignore[index]
    rows.append(("before, evaluations only", w, c, n_evals))
    assert torch.allclose(acc_ours, torch.tensor(acc_before), atol=1e-6, rtol=0), (acc_ours, acc_before)
    if args.naive:
        w, c, acc = clock(naive_one, vectors[-1])
        rows.append(("naive, one evaluation (HF forward, full logits)", w, c, 1))
        assert abs(acc - float(acc_ours[-1])) < 1e-6, (acc, acc_ours)

    print(f"model {args.model}, task {args.task}, layer {args.layer}, {args.n_prompts} ICL prompts x {args.n_shots} shots "
          f"(seq {batch.input_ids.shape[1]}, {int(arrows.sum())} arrows), {len(feats)} features x {len(scales)} scales, "
          f"{torch.get_num_threads()} threads, vectors_per_pass {cfg.vectors_per_pass}")
    print(f"  accuracy at scale {scales[-1]:g} per feature: {[round(a, 4) for a in ref]} (same for every method)")
    per = {what: (w / n, c / n) for what, w, c, n in rows}
    for what, w, c, n in rows:
        kind = "ours, whole run (caches included)" if "whole" in what else "ours, evaluations only"
        print(f"  {what:50s}: {w / n:6.2f} s wall, {c / n:6.2f} s CPU per (feature, scale);"
              f" ours is {w / n / per[kind][0]:5.2f}x faster (wall), {c / n / per[kind][1]:5.2f}x (CPU)")


if __name__ == "__main__":
    main()
