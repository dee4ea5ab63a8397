"""Task Vector Cleaning on the bundled model: one optimisation step, ours vs. naive, and a whole run.

    python benchmarks/bench_tvc.py [--task country_capital] [--threads 2] [--steps 5] [--no-run]

A step is one forward + backward of NLL + λ L1 on the 24 training prompts, steering resid_pre[12]
at the query arrow. Compared in the same process, on the same prompts and vector:
  naive      plain transformers forward from layer 0, a forward-pre-hook adding the vector,
             full-vocabulary logits at every position, NLL taken from them
  start-L    LM.run from the cached resid_pre[12] (blocks 0-11 skipped), log-probs only where scored
  ours       start-L plus the prefix cache (only tokens from the arrow on are re-run; one
             unembedding for all prompt groups): what ZeroShotSteering does by default
The script checks that all three give the same loss, then times a full `clean_task` (setup,
baselines, TVC with the default config, per-feature effects).
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="country_capital")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    ap.add_argument("--no-run", action="store_true", help="skip the whole-task run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from icl_circuits import load_model, load_task
    from icl_circuits.cleaning import CleaningConfig, frozen_decoder, jumprelu
    from icl_circuits.cleaning_runs import clean_task, cleaning_setup
    from icl_circuits.sae.suite import starter_sae
    from icl_circuits.task_vectors import ZeroShotSteering

    lm = load_model("gemma-3-270m")
    sae = starter_sae(lm, f"resid:{args.layer}")
    task = load_task(args.task)
    cfg = CleaningConfig()
    setup = cleaning_setup(lm, task, args.layer, cfg)
    ours = setup.train
    start_l = ZeroShotSteering(lm, ours.batch, [args.layer], prefix_cache=False)
    decode = frozen_decoder(sae)
    theta0 = sae.pre_acts(setup.vector).detach()
    block = lm.adapter.blocks(lm.model)[args.layer]
    batch = ours.batch
    arrow = batch.arrow_mask("last")
    scoring = batch.scoring("last")

    def naive_loss(v: torch.Tensor) -> torch.Tensor:
        def hook(m, a, kw):  # type: ignore[no-untyped-def]
            h = a[0] + arrow.unsqueeze(-1).to(a[0].dtype) * v
            return (h, *a[1:]), kw

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [b, s, vocab]
        finally:
            handle.remove()
        logp = torch.log_softmax(logits.float(), -1)[scoring.positions]
        return scoring.nll(logp)

    def step(loss_of) -> float:  # type: ignore[no-untyped-def]
        theta = theta0.clone().requires_grad_(True)
        w = jumprelu(sae, theta)
        loss = loss_of(decode(w)) + cfg.l1_coeff * w.sum()
        loss.backward()
        return loss.item()

    variants = {
        "naive (full forward, full logits)": lambda: step(naive_loss),
        "start at layer L, scored positions only": lambda: step(lambda v: start_l.loss(args.layer, v)),
        "ours (+ prefix cache, one unembedding)": lambda: step(lambda v: ours.loss(args.layer, v)),
    }
    print(f"model gemma-3-270m, task {args.task}, layer {args.layer}, {len(batch)} training prompts "
          f"(seq {batch.input_ids.shape[1]}), {torch.get_num_threads()} threads, median of {args.steps}")  # fmt: skip
    results = {name: timed(fn, args.steps, warmup=True) for name, fn in variants.items()}
    losses = [v for _, v in results.values()]
    assert max(losses) - min(losses) < 1e-3 * abs(losses[0]), f"variants disagree: {losses}"
    naive = results["naive (full forward, full logits)"][0]
    for name, (t, loss) in results.items():
        print(f"  {name:42s} {t * 1000:8.0f} ms/step   {naive / t:5.1f}x   (loss {loss:.5f})")

    if not args.no_run:
        t = time.perf_counter()
        r = clean_task(lm, sae, task, args.layer, cfg, progress=False)
        total = time.perf_counter() - t
        print(f"\nwhole task ({args.task}): {total:.0f} s wall = setup + baselines + {r.steps} TVC steps "
              f"({r.seconds:.0f} s, {r.seconds / r.steps * 1000:.0f} ms/step incl. evaluations) + feature effects; "
              f"L0 {len(r.initial_features)} -> {r.l0}, stopped by {r.stopped}")  # fmt: skip
        print(f"naive steps for the same run would take ~{r.steps * naive:.0f} s")


if __name__ == "__main__":
    main()
