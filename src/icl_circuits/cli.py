"""Command line: a thin layer over the Python API.

    icl-circuits tasks
    icl-circuits task-vectors --model gemma-3-270m --tasks all [--layers 0-17] [--out runs/tv]
    icl-circuits sae train --model gemma-3-270m --saes resid:12,attn:12,transcoder:12 --corpus generated:2048 --out runs/saes
    icl-circuits sae eval --model gemma-3-270m --sae runs/saes/saes/resid_12 --corpus generated:2048
    torchrun --nproc_per_node 2 -m icl_circuits.cli sae train ...   (several SAEs: spread over ranks)
    torchrun --nproc_per_node 8 -m icl_circuits.cli sae train --cache runs/acts --saes resid:12 ...   (one SAE: data-parallel)
    torchrun --nproc_per_node 8 -m icl_circuits.cli clean|circuit --tasks all ...   (tasks split over ranks)
    icl-circuits examples --model gemma-3-270m --saes resid:12 --corpus generated:512+python-docs --out runs/examples
    icl-circuits view runs/examples [--port 8000] [--host 127.0.0.1]
    icl-circuits circuit --model gemma-3-270m --tasks all --layers 11-12 --out runs/circuits
    icl-circuits reproduce --recipe paper --out runs/paper --docs docs/results/gemma-3-270m   (every experiment + claims)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .distributed import init_from_env, is_main  # (no torch at import)

N_SCORE_TOKENS = 2  # = prompts.N_SCORE_TOKENS (a literal: the CLI starts without importing torch; a test checks)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'all', '12', '2-9', '1,4,6-8' -> sorted layer list, checked against the model."""
    if spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise SystemExit(f"error: bad --layers {spec!r}; use e.g. 'all', '12', '2-9' or '1,4,6-8'") from None
        if b < a:
            raise SystemExit(f"error: bad --layers {spec!r}: the range {part.strip()} runs backwards; write {b}-{a}")
        layers.update(range(a, b + 1))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise SystemExit(f"error: --layers {spec!r}: layers {sorted(bad)} outside 0..{n_layers - 1} (the model has {n_layers} layers)")
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

    from .sweep import run_layer_sweep
    from .task_vectors import TaskVectorConfig
    from .tasks import load_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_tasks(args.tasks, strict=getattr(args, "strict", False))  # fail on a bad task before the slow model load
    lm = _load_lm(args)
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
    from .report import write_report

    print(f"  {write_report(args.out, 'Task-vector layer sweep')}")
    return 0


def _print_eval(results: list) -> None:
    print(f"\n{'SAE site':16s} {'tokens':>7s} {'L0':>7s} {'FVE':>6s} {'dead':>6s} {'CE clean':>8s} {'CE SAE':>8s} {'CE zero':>8s} {'CE rec.':>7s}")
    for r in results:
        r = r if isinstance(r, dict) else r.to_dict()
        print(
            f"{r['site']:16s} {r['n_tokens']:7d} {r['l0']:7.1f} {r['fve']:6.3f} {r['dead_fraction']:6.3f} "
            f"{r['ce_clean']:8.3f} {r['ce_spliced']:8.3f} {r['ce_zero']:8.3f} {r['ce_loss_recovered']:7.3f}"
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


def _kv_trainer(items: list[str] | None) -> dict | None:
    """['aux_k=256', 'l0_coeff=2'] -> {'aux_k': 256, 'l0_coeff': 2.0}: more TrainerConfig fields."""
    import json

    if not items:
        return None
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"error: expected NAME=VALUE (a JSON value), got {item!r}") from None
    return out


