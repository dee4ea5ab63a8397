"""Worker for bench_sae_training.py: time one SAE trainer on pre-harvested activations.

Run in a fresh process per implementation, so peak RSS of one trainer never mixes with the other:

    python _sae_train_worker.py --impl ours    --data acts.safetensors ...   (our venv)
    python _sae_train_worker.py --impl saelens --data acts.safetensors ...   (SAELens venv)

It imports only torch + safetensors + the implementation under test (the SAELens venv has no
icl_circuits), loads the rows [n, d_in] from the file, builds the trainer, runs `--warmup`
untimed steps and `--steps` timed ones over consecutive `--batch`-row slices (wrapping around),
and prints one JSON line with the step times and memory figures.
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


def build_ours(args, d_in: int, scale: float):
    from icl_circuits.sae.dictionary import SAEConfig
    from icl_circuits.sae.trainers import TrainerConfig, SAETrainer

    cfg = TrainerConfig(arch=args.arch, d_in=d_in, d_sae=args.d_sae, lr=1e-3, betas=(0.0, 0.99), k=args.k,
                        param_dtype=args.param_dtype)  # fmt: skip
    sae_cfg = SAEConfig(d_in=d_in, d_sae=args.d_sae, site="resid_pre.12", layer=12, model="bench",
                        k=args.k if args.arch == "topk" else None)  # fmt: skip
    tr = SAETrainer(cfg, sae_cfg)
    tr.set_normalisation(scale)  # same fixed input scale as SAELens's activation_scaler below

    def step(x):
        return tr.step(x)["loss"]

    desc = (f"icl_circuits SAETrainer arch={args.arch} params={args.param_dtype} (math fp32), Adam(1e-3,(0,0.99)), "
            f"l1={cfg.l1_coeff}, centre on b_dec, ghost grads on (idle: no dead features this early)")  # fmt: skip
    return step, desc


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

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=args.k))
    else:
        raise SystemExit(f"unknown arch {args.arch}")
    total = (args.warmup + args.steps) * args.batch
    tcfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=args.batch, lr=1e-3, lr_end=1e-4,
                            adam_beta1=0.0, adam_beta2=0.99, device="cpu", autocast=False)  # fmt: skip
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

    desc = (f"sae_lens {sae_lens.__version__} SAETrainer.step, {type(sae).__name__} fp32, Adam(1e-3,(0,0.99)), "
            "constant lr, grad-norm clip 1.0, apply_b_dec_to_input")  # fmt: skip
    return step, desc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["ours", "saelens"], required=True)
    ap.add_argument("--data", required=True, help=".safetensors file with tensor 'acts' [n, d_in] fp32")
    ap.add_argument("--arch", default="gated", choices=["gated", "relu", "topk"])
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--param-dtype", default="float32", help="ours only: storage dtype of the weights")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
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
    step, desc = build(args, d_in, scale)

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
        "peak_reset": reset,
    }))  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
