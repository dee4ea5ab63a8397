"""Worker for bench_sae_training.py: time one SAE trainer on pre-harvested activations.

Run in a fresh process per implementation, so peak RSS of one trainer never mixes with the other:

    python _sae_train_worker.py --impl ours    --data acts.safetensors ...   (our venv)
    python _sae_train_worker.py --impl saelens --data acts.safetensors ...   (SAELens venv)

It imports only torch + safetensors + the implementation under test (the SAELens venv has no
icl_circuits), loads the rows [n, d_in] from the file, builds the trainer, runs `--warmup`
untimed steps and `--steps` timed ones over consecutive `--batch`-row slices (wrapping around),
and prints one JSON line with the step times, memory figures and the dead fraction at the end.

Archs: gated, relu (SAELens 'standard'), topk, batchtopk. For topk/batchtopk ours runs without
ghost grads and with AuxK (SAELens's TopK/BatchTopK trainers use their aux loss instead).
--dead-window N makes both count a latent dead after N steps without firing (so the dead-latent
losses, AuxK / SAELens's aux loss, can be exercised in a short run); default: each library's own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """High-water RSS of this process (MiB). Not ru_maxrss: Linux carries that over from the
    parent across fork+exec, so a worker started by a process holding a model would report the
    parent's peak."""
    return _status_mib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


TOPK_FAMILY = ("topk", "batchtopk")


def build_ours(args, d_in: int, scale: float):
    from icl_circuits.sae.dictionary import SAEConfig
    from icl_circuits.sae.trainers import TrainerConfig, SAETrainer

    kw = {}
    if args.arch in TOPK_FAMILY:
        kw["ghost_grads"] = False  # the TopK family revives dead latents with AuxK, as SAELens's aux loss does
    if args.dead_window is not None:
        # ours: dead when steps_since_fire >= dead_steps; SAELens: when passes_since_fired > dead_feature_window
        kw["dead_steps"] = args.dead_window + 1
    cfg = TrainerConfig(arch=args.arch, d_in=d_in, d_sae=args.d_sae, lr=1e-3, betas=(0.0, 0.99), k=args.k,
                        param_dtype=args.param_dtype, **kw)  # fmt: skip
    sae_cfg = SAEConfig(d_in=d_in, d_sae=args.d_sae, site="resid_pre.12", layer=12, model="bench",
                        k=args.k if args.arch == "topk" else None)  # fmt: skip
    tr = SAETrainer(cfg, sae_cfg)
    tr.set_normalisation(scale)  # same fixed input scale as SAELens's activation_scaler below

    def step(x):
        return tr.step(x)["loss"]

    def dead_fraction() -> float:
        return tr.dead_mask().float().mean().item()

    if args.arch in TOPK_FAMILY:
        extra = (f"k={cfg.k}, AuxK (aux_k={cfg.aux_k}, coeff {cfg.aux_coeff:g}), no ghost grads, "
                 f"sparse decode, dead after {cfg.dead_steps} steps without firing")  # fmt: skip
    else:
        extra = f"l1={cfg.l1_coeff}, ghost grads {'on' if cfg.ghost_grads else 'off'}"
    desc = (f"icl_circuits {type(tr).__name__} params={args.param_dtype} (math fp32), Adam(1e-3,(0,0.99)), "
            f"centre on b_dec, {extra}")  # fmt: skip
    return step, desc, dead_fraction