def cmd_sae_train(args: argparse.Namespace) -> int:
    import json

    import torch

    from .corpus import from_spec
    from .plots import plot_training_curves
    from .sae.evaluation import evaluate_saes
    from .sae.training import SAESpec, TrainConfig, init_distributed_from_env, train_from_cache, train_saes
    from .storage import write_json

    specs = [s for s in args.saes.split(",") if s]
    for s in specs:
        SAESpec.parse(s)  # fail on a bad spec before the slow model load
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = init_distributed_from_env()
    from .sae.cache import HarvestRun

    run = HarvestRun(args.cache) if args.cache is not None else None
    lm = _load_lm(args, run.model if run else None)
    docs = None if run else from_spec(args.corpus, lm, progress=not args.quiet)
    cfg = TrainConfig(
        specs=specs, arch=args.arch, d_sae=args.d_sae, n_tokens=args.tokens, batch_tokens=args.batch_tokens,
        seq_len=args.seq_len, l1_coeff=args.l1, k=args.k, lr=args.lr, param_dtype=args.param_dtype,
        dead_window=args.dead_window, dead_steps=args.dead_steps, checkpoint_every=args.checkpoint_every,
        b_dec_init=args.b_dec_init, norm_centered=args.norm_centered, l1_by_kind=_kv_floats(args.l1_kind),
        skip_docs=0 if run else args.eval_docs, seed=args.seed, trainer=_kv_trainer(args.trainer),
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
        from .sae.formats import load_sae

        saes = {SAESpec.parse(s).name: load_sae(args.out / "saes" / SAESpec.parse(s).name).to(lm.device) for s in specs}
    records = [json.loads(l) for l in (args.out / "metrics.jsonl").read_text().splitlines()] if (args.out / "metrics.jsonl").is_file() else []
    if records:
        plot_training_curves(records, args.out / "training_curves")
    if (run or args.eval_docs) and not args.no_eval:
        if run:
            held = run.held_out_docs(lm)
            batches = _eval_batches(lm, held, min(64, len(held)), args.seq_len)
        else:
            batches = _eval_batches(lm, docs, args.eval_docs, args.seq_len)
        results = evaluate_saes(lm, list(saes.values()), batches, progress=not args.quiet)
        write_json(args.out / "eval.json", [r.to_dict() for r in results])
        _print_eval(results)
    print(f"\nSAEs in {args.out / 'saes'} (ours) and {args.out / 'saelens'} (SAELens format)")
    from .report import write_report

    print(f"report: {write_report(args.out, 'SAE training')}")
    return 0


def cmd_sae_harvest(args: argparse.Namespace) -> int:
    import torch

    from .corpus import harvest_docs, provenance
    from .loading import load_model
    from .sae.cache import harvest
    from .sae.training import SAESpec
    from .storage import write_json

    specs = [SAESpec.parse(s) for s in args.saes.split(",") if s]
    sites = sorted({site for s in specs for site in (s.in_site, s.out_site)}, key=lambda s: s.order)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = _load_lm(args)
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
    import torch

    from .sae.compare import CompareConfig, run_compare, winner

    if args.threads:
        torch.set_num_threads(args.threads)
    from .sae.cache import HarvestRun

    run = HarvestRun(args.cache)
    penalties = {}
    for item in args.penalty or []:
        arch, _, values = item.partition("=")
        penalties[arch] = tuple(_floats(values, f"--penalty {arch}"))
    cfg = CompareConfig(
        spec=args.sae, archs=tuple(a for a in args.archs.split(",") if a), l0_targets=tuple(int(x) for x in args.l0.split(",")),
        penalties=penalties, d_sae=args.d_sae, n_tokens=args.tokens, batch_tokens=args.batch_tokens, seed=args.seed,
    )  # fmt: skip
    cfg.runs()  # fail on a missing --penalty before the slow model load
    lm = _load_lm(args, run.model)
    held = run.held_out_docs(lm)
    batches = _eval_batches(lm, held, min(args.eval_ce_docs, len(held)), 128)
    rows = run_compare(lm, cfg, run.train, run.eval, batches, args.out, progress=not args.quiet)
    print(f"\n{'recipe':12s} {'L0':>5s} {'FVE':>6s} {'CE rec.':>7s} {'dead':>6s} {'tok/s':>7s} {'arrow':>6s} {'input':>6s} {'output':>6s}")
    for r in rows:
        print(f"{r['arch']:12s} {r['target_l0']:5d} {r['fve']:6.3f} {r['ce_loss_recovered']:7.3f} {r['dead_fraction']:6.3f} "
              f"{r['tokens_per_s']:7.0f} {r['icl_fve_arrow']:6.3f} {r['icl_fve_input']:6.3f} {r['icl_fve_output']:6.3f}")  # fmt: skip
    print(f"\nwinner by mean CE loss recovered: {winner(rows)}\ntable: {args.out / 'compare.csv'}  plot: {args.out / 'compare.png'}")
    return 0


def cmd_sae_eval(args: argparse.Namespace) -> int:
    import torch

    from .corpus import from_spec
    from .sae.evaluation import evaluate_saes
    from .sae.formats import load_any
    from .storage import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    from .sae.cache import HarvestRun

    run = HarvestRun(args.cache) if args.cache is not None else None
    lm = _load_lm(args, run.model if run else None)
    saes = [load_any(p).to(lm.device) for p in args.sae or []]
    if args.starter:
        from .sae.suite import STARTER_SPECS, starter_sae

        saes += [starter_sae(lm, spec, progress=not args.quiet) for spec in STARTER_SPECS]
    if not saes:
        raise ValueError("nothing to evaluate: pass --sae PATH (repeatable) or --starter")
    if run:  # held-out documents of the harvest (chosen by content hash), not the first --eval-docs
        held = run.held_out_docs(lm)
        batches = _eval_batches(lm, held, min(args.eval_ce_docs, len(held)), args.seq_len)
    else:
        batches = _eval_batches(lm, from_spec(args.corpus, lm, progress=not args.quiet), args.eval_docs, args.seq_len)
    results = [r.to_dict() for r in evaluate_saes(lm, saes, batches, progress=not args.quiet)]
    _print_eval(results)
    if run:
        from .sae.evaluation import cache_stats

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
    from .sae.suite import export_suite

    corpus, prov = args.corpus, None
    if args.cache is not None:  # the harvest names the corpus and where its text came from
        from .sae.cache import HarvestRun

        run = HarvestRun(args.cache)
        corpus, prov = run.settings["corpus"], run.train.manifest.get("provenance")
    for path in export_suite(args.run, args.dest, corpus=corpus, provenance=prov, eval_path=args.eval):
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"{path}  ({size:.1f} MiB)")
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    import torch

    from .corpus import from_spec
    from .examples import ExampleConfig, build_example_store, summarize_store
    from .report import Section, write_report

    cfg = ExampleConfig(
        seq_len=args.seq_len, batch_size=args.batch_size, top_k=args.top_k, bin_width=args.bin_width,
        per_bin=args.per_bin, context_before=args.context_before, context_after=args.context_after, seed=args.seed,
        corpus=args.corpus + (f"[:{args.max_docs}]" if args.max_docs else ""),
    )  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = _load_lm(args)
    saes = _load_saes(lm, args.saes, progress=not args.quiet)
    docs = from_spec(args.corpus, lm, progress=not args.quiet)
    if args.max_docs:
        import itertools

        docs = list(itertools.islice(docs, args.max_docs))
    store = build_example_store(lm, saes, docs, args.out / "examples.sqlite", cfg, progress=not args.quiet)
    rows = summarize_store(store, args.out)
    for r in rows:
        print(f"{r['sae']:14s} {r['site']:14s} {r['latents_fired']:5d}/{r['d_sae']} latents fired, {r['examples']:,} examples")
    print(f"store: {store.path}\nreport: {write_report(args.out, 'Max-activating examples', [Section('Stores', table=rows)])}")
    print(f"browse: icl-circuits view {args.out}")
    return 0


def _load_saes(lm, specs: str, progress: bool) -> dict:  # type: ignore[no-untyped-def]
    """'resid:12,attn:11' (starter suite) or 'NAME=PATH' items (any supported SAE format) -> {name: SAE}."""
    from .sae.formats import load_any
    from .sae.suite import starter_sae
    from .sae.training import SAESpec

    saes = {}
    for item in [x for x in specs.split(",") if x]:
        if "=" in item:
            name, _, path = item.partition("=")
            saes[name] = load_any(path).float().to(lm.device)
        else:
            saes[SAESpec.parse(item).name] = starter_sae(lm, item, progress=progress)
    if not saes:
        raise ValueError("no SAEs given: use e.g. --saes resid:12 or --saes mine=path/to/sae")
    return saes


