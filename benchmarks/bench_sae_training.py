"""SAE training throughput and memory: our SAETrainer vs. SAELens's trainer on the same activations.

What is measured
  1. N activation rows (default 65536 rows of resid_pre.12 of the bundled gemma-3-270m, read from
     the offline corpus 'generated:512+python-docs' by our ActivationStore) are harvested ONCE and
     written to a temporary .safetensors file (`--synthetic`: random rows with a residual-like norm
     instead, no model needed).
  2. Each implementation then trains on exactly those rows, in its own fresh subprocess
     (benchmarks/_sae_train_worker.py), with the same batch (default 4096 rows), width (default
     d_sae 4096), architecture (gated; --arch relu|topk map to SAELens' standard|topk), Adam lr 1e-3,
     betas (0, 0.99), the same fixed input scale (E||x|| = sqrt(d_in)), fp32 and the same torch
     thread count:
       ours fp32   : icl_circuits SAETrainer(param_dtype='float32').step(x)
       ours bf16   : the same with our default bf16 weight storage (math stays fp32)
       SAELens     : sae_lens SAETrainer.step(x) (training_forward_pass + backward + grad clip +
                     Adam + lr scheduler), driven directly on the rows, i.e. fit()'s loop body minus
                     wandb/evals/checkpoints; SAELens runs from its own venv
                     (benchmarks/.venv-saelens, created by --setup-saelens) so nothing is shared.
  tokens/s  = batch / median step time over --steps timed steps, after --warmup untimed steps.
  peak RSS  = the worker's high-water RSS during the training loop (VmHWM, reset just before the
              first step via /proc/self/clear_refs; it includes torch, imports and the rows in
              memory); 'loop +MiB' = that peak minus the RSS just before the first step, i.e. what
              the training loop itself adds (params, Adam state, activations, gradients).
              (ru_maxrss is not used: Linux carries it over from the parent across fork+exec.)

Usage:
  python benchmarks/bench_sae_training.py                       # real activations, gated
  python benchmarks/bench_sae_training.py --synthetic --rows 8192 --d-sae 1024 --batch 1024 --steps 5
  python benchmarks/bench_sae_training.py --setup-saelens       # create the SAELens venv first
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_sae_train_worker.py"
SAELENS_VENV = HERE / ".venv-saelens"
SAELENS_ARCH = {"gated": "gated", "relu": "standard", "topk": "topk"}


def setup_saelens(venv: Path) -> None:
    """Create the SAELens venv with torch pinned to this venv's version (a CPU wheel)."""
    torch_pin = torch.__version__.split("+")[0]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={torch_pin}\n")  # pip must not swap torch for a CUDA build
    subprocess.run([str(venv / "bin" / "pip"), "install", "-c", f.name, f"torch=={torch_pin}", "sae-lens"], check=True)