def build_saelens(args, d_in: int, scale: float):
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    common = dict(d_in=d_in, d_sae=args.d_sae, dtype="float32", device="cpu", apply_b_dec_to_input=True,
                  normalize_activations="expected_average_only_in")  # fmt: skip
    if args.arch == "gated":
        from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig

        sae = GatedTrainingSAE(GatedTrainingSAEConfig(**common, l1_coefficient=10.0))
    elif args.arch == "relu":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=5.0))
    elif args.arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        # SAELens defaults: rescale_acts_by_decoder_norm=True, aux_loss_coefficient=1.0, use_sparse_activations=False.
        # --saelens-sparse: its COO-tensor decode (use_sparse_activations=True), which trains on CPU only without
        # the decoder-norm rescaling (with it, backward fails: "aten::view ... SparseCPU", sae-lens 6.54 / torch 2.13)
        sparse = {"use_sparse_activations": True, "rescale_acts_by_decoder_norm": False} if args.saelens_sparse else {}
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=args.k, **sparse))
    elif args.arch == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        # its BatchTopK activation is always dense (flat top-k over batch * d_sae, scatter into zeros)
        if args.saelens_sparse:
            raise SystemExit("SAELens's BatchTopK has no sparse-activation option")
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=float(args.k)))
    else:
        raise SystemExit(f"unknown arch {args.arch}")
    total = (args.warmup + args.steps) * args.batch
    kw = {} if args.dead_window is None else {"dead_feature_window": args.dead_window}
    tcfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=args.batch, lr=1e-3, lr_end=1e-4,
                            adam_beta1=0.0, adam_beta2=0.99, device="cpu", autocast=False, **kw)  # fmt: skip
    trainer = SAETrainer(tcfg, sae, data_provider=iter(()))  # the data provider is only read by fit()
    # (lr_end = lr/10 is what the runner config fills in; unused by the constant scheduler)
    # fit() would estimate this from n_batches_for_norm_estimate batches; we set the same value ours uses
    trainer.activation_scaler.scaling_factor = scale

    def step(x):
        # what SAETrainer.fit() does per iteration, minus wandb logging / evals / checkpoints
        trainer.maybe_reset_sparsity()
        out = trainer.step(x)  # scale, training_forward_pass, backward, clip_grad_norm_(1.0), Adam, lr sched
        trainer.n_training_steps += 1
        return out.loss.item()

    def dead_fraction() -> float:
        return trainer.dead_neurons.float().mean().item()

    extra = ""
    if args.arch in TOPK_FAMILY:
        c = sae.cfg
        sparse_acts = getattr(c, "use_sparse_activations", None)
        extra = (f", k={c.k}, aux loss coeff {c.aux_loss_coefficient:g}, rescale_acts_by_decoder_norm="
                 f"{c.rescale_acts_by_decoder_norm}, use_sparse_activations={sparse_acts}"
                 f", dead after {tcfg.dead_feature_window} passes without firing")  # fmt: skip
    desc = (f"sae_lens {sae_lens.__version__} SAETrainer.step, {type(sae).__name__} fp32, Adam(1e-3,(0,0.99)), "
            f"constant lr, grad-norm clip 1.0, apply_b_dec_to_input{extra}")  # fmt: skip
    return step, desc, dead_fraction


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["ours", "saelens"], required=True)
    ap.add_argument("--data", required=True, help=".safetensors file with tensor 'acts' [n, d_in] fp32")
    ap.add_argument("--arch", default="gated", choices=["gated", "relu", "topk", "batchtopk"])
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--param-dtype", default="float32", help="ours only: storage dtype of the weights")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--saelens-sparse", action="store_true",
                    help="SAELens topk: use_sparse_activations=True (and rescale_acts_by_decoder_norm=False)")
    ap.add_argument("--dead-window", type=int, default=None,
                    help="steps without firing before a latent counts as dead (both; default: each library's own)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    acts = load_file(args.data)["acts"].float().contiguous()  # [n, d_in]
    n, d_in = acts.shape
    if n < args.batch:
        raise SystemExit(f"need at least --batch={args.batch} rows, the file has {n}")
    # Anthropic normalisation: E||x|| = sqrt(d_in) (ours' set_normalisation, SAELens' scaling_factor)
    scale = math.sqrt(d_in) / acts.norm(dim=-1).mean().item()

    build = build_ours if args.impl == "ours" else build_saelens
    step, desc, dead_fraction = build(args, d_in, scale)

    n_batches = n // args.batch
    batches = [acts[i * args.batch : (i + 1) * args.batch] for i in range(n_batches)]  # [batch, d_in] views

    peak_start = peak_rss_mib()  # process peak so far (loading, imports)
    reset = reset_peak_rss()
    rss_start = rss_mib()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        x = batches[i % n_batches]
        t = time.perf_counter()
        loss = step(x)
        dt = time.perf_counter() - t
        if i >= args.warmup:
            times.append(dt)
        losses.append(loss)
    peak_end = peak_rss_mib() if reset else max(peak_rss_mib(), peak_start)
    print(json.dumps({
        "impl": args.impl, "desc": desc, "arch": args.arch, "d_sae": args.d_sae, "batch": args.batch,
        "d_in": d_in, "rows": n, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "step_times": times, "losses": [losses[0], losses[-1]],
        "rss_loop_start_mib": rss_start, "peak_rss_before_loop_mib": peak_start, "peak_rss_mib": peak_end,
        "peak_reset": reset, "dead_fraction": dead_fraction(), "saelens_sparse": args.saelens_sparse,
    }))  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