def cmd_dashboards(args: argparse.Namespace) -> int:
    import itertools

    import torch

    from .dashboards import DashboardConfig, build_dashboards
    from .tasks import load_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_tasks(args.tasks)
    lm = _load_lm(args)
    saes = _load_saes(lm, args.saes, progress=not args.quiet)
    docs = None
    if args.corpus:
        from .corpus import from_spec

        docs = list(itertools.islice(from_spec(args.corpus, lm, progress=not args.quiet), args.max_docs or None))
    cfg = DashboardConfig(n_prompts=args.n_prompts, n_shots=args.n_shots, top_tokens=args.top_tokens,
                          n_neighbours=args.neighbours, seed=args.seed)  # fmt: skip
    path = build_dashboards(lm, saes, args.out, tasks, cfg, docs=docs, progress=not args.quiet)
    print(f"dashboards: {path}\nbrowse: icl-circuits view {args.out}")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from .viewer import serve

    try:
        serve(args.run_dir, host=args.host, port=args.port, example_stores=args.examples, allow_hosts=args.allow_host)
    except FileNotFoundError:
        raise
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


def _floats(spec: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in spec.split(",") if x)
    except ValueError:
        raise SystemExit(f"error: bad {what} {spec!r}; use comma-separated numbers") from None


def cmd_heatmap(args: argparse.Namespace) -> int:
    import torch

    from dataclasses import replace

    from .steering import NegativeConfig, run_heatmap, specificity

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = None if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    overrides = dict(scale_mode=args.scale_mode, scale=args.scale, scale_grid=_floats(args.scale_grid, "--scale-grid"),
                     select_on=args.select_on, top_only=args.top_only, n_eval=args.n_eval, seed=args.seed)  # fmt: skip
    neg_scales = None if args.negative_scales == "paper" else _floats(args.negative_scales, "--negative-scales")
    negative = (NegativeConfig(scales=neg_scales, n_prompts=args.negative_prompts,
                               n_shots=args.negative_shots) if args.negative else None)  # layer: the results'  # fmt: skip
    top = args.negative_features == "top"
    neg_features = [int(f) for f in _floats(args.negative_features, "--negative-features")] if args.negative_features and not top else None
    lm = _load_lm(args)
    kw = dict(floor=args.floor, min_effect=args.min_effect, all_rows=args.all_rows, progress=not args.quiet)
    if negative is not None and (top or args.negative_n_scales):
        # features / scales that depend on the positive heatmap: compute it first (the second call resumes it)
        first = run_heatmap(lm, args.results, args.out, args.figures, args.name, tasks, args.top_k, overrides, **kw)
        if top:  # each task's top executor, if it helps its own task (the features the paper subtracts)
            neg_features = sorted({int(r["top_feature"]) for r in specificity(first["heatmap"]) if r["top_feature"] is not None and r["own_effect"] > 0})
            if not neg_features:
                raise ValueError("--negative-features top: no task has a top feature with a positive effect on its own task")
        if negative.scales is None and args.negative_n_scales:
            from .steering import paper_negative_scales

            res = first["heatmap"]
            shared = res.shared_scale or sorted(res.scales)[len(res.scales) // 2]
            negative = replace(negative, scales=paper_negative_scales(shared, args.negative_n_scales))
    out = run_heatmap(lm, args.results, args.out, args.figures, args.name, tasks, args.top_k, overrides,
                      negative=negative, negative_features=neg_features, **kw)  # fmt: skip
    print(f"\n{'task':30s} {'top feature':>11s} {'scale':>6s} {'own effect':>10s} {'best other':>10s}  other task / specific")
    for r in specificity(out["heatmap"]):
        if r["top_feature"] is None:
            print(f"{r['task']:30s} {'-':>11s}")
            continue
        print(f"{r['task']:30s} {r['top_feature']:11d} {r['scale']:6g} {r['own_effect']:10.3f} {r['best_other_effect']:10.3f}  "
              f"{r['best_other_task']} / {'yes' if r['specific'] else 'no'}")  # fmt: skip
    print("\nwrote:", *[str(p) for p in out["files"]], sep="\n  ")
    print(f"report: {_report(args.out, 'Feature steering heatmaps')}")
    return 0


def cmd_detectors(args: argparse.Namespace) -> int:
    import torch

    from .detection import LinkConfig, MassConfig, run_detectors

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = None if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    steps = [s for s in args.steps.split(",") if s]
    lm = _load_lm(args)
    layers = parse_layers(args.sweep_layers, lm.n_layers) if "sweep" in steps else []
    out = run_detectors(
        lm, steps, args.out, args.figures, args.executors, args.detectors, args.exec_heatmap, args.det_heatmap, tasks, layers,
        MassConfig(n_prompts=args.n_prompts, n_shots=args.n_shots),
        LinkConfig(n_prompts=args.n_prompts, n_shots=args.n_shots, ablation=args.link_ablation, multiple=args.link_multiple,
                   ablate_at=args.link_ablate_at, measure_at=args.link_measure_at),
        progress=not args.quiet,
    )  # fmt: skip
    if "mass_table" in out:
        print("\ntoken-type activation masses (%), ours vs. the paper's Tables 1-2:")
        for r in out["mass_table"]:
            print("  " + "  ".join(f"{k}={v}" for k, v in r.items()))
    if "link" in out:
        res = out["link"]
        print("\ndetector task -> drop of its own executor / largest drop of another task's executor")
        for i, d in enumerate(res.detector_tasks):
            own = float(res.drop[i, res.executor_tasks.index(d)]) if d in res.executor_tasks else float("nan")
            j = max((j for j, e in enumerate(res.executor_tasks) if e != d), key=lambda j: float(res.drop[i, j]), default=None)
            other = f"{float(res.drop[i, j]):.3f} ({res.executor_tasks[j]})" if j is not None else "-"
            print(f"  {d:30s} {own:6.3f}   {other}")
    print("\nwrote:", *[str(p) for p in out["files"]], sep="\n  ")
    print(f"report: {_report(args.out, 'Task-detection features')}")
    return 0


# The bundled model's best layers, from the README's sweeps: task vectors (execution, best 12) and
# the fake-pair detection sweep (best 6; detection collapses from layer 10 on).
BUNDLED_LAYERS = {"execution": 12, "detection": 6}


def default_layer(model: str, setting: str) -> int:
    if model == "gemma-3-270m":
        return BUNDLED_LAYERS[setting]
    raise SystemExit(
        f"--layer is needed for {model}: find the best one with `icl-circuits task-vectors` (execution) "
        "or `icl-circuits detectors --steps sweep` (detection)"
    )


def cmd_clean(args: argparse.Namespace) -> int:
    """Task Vector Cleaning for one or many tasks (or a λ sweep / a layer comparison), resumable."""
    import torch

    from .cleaning import CleaningConfig
    from .cleaning_runs import l1_sweep, layer_comparison, run_cleaning
    import math

    from .loading import resolve_spec
    from .sae.formats import load_any
    from .sae.suite import starter_sae
    from .task_vectors import TaskVectorConfig
    from .tasks import load_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_tasks(args.tasks or args.task, strict=getattr(args, "strict", False))  # fail before the slow model load
    for opt, v in (("--l1", args.l1), ("--lr", args.lr)):
        if v is not None and not math.isfinite(v):
            raise SystemExit(f"error: {opt} {v} is not a finite number")
    if args.sae and args.sae != "starter":
        resolve_spec(args.sae, "--sae", hub_subfolders=True)  # a missing local path fails now, without the network
    given = dict(l1_coeff=args.l1, lr=args.lr, patience=args.patience, max_steps=args.max_steps, n_train=args.n_train, n_eval=args.n_eval)
    cfg = CleaningConfig(
        **{k: v for k, v in given.items() if v is not None}, n_score_tokens=args.n_score_tokens, setting=args.setting, seed=args.seed,
        init=args.init, ito_k=args.ito_k,
    )
    tv_cfg = TaskVectorConfig(n_prompts=args.n_prompts, n_shots=args.n_shots, arrows=args.arrows, seed=args.seed)
    lm = _load_lm(args)
    layer = args.layer if args.layer is not None else default_layer(lm.name, args.setting)
    if not 0 <= layer < lm.n_layers:  # before any SAE is loaded or trained for it
        raise SystemExit(f"error: --layer {layer} outside 0..{lm.n_layers - 1} (the model has {lm.n_layers} layers)")

    def sae_for(layer: int):  # type: ignore[no-untyped-def]
        if args.sae and args.sae != "starter":
            sae = load_any(args.sae).float().to(lm.device)
            from .sites import Site, same_site

            if not same_site(sae.cfg.site, Site(layer, "resid_pre")) and not args.compare_layers:
                raise SystemExit(f"error: --sae {args.sae} reads {sae.cfg.site}, but --layer {layer} steers resid_pre.{layer}; "
                                 f"use a residual SAE trained on resid_pre.{layer}")  # fmt: skip
            return args.sae, sae
        return f"resid:{layer}", starter_sae(lm, f"resid:{layer}", progress=not args.quiet)

    if args.compare_layers:
        layers = parse_layers(args.compare_layers, lm.n_layers)
        rows, files = layer_comparison(lm, {l: sae_for(l)[1] for l in layers}, tasks, args.out, cfg, tv_cfg, progress=not args.quiet)
        from .report import write_report

        files.append(write_report(args.out, "Task vector reconstructions by layer (Fig. 2)"))
        print(f"\n{'layer':>5s} " + " ".join(f"{m:>18s}" for m in ("tv", "sae_reconstruction", "ito_5", "ito_20", "tvc")))
        for l in layers:
            means = [_mean_of(rows, layer=l, method=m) for m in ("tv", "sae_reconstruction", "ito_5", "ito_20", "tvc")]
            print(f"{l:5d} " + " ".join(f"{x:18.3f}" for x in means))
        print("\nwrote:", *[str(p) for p in files], sep="\n  ")
        return 0
    spec, sae = sae_for(layer)
    if args.sweep_l1:
        grid = [float(x) for x in args.sweep_l1.split(",")] if args.sweep_l1 != "paper" else None
        kw = {} if grid is None else dict(l1_coeffs=grid)
        rows, files = l1_sweep(lm, sae, tasks, layer, args.out, cfg=cfg, tv_cfg=tv_cfg, sae_spec=spec, progress=not args.quiet, **kw)
        from .report import write_report

        files.append(write_report(args.out, f"TVC λ sweep (layer {layer}, SAE {spec})"))
        print(f"\n{'l1':>8s} {'rel. loss decrease':>18s} {'TV L0 fraction':>14s}")
        for l1 in sorted({r["l1_coeff"] for r in rows if r["method"] == "tvc"}):
            print(f"{l1:8g} {_mean_of(rows, method='tvc', l1_coeff=l1):18.3f} "
                  f"{_mean_of(rows, method='tvc', l1_coeff=l1, key='l0_fraction'):14.3f}")  # fmt: skip
        print("\nwrote:", *[str(p) for p in files], sep="\n  ")
        return 0
    results, files = run_cleaning(lm, sae, tasks, layer, args.out, cfg, tv_cfg, sae_spec=spec, progress=not args.quiet)
    if not is_main():  # under torchrun rank 0 reports for all (the tasks were split over ranks)
        return 0
    from .cleaning_runs import summary_rows
    from .report import Section, write_report

    table = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in summary_rows(results)]
    flagged = [dict(task=r.task, warning=w) for r in results for w in getattr(r, "warnings", [])]
    sections = [Section("Warnings: results that are not useful as they stand", table=flagged)] if flagged else []
    files.append(write_report(args.out, f"Task Vector Cleaning ({args.setting}, layer {layer}, SAE {spec})",
                              [*sections, Section("Relative loss decrease of each method, L0 before/after cleaning", table=table, images=["summary.png"])]))  # fmt: skip
    for r in results:
        s = r.scores
        print(f"\n{r.task} ({r.setting}, layer {r.layer}): L0 {len(r.initial_features)} -> {r.l0} in {r.steps} steps ({r.stopped}, {r.seconds:.0f} s)")
        for w in getattr(r, "warnings", []):
            print(f"  WARNING: {w}")
        print("  relative loss decrease: " + ", ".join(f"{m} {s[m]['relative_loss_decrease']:.3f}" for m in s if m != "zero_shot"))
        print(f"  {'feature':>8s} {'weight':>8s} {'alone':>8s} {'drop without':>12s}")
        for e in r.feature_effects:
            print(f"  {e['index']:8d} {e['weight']:8.3f} {e['alone']:8.3f} {e['drop_without']:12.3f}")
    print("\nwrote:", *[str(p) for p in files], sep="\n  ")
    return 0


