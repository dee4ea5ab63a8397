"""GPU smoke test: every stage of the pipeline once, end to end, on one device; timings and peak memory.

Stages (small settings, one task): load the model and its starter SAE; task-vector extraction and
its steering score; Task Vector Cleaning (with its ITO baselines) for a few steps; a steering heatmap
of the cleaned features; circuit node effects at two layers plus two faithfulness points; the
detector -> executor link (frozen attention) between the two circuit layers; max-activating examples
into a SQLite store; loading a Gemma Scope 2 folder (an attn_z SAE and an affine skip transcoder,
random weights written to a temp folder) and splicing both into a forward; a few steps of SAE training
on a live activation stream; data-parallel SAE training over every visible GPU (skipped, with a note,
on one GPU or without --ddp-ranks on the CPU).
Every stage prints its seconds and how many model forwards it ran on which device (any forward
elsewhere fails it), and checks that what it returns lives on the device (or, for small results kept
on the CPU by design, is finite), so a tensor left on the wrong device fails here, not in a long run.

    python scripts/gpu_smoke.py                       # cuda, bundled Gemma 3 270M, float32
    python scripts/gpu_smoke.py --device cuda:1 --dtype bfloat16
    python scripts/gpu_smoke.py --device cpu --tvc-steps 5 --sae-steps 3 --threads 1 --ddp-ranks 2   # the CPU check

Exit code 0: every stage ran; 2: the device (or a starter SAE) is not available; 1: a stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _same(d: torch.device, device: torch.device) -> bool:
    # 'cuda' (no index) accepts any GPU; 'cuda:1' only that one
    return d.type == device.type and (device.index is None or d.index in (None, device.index))


def _on(t: torch.Tensor, device: torch.device, what: str) -> None:
    if not _same(t.device, device) or not torch.isfinite(t.float()).all():
        raise RuntimeError(f"{what}: on {t.device} (finite: {bool(torch.isfinite(t.float()).all())}), expected finite on {device}")
    print(f"    check: {what} on {t.device}, finite")


def _top_latent(lm: Any, sae: Any, batch: Any) -> int:
    """The SAE latent with the largest mean activation over the batch's real tokens (BOS and padding left out)."""
    site = sae.cfg.site
    acts = next(iter(lm.run(batch.input_ids, batch.attention_mask, read=[site]).acts.values()))
    real = (batch.token_types >= 1).to(acts.device)
    return int(sae.encode(acts)[real].float().mean(0).argmax())


def _write_gemma_scope_2(folder: Path, hook_in: str, hook_out: str | None, d_in: int, d_out: int, d_sae: int,
                         model_name: str, seed: int) -> Path:  # fmt: skip
    """A Gemma Scope 2 folder as published: params.safetensors (w_enc, w_dec, b_enc, b_dec, threshold, and
    affine_skip_connection for a transcoder) and config.json; random weights sized so some latents fire."""
    from safetensors.torch import save_file

    from icl_circuits.core.storage import write_json

    g = torch.Generator().manual_seed(seed)
    t = {"w_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5, "b_enc": torch.zeros(d_sae),
         "w_dec": torch.randn(d_sae, d_out, generator=g) / d_sae**0.5, "b_dec": torch.zeros(d_out),
         "threshold": torch.full((d_sae,), 0.05)}  # fmt: skip
    cfg: dict[str, Any] = {"architecture": "jump_relu", "model_name": model_name, "hf_hook_point_in": hook_in}
    if hook_out is not None:
        t["affine_skip_connection"] = torch.randn(d_in, d_out, generator=g) * 0.01
        cfg |= {"hf_hook_point_out": hook_out, "affine_connection": True}
    folder.mkdir(parents=True)
    save_file(t, str(folder / "params.safetensors"))
    write_json(folder / "config.json", cfg)
    return folder


# -- data-parallel SAE training: one process per rank (spawned; top level so that spawn can import it) ---------

DDP_D_IN, DDP_D_SAE, DDP_ROWS = 64, 512, 256


def _ddp_trainer() -> Any:
    from icl_circuits.sae.dictionary import SAEConfig
    from icl_circuits.sae.trainers import SAETrainer, TrainerConfig

    cfg = TrainerConfig(arch="topk", d_in=DDP_D_IN, d_sae=DDP_D_SAE, k=16, param_dtype="float32")
    return SAETrainer(cfg, SAEConfig(d_in=DDP_D_IN, d_sae=DDP_D_SAE, kind="resid", model="smoke", site="resid_pre.0", layer=0, k=16))


