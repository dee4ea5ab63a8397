"""`icl-circuits examples` and `dashboards`: what SAE latents fire on, precomputed for the viewer."""

from __future__ import annotations

import argparse
from pathlib import Path

from icl_circuits.cli.common import add_sae_option, load_lm, run_options, sae_refs

SAES_HELP = "SAEs: kind:layer (starter suite), NAME=PATH or a PATH in any supported format (comma-separated / repeatable)"


def load_saes(lm, specs: str, progress: bool) -> dict:  # type: ignore[no-untyped-def]
    """'resid:12,attn:11' (starter suite), 'NAME=PATH' or 'PATH' items -> {store name: SAE on lm's device}.

    Store names are what they always were: 'resid_12' for resid:12, NAME as written for NAME=PATH."""
    refs = sae_refs(specs, "--saes")
    if not refs:
        raise ValueError("no SAEs given: use e.g. --saes resid:12 or --saes mine=path/to/sae")
    for ref in refs:
        ref.check_path()  # every missing path fails before any slow load
    saes = {}
    for ref in refs:
        sae = ref.resolve(lm, train_if_missing=True, progress=progress)
        saes[ref.with_config(sae).store_name] = sae
    return saes


def cmd_examples(args: argparse.Namespace) -> int:
    from icl_circuits.data.corpus import from_spec
    from icl_circuits.methods.examples import ExampleConfig, build_example_store, summarize_store
    from icl_circuits.viz.plots import plot_latent_density
    from icl_circuits.viz.report import Section, write_report

    cfg = ExampleConfig(
        seq_len=args.seq_len, batch_size=args.batch_size, top_k=args.top_k, bin_width=args.bin_width,
        per_bin=args.per_bin, context_before=args.context_before, context_after=args.context_after, seed=args.seed,
        corpus=args.corpus + (f"[:{args.max_docs}]" if args.max_docs else ""),
    )  # fmt: skip
    sae_refs(args.saes, "--saes")  # a bad spec fails before the slow model load
    lm = load_lm(args)
    saes = load_saes(lm, args.saes, progress=not args.quiet)
    docs = from_spec(args.corpus, lm, progress=not args.quiet)
    if args.max_docs:
        import itertools

        docs = list(itertools.islice(docs, args.max_docs))
    store = build_example_store(lm, saes, docs, args.out / "examples.sqlite", cfg, progress=not args.quiet)
    rows = summarize_store(store, args.out)
    plot_latent_density(store, args.out / "latent_density")
    for r in rows:
        print(f"{r['sae']:14s} {r['site']:14s} {r['latents_fired']:5d}/{r['d_sae']} latents fired, {r['examples']:,} examples")
    print(f"store: {store.path}\nreport: {write_report(args.out, 'Max-activating examples', [Section('Stores', table=rows)])}")
    print(f"browse: icl-circuits view {args.out}")
    return 0


def cmd_dashboards(args: argparse.Namespace) -> int:
    import itertools

    from icl_circuits.methods.dashboards import DashboardConfig, build_dashboards
    from icl_circuits.data.tasks import load_tasks

    tasks = load_tasks(args.tasks)
    sae_refs(args.saes, "--saes")
    lm = load_lm(args)
    saes = load_saes(lm, args.saes, progress=not args.quiet)
    docs = None
    if args.corpus:
        from icl_circuits.data.corpus import from_spec

        docs = list(itertools.islice(from_spec(args.corpus, lm, progress=not args.quiet), args.max_docs or None))
    cfg = DashboardConfig(n_prompts=args.n_prompts, n_shots=args.n_shots, top_tokens=args.top_tokens,
                          n_neighbours=args.neighbours, seed=args.seed)  # fmt: skip
    path = build_dashboards(lm, saes, args.out, tasks, cfg, docs=docs, progress=not args.quiet)
    print(f"dashboards: {path}\nbrowse: icl-circuits view {args.out}")
    return 0


def add_examples(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("examples", help="max-activating examples of SAE latents on a corpus (resumable SQLite store)")
    add_sae_option(s, "resid:12", SAES_HELP)
    s.add_argument("--corpus", default="generated:512+python-docs", help="'generated:N', 'python-docs', 'A+B', or .txt/.jsonl paths")
    s.add_argument("--max-docs", type=int, default=0, help="use only the first N documents (0: all)")
    s.add_argument("--out", type=Path, default=Path("runs/examples"), help="run directory (resumes if a partial store is there)")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--top-k", type=int, default=16, help="top examples per latent (one per chunk)")
    s.add_argument("--per-bin", type=int, default=4, help="sampled examples per activation bin")
    s.add_argument("--bin-width", type=float, default=0.5)
    s.add_argument("--context-before", type=int, default=24)
    s.add_argument("--context-after", type=int, default=8)
    run_options(s)
    s.set_defaults(func=cmd_examples)


def add_dashboards(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("dashboards", help="precompute feature dashboards (logit lens, density, ICL-prompt activations, neighbours) for `view`")
    add_sae_option(s, "resid:12", "as for `examples`; same names so the viewer joins them")
    s.add_argument("--tasks", default="all")
    s.add_argument("--corpus", default="", help="optional: its tokens also count towards density / histogram")
    s.add_argument("--max-docs", type=int, default=0)
    s.add_argument("--out", type=Path, default=Path("runs/examples"), help="run directory (writes dashboards.sqlite)")
    s.add_argument("--n-prompts", type=int, default=8)
    s.add_argument("--n-shots", type=int, default=8)
    s.add_argument("--top-tokens", type=int, default=10)
    s.add_argument("--neighbours", type=int, default=8)
    run_options(s)
    s.set_defaults(func=cmd_dashboards)
