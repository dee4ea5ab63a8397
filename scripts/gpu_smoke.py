"""GPU smoke test: every stage of the pipeline once, end to end, on one device; timings and peak memory.

Stages (small settings, one task): load the model and its starter SAE; task-vector extraction and
its steering score; Task Vector Cleaning (with its ITO baselines) for a few steps; circuit node effects
at two layers plus two faithfulness points; a few steps of SAE training on a live activation stream.
Each stage checks that what it returns lives on the device (or, for small results kept on the CPU by
design, is finite), so a tensor left on the wrong device fails here, not in a long run.

    python scripts/gpu_smoke.py                       # cuda, bundled Gemma 3 270M, float32
    python scripts/gpu_smoke.py --device cuda:1 --dtype bfloat16
    python scripts/gpu_smoke.py --device cpu --tvc-steps 5 --sae-steps 3    # the CPU check (~1-2 min)

Exit code 0: every stage ran; 2: the device (or a starter SAE) is not available; 1: a stage failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on(t: torch.Tensor, device: torch.device, what: str) -> None:
    if t.device.type != device.type or not torch.isfinite(t.float()).all():
        raise RuntimeError(f"{what}: on {t.device} (finite: {bool(torch.isfinite(t.float()).all())}), expected finite on {device}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, mps or cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the model's dtype")
    ap.add_argument("--model", default="gemma-3-270m", help="the bundled model, or anything load_model takes")
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--layer", type=int, default=12, help="resid_pre layer of the task vector and TVC (a starter SAE must exist)")
    ap.add_argument("--circuit-layers", default="11,12", help="layers of the node-effect SAEs (starter resid/attn/transcoder)")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--n-shots", type=int, default=8)
    ap.add_argument("--tvc-steps", type=int, default=30)
    ap.add_argument("--sae-steps", type=int, default=10, help="SAE training steps (batch 256 tokens)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from icl_circuits.core.loading import load_model, resolve_device, resolve_dtype

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype)
    times: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times[name] = time.perf_counter() - t0
        print(f"  {name:<28s} {times[name]:7.2f} s", flush=True)
        return out

    print(f"gpu_smoke: {args.model} on {device} in {args.dtype} (torch {torch.__version__})")
    if device.type == "cuda":
        print(f"  {torch.cuda.get_device_name(device)}")
        torch.cuda.reset_peak_memory_stats(device)
    warnings.simplefilter("ignore")  # collapsed / weak cleanings at a few steps are expected here

    from icl_circuits.sae.suite import starter_sae
    from icl_circuits.data.tasks import load_task

    lm = stage("load model", lambda: load_model(args.model, dtype=dtype, device=device))
    _on(lm.model.get_output_embeddings().weight, device, "model weights")
    try:
        sae = stage("load starter SAE", lambda: starter_sae(lm, f"resid:{args.layer}", train_if_missing=False))
    except FileNotFoundError as e:
        print(f"error: {e}; pass --layer with a shipped starter SAE", file=sys.stderr)
        return 2
    _on(sae.W_dec, device, "starter SAE")
    task = load_task(args.task)

    try:
        # task vector at one layer and its steering score on zero-shot prompts
        from icl_circuits.interventions.steer import Steerer
        from icl_circuits.methods.task_vectors import TaskVectorConfig, extract_task_vectors, held_out_prompts, icl_batch

        tv_cfg = TaskVectorConfig(n_prompts=args.n_prompts, n_shots=args.n_shots, n_eval=16)

        def task_vector() -> tuple[torch.Tensor, float]:
            icl, zero = icl_batch(lm, task, tv_cfg), held_out_prompts(lm, task, tv_cfg)
            tv = extract_task_vectors(lm, icl, [args.layer])[args.layer]  # [d_model]
            st = Steerer(lm, zero.batch, [args.layer], steer_at=zero.steer_at)
            return tv, st.relative_loss_decrease(st.evaluate(args.layer, tv))

        tv, rld = stage("task vector + steering", task_vector)
        _on(tv, device, "task vector")
        print(f"    relative loss decrease of the task vector at layer {args.layer}: {rld:.3f}")

        # Task Vector Cleaning (+ SAE reconstruction and ITO baselines, per-feature effects)
        from icl_circuits.methods.cleaning import CleaningConfig
        from icl_circuits.methods.cleaning_task import clean_task

        ccfg = CleaningConfig(n_train=8, n_eval=8, max_steps=args.tvc_steps, patience=args.tvc_steps)
        res = stage(f"TVC ({args.tvc_steps} steps)", lambda: clean_task(lm, sae, task, args.layer, ccfg, tv_cfg, sae_spec=f"resid:{args.layer}"))
        _on(res.weights, device, "TVC weights")
        print(f"    TVC: L0 {len(res.initial_features)} -> {res.l0}, relative loss decrease {res.scores['tvc']['relative_loss_decrease']:.3f}")

        # circuit node effects at two layers, and two faithfulness points (SAEs spliced in)
        from icl_circuits.methods.circuits import CircuitConfig, SplicedModel, circuit_saes, faithfulness_curve, node_effects
        from icl_circuits.data.prompts import icl_prompts

        layers = tuple(int(x) for x in args.circuit_layers.split(","))
        cir_cfg = CircuitConfig(layers=layers)
        saes = stage("load circuit SAEs", lambda: circuit_saes(lm, cir_cfg))
        for key, s in saes.saes.items():
            _on(s.W_dec, device, f"circuit SAE {key}")
        batch = icl_prompts(lm.tokenizer, task, args.n_prompts // 2, args.n_shots, seed=0)
        eff = stage(f"node effects (layers {args.circuit_layers})", lambda: node_effects(lm, batch, saes, cir_cfg))
        _on(eff.flat(), eff.flat().device, "node effects")  # small per-node results: kept on the CPU
        curve = stage("faithfulness (2 sizes)", lambda: faithfulness_curve(SplicedModel(lm, batch, saes, cir_cfg), eff, sizes=(10, 100)))
        print(f"    m(M) {eff.metric:.3f}; faithfulness by circuit size: {', '.join(f'{n}: {f:.2f}' for n, f in zip(curve.sizes, curve.faith_C))}")

        # SAE training on a live activation stream of the task's own text
        from icl_circuits.sae.training import TrainConfig, train_saes

        docs = [" ".join(f"{x} -> {y}" for x, y in task.pairs[i : i + 24]) for i in range(0, len(task.pairs), 24)] * 8
        tcfg = TrainConfig(specs=[f"resid:{args.layer}"], arch="topk", k=16, d_sae=1024, batch_tokens=256,
                           n_tokens=256 * args.sae_steps, seq_len=64, prompts_per_forward=8, buffer_batches=2,
                           checkpoint_every=10_000, b_dec_init="mean")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            trained = stage(f"SAE training ({args.sae_steps} steps)", lambda: train_saes(lm, docs, tcfg, Path(tmp), progress=False))
        new = next(iter(trained.values()))
        print(f"    trained {new.cfg.site}: d_sae {new.d_sae}, exported on {new.device}")
    except Exception as e:  # noqa: BLE001 - report which stage broke, then fail
        print(f"FAILED after {', '.join(times)}: {type(e).__name__}: {e}", file=sys.stderr)
        raise

    print(f"total {sum(times.values()):.1f} s")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
              f"(reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB)")  # fmt: skip
    else:
        print("peak CUDA memory: - (not a CUDA device)")
    print("gpu_smoke: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