def _ddp_batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(DDP_D_IN, generator=g) * 3  # the same global batches on every rank (same seed)
    return [torch.randn(DDP_ROWS, DDP_D_IN, generator=g) + mean for _ in range(steps)]


def _ddp_rank(rank: int, world: int, init: str, device_type: str, steps: int, out: str) -> None:
    """Rank `rank`: train on its rows of every batch (DistRowComm), then write where its parameters live and
    how far they are from rank 0's (and, on rank 0, from one process trained on the whole batches)."""
    import torch.distributed as dist

    from icl_circuits.sae.distributed import DistRowComm

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank, world_size=world)
    try:
        batches = _ddp_batches(steps)
        tr = _ddp_trainer().to(device)
        tr.comm = DistRowComm()
        for x in batches:
            tr.step(x[rank::world].to(device))  # this rank's rows: the stride split of sae/distributed.py
        replica = 0.0
        for p in tr.params.values():  # every replica must equal rank 0's
            ref = p.detach().clone()
            dist.broadcast(ref, 0)
            replica = max(replica, float((p.detach() - ref).abs().max()))
        tr.comm.check_replicas(tr.params)  # the package's own check (raises on diverged replicas)
        rec: dict[str, Any] = dict(devices=sorted({str(p.device) for p in tr.params.values()}), replica_diff=replica)
        if rank == 0:
            one = _ddp_trainer().to(device)
            for x in batches:
                one.step(x.to(device))
            rec["vs_one_process"] = max(float((tr.params[k].detach() - v.detach()).abs().max()) for k, v in one.params.items())
        Path(out, f"rank{rank}.json").write_text(json.dumps(rec))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_main(*args: Any) -> None:
    _ddp_rank(*args)  # type: ignore[arg-type]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # leave at once: gloo's threads can abort a normal interpreter exit after a clean run


