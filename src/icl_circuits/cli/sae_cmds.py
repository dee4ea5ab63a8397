"""`icl-circuits sae train|harvest|compare|eval|export`: train, cache, compare, evaluate and ship SAEs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from icl_circuits.cli.common import add_sae_option, floats, kv_floats, kv_trainer, load_lm, run_options, sae_refs, words

if TYPE_CHECKING:
    from icl_circuits.sae.training import SAESpec

CORPUS_HELP = "'generated:N' (model-sampled, offline), 'hf:NAME[:CONFIG]' (online), or .txt/.jsonl paths/globs"


def print_eval(results: list) -> None:
    print(f"\n{'SAE site':16s} {'tokens':>7s} {'L0':>7s} {'FVE':>6s} {'dead':>6s} {'CE clean':>8s} {'CE SAE':>8s} {'CE zero':>8s} {'CE rec.':>7s}")
    for r in results:
        r = r if isinstance(r, dict) else r.to_dict()
        print(
            f"{r['site']:16s} {r['n_tokens']:7d} {r['l0']:7.1f} {r['fve']:6.3f} {r['dead_fraction']:6.3f} "
            f"{r['ce_clean']:8.3f} {r['ce_spliced']:8.3f} {r['ce_zero']:8.3f} {r['ce_loss_recovered']:7.3f}"
        )


def eval_batches(lm, docs, n_docs: int, seq_len: int):  # type: ignore[no-untyped-def]
    from icl_circuits.sae.activations import held_out_batches

    batches = held_out_batches(lm.tokenizer, docs, n_docs, seq_len=seq_len, batch_size=8)
    if not batches:
        raise ValueError(f"no held-out evaluation tokens in the first {n_docs} documents")
    return batches


def train_specs(saes: str, option: str = "--saes") -> list[SAESpec]:
    """The SAEs to train or harvest for: kind and layer only ('resid:12,attn:12'), no paths."""
    from icl_circuits.sae.training import SAESpec  # noqa: F811 - at run time (torch), the annotation's is for type checkers

    specs = []
    for ref in sae_refs(saes, option):
        if not ref.is_starter:
            raise ValueError(f"{option} {ref.spec}: name the SAE to train by kind and layer, e.g. resid:12")
        specs.append(SAESpec(ref.kind, ref.layer))
    return specs


def cmd_sae_train(args: argparse.Namespace) -> int:
    import json

    from icl_circuits.data.corpus import from_spec
    from icl_circuits.viz.plots import plot_training_curves
    from icl_circuits.sae.evaluation import evaluate_saes
    from icl_circuits.sae.training import TrainConfig, init_distributed_from_env, train_from_cache, train_saes
    from icl_circuits.core.storage import write_json

    specs = train_specs(args.saes)  # fail on a bad spec before the slow model load
    distributed = init_distributed_from_env()
    from icl_circuits.sae.cache_reader import HarvestRun

    run = HarvestRun(args.cache) if args.cache is not None else None
    lm = load_lm(args, run.model if run else None)
    docs = None if run else from_spec(args.corpus, lm, progress=not args.quiet)
    cfg = TrainConfig(
        specs=[s.ref.spec for s in specs], arch=args.arch, d_sae=args.d_sae, n_tokens=args.tokens, batch_tokens=args.batch_tokens,
        seq_len=args.seq_len, l1_coeff=args.l1, k=args.k, lr=args.lr, param_dtype=args.param_dtype,
        dead_window=args.dead_window, dead_steps=args.dead_steps, checkpoint_every=args.checkpoint_every,
        b_dec_init=args.b_dec_init, norm_centered=args.norm_centered, l1_by_kind=kv_floats(args.l1_kind),
        skip_docs=0 if run else args.eval_docs, seed=args.seed, trainer=kv_trainer(args.trainer),
    )  # fmt: skip
    if run:
        saes = train_from_cache(run.train, cfg, args.out, progress=not args.quiet, device=lm.device, ddp=args.ddp)
    else:
        saes = train_saes(lm, docs, cfg, args.out, progress=not args.quiet, ddp=args.ddp)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        if dist.get_rank() != 0:
            return 0
        from icl_circuits.sae.formats import load_sae

        saes = {s.name: load_sae(args.out / "saes" / s.name).to(lm.device) for s in specs}
    metrics = args.out / "metrics.jsonl"
    records = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
    if records:
        plot_training_curves(records, args.out / "training_curves")
    if (run or args.eval_docs) and not args.no_eval:
        if run:
            held = run.held_out_docs(lm)
            batches = eval_batches(lm, held, min(64, len(held)), args.seq_len)
        else:
            batches = eval_batches(lm, docs, args.eval_docs, args.seq_len)
        results = evaluate_saes(lm, list(saes.values()), batches, progress=not args.quiet)
        write_json(args.out / "eval.json", [r.to_dict() for r in results])
        print_eval(results)
    print(f"\nSAEs in {args.out / 'saes'} (ours) and {args.out / 'saelens'} (SAELens format)")
    from icl_circuits.viz.report import write_report

    print(f"report: {write_report(args.out, 'SAE training')}")
    return 0


def cmd_sae_harvest(args: argparse.Namespace) -> int:
    from icl_circuits.data.corpus import harvest_docs, provenance
    from icl_circuits.core.loading import load_model
    from icl_circuits.sae.cache import harvest
    from icl_circuits.core.storage import write_json

    specs = train_specs(args.saes)
    sites = sorted({site for s in specs for site in (s.in_site, s.out_site)}, key=lambda s: s.order)
    lm = load_lm(args)
    for s in specs:
        if s.layer >= lm.n_layers:
            raise ValueError(f"--saes {s.kind}:{s.layer}: {lm.name!r} has layers 0..{lm.n_layers - 1}")
    train, held = harvest_docs(args.corpus, args.eval_docs, args.seed, lm, progress=not args.quiet)
    prov = provenance(args.corpus)
    write_json(args.out / "harvest.json", dict(model=lm.name, corpus=args.corpus, eval_docs=args.eval_docs, seed=args.seed,
                                                sites=[str(s) for s in sites], dtype=args.dtype))  # fmt: skip
    # held-out rows always come from a float32 forward: they are the reference every SAE is scored on
    exact = lm if args.dtype == "float32" else load_model(args.model, device=lm.device)
    for split, docs, n, model in (("eval", held, args.eval_tokens, exact), ("train", train, args.tokens, lm)):
        cache = harvest(model, sites, docs, args.out / split, n_tokens=n, seq_len=args.seq_len, provenance=prov,
                        progress=not args.quiet)  # fmt: skip
        print(f"{split}: {cache.n_rows:,} rows of {len(sites)} sites in {cache.path}")
    return 0


def cmd_sae_compare(args: argparse.Namespace) -> int:
    from icl_circuits.sae.cache_reader import HarvestRun
    from icl_circuits.experiments.sae_compare import CompareConfig, run_compare, winner

    specs = train_specs(args.sae, "--sae")
    if len(specs) != 1:
        raise ValueError(f"--sae {args.sae}: `sae compare` trains one SAE per recipe; name one, e.g. resid:12")
    run = HarvestRun(args.cache)
    if args.model is not None and args.model != run.model:  # the cached rows are that model's activations
        raise ValueError(f"--model {args.model}: the cache {args.cache} holds activations of {run.model!r}")
    penalties = {}
    for item in args.penalty or []:
        arch, _, values = item.partition("=")
        penalties[arch] = tuple(floats(values, f"--penalty {arch}"))
    cfg = CompareConfig(
        spec=specs[0].ref.spec, archs=tuple(words(args.archs)), l0_targets=tuple(int(x) for x in args.l0.split(",")),
        penalties=penalties, d_sae=args.d_sae, n_tokens=args.tokens, batch_tokens=args.batch_tokens, seed=args.seed,
    )  # fmt: skip
    cfg.runs()  # fail on a missing --penalty before the slow model load
    lm = load_lm(args, run.model)
    held = run.held_out_docs(lm)
    batches = eval_batches(lm, held, min(args.eval_ce_docs, len(held)), 128)
    rows = run_compare(lm, cfg, run.train, run.eval, batches, args.out, progress=not args.quiet)
    print(f"\n{'recipe':12s} {'L0':>5s} {'FVE':>6s} {'CE rec.':>7s} {'dead':>6s} {'tok/s':>7s} {'arrow':>6s} {'input':>6s} {'output':>6s}")
    for r in rows:
        print(f"{r['arch']:12s} {r['target_l0']:5d} {r['fve']:6.3f} {r['ce_loss_recovered']:7.3f} {r['dead_fraction']:6.3f} "
              f"{r['tokens_per_s']:7.0f} {r['icl_fve_arrow']:6.3f} {r['icl_fve_input']:6.3f} {r['icl_fve_output']:6.3f}")  # fmt: skip
    print(f"\nwinner by mean CE loss recovered: {winner(rows)}\ntable: {args.out / 'compare.csv'}  plot: {args.out / 'compare.png'}")
    return 0


def cmd_sae_eval(args: argparse.Namespace) -> int:
    from icl_circuits.data.corpus import from_spec
    from icl_circuits.sae.evaluation import evaluate_saes
    from icl_circuits.core.storage import write_json

    refs = sae_refs(args.sae)
    if args.starter:
        from icl_circuits.sae.registry import SAERef
        from icl_circuits.sae.suite import STARTER_SPECS

        refs += [SAERef.parse(spec) for spec in STARTER_SPECS]
    if not refs:
        raise ValueError("nothing to evaluate: pass --sae SPEC (a path or kind:layer; repeatable) or --starter")
    for ref in refs:
        ref.check_path()  # a missing local path fails before the slow model load
    from icl_circuits.sae.cache_reader import HarvestRun

    run = HarvestRun(args.cache) if args.cache is not None else None
    lm = load_lm(args, run.model if run else None)
    saes = [ref.resolve(lm, train_if_missing=True, progress=not args.quiet) for ref in refs]
    if run:  # held-out documents of the harvest (chosen by content hash), not the first --eval-docs
        held = run.held_out_docs(lm)
        batches = eval_batches(lm, held, min(args.eval_ce_docs, len(held)), args.seq_len)
    else:
        batches = eval_batches(lm, from_spec(args.corpus, lm, progress=not args.quiet), args.eval_docs, args.seq_len)
    results = [r.to_dict() for r in evaluate_saes(lm, saes, batches, progress=not args.quiet)]
    print_eval(results)
    if run:
        from icl_circuits.sae.evaluation import cache_stats

        extra = cache_stats(lm, saes, run.eval.path, run.train.path, dead_rows=args.dead_rows, progress=not args.quiet)
        for r, e in zip(results, extra):
            r.update(e)
        print(f"\n{'SAE site':16s} {'FVE (held-out rows)':>19s} {'dead over train rows':>20s} {'FVE arrow':>9s} {'input':>6s} {'output':>6s}")
        for r in results:
            print(f"{r['site']:16s} {r['rows_fve']:19.3f} {r['dead_fraction_train']:20.3f} {r['icl_fve_arrow']:9.3f} "
                  f"{r['icl_fve_input']:6.3f} {r['icl_fve_output']:6.3f}")  # fmt: skip
    if args.out:
        write_json(args.out, results)
        print(f"\nwrote {args.out}")
    return 0


def cmd_sae_export(args: argparse.Namespace) -> int:
    from icl_circuits.sae.suite import export_suite

    corpus, prov = args.corpus, None
    if args.cache is not None:  # the harvest names the corpus and where its text came from
        from icl_circuits.sae.cache_reader import HarvestRun

        run = HarvestRun(args.cache)
        corpus, prov = run.settings["corpus"], run.train.manifest.get("provenance")
    for path in export_suite(args.run, args.dest, corpus=corpus, provenance=prov, eval_path=args.eval):
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"{path}  ({size:.1f} MiB)")
    return 0


def add_sae_commands(sub: argparse._SubParsersAction) -> None:
    from icl_circuits.sae.suite import STARTER_CORPUS
    from icl_circuits.sae.trainers import ARCHS

    sae = sub.add_parser("sae", help="train and evaluate SAEs / transcoders").add_subparsers(dest="sae_command", required=True)
    s = sae.add_parser("train", help="train SAEs on one activation stream (resumes if --out holds a checkpoint)")
    add_sae_option(s, "resid:12", "SAEs to train: kind:layer, kind in resid|attn|transcoder (comma-separated / repeatable)")
    s.add_argument("--corpus", default="generated:2048", help=CORPUS_HELP)
    s.add_argument("--out", type=Path, default=Path("runs/saes"))
    s.add_argument("--cache", type=Path, default=None, help="train on a `sae harvest` folder instead of a live model stream")
    s.add_argument("--arch", choices=list(ARCHS), default="gated")
    s.add_argument("--trainer", action="append", metavar="NAME=VALUE", help="another TrainerConfig field, e.g. aux_k=256 (repeatable)")
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
    s.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun: train every SAE data-parallel (rows of each batch split over ranks); "
                        "--no-ddp: one SAE per rank. Default: data-parallel iff one SAE is given")  # fmt: skip
    run_options(s)
    s.set_defaults(func=cmd_sae_train)

    s = sae.add_parser("harvest", help="cache activations on disk once (bf16 shards, resumable) for many training runs")
    add_sae_option(s, "resid:12", "the SAEs the cache will feed (their input and output sites are stored)")
    s.add_argument("--corpus", default=STARTER_CORPUS, help=CORPUS_HELP)
    s.add_argument("--tokens", type=int, default=2_000_000, help="training rows to store")
    s.add_argument("--eval-docs", type=int, default=200, help="documents held out (by content hash) for evaluation")
    s.add_argument("--eval-tokens", type=int, default=100_000, help="rows of the held-out documents to store")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--out", type=Path, default=Path("runs/activations"))
    run_options(s, dtype="bfloat16", dtype_help="the model forward's dtype (held-out rows always come from a float32 forward)")
    s.set_defaults(func=cmd_sae_harvest)

    s = sae.add_parser("compare", help="every SAE recipe on the same cached rows at matched L0: FVE, CE loss recovered, ICL-prompt FVE")
    s.add_argument("--cache", type=Path, required=True, help="a `sae harvest` folder")
    s.add_argument("--sae", default="resid:12", metavar="SPEC", help="the SAE every recipe trains (kind:layer)")
    s.add_argument("--archs", default="topk,batchtopk,matryoshka,jumprelu,gated")
    s.add_argument("--l0", default="16,32,64", help="target L0s (k for TopK recipes)")
    s.add_argument("--penalty", action="append", metavar="ARCH=C1,C2,..",
                   help="sparsity coefficients of a penalty recipe (gated/relu: l1, jumprelu: l0); L0 is interpolated")
    s.add_argument("--d-sae", type=int, default=4096)
    s.add_argument("--tokens", type=int, default=300_000, help="training rows per run (same for every recipe)")
    s.add_argument("--batch-tokens", type=int, default=1024)
    s.add_argument("--eval-ce-docs", type=int, default=24, help="held-out documents for CE loss recovered")
    s.add_argument("--out", type=Path, default=Path("runs/sae_compare"))
    run_options(s, model=None, model_help="the harvested model (default: the one the --cache records; another is an error)")
    s.set_defaults(func=cmd_sae_compare)

    s = sae.add_parser("eval", help="L0, FVE, dead fraction, CE loss recovered on held-out tokens")
    s.add_argument("--sae", "--saes", action="append", metavar="SPEC",
                   help="an SAE: a folder/file in any supported format or kind:layer of the starter suite (repeatable, comma-separated)")
    s.add_argument("--starter", action="store_true", help="the starter suite for --model (trained first if missing)")
    s.add_argument("--corpus", default="generated:2048", help=CORPUS_HELP)
    s.add_argument("--eval-docs", type=int, default=64)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--cache", type=Path, default=None,
                   help="a `sae harvest` folder: its held-out documents and rows, dead latents over its training rows, and ICL-prompt FVE by token type")
    s.add_argument("--eval-ce-docs", type=int, default=24, help="with --cache: held-out documents for CE loss recovered")
    s.add_argument("--dead-rows", type=int, default=1_000_000, help="with --cache: training rows over which a silent latent counts as dead")
    s.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    run_options(s)
    s.set_defaults(func=cmd_sae_eval)

    s = sae.add_parser("export", help="ship a training run: bf16 weights + a model card per SAE")
    s.add_argument("run", type=Path, help="the --out of `sae train`")
    s.add_argument("dest", type=Path, nargs="?", default=None,
                   help="e.g. src/icl_circuits/data/saes/gemma-3-270m; omitted: the user cache, where starter SAEs the "
                        "package does not ship are found (e.g. layers 10-17 for `circuit --layers 10-17`)")  # fmt: skip
    s.add_argument("--corpus", default=STARTER_CORPUS, help="corpus spec named in the model cards")
    s.add_argument("--cache", type=Path, default=None, help="the `sae harvest` folder the run trained on (corpus and provenance)")
    s.add_argument("--eval", type=Path, default=None, help="results of `sae eval` for the model cards (default: RUN/eval.json)")
    s.set_defaults(func=cmd_sae_export)
