"""SAE training throughput and memory: our SAETrainer vs. SAELens's own trainer on the same activations.

What is measured
  1. N activation rows (default 65536 rows of resid_pre.12 of the bundled gemma-3-270m) are obtained
     ONCE and written to a temporary .safetensors file:
       default      harvested from the offline corpus 'generated:512+python-docs' by our ActivationStore;
       --cache DIR  read from an on-disk ActivationCache (icl_circuits.sae.cache), --site of it: the
                    first N rows of a shuffled epoch (seed 0) over its complete shards (bf16 -> fp32);
       --synthetic  random rows with a residual-like norm (no model needed).
  2. For each --arch (default: topk,batchtopk), each implementation then trains on exactly those
     rows, in its own fresh subprocess (benchmarks/_sae_train_worker.py), with the same batch
     (default 4096 rows), width (default d_sae 4096), k (default 32; batchtopk: mean per row), Adam
     lr 1e-3, betas (0, 0.99), the same fixed input scale (E||x|| = sqrt(d_in)), fp32 math and the
     same torch thread count:
       ours fp32           : icl_circuits SAETrainer(TrainerConfig(arch, param_dtype='float32')).step(x);
                             topk/batchtopk: AuxK on, ghost grads off, sparse decode
       ours bf16 weights   : the same with our default bf16 weight storage (math stays fp32)
       SAELens <arch> fp32 : sae_lens SAETrainer.step(x) on its TopKTrainingSAE / BatchTopKTrainingSAE
                             (GatedTrainingSAE / StandardTrainingSAE for gated / relu) at its defaults
                             (training_forward_pass incl. aux loss + backward + grad clip + Adam + lr
                             scheduler), driven directly on the rows, i.e. fit()'s loop body minus
                             wandb/evals/checkpoints. SAELens runs from its own venv (--saelens-python,
                             default benchmarks/.venv-saelens made by --setup-saelens).
       SAELens topk, sparse acts: the same with use_sparse_activations=True (its COO decode; needs
                             rescale_acts_by_decoder_norm=False on CPU); --no-saelens-sparse skips it.
  tokens/s  = batch / median step time over --steps timed steps, after --warmup untimed steps.
  peak RSS  = the worker's high-water RSS during the training loop (VmHWM, reset just before the
              first step via /proc/self/clear_refs; it includes torch, imports and the rows in
              memory); 'loop +MiB' = that peak minus the RSS just before the first step, i.e. what
              the training loop itself adds (params, Adam state, activations, gradients).
              (ru_maxrss is not used: Linux carries it over from the parent across fork+exec.)
  The table (markdown) gives, per arch, ours / SAELens's default trainer of that arch.

Usage:
  python benchmarks/bench_sae_training.py --saelens-python /tmp/saelens-venv/bin/python \
      --cache /work/runs/acts_v2/train --site resid_pre.12 --rows 65536      # real rows from a cache
  python benchmarks/bench_sae_training.py                                   # harvest the rows itself
  python benchmarks/bench_sae_training.py --synthetic --rows 8192 --d-sae 1024 --batch 1024 --steps 5
  python benchmarks/bench_sae_training.py --arch gated,relu                 # the L1 recipes
  python benchmarks/bench_sae_training.py --setup-saelens                   # create the SAELens venv first
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
SAELENS_ARCH = {"topk": "topk", "batchtopk": "batchtopk", "gated": "gated", "relu": "standard"}


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
    if args.cache:
        from icl_circuits.sae.cache_reader import ActivationCache, manifest_summary

        cache = ActivationCache(args.cache)
        cache.check(cache.manifest["model"], cache.d_model, [args.site])
        if cache.n_rows == 0:
            raise SystemExit(f"{args.cache}: the cache has no complete shard yet")
        # the first --rows rows of one shuffled epoch (seed 0) over the cache's complete shards
        batch = next(cache.batches([args.site], batch_rows=args.rows, seed=0, buffer_shards=8))
        x = next(iter(batch.values())).float().contiguous()  # [rows, d_model]
        if x.shape[0] < args.rows:
            print(f"note: the cache holds only {x.shape[0]} rows (asked for {args.rows})")
        desc = f"{x.shape[0]} rows of {args.site} from the cache {args.cache} ({manifest_summary(args.cache)})"
        return x, desc, time.perf_counter() - t
    from icl_circuits.data.corpus import from_spec
    from icl_circuits.core.loading import load_model
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


def run_worker(python: str, impl: str, data: Path, arch: str, args: argparse.Namespace, param_dtype: str = "float32",
               saelens_sparse: bool = False) -> dict:  # fmt: skip
    cmd = [python, str(WORKER), "--impl", impl, "--data", str(data), "--arch", arch, "--d-sae", str(args.d_sae),
           "--batch", str(args.batch), "--k", str(args.k), "--param-dtype", param_dtype, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
    if saelens_sparse:
        cmd.append("--saelens-sparse")
    if args.dead_window is not None:
        cmd += ["--dead-window", str(args.dead_window)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} worker failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "n/a"


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """One markdown table over all archs; ratios against SAELens's default trainer of the same arch."""
    print(f"median over {args.steps} steps after {args.warmup} warm-up steps, {args.threads} thread(s), "
          f"d_in {rows[0]['d_in']}, d_sae {args.d_sae}, batch {args.batch}, k {args.k}, "
          f"{rows[0]['rows']} rows reused cyclically\n")  # fmt: skip
    print("| arch | implementation | ms/step | tokens/s | peak RSS MiB | loop +MiB | dead frac. (end) "
          "| tokens/s vs SAELens | peak RSS vs SAELens | loop +MiB vs SAELens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["ms"] = statistics.median(r["step_times"]) * 1000
        r["tps"] = r["batch"] / (r["ms"] / 1000)
        r["loop"] = r["peak_rss_mib"] - r["rss_loop_start_mib"]
    summary = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        group = [r for r in rows if r["arch"] == arch]
        ref = next((r for r in group if r["impl"] == "saelens" and not r.get("saelens_sparse")), None)
        for r in group:
            if ref is None:
                rt = rm = rl = "n/a"
            elif r is ref:
                rt = rm = rl = "1"
            else:
                rt, rm = _ratio(r["tps"], ref["tps"]), _ratio(r["peak_rss_mib"], ref["peak_rss_mib"])
                rl = _ratio(r["loop"], ref["loop"])
                if r["impl"] == "ours":
                    rt = f"**{rt}**"
            dead = r.get("dead_fraction", float("nan"))
            print(f"| {arch} | {r['name']} | {r['ms']:.1f} | {r['tps']:.0f} | {r['peak_rss_mib']:.0f} "
                  f"| {r['loop']:.0f} | {dead:.3f} | {rt} | {rm} | {rl} |")  # fmt: skip
        sl = [r for r in group if r["impl"] == "saelens"]
        ours = [r for r in group if r["impl"] == "ours"]
        if sl and ours:
            best_sl = max(sl, key=lambda r: r["tps"])
            best_ours = max(ours, key=lambda r: r["tps"])
            summary.append(f"  {arch}: fastest ours ({best_ours['name']}) vs fastest SAELens ({best_sl['name']}): "
                           f"tokens/s {best_ours['tps'] / best_sl['tps']:.2f}x, peak RSS "
                           f"{best_ours['peak_rss_mib'] / best_sl['peak_rss_mib']:.2f}x "
                           f"(aim: >= 2x tokens/s at <= 1x peak RSS)")  # fmt: skip
    if summary:
        print("\n" + "\n".join(summary))
    else:
        print("\nno SAELens numbers: ratios ours/SAELens not available")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--corpus", default="generated:512+python-docs")
    ap.add_argument("--site", default="resid_pre.12")
    ap.add_argument("--rows", type=int, default=65536, help="activation rows harvested (or read) once and reused")
    ap.add_argument("--cache", default=None,
                    help="read the rows of --site from this ActivationCache folder instead of harvesting")
    ap.add_argument("--synthetic", action="store_true", help="random rows instead of model activations")
    ap.add_argument("--synthetic-norm", type=float, default=1.07e4,
                    help="mean row norm of --synthetic data (gemma-3-270m resid_pre.12: ~1.07e4)")
    ap.add_argument("--d-in", type=int, default=640, help="row width of --synthetic data (gemma-3-270m: 640)")
    ap.add_argument("--arch", default="topk,batchtopk",
                    help=f"comma-separated, of {','.join(SAELENS_ARCH)}; all run on the same rows in one table")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096, help="rows (tokens) per optimiser step")
    ap.add_argument("--k", type=int, default=32, help="topk: active latents per row; batchtopk: mean per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dead-window", type=int, default=None,
                    help="both count a latent dead after this many steps without firing (exercises AuxK / "
                         "SAELens's aux loss in a short run); default: each library's own (ours 2000, SAELens 1000)")
    ap.add_argument("--saelens-python", default=str(SAELENS_VENV / "bin" / "python"),
                    help="python of a venv with sae-lens (default: the one --setup-saelens makes)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the 'ours with bf16 weights' run")
    ap.add_argument("--no-saelens-sparse", action="store_true",
                    help="skip the extra SAELens topk run with use_sparse_activations=True")
    ap.add_argument("--setup-saelens", action="store_true", help="create benchmarks/.venv-saelens and exit")
    args = ap.parse_args()
    if args.setup_saelens:
        setup_saelens(SAELENS_VENV)
        return
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in SAELENS_ARCH]
    if bad or not archs:
        ap.error(f"--arch: unknown {bad}; choose from {list(SAELENS_ARCH)}")
    torch.set_num_threads(args.threads)

    acts, desc, t_harvest = harvest(args)
    print(f"activations: {desc}; read in {t_harvest:.1f} s; mean row norm {acts.norm(dim=-1).mean():.1f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sae_") as tmp:
        from safetensors.torch import save_file

        data = Path(tmp) / "acts.safetensors"
        save_file({"acts": acts.float().contiguous()}, str(data))
        del acts

        saelens_ok = Path(args.saelens_python).exists()
        if not saelens_ok:
            print(f"!! SAELens not available: {args.saelens_python} does not exist "
                  "(run with --setup-saelens, or pass --saelens-python); timing ours only")  # fmt: skip
        for arch in archs:
            runs = [("ours fp32", sys.executable, "ours", "float32", False)]
            if not args.no_bf16:
                runs.append(("ours bf16 weights (default)", sys.executable, "ours", "bfloat16", False))
            if saelens_ok:
                runs.append((f"SAELens {SAELENS_ARCH[arch]} fp32", args.saelens_python, "saelens", "float32", False))
                if arch == "topk" and not args.no_saelens_sparse:
                    runs.append(("SAELens topk fp32, sparse acts", args.saelens_python, "saelens", "float32", True))
            for name, python, impl, pdt, sparse in runs:
                try:
                    r = run_worker(python, impl, data, arch, args, pdt, sparse)
                except RuntimeError as e:
                    print(f"!! {arch} / {name}: could not run: {e}")
                    continue
                r["name"] = name
                if not r.get("peak_reset", True):
                    print(f"  note: {name} could not reset VmHWM; its peak RSS includes loading and imports")
                rows.append(r)
                print(f"  {arch} / {name}: {r['desc']}; torch {r['torch']}, "
                      f"loss {r['losses'][0]:.4g} -> {r['losses'][1]:.4g}")  # fmt: skip

    if not rows:
        raise SystemExit("no implementation ran")
    print()
    print_table(rows, args)
    print("\nremaining differences:")
    print("  * SAELens clips the global grad norm to 1.0 every step and steps an lr scheduler (constant);")
    print("    ours does neither.")
    print("  * ours tracks dead features (fire buffer) and computes L0/FVE/loss terms with .item() each step;")
    print("    SAELens tracks firing counts. 'dead frac.' is each trainer's own dead mask after the last step;")
    print("    while it is 0 the dead-latent losses (ghost grads / AuxK / SAELens aux loss) cost nothing")
    print("    (--dead-window makes both count latents dead sooner).")
    if "gated" in archs:
        print("  * gated aux loss: ours detaches W_dec/b_dec in the gate-path reconstruction, SAELens does not.")
    if any(a in ("topk", "batchtopk") for a in archs):
        print("  * topk/batchtopk: SAELens (default) ranks latents scaled by the decoder row norm")
        print("    (rescale_acts_by_decoder_norm) and decodes densely (scatter into [batch, d_sae], then @ W_dec);")
        print("    its 'sparse acts' variant (topk only) decodes a COO tensor and must turn the rescaling off")
        print("    (with it, backward fails on CPU). Ours ranks raw latents and decodes only the active rows")
        print("    (icl_circuits.sae.sparse). Aux losses: ours AuxK, aux_k = d_in/2, coeff 1/32 with Gao et al.'s")
        print("    normalisation, dead after 2000 steps; SAELens aux loss, k_aux = d_in/2, coeff 1, dead after 1000.")
        print("  * batchtopk: SAELens takes one flat top-k over batch*d_sae; ours a per-row candidate top-k, then")
        print("    the batch top-k among those (exact, with a flat fallback).")
    print("  * init differs (ours orthogonal W_enc, SAELens kaiming W_dec scaled to norm 0.1); speed is unaffected.")
    print("  * peak RSS includes each process's imports: SAELens imports transformer_lens, transformers, etc.")


if __name__ == "__main__":
    main()