def _ddp_train(world: int, device_type: str, steps: int) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_ddp_main, args=(r, world, f"file://{tmp}/pg", device_type, steps, tmp)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"data-parallel ranks exited with (rank, code) {bad}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


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
    ap.add_argument("--ddp-ranks", type=int, default=0,
                    help="ranks of the data-parallel SAE training stage (0: every visible GPU on cuda, skipped on one GPU "
                         "or on the CPU; N >= 2 on the CPU: N gloo processes, to check the stage itself)")  # fmt: skip
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
    model: list[Any] = []  # the loaded LM, once there is one: stage() watches its forwards

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        """fn() timed; every model forward in it must run on the device (its input embedding's output tells)."""
        seen: list[torch.device] = []
        hook = model[0].model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.device)) if model else None
        _sync(device)
        t0 = time.perf_counter()
        try:
            out = fn()
        finally:
            if hook is not None:
                hook.remove()
        _sync(device)
        times[name] = time.perf_counter() - t0
        where = sorted({str(d) for d in seen})
        print(f"  {name:<32s} {times[name]:7.2f} s   " + (f"{len(seen)} forwards on {', '.join(where)}" if seen else "no forward"), flush=True)
        if not all(_same(d, device) for d in seen):
            raise RuntimeError(f"{name}: model forwards ran on {where}, expected {device}")
        return out

    print(f"gpu_smoke: {args.model} on {device} in {args.dtype} (torch {torch.__version__})")
    if device.type == "cuda":
        print(f"  {torch.cuda.get_device_name(device)}")
        torch.cuda.reset_peak_memory_stats(device)
    warnings.simplefilter("ignore")  # collapsed / weak cleanings at a few steps are expected here

    from icl_circuits.sae.suite import starter_sae
    from icl_circuits.data.tasks import load_task

    lm = stage("load model", lambda: load_model(args.model, dtype=dtype, device=device))
    model.append(lm)
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

        # a steering heatmap: the task steered by each of its strongest cleaned features, scale per feature
        from icl_circuits.methods.heatmaps import HeatmapConfig, feature_set_from_cleaning, positive_heatmap

        fs = feature_set_from_cleaning(res, top_k=3)
        hcfg = HeatmapConfig(layer=args.layer, scale_mode="per_feature", scale_grid=(1024.0, 4096.0), n_eval=8, vectors_per_pass=4)
        heat = stage(f"heatmap ({len(fs.features)} features)", lambda: positive_heatmap(lm, [task], {task.name: fs}, sae, hcfg, progress=False))
        _on(heat.raw, heat.raw.device, "heatmap steering scores (kept on the CPU by design)")
        print(f"    features {heat.features}: steering scores {[round(float(v), 3) for v in heat.raw.flatten()]}")

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
        _on(eff.flat(), eff.flat().device, "node effects (kept on the CPU by design)")
        curve = stage("faithfulness (2 sizes)", lambda: faithfulness_curve(SplicedModel(lm, batch, saes, cir_cfg), eff, sizes=(10, 100)))
        print(f"    m(M) {eff.metric:.3f}; faithfulness by circuit size: {', '.join(f'{n}: {f:.2f}' for n, f in zip(curve.sizes, curve.faith_C))}")

        # the detector -> executor link: the first circuit layer's top latent ablated, attention frozen, the last's measured
        from icl_circuits.methods.link import LinkConfig, detector_executor_link

        lo, hi = layers[0], layers[-1]
        if lo >= hi:
            raise ValueError(f"--circuit-layers {args.circuit_layers}: the link needs two increasing layers")
        det, ex = (starter_sae(lm, f"resid:{layer}", train_if_missing=False) for layer in (lo, hi))
        _on(det.W_dec, device, f"detector SAE resid:{lo}")
        _on(ex.W_dec, device, f"executor SAE resid:{hi}")
        d_f, e_f = _top_latent(lm, det, batch), _top_latent(lm, ex, batch)
        link = stage(f"detector->executor link ({lo}->{hi})", lambda: detector_executor_link(
            lm, [task], {task.name: d_f}, {task.name: e_f}, det, ex, LinkConfig(n_prompts=4, n_shots=4), progress=False))  # fmt: skip
        _on(link.drop, link.drop.device, "link drops (kept on the CPU by design)")
        print(f"    detector {d_f} -> executor {e_f}: drop {float(link.drop[0, 0]):.3f} over {int(link.n_active[0, 0])} active positions")

        # max-activating examples of the starter SAE over the task's text, into a SQLite store
        from icl_circuits.methods.examples import ExampleConfig, build_example_store

        texts = [" ".join(f"{x} -> {y}" for x, y in task.pairs[i : i + 24]) for i in range(0, len(task.pairs), 24)]
        encoded: list[torch.device] = []
        real_encode = sae.encode
        sae.encode = lambda x: encoded.append(x.device) or real_encode(x)  # where the store's SAE passes ran
        try:
            with tempfile.TemporaryDirectory() as tmp:
                ecfg = ExampleConfig(seq_len=64, batch_size=8, top_k=4, per_bin=2)
                path = Path(tmp) / "ex.sqlite"
                store = stage("max-activating examples", lambda: build_example_store(lm, {"resid": sae}, texts, path, ecfg, progress=False))
                n_ex = store.count("resid")
        finally:
            del sae.encode  # the class's method again
        if not encoded or not all(_same(d, device) for d in encoded) or n_ex == 0:
            raise RuntimeError(f"max-activating examples: {n_ex} examples, SAE passes on {sorted(set(map(str, encoded)))}")
        print(f"    check: {len(encoded)} SAE passes on {sorted(set(map(str, encoded)))}; {n_ex} examples stored")

        # published weights: a Gemma Scope 2 attn_z SAE and affine skip transcoder, loaded as commands do and spliced in
        from icl_circuits.interventions.splice import splice
        from icl_circuits.sae.registry import SAERef

        gs_name = "gemma-v3-270m-pt" if lm.name.endswith("gemma-3-270m") else lm.name  # as Gemma Scope 2 names the model
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "gemma-scope-2-270m-pt"
            hook = f"model.layers.{hi}"
            attn_dir = _write_gemma_scope_2(root / f"attn_out/layer_{hi}_width_16k_l0_small", f"{hook}.self_attn.o_proj.input", None,
                                            lm.d_z, lm.d_z, 256, gs_name, seed=1)  # fmt: skip
            tc_dir = _write_gemma_scope_2(root / f"transcoder/layer_{hi}_width_16k_l0_small_affine", f"{hook}.pre_feedforward_layernorm.output",
                                          f"{hook}.post_feedforward_layernorm.output", lm.d_model, lm.d_model, 256, gs_name, seed=2)  # fmt: skip
            attn_sae, tc = stage("load Gemma Scope 2 SAEs", lambda: [SAERef.parse(str(d)).resolve(lm) for d in (attn_dir, tc_dir)])
        if attn_sae.cfg.site != f"attn_z.{hi}" or tc.cfg.out_site != f"mlp_out.{hi}" or not tc.has_skip:
            raise RuntimeError(f"Gemma Scope 2: read as {attn_sae.cfg.site}, {tc.cfg.site} -> {tc.cfg.out_site} (skip: {tc.has_skip})")
        _on(attn_sae.W_enc, device, f"Gemma Scope 2 SAE {attn_sae.cfg.site}")
        _on(tc.W_skip, device, f"Gemma Scope 2 transcoder {tc.cfg.site} -> {tc.cfg.out_site} skip")
        mask = batch.token_types >= 1

        attn_sae, tc = attn_sae.to(lm.dtype), tc.to(lm.dtype)

        def spliced() -> tuple[torch.Tensor, dict]:
            clean = next(iter(lm.run(batch.input_ids, batch.attention_mask, read=[f"attn_z.{hi}"]).acts.values()))
            iv = [splice(s, mask) for s in (attn_sae, tc)]
            return clean, lm.run(batch.input_ids, batch.attention_mask, read=[f"attn_z.{hi}", f"mlp_out.{hi}"], interventions=iv).acts

        clean_z, acts = stage("Gemma Scope 2 spliced forward", spliced)
        for site, a in acts.items():
            _on(a, device, f"{site} with both spliced")
        # the splice took effect: attn_z is now the SAE's reconstruction of the clean z
        z, want = next(iter(acts.values()))[mask.to(device)].float(), attn_sae(clean_z)[mask.to(device)].float()
        err = float((z - want).norm() / want.norm().clamp_min(1e-12))
        if err > 2e-2:
            raise RuntimeError(f"Gemma Scope 2: spliced attn_z.{hi} is not the SAE's reconstruction (relative error {err:.2e})")
        print(f"    spliced attn_z.{hi} = the SAE's reconstruction of the clean z (relative error {err:.1e})")

        # SAE training on a live activation stream of the task's own text
        from icl_circuits.sae.training import TrainConfig, train_saes

        docs = texts * 8  # the task's text, repeated: enough tokens for a few training batches
        tcfg = TrainConfig(specs=[f"resid:{args.layer}"], arch="topk", k=16, d_sae=1024, batch_tokens=256,
                           n_tokens=256 * args.sae_steps, seq_len=64, prompts_per_forward=8, buffer_batches=2,
                           checkpoint_every=10_000, b_dec_init="mean")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            trained = stage(f"SAE training ({args.sae_steps} steps)", lambda: train_saes(lm, docs, tcfg, Path(tmp), progress=False))
        new = next(iter(trained.values()))
        print(f"    trained {new.cfg.site}: d_sae {new.d_sae}, exported on {new.device}")

        # data-parallel SAE training: one trainer per GPU, every batch's rows split over them
        n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
        world = args.ddp_ranks or n_gpu
        if device.type == "cuda" and world > n_gpu:
            raise ValueError(f"--ddp-ranks {world}: only {n_gpu} GPUs are visible")
        if world >= 2 and device.type in ("cuda", "cpu"):
            steps = max(args.sae_steps, 2)
            recs = stage(f"data-parallel SAE ({world} ranks, {steps} steps)", lambda: _ddp_train(world, device.type, steps))
            want = [[f"cuda:{r}"] if device.type == "cuda" else ["cpu"] for r in range(world)]
            if [r["devices"] for r in recs] != want or max(r["replica_diff"] for r in recs) > 1e-6 or recs[0]["vs_one_process"] > 1e-4:
                raise RuntimeError(f"data-parallel SAE training: {recs}")
            print(f"    check: rank r's parameters on {', '.join(d for r in recs for d in r['devices'])}; replicas differ by "
                  f"{max(r['replica_diff'] for r in recs):.1e}, one process by {recs[0]['vs_one_process']:.1e}")  # fmt: skip
        else:
            print(f"  data-parallel SAE training: skipped ({n_gpu} GPU(s) visible on {device}; "
                  "it needs 2 or more, or --ddp-ranks N on the CPU)")  # fmt: skip
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
