"""Command line: a thin layer over the Python API.

    icl-circuits tasks
    icl-circuits task-vectors --model gemma-3-270m --tasks all [--layers 0-17] [--out runs/tv]
    icl-circuits sae train --model gemma-3-270m --saes resid:12,attn:12,transcoder:12 --corpus generated:2048 --out runs/saes
    icl-circuits sae eval --model gemma-3-270m --sae runs/saes/saes/resid_12 --corpus generated:2048
    torchrun --nproc_per_node 2 -m icl_circuits.cli sae train ...   (SAEs spread over ranks)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'all', '12', '2-9', '1,4,6-8' -> sorted layer list, checked against the model."""
    if spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        try:
            layers.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise SystemExit(f"error: bad --layers {spec!r}; use e.g. 'all', '12', '2-9' or '1,4,6-8'") from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise SystemExit(f"error: layers {sorted(bad)} outside 0..{n_layers - 1}")
    return sorted(layers)


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import list_tasks, load_task

    for name in list_tasks():
        task = load_task(name)
        x, y = task.pairs[0]
        print(f"{name:30s} {len(task):4d} pairs   e.g. {x} -> {y}")
    return 0


def cmd_task_vectors(args: argparse.Namespace) -> int:
    import torch

    from .loading import load_model
    from .sweep import run_layer_sweep
    from .task_vectors import TaskVectorConfig
    from .tasks import load_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_tasks(args.tasks)  # fail on a bad task name before the slow model load
    lm = load_model(args.model)
    layers = parse_layers(args.layers, lm.n_layers)
    cfg = TaskVectorConfig(
        n_prompts=args.n_prompts, n_shots=args.n_shots, arrows=args.arrows, n_eval=args.n_eval,
        n_score_tokens=args.n_score_tokens, seed=args.seed,
    )  # fmt: skip
    result = run_layer_sweep(lm, tasks, layers, cfg, args.out, progress=not args.quiet)
    print(f"\n{'task':30s} best layer  rel. loss decrease  ICL acc  0-shot acc  steered acc")
    for b in result.best:
        print(
            f"{b['task']:30s} {b['best_layer']:10d}  {b['relative_loss_decrease']:17.3f}  "
            f"{b['icl_accuracy']:7.2f}  {b['zero_shot_accuracy']:10.2f}  {b['steered_accuracy']:11.2f}"
        )
    print("\nwrote:", *[str(p) for p in result.files], sep="\n  ")
    return 0


def _print_eval(results: list) -> None:
    print(f"\n{'SAE site':16s} {'tokens':>7s} {'L0':>7s} {'FVE':>6s} {'dead':>6s} {'CE clean':>8s} {'CE SAE':>8s} {'CE zero':>8s} {'CE rec.':>7s}")
    for r in results:
        print(
            f"{r.site:16s} {r.n_tokens:7d} {r.l0:7.1f} {r.fve:6.3f} {r.dead_fraction:6.3f} "
            f"{r.ce_clean:8.3f} {r.ce_spliced:8.3f} {r.ce_zero:8.3f} {r.ce_loss_recovered:7.3f}"
        )


def _eval_batches(lm, docs, n_docs: int, seq_len: int):  # type: ignore[no-untyped-def]
    from .sae.activations import held_out_batches

    batches = held_out_batches(lm.tokenizer, docs, n_docs, seq_len=seq_len, batch_size=8)
    if not batches:
        raise ValueError(f"no held-out evaluation tokens in the first {n_docs} documents")
    return batches


def _kv_floats(items: list[str] | None) -> dict[str, float] | None:
    """['transcoder=4', 'attn=20'] -> {'transcoder': 4.0, 'attn': 20.0}"""
    if not items:
        return None
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise SystemExit(f"error: expected KIND=NUMBER, got {item!r}") from None
    return out


def cmd_sae_train(args: argparse.Namespace) -> int:
    import json

    import torch

    from .corpus import from_spec
    from .loading import load_model
    from .plots import plot_training_curves
    from .sae.evaluation import evaluate_saes
    from .sae.training import SAESpec, TrainConfig, init_distributed_from_env, train_saes
    from .storage import write_json

    specs = [s for s in args.saes.split(",") if s]
    for s in specs:
        SAESpec.parse(s)  # fail on a bad spec before the slow model load
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = init_distributed_from_env()
    lm = load_model(args.model)
    docs = from_spec(args.corpus, lm, progress=not args.quiet)
    cfg = TrainConfig(
        specs=specs, arch=args.arch, d_sae=args.d_sae, n_tokens=args.tokens, batch_tokens=args.batch_tokens,
        seq_len=args.seq_len, l1_coeff=args.l1, k=args.k, lr=args.lr, param_dtype=args.param_dtype,
        dead_window=args.dead_window, dead_steps=args.dead_steps, checkpoint_every=args.checkpoint_every,
        b_dec_init=args.b_dec_init, norm_centered=args.norm_centered, l1_by_kind=_kv_floats(args.l1_kind),
        skip_docs=args.eval_docs, seed=args.seed,
    )  # fmt: skip
    saes = train_saes(lm, docs, cfg, args.out, progress=not args.quiet)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        if dist.get_rank() != 0:
            return 0
        from .sae.formats import load_sae

        saes = {SAESpec.parse(s).name: load_sae(args.out / "saes" / SAESpec.parse(s).name) for s in specs}
    records = [json.loads(l) for l in (args.out / "metrics.jsonl").read_text().splitlines()] if (args.out / "metrics.jsonl").is_file() else []
    if records:
        plot_training_curves(records, args.out / "training_curves")
    if args.eval_docs and not args.no_eval:
        results = evaluate_saes(lm, list(saes.values()), _eval_batches(lm, docs, args.eval_docs, args.seq_len), progress=not args.quiet)
        write_json(args.out / "eval.json", [r.to_dict() for r in results])
        _print_eval(results)
    print(f"\nSAEs in {args.out / 'saes'} (ours) and {args.out / 'saelens'} (SAELens format)")
    return 0