def _report(run_dir: Path, title: str) -> Path:
    """Every command leaves a static report.html (figures and tables found in its run directory)."""
    from .report import write_report

    return write_report(run_dir, title)


def _mean_of(rows: list[dict], key: str = "relative_loss_decrease", **match: object) -> float:
    vals = [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return sum(vals) / len(vals) if vals else float("nan")


def cmd_circuit(args: argparse.Namespace) -> int:
    import torch

    from .ablation import CircuitRunConfig, run_circuits
    from .circuits import CircuitConfig
    from .tasks import load_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_tasks(args.tasks or args.task, strict=getattr(args, "strict", False))  # fail before the slow model load
    user_saes = {}
    for item in args.sae or []:
        key, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--sae takes KIND.LAYER=PATH (e.g. resid.11=runs/saes/saes/resid_11), got {item!r}")
        from .sae.formats import load_any

        user_saes[key] = load_any(path).float()
    lm = _load_lm(args)  # circuit_saes moves every SAE to the model's device and dtype
    layers = tuple(parse_layers(args.layers, lm.n_layers))
    cfg = CircuitRunConfig(
        circuit=CircuitConfig(layers=layers, kinds=tuple(k for k in args.kinds.split(",") if k), metric_pairs=args.metric),
        n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed, rank_by=args.rank_by, edge_k=args.edge_k,
        ie_quality_per_sae=None if args.ie_quality == "all" else int(args.ie_quality), faith_target=args.faith_target,
        cross_target=args.cross_target, ablate_errors=args.ablate_errors, other_errors_curve=args.other_errors_curve,
    )  # fmt: skip
    res = run_circuits(lm, tasks, cfg, args.out, saes=user_saes or None, cross_task=not args.no_cross_task, progress=not args.quiet,
                       train_missing=args.train_missing_saes)  # fmt: skip
    if not is_main():  # under torchrun rank 0 reports for all (the tasks were split over ranks)
        return 0
    print(f"\n{'task':30s} m(M)     m(empty)  non-zero nodes  nodes for faithfulness {cfg.faith_target}  edges")
    for s in res["summaries"]:
        print(f"{s['task']:30s} {s['metric_eval']:7.3f}  {s['metric_empty']:8.3f}  {s['n_nonzero_nodes']:14d}  "
              f"{str(s['nodes_for_target']):>29s}  {s['n_edges']:5d}")  # fmt: skip
    print("\nwrote:", *[str(p) for p in res["files"]], f"{args.out}/<task>/ (nodes.csv, graph.json, faithfulness.json, ...)", sep="\n  ")
    print(f"report: {_report(args.out, 'Sparse feature circuits')}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Every experiment of a recipe, resumably, then the claims report."""
    from .claims import claims_markdown
    from .reproduce import ReproduceConfig, reproduce

    words = lambda v: tuple(x for x in (v or "").split(",") if x)  # noqa: E731
    cfg = ReproduceConfig(
        recipe=args.recipe, out=args.out, docs=args.docs, model=args.model, tasks=args.tasks, device=args.device,
        dtype=args.dtype, threads=args.threads, seed=args.seed, include=words(args.include), rerun=words(args.rerun),
        only=words(args.only), progress=not args.quiet, jobs=args.jobs,
    )  # fmt: skip
    res = reproduce(cfg)
    print("\nclaims of the paper, on this run (rules and figures in the report):")
    print(claims_markdown(res.claims))
    print(f"\nreport: {res.report}\n        {res.report.with_name('report.md')}")
    return 0


def _run_options(s: argparse.ArgumentParser, dtype: str = "float32", dtype_help: str = "the model's dtype") -> None:
    """--seed, --threads, --quiet, --device, --dtype: the same on every command that runs a model."""
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_options(s, dtype, dtype_help)


def _device_options(s: argparse.ArgumentParser, dtype: str = "float32", dtype_help: str = "the model's dtype") -> None:
    """--device and --dtype (part of _run_options; alone only where a command has no --seed)."""
    from .loading import DTYPES

    s.add_argument("--device", default="cpu", help="where the model, SAEs and prompt tensors live: cpu, cuda, cuda:1, mps")
    s.add_argument("--dtype", choices=DTYPES, default=dtype, help=f"{dtype_help} (default {dtype})")


def _load_lm(args: argparse.Namespace, spec: str | None = None):  # type: ignore[no-untyped-def]
    """load_model(spec or --model) on --device in --dtype."""
    from .loading import load_model, resolve_dtype

    return load_model(spec if spec is not None else args.model, dtype=resolve_dtype(args.dtype), device=args.device)


def build_parser() -> argparse.ArgumentParser:
    from .sae.suite import STARTER_CORPUS
    from .sae.trainers import ARCHS

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
    s.add_argument("--n-score-tokens", type=int, default=N_SCORE_TOKENS, help="first n output tokens scored (the authors: 2)")
    _run_options(s)
    s.set_defaults(func=cmd_task_vectors)

    sae = sub.add_parser("sae", help="train and evaluate SAEs / transcoders").add_subparsers(dest="sae_command", required=True)
    corpus_help = "'generated:N' (model-sampled, offline), 'hf:NAME[:CONFIG]' (online), or .txt/.jsonl paths/globs"
    s = sae.add_parser("train", help="train SAEs on one activation stream (resumes if --out holds a checkpoint)")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--saes", default="resid:12", help="comma-separated kind:layer, kind in resid|attn|transcoder")
    s.add_argument("--corpus", default="generated:2048", help=corpus_help)
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
    _run_options(s)
    s.set_defaults(func=cmd_sae_train)

    s = sae.add_parser("harvest", help="cache activations on disk once (bf16 shards, resumable) for many training runs")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--saes", default="resid:12", help="the SAEs the cache will feed (their input and output sites are stored)")
    s.add_argument("--corpus", default=STARTER_CORPUS, help=corpus_help)
    s.add_argument("--tokens", type=int, default=2_000_000, help="training rows to store")
    s.add_argument("--eval-docs", type=int, default=200, help="documents held out (by content hash) for evaluation")
    s.add_argument("--eval-tokens", type=int, default=100_000, help="rows of the held-out documents to store")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--out", type=Path, default=Path("runs/activations"))
    _run_options(s, dtype="bfloat16", dtype_help="the model forward's dtype (held-out rows always come from a float32 forward)")
    s.set_defaults(func=cmd_sae_harvest)

    s = sae.add_parser("compare", help="every SAE recipe on the same cached rows at matched L0: FVE, CE loss recovered, ICL-prompt FVE")
    s.add_argument("--cache", type=Path, required=True, help="a `sae harvest` folder")
    s.add_argument("--sae", default="resid:12", help="the SAE every recipe trains")
    s.add_argument("--archs", default="topk,batchtopk,matryoshka,jumprelu,gated")
    s.add_argument("--l0", default="16,32,64", help="target L0s (k for TopK recipes)")
    s.add_argument("--penalty", action="append", metavar="ARCH=C1,C2,..",
                   help="sparsity coefficients of a penalty recipe (gated/relu: l1, jumprelu: l0); L0 is interpolated")
    s.add_argument("--d-sae", type=int, default=4096)
    s.add_argument("--tokens", type=int, default=300_000, help="training rows per run (same for every recipe)")
    s.add_argument("--batch-tokens", type=int, default=1024)
    s.add_argument("--eval-ce-docs", type=int, default=24, help="held-out documents for CE loss recovered")
    s.add_argument("--out", type=Path, default=Path("runs/sae_compare"))
    _run_options(s)
    s.set_defaults(func=cmd_sae_compare)

    s = sae.add_parser("eval", help="L0, FVE, dead fraction, CE loss recovered on held-out tokens")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--sae", action="append", help="an SAE folder/file in any supported format (repeatable)")
    s.add_argument("--starter", action="store_true", help="the starter suite for --model (trained first if missing)")
    s.add_argument("--corpus", default="generated:2048", help=corpus_help)
    s.add_argument("--eval-docs", type=int, default=64)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--cache", type=Path, default=None,
                   help="a `sae harvest` folder: its held-out documents and rows, dead latents over its training rows, and ICL-prompt FVE by token type")
    s.add_argument("--eval-ce-docs", type=int, default=24, help="with --cache: held-out documents for CE loss recovered")
    s.add_argument("--dead-rows", type=int, default=1_000_000, help="with --cache: training rows over which a silent latent counts as dead")
    s.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    _run_options(s)
    s.set_defaults(func=cmd_sae_eval)

    s = sae.add_parser("export", help="ship a training run: bf16 weights + a model card per SAE")
    s.add_argument("run", type=Path, help="the --out of `sae train`")
    s.add_argument("dest", type=Path, help="e.g. src/icl_circuits/data/saes/gemma-3-270m")
    s.add_argument("--corpus", default=STARTER_CORPUS, help="corpus spec named in the model cards")
    s.add_argument("--cache", type=Path, default=None, help="the `sae harvest` folder the run trained on (corpus and provenance)")
    s.add_argument("--eval", type=Path, default=None, help="results of `sae eval` for the model cards (default: RUN/eval.json)")
    s.set_defaults(func=cmd_sae_export)

    s = sub.add_parser("examples", help="max-activating examples of SAE latents on a corpus (resumable SQLite store)")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--saes", default="resid:12", help="comma-separated starter specs (resid:12) or NAME=PATH items")
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
    _run_options(s)
    s.set_defaults(func=cmd_examples)

    s = sub.add_parser("view", help="browse a run in a local web page (tasks, features, examples, circuits, plots)")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--examples", action="append", help="an example store outside RUN_DIR (repeatable)")
    s.add_argument("--allow-host", action="append", default=[],
                   help="a Host name to answer besides loopback (e.g. the LAN name with --host 0.0.0.0); repeatable")
    s.set_defaults(func=cmd_view)

    s = sub.add_parser("dashboards", help="precompute feature dashboards (logit lens, density, ICL-prompt activations, neighbours) for `view`")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--saes", default="resid:12", help="as for `examples`; same names so the viewer joins them")
    s.add_argument("--tasks", default="all")
    s.add_argument("--corpus", default="", help="optional: its tokens also count towards density / histogram")
    s.add_argument("--max-docs", type=int, default=0)
    s.add_argument("--out", type=Path, default=Path("runs/examples"), help="run directory (writes dashboards.sqlite)")
    s.add_argument("--n-prompts", type=int, default=8)
    s.add_argument("--n-shots", type=int, default=8)
    s.add_argument("--top-tokens", type=int, default=10)
    s.add_argument("--neighbours", type=int, default=8)
    _run_options(s)
    s.set_defaults(func=cmd_dashboards)
    s = sub.add_parser("heatmap", help="steering heatmaps of cleaned task-vector features (Sec. 3.2, App. F; Fig. 10 with --top-only)")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--results", type=Path, required=True, help="folder of TVC results, <results>/<task>/cleaning.json")
    s.add_argument("--tasks", default="all", help="'all' (every task in --results) or comma-separated names")
    s.add_argument("--top-k", type=int, default=None, help="use only each task's k largest cleaned weights")
    s.add_argument("--scale-mode", choices=["shared", "per_feature", "fixed"], default="shared",
                   help="shared: one scale calibrated on the calibration split (the paper's Gemma 1 procedure); "
                        "per_feature: best grid scale on any task (Gemma 2); fixed: --scale")
    s.add_argument("--scale", type=float, default=15.0, help="the scale for --scale-mode fixed (paper, Gemma 1: 15)")
    s.add_argument("--scale-grid", default="128,256,512,1024,2048,4096,8192,16384",
                   help="comma-separated scales of the unit-norm directions, tried on the calibration split")
    s.add_argument("--select-on", choices=["owner", "all"], default="owner",
                   help="grid scales tried on the feature's own tasks (cheap) or on every task (the paper)")
    s.add_argument("--top-only", action="store_true", help="only each task's strongest feature (Fig. 10)")
    s.add_argument("--all-rows", action="store_true", help="a row for every built-in task, also those missing from --results")
    s.add_argument("--n-eval", type=int, default=32, help="zero-shot / fake-pair prompts per task")
    s.add_argument("--floor", type=float, default=0.2, help="normalised values below this become 0")
    s.add_argument("--min-effect", type=float, default=0.05, help="drop features whose best raw effect (relative loss decrease) is below this")
    s.add_argument("--negative", action="store_true", help="also negative steering on 16 x 32-shot ICL prompts (App. F.1; slow)")
    s.add_argument("--negative-scales", default="paper", help="'paper': the authors' 50 log-spaced scales 1..31.6 around their "
                   "scale 15, carried over to the calibrated shared scale (x 1/15 .. x 2.1); or comma-separated scales")
    s.add_argument("--negative-prompts", type=int, default=16, help="ICL prompts per task for negative steering")
    s.add_argument("--negative-shots", type=int, default=32, help="shots per ICL prompt for negative steering")
    s.add_argument("--negative-features", default=None, help="comma-separated features for negative steering, or 'top': each "
                   "task's top feature with a positive effect on its own task (default: all cleaned features)")
    s.add_argument("--negative-n-scales", type=int, default=None, help="with --negative-scales paper: this many of the paper's "
                   "log-spaced scales over the same range (default: the paper's 50)")
    s.add_argument("--out", type=Path, default=Path("runs/heatmap"), help="run folder (resumes if present)")
    s.add_argument("--figures", type=Path, default=None, help="where figures and tables go (default: --out)")
    s.add_argument("--name", default=None, help="file stem of the figures (default: the setting)")
    _run_options(s)
    s.set_defaults(func=cmd_heatmap)

    s = sub.add_parser("detectors", help="task-detection features: layer sweep, token-type masses, detector->executor link (Sec. 4.2)")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--steps", default="sweep,masses,link", help="comma-separated: sweep, masses, link")
    s.add_argument("--executors", type=Path, default=None, help="TVC results of the execution setting (<dir>/<task>/)")
    s.add_argument("--detectors", type=Path, default=None, help="TVC results of the detection (fake-pair) setting")
    s.add_argument("--exec-heatmap", type=Path, default=None, help="heatmap.json of `heatmap` on --executors (top executor per task)")
    s.add_argument("--det-heatmap", type=Path, default=None, help="heatmap.json of `heatmap` on --detectors (top detector per task)")
    s.add_argument("--tasks", default="all")
    s.add_argument("--sweep-layers", default="4-16", help="layers of the detection-layer sweep")
    s.add_argument("--link-ablation", choices=["direction", "zero"], default="direction",
                   help="link: subtract --link-multiple x mean activation x unit direction (the authors') or zero the latent")
    s.add_argument("--link-multiple", type=float, default=50.0, help="link: multiple of the detector's mean activation (the authors': 50)")
    s.add_argument("--link-ablate-at", default="all", help="link: token type where the detector is ablated, or 'all' (the authors')")
    s.add_argument("--link-measure-at", default="all", help="link: token type where executors are read, or 'all' (the authors')")
    s.add_argument("--n-prompts", type=int, default=16, help="ICL prompts per task for masses and the link")
    s.add_argument("--n-shots", type=int, default=16)
    s.add_argument("--out", type=Path, default=Path("runs/detectors"), help="run folder (resumes if present)")
    s.add_argument("--figures", type=Path, default=None, help="where figures and tables go (default: --out)")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    _device_options(s)
    s.set_defaults(func=cmd_detectors)

    s = sub.add_parser("clean", help="Task Vector Cleaning (Sec. 3.1): TV -> sparse SAE latents, with baselines, λ sweeps, layer comparison")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="one task name or task file")
    g.add_argument("--tasks", help="'all', or comma-separated names / files")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--layer", type=int, default=None, help="resid_pre layer to steer (bundled model: 12 for execution, 6 for detection; others: required)")
    s.add_argument("--sae", default="starter", help="'starter' (the shipped resid SAE of that layer) or a path in any supported format")
    s.add_argument("--setting", choices=["execution", "detection"], default="execution",
                   help="execution: steer the query arrow of zero-shot prompts; detection: the fake pair's output (App. G)")
    s.add_argument("--l1", type=float, default=None, help="default: CleaningConfig.l1_coeff")
    s.add_argument("--lr", type=float, default=None, help="default: CleaningConfig.lr")
    s.add_argument("--patience", type=int, default=None, help="default: CleaningConfig.patience")
    s.add_argument("--max-steps", type=int, default=None, help="default: CleaningConfig.max_steps")
    s.add_argument("--n-train", type=int, default=None, help="default: CleaningConfig.n_train")
    s.add_argument("--n-eval", type=int, default=None, help="default: CleaningConfig.n_eval")
    s.add_argument("--n-score-tokens", type=int, default=N_SCORE_TOKENS, help="first n output tokens scored (the authors: 2)")
    s.add_argument("--n-prompts", type=int, default=16, help="n-shot prompts averaged into the task vector")
    s.add_argument("--n-shots", type=int, default=16)
    s.add_argument("--arrows", choices=["all", "demos", "last"], default="all")
    s.add_argument("--init", choices=["auto", "encode_mean", "mean_encode", "ito"], default="auto",
                   help="TVC's start: 'auto' (the authors': encode_mean for execution, ito for detection), the encoding of the "
                        "vector (Alg. 1), the mean of per-token encodings (App. D) or gradient pursuit with --ito-k latents")
    s.add_argument("--ito-k", type=int, default=7, help="latents of the 'ito' start (the authors' detection TVC: 7)")
    s.add_argument("--sweep-l1", help="run a λ sweep instead: 'paper' (1e-5 ... 0.1) or comma-separated values")
    s.add_argument("--compare-layers", help="run every method at these layers instead (Fig. 2), e.g. 11,12")
    s.add_argument("--out", type=Path, default=Path("runs/clean"))
    _run_options(s)
    s.set_defaults(func=cmd_clean)

    s = sub.add_parser("circuit", help="sparse feature circuits: node/edge effects by token type, faithfulness, cross-task ablation (Sec. 4)")
    s.add_argument("--model", default="gemma-3-270m")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--task", default="antonyms", help="one task name or task file")
    g.add_argument("--tasks", default=None, help="'all', or comma-separated task names (cross-task ablation when > 1)")
    s.add_argument("--layers", default="11-12", help="layers with SAEs, e.g. '11-12' (the starter suite) or '10-17'")
    s.add_argument("--kinds", default="resid,attn,transcoder", help="SAE kinds spliced at every layer")
    s.add_argument("--sae", action="append", metavar="KIND.LAYER=PATH", help="your own SAE for one site (repeatable; then give all)")
    s.add_argument("--metric", choices=["all_but_first", "last"], default="all_but_first",
                   help="log-prob of the outputs of all pairs but the first (paper) or of the query only (original SFC)")
    s.add_argument("--n-prompts", type=int, default=8, help="prompts in the IE batch and in the held-out batch")
    s.add_argument("--n-shots", type=int, default=12, help="shots per prompt (the authors: 12)")
    s.add_argument("--rank-by", choices=["signed", "abs"], default="signed",
                   help="circuit = top-N nodes by signed effect (the authors') or by |effect|")
    s.add_argument("--edge-k", type=int, default=3, help="edge targets per (layer, token type)")
    s.add_argument("--ie-quality", default="all", help="Fig. 20/21 single-node ablations: 'all' non-zero feature nodes (the authors'), "
                                                       "N = a seeded sample of N per (SAE, token type), 0 = skip")
    s.add_argument("--faith-target", type=float, default=0.6)
    s.add_argument("--cross-target", type=float, default=0.3, help="cross-task: ablate until the task's faithfulness is this")
    s.add_argument("--no-cross-task", action="store_true")
    s.add_argument("--ablate-errors", action="store_true", help="rank and zero-ablate SAE error nodes too (the authors always keep them)")
    s.add_argument("--other-errors-curve", action="store_true", help="also the curves and cross-task ablation with the other error-node choice")
    s.add_argument("--train-missing-saes", action="store_true", help="train (with the starter-suite recipe) and cache a starter "
                   "SAE for every site of --layers/--kinds that the shipped suite lacks (CPU: tens of minutes per SAE)")
    s.add_argument("--out", type=Path, default=Path("runs/circuits"), help="run folder (finished tasks are skipped)")
    _run_options(s)
    s.set_defaults(func=cmd_circuit)

    s = sub.add_parser("reproduce", help="every experiment of the paper from a recipe file, resumably, with the claims report")
    s.add_argument("--recipe", default="paper", help="'paper' (everything, hours on a CPU), 'demo' (≤ 15 min) or a .toml file")
    s.add_argument("--model", default="gemma-3-270m")
    s.add_argument("--tasks", default=None, help="'all', or comma-separated task names / your task files (default: the recipe's)")
    s.add_argument("--out", type=Path, default=Path("runs/paper"), help="run folder: one sub-folder per stage (resumes if present)")
    s.add_argument("--docs", type=Path, default=None, help="where the report, figures and tables go (default: <out>/results)")
    s.add_argument("--include", default="", help="optional stages to run too (comma-separated), e.g. circuits_10_17")
    s.add_argument("--only", default="", help="run only these stages (the report covers whatever has finished)")
    s.add_argument("--rerun", default="", help="finished stages to run again ('all'); their commands resume what they can")
    s.add_argument("--jobs", type=int, default=1, help="stages run side by side (independent ones, each in its own process)")
    _run_options(s)
    s.set_defaults(func=cmd_reproduce)
    return p