def harvest(args: argparse.Namespace) -> tuple[torch.Tensor, str, float]:
    """[rows, d_model] fp32 activation rows, a description, and the seconds it took."""
    t = time.perf_counter()
    if args.synthetic:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.rows, args.d_in, generator=gen) * 0.3 + torch.randn(args.d_in, generator=gen)
        x = x * (args.synthetic_norm / x.norm(dim=-1, keepdim=True).mean())  # mean row norm = synthetic_norm
        desc = f"synthetic N(mu, 0.3^2) rows, d_in {args.d_in}, mean norm {args.synthetic_norm:g}"
        return x, desc, time.perf_counter() - t
    from icl_circuits.corpus import from_spec
    from icl_circuits.loading import load_model
    from icl_circuits.sae.activations import ActivationStore

    lm = load_model(args.model)
    docs = from_spec(args.corpus, lm, progress=False)
    # a shuffle buffer just big enough for the rows asked for, so one refill reads all of them
    buffer_batches = -(-args.rows // (16 * 127))
    store = ActivationStore(lm, [args.site], docs, seq_len=128, batch_size=16, buffer_batches=buffer_batches, seed=0)
    parts = [store.next(args.rows)[store.sites[0]]]  # [rows, d_model]
    x = torch.cat(parts)[: args.rows].contiguous()
    if x.shape[0] < args.rows:
        print(f"note: the corpus yielded only {x.shape[0]} rows (asked for {args.rows})")
    desc = f"{x.shape[0]} rows of {args.site} of {args.model}, corpus {args.corpus} ({store.forwards} forwards)"
    return x, desc, time.perf_counter() - t


def run_worker(python: str, impl: str, data: Path, args: argparse.Namespace, param_dtype: str = "float32") -> dict:
    cmd = [python, str(WORKER), "--impl", impl, "--data", str(data), "--arch", args.arch, "--d-sae", str(args.d_sae),
           "--batch", str(args.batch), "--k", str(args.k), "--param-dtype", param_dtype, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} worker failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--corpus", default="generated:512+python-docs")
    ap.add_argument("--site", default="resid_pre.12")
    ap.add_argument("--rows", type=int, default=65536, help="activation rows harvested once and reused")
    ap.add_argument("--synthetic", action="store_true", help="random rows instead of model activations")
    ap.add_argument("--synthetic-norm", type=float, default=1.07e4,
                    help="mean row norm of --synthetic data (gemma-3-270m resid_pre.12: ~1.07e4)")
    ap.add_argument("--d-in", type=int, default=640, help="row width of --synthetic data (gemma-3-270m: 640)")
    ap.add_argument("--arch", default="gated", choices=["gated", "relu", "topk"])
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096, help="rows (tokens) per optimiser step")
    ap.add_argument("--k", type=int, default=32, help="topk only")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--saelens-python", default=str(SAELENS_VENV / "bin" / "python"))
    ap.add_argument("--no-bf16", action="store_true", help="skip the 'ours with bf16 weights' run")
    ap.add_argument("--setup-saelens", action="store_true", help="create benchmarks/.venv-saelens and exit")
    args = ap.parse_args()
    if args.setup_saelens:
        setup_saelens(SAELENS_VENV)
        return
    torch.set_num_threads(args.threads)

    acts, desc, t_harvest = harvest(args)
    print(f"activations: {desc}; harvested in {t_harvest:.1f} s; mean row norm {acts.norm(dim=-1).mean():.1f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sae_") as tmp:
        from safetensors.torch import save_file

        data = Path(tmp) / "acts.safetensors"
        save_file({"acts": acts.float().contiguous()}, str(data))
        del acts

        runs = [("ours fp32", sys.executable, "ours", "float32")]
        if not args.no_bf16:
            runs.append(("ours bf16 weights", sys.executable, "ours", "bfloat16"))
        saelens_ok = Path(args.saelens_python).exists()
        if saelens_ok:
            runs.append(("SAELens fp32", args.saelens_python, "saelens", "float32"))
        else:
            print(f"!! SAELens not available: {args.saelens_python} does not exist "
                  "(run with --setup-saelens to create it); timing ours only")  # fmt: skip
        for name, python, impl, pdt in runs:
            try:
                r = run_worker(python, impl, data, args, pdt)
            except RuntimeError as e:
                print(f"!! {name}: could not run: {e}")
                if impl == "saelens":
                    saelens_ok = False
                continue
            r["name"] = name
            if not r.get("peak_reset", True):
                print(f"  note: {name} could not reset VmHWM; its peak RSS includes loading and imports")
            rows.append(r)
            print(f"  {name}: {r['desc']}; torch {r['torch']}, loss {r['losses'][0]:.4g} -> {r['losses'][1]:.4g}")

    if not rows:
        raise SystemExit("no implementation ran")
    print()
    print(f"median over {args.steps} steps after {args.warmup} warm-up steps, {args.threads} threads, "
          f"d_in {rows[0]['d_in']}, {rows[0]['rows']} rows reused cyclically")  # fmt: skip
    hdr = (f"{'implementation':<20} {'arch':<8} {'d_sae':>6} {'batch':>6} {'ms/step':>9} {'tokens/s':>10} "
           f"{'peak RSS MiB':>13} {'loop +MiB':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        r["ms"] = statistics.median(r["step_times"]) * 1000
        r["tps"] = r["batch"] / (r["ms"] / 1000)
        r["loop"] = r["peak_rss_mib"] - r["rss_loop_start_mib"]
        arch = r["arch"] if r["impl"] == "ours" else SAELENS_ARCH[r["arch"]]
        print(f"{r['name']:<20} {arch:<8} {r['d_sae']:>6} {r['batch']:>6} {r['ms']:>9.1f} {r['tps']:>10.0f} "
              f"{r['peak_rss_mib']:>13.0f} {r['loop']:>10.0f}")  # fmt: skip
    ref = next((r for r in rows if r["impl"] == "saelens"), None)
    if ref is None:
        print("\nno SAELens numbers: ratios ours/SAELens not available")
        return
    print("\nratios ours / SAELens (tokens/s: >1 = ours faster; memory: <1 = ours smaller)")
    for r in rows:
        if r is ref:
            continue
        print(f"  {r['name']:<20} tokens/s {r['tps'] / ref['tps']:5.2f}x   "
              f"peak RSS {r['peak_rss_mib'] / ref['peak_rss_mib']:5.2f}x   loop +MiB {r['loop'] / ref['loop']:5.2f}x")
    print("\nremaining differences:")
    print("  * SAELens clips the global grad norm to 1.0 every step and steps an lr scheduler (constant);")
    print("    ours does neither.")
    print("  * ours also tracks dead features (fire buffer), computes L0/FVE/loss terms with .item() each step;")
    print("    SAELens tracks firing counts. Neither has dead features this early, so ghost grads / aux-k are idle.")
    if args.arch == "gated":
        print("  * gated aux loss: ours detaches W_dec/b_dec in the gate-path reconstruction, SAELens does not.")
    if args.arch == "topk":
        print("  * topk: SAELens ranks latents scaled by decoder norm (rescale_acts_by_decoder_norm) and has an")
        print("    aux-k loss for dead latents (idle here); ours ranks raw latents and uses ghost grads (idle here).")
    print("  * init differs (ours orthogonal W_enc, SAELens kaiming W_dec scaled to norm 0.1); speed is unaffected.")
    print("  * peak RSS includes each process's imports: SAELens imports transformer_lens, transformers, etc.")


if __name__ == "__main__":
    main()