def cmd_sae_eval(args: argparse.Namespace) -> int:
    from .corpus import from_spec
    from .loading import load_model
    from .sae.evaluation import evaluate_saes
    from .sae.formats import load_any
    from .storage import write_json

    lm = load_model(args.model)
    saes = [load_any(p) for p in args.sae or []]
    if args.starter:
        from .sae.suite import STARTER_SPECS, starter_sae

        saes += [starter_sae(lm, spec, progress=not args.quiet) for spec in STARTER_SPECS]
    if not saes:
        raise ValueError("nothing to evaluate: pass --sae PATH (repeatable) or --starter")
    docs = from_spec(args.corpus, lm, progress=not args.quiet)
    results = evaluate_saes(lm, saes, _eval_batches(lm, docs, args.eval_docs, args.seq_len), progress=not args.quiet)
    _print_eval(results)
    if args.out:
        write_json(args.out, [r.to_dict() for r in results])
        print(f"\nwrote {args.out}")
    return 0


def cmd_sae_export(args: argparse.Namespace) -> int:
    from .sae.suite import export_suite

    for path in export_suite(args.run, args.dest, corpus=args.corpus):
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"{path}  ({size:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icl-circuits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"icl-circuits {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("tasks", help="list the built-in ICL tasks")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("task-vectors", help="task-vector layer sweep: steer zero-shot prompts with each layer's TV")
    s.add_argument("--model", default="gemma-3-270m", help="'gemma-3-270m' (bundled), a .gguf file, a folder or a hub id")
    s.add_argument("--tasks", default="all", help="'all', or comma-separated task names / task files")
    s.add_argument("--layers", default="all", help="'all', '12', '2-9', '1,4,6-8'")
    s.add_argument("--out", type=Path, default=Path("runs/task_vectors"), help="run directory (resumes if present)")
    s.add_argument("--n-prompts", type=int, default=16, help="n-shot prompts averaged into each TV")
    s.add_argument("--n-shots", type=int, default=16)
    s.add_argument("--arrows", choices=["all", "demos", "last"], default="all", help="which arrows the TV averages")
    s.add_argument("--n-eval", type=int, default=32, help="zero-shot prompts scored per task")
    s.add_argument("--n-score-tokens", type=int, default=1, help="first n output tokens scored")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_task_vectors)

    sae = sub.add_parser("sae", help="train and evaluate SAEs / transcoders").add_subparsers(dest="sae_command", required=True)
    corpus_help = "'generated:N' (model-sampled, offline), 'hf:NAME[:CONFIG]' (online), or .txt/.jsonl paths/globs"
    s = sae.add_parser("train", help="train SAEs on one activation stream (resumes if --out holds a checkpoint)")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--saes", default="resid:12", help="comma-separated kind:layer, kind in resid|attn|transcoder")
    s.add_argument("--corpus", default="generated:2048", help=corpus_help)
    s.add_argument("--out", type=Path, default=Path("runs/saes"))
    s.add_argument("--arch", choices=["gated", "relu", "topk"], default="gated")
    s.add_argument("--d-sae", type=int, default=4096)
    s.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (epochs repeat a short corpus)")
    s.add_argument("--batch-tokens", type=int, default=1024)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--l1", type=float, default=None, help="sparsity coefficient (default: per arch)")
    s.add_argument("--l1-kind", action="append", metavar="KIND=L1", help="per-kind sparsity, e.g. transcoder=4 (repeatable)")
    s.add_argument("--k", type=int, default=32, help="TopK only")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--param-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    s.add_argument("--dead-window", type=int, default=1000, help="batches in the dead-feature density window")
    s.add_argument("--dead-steps", type=int, default=2000, help="steps without firing that make a feature dead")
    s.add_argument("--b-dec-init", choices=["zeros", "mean"], default="zeros",
                   help="decoder-bias init: 'zeros' (paper) or the data mean (better for short runs)")
    s.add_argument("--norm-centered", action="store_true",
                   help="normalise by the norm around the mean (for residual streams with a massive constant dim)")
    s.add_argument("--checkpoint-every", type=int, default=200)
    s.add_argument("--eval-docs", type=int, default=64, help="first N corpus documents: held out, evaluated after training")
    s.add_argument("--no-eval", action="store_true", help="skip the evaluation after training (run `sae eval` later)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sae_train)

    s = sae.add_parser("eval", help="L0, FVE, dead fraction, CE loss recovered on held-out tokens")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--sae", action="append", help="an SAE folder/file in any supported format (repeatable)")
    s.add_argument("--starter", action="store_true", help="the starter suite for --model (trained first if missing)")
    s.add_argument("--corpus", default="generated:2048", help=corpus_help)
    s.add_argument("--eval-docs", type=int, default=64)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sae_eval)

    s = sae.add_parser("export", help="ship a training run: bf16 weights + a model card per SAE")
    s.add_argument("run", type=Path, help="the --out of `sae train`")
    s.add_argument("dest", type=Path, help="e.g. src/icl_circuits/data/saes/gemma-3-270m")
    s.add_argument("--corpus", default="generated:512+python-docs", help="corpus spec named in the model cards")
    s.set_defaults(func=cmd_sae_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
