"""Task Vector Cleaning on the bundled model: one optimisation step, ours vs. naive, and a whole run.

    python benchmarks/bench_tvc.py [--task country_capital] [--threads 2] [--steps 5] [--no-run]

TVC's own steps unembed in bfloat16 (CleaningConfig.train_unembed), so their loss is compared with the
float32 variants only to 1%; the last two rows time the step as TVC runs it, before and after merging
prompt shapes into fewer suffix passes (prefix_cache.PASS_COST).

A step is one forward + backward of NLL + λ L1 on the 24 training prompts, steering resid_pre[12]
at the query arrow. Compared in the same process, on the same prompts and vector:
  naive      plain transformers forward from layer 0, a forward-pre-hook adding the vector,
             full-vocabulary logits at every position, NLL taken from them
  start-L    LM.run from the cached resid_pre[12] (blocks 0-11 skipped), log-probs only where scored
  ours       start-L plus the prefix cache (only tokens from the arrow on are re-run; one
             unembedding for all prompt groups): what Steerer does by default
The script checks that all three give the same loss, then times a full `clean_task` (setup,
baselines, TVC with the default config, per-feature effects) twice in the same process:
  before     the previous way: one suffix pass per distinct prompt shape (pass_cost=0), and every
             evaluation (every eval_every steps, the result, each baseline, 2 per feature + 1 for
             the feature effects) a separate `evaluate` call
  now        `clean_task` as it is: prompt shapes merged into fewer suffix passes (prefix_cache.PASS_COST),
             the evaluation snapshots scored after the loop, and all evaluations of a phase scored as
             one batch of vectors (`Steerer.score`)
and checks that both give the same steps, features and scores. Use --threads 1 for the docs' figures;
wall time depends on what else runs on the machine, so the CPU seconds of this process are printed too.
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
    from icl_circuits.methods.cleaning import CleaningConfig, frozen_decoder, jumprelu
    from icl_circuits.methods.cleaning_task import clean_task, cleaning_setup
    from icl_circuits.sae.suite import starter_sae
    from icl_circuits.interventions.steer import Steerer

    lm = load_model("gemma-3-270m")
    sae = starter_sae(lm, f"resid:{args.layer}")
    task = load_task(args.task)
    cfg = CleaningConfig()
    setup = cleaning_setup(lm, task, args.layer, cfg)
    ours_bf16 = setup.train  # what TVC trains with: merged suffix passes, bf16 unembedding
    ours = Steerer(lm, ours_bf16.batch, [args.layer])  # the same in float32, comparable with the naive pass
    # the previous TVC step: one suffix pass per prompt shape, bf16 unembedding
    shapes_bf16 = Steerer(lm, ours.batch, [args.layer], unembed_dtype=torch.bfloat16, pass_cost=0.0)
    start_l = Steerer(lm, ours.batch, [args.layer], prefix_cache=False)
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
        "TVC before: one pass per shape, bf16 unembed": lambda: step(lambda v: shapes_bf16.loss(args.layer, v)),
        "TVC now: merged passes, bf16 unembed": lambda: step(lambda v: ours_bf16.loss(args.layer, v)),
    }
    print(f"model gemma-3-270m, task {args.task}, layer {args.layer}, {len(batch)} training prompts "
          f"(seq {batch.input_ids.shape[1]}), {torch.get_num_threads()} threads, median of {args.steps}")  # fmt: skip
    results = {name: timed(fn, args.steps, warmup=True) for name, fn in variants.items()}
    losses = [v for _, v in results.values()]
    assert max(losses[:3]) - min(losses[:3]) < 1e-3 * abs(losses[0]), f"float32 variants disagree: {losses}"
    assert abs(losses[3] - losses[4]) < 1e-5 * abs(losses[0]), f"bf16 variants disagree: {losses}"
    assert abs(losses[4] - losses[0]) < 1e-2 * abs(losses[0]), f"bf16 unembedding too far from float32: {losses}"
    naive = results["naive (full forward, full logits)"][0]
    for name, (t, loss) in results.items():
        print(f"  {name:42s} {t * 1000:8.0f} ms/step   {naive / t:5.1f}x   (loss {loss:.5f})")

    if not args.no_run:
        runs = {}
        for name, fn in (("now", lambda: clean_task(lm, sae, task, args.layer, cfg, progress=False)),
                         ("before", lambda: _clean_task_before(lm, sae, task, args.layer, cfg))):  # fmt: skip
            t, c = time.perf_counter(), time.process_time()
            r = fn()
            runs[name] = (time.perf_counter() - t, time.process_time() - c, r)
        (now, now_cpu, r), (before, before_cpu, old) = runs["now"], runs["before"]
        # the same up to float summation order (bf16 unembedding in the steps: see docs/benchmarks.md)
        diff = max(abs(r.scores[m]["relative_loss_decrease"] - sc["relative_loss_decrease"]) for m, sc in old.scores.items())
        same = r.steps == old.steps and r.features == old.features and diff < 1e-3
        print(f"\nwhole task ({args.task}): {now:.0f} s wall ({now_cpu:.0f} s CPU) = setup + baselines + {r.steps} TVC steps "
              f"({r.seconds:.0f} s, {r.seconds / r.steps * 1000:.0f} ms/step incl. evaluations) + feature effects; "
              f"L0 {len(r.initial_features)} -> {r.l0}, stopped by {r.stopped}")  # fmt: skip
        print(f"before (one pass per prompt shape, one evaluation per vector): {before:.0f} s wall ({before_cpu:.0f} s CPU); "
              f"now {before / now:.2f}x wall, {before_cpu / now_cpu:.2f}x CPU; steps {old.steps} vs {r.steps}, "
              f"features {'the same' if r.features == old.features else 'DIFFERENT'}, scores within {diff:.1e}"
              f"{'' if same else '  <-- NOT THE SAME RESULT'}")  # fmt: skip
        print(f"naive steps for the same run would take ~{r.steps * naive:.0f} s")


def _clean_task_before(lm, sae, task, layer, cfg):  # type: ignore[no-untyped-def]
    """clean_task the previous way (see the module docstring), for the timing comparison."""
    from icl_circuits.methods.cleaning import clean_vector
    from icl_circuits.methods.cleaning_task import baseline_scores, cleaning_setup, feature_effects_one_by_one

    setup = cleaning_setup(lm, task, layer, cfg, pass_cost=0.0)
    ev = setup.evaluation
    from icl_circuits.interventions.steer import SteeringScores

    def one_by_one(layer: int, vectors: torch.Tensor, need_accuracy: bool = False, **kw: object) -> SteeringScores:
        s = [ev.evaluate(layer, v) for v in vectors]  # one pass per vector
        return SteeringScores(torch.tensor([x.nll for x in s], dtype=torch.float64), torch.tensor([x.accuracy for x in s], dtype=torch.float64))

    ev.score = one_by_one
    r = clean_vector(sae, setup.train, layer, setup.vector, cfg, ev, task=task.name, init=setup.initial_latents(sae, cfg))
    r.scores = {**baseline_scores(setup, sae), **r.scores}
    r.feature_effects = feature_effects_one_by_one(setup, sae, r)
    return r


if __name__ == "__main__":
    main()