def _add_strict(parser: argparse.ArgumentParser) -> None:
    """Every command that reads task files gets --strict (refuse a file with unusable pairs instead of skipping them)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_strict(sub)
    opts = parser._option_string_actions
    if ("--tasks" in opts or "--task" in opts) and "--strict" not in opts:
        parser.add_argument("--strict", action="store_true",
                            help="refuse a task file with pairs that cannot form a prompt (default: skip them with a warning)")


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or type(message).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a command; every expected failure (bad input, missing or damaged file, disk full) is one line and rc 2."""
    import warnings

    from safetensors import SafetensorError

    if not getattr(warnings.formatwarning, "_icl_one_line", False):
        default_format = warnings.formatwarning

        def one_line_warning(message, category, *args, **kwargs):  # noqa: ANN001, ANN202
            """Our data warnings (skipped task pairs, a collapsed cleaning) as one 'warning:' line each."""
            if category.__name__ in ("SkippedPairsWarning", "CleaningWarning"):
                return f"warning: {message}\n"
            return default_format(message, category, *args, **kwargs)

        one_line_warning._icl_one_line = True  # type: ignore[attr-defined]
        warnings.formatwarning = one_line_warning
    parser = build_parser()
    _add_strict(parser)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:  # e.g. --device cuda without CUDA: rc 2 before any slow step
            from .loading import resolve_device

            resolve_device(args.device)
        init_from_env()  # under torchrun (WORLD_SIZE > 1): join the process group, one GPU per rank
        return args.func(args)
    except SystemExit as e:  # commands raise SystemExit("error: ...") for bad options
        if isinstance(e.code, str):
            msg = _one_line(e.code)
            print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr)
            return 2
        raise
    except (ValueError, OSError) as e:  # OSError: missing/unreadable files, disk full (storage.WriteFailed)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SafetensorError as e:
        print(f"error: a damaged or truncated .safetensors file ({_one_line(e)})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
