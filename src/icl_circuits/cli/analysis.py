"""`icl-circuits heatmap`, `detectors` and `circuit`: steering heatmaps, task-detection features, circuits."""

from __future__ import annotations

import argparse
from pathlib import Path

from icl_circuits.core.distributed import is_main
from icl_circuits.cli.common import add_layers, add_score_tokens, check_layers, floats, load_lm, parse_layers, report, run_options, sae_refs, words


def cmd_heatmap(args: argparse.Namespace) -> int:
    from icl_circuits.experiments.heatmap import run_heatmap
    from icl_circuits.methods.heatmaps import specificity
    from icl_circuits.methods.negative import NegativeConfig

    tasks = None if args.tasks == "all" else words(args.tasks)
    overrides = dict(scale_mode=args.scale_mode, scale=args.scale, scale_grid=floats(args.scale_grid, "--scale-grid"),
                     select_on=args.select_on, top_only=args.top_only, n_eval=args.n_eval, seed=args.seed,
                     n_score_tokens=args.n_score_tokens)  # fmt: skip
    neg_scales = None if args.negative_scales == "paper" else floats(args.negative_scales, "--negative-scales")
    negative = (NegativeConfig(scales=neg_scales, n_prompts=args.negative_prompts,
                               n_shots=args.negative_shots) if args.negative else None)  # layer: the results'  # fmt: skip
    top = args.negative_features == "top"
    neg_features = "top" if top else ([int(f) for f in floats(args.negative_features, "--negative-features")] if args.negative_features else None)
    positive = None
    if args.positive:  # negative steering as a step of its own, on a finished positive heatmap
        from icl_circuits.methods.heatmaps import HeatmapResult
        from icl_circuits.core.storage import read_json

        positive = HeatmapResult.from_dict(read_json(args.positive), str(args.positive))
    lm = load_lm(args)
    out = run_heatmap(lm, args.results, args.out, args.figures, args.name, tasks, args.top_k, overrides,
                      floor=args.floor, min_effect=args.min_effect, negative=negative, all_rows=args.all_rows,
                      negative_features=neg_features, progress=not args.quiet, positive=positive,
                      negative_n_scales=args.negative_n_scales or 50)  # fmt: skip
    print(f"\n{'task':30s} {'top feature':>11s} {'scale':>6s} {'own effect':>10s} {'best other':>10s}  other task / specific")
    for r in specificity(out["heatmap"]):
        if r["top_feature"] is None:
            print(f"{r['task']:30s} {'-':>11s}")
            continue
        print(f"{r['task']:30s} {r['top_feature']:11d} {r['scale']:6g} {r['own_effect']:10.3f} {r['best_other_effect']:10.3f}  "
              f"{r['best_other_task']} / {'yes' if r['specific'] else 'no'}")  # fmt: skip
    print("\nwrote:", *[str(p) for p in out["files"]], sep="\n  ")
    print(f"report: {report(args.out, 'Feature steering heatmaps')}")
    return 0


def cmd_detectors(args: argparse.Namespace) -> int:
    from icl_circuits.methods.link import LinkConfig
    from icl_circuits.methods.masses import MassConfig
    from icl_circuits.experiments.detectors import run_detectors

    tasks = None if args.tasks == "all" else words(args.tasks)
    steps = words(args.steps)
    check_layers(args.layers)
    lm = load_lm(args)
    layers = parse_layers(args.layers, lm.n_layers) if "sweep" in steps else []
    out = run_detectors(
        lm, steps, args.out, args.figures, args.executors, args.detectors, args.exec_heatmap, args.det_heatmap, tasks, layers,
        MassConfig(n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed),
        LinkConfig(n_prompts=args.n_prompts, n_shots=args.n_shots, ablation=args.link_ablation, multiple=args.link_multiple,
                   ablate_at=args.link_ablate_at, measure_at=args.link_measure_at, seed=args.seed),
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
    print(f"report: {report(args.out, 'Task-detection features')}")
    return 0


def cmd_circuit(args: argparse.Namespace) -> int:
    from icl_circuits.experiments.circuits import run_circuits
    from icl_circuits.methods.circuits import CircuitConfig, CircuitRunConfig
    from icl_circuits.data.tasks import load_tasks

    tasks = load_tasks(args.tasks or args.task, strict=getattr(args, "strict", False))  # fail before the slow model load
    refs = sae_refs(args.sae)
    for ref in refs:
        ref.check_path()  # a missing local SAE fails before the slow model load
    check_layers(args.layers)
    lm = load_lm(args)  # circuit_saes moves every SAE to the model's device and dtype
    user_saes = {}
    for ref in refs:  # KIND.LAYER=PATH, KIND:LAYER (starter suite) or PATH (kind and layer from its config)
        sae = ref.resolve(lm, train_if_missing=args.train_missing_saes, progress=not args.quiet)
        key = ref.with_config(sae).key
        if key in user_saes:
            raise ValueError(f"--sae: two SAEs for {key}")
        user_saes[key] = sae
    layers = tuple(parse_layers(args.layers, lm.n_layers))
    cfg = CircuitRunConfig(
        circuit=CircuitConfig(layers=layers, kinds=tuple(words(args.kinds)), metric_pairs=args.metric,
                              n_score_tokens=args.n_score_tokens),
        n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed, rank_by=args.rank_by, rank_over=args.rank_over, edge_k=args.edge_k,
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
    print(f"report: {report(args.out, 'Sparse feature circuits')}")
    return 0


def add_heatmap(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("heatmap", help="steering heatmaps of cleaned task-vector features (Sec. 3.2, App. F; Fig. 10 with --top-only)")
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
    add_score_tokens(s)
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
    s.add_argument("--positive", type=Path, default=None, help="a finished positive heatmap.json of the same results: "
                   "skip the positive heatmap and run only negative steering on it (its top features and shared scale)")
    s.add_argument("--out", type=Path, default=Path("runs/heatmap"), help="run folder (resumes if present)")
    s.add_argument("--figures", type=Path, default=None, help="where figures and tables go (default: --out)")
    s.add_argument("--name", default=None, help="file stem of the figures (default: the setting)")
    run_options(s)
    s.set_defaults(func=cmd_heatmap)


def add_detectors(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("detectors", help="task-detection features: layer sweep, token-type masses, detector->executor link (Sec. 4.2)")
    s.add_argument("--steps", default="sweep,masses,link", help="comma-separated: sweep, masses, link")
    s.add_argument("--executors", type=Path, default=None, help="TVC results of the execution setting (<dir>/<task>/)")
    s.add_argument("--detectors", type=Path, default=None, help="TVC results of the detection (fake-pair) setting")
    s.add_argument("--exec-heatmap", type=Path, default=None, help="heatmap.json of `heatmap` on --executors (top executor per task)")
    s.add_argument("--det-heatmap", type=Path, default=None, help="heatmap.json of `heatmap` on --detectors (top detector per task)")
    s.add_argument("--tasks", default="all")
    add_layers(s, "4-16", "layers of the detection-layer sweep", "--sweep-layers")
    s.add_argument("--link-ablation", choices=["direction", "zero"], default="direction",
                   help="link: subtract --link-multiple x mean activation x unit direction (the authors') or zero the latent")
    s.add_argument("--link-multiple", type=float, default=50.0, help="link: multiple of the detector's mean activation (the authors': 50)")
    s.add_argument("--link-ablate-at", default="all", help="link: token type where the detector is ablated, or 'all' (the authors')")
    s.add_argument("--link-measure-at", default="all", help="link: token type where executors are read, or 'all' (the authors')")
    s.add_argument("--n-prompts", type=int, default=16, help="ICL prompts per task for masses and the link")
    s.add_argument("--n-shots", type=int, default=16)
    s.add_argument("--out", type=Path, default=Path("runs/detectors"), help="run folder (resumes if present)")
    s.add_argument("--figures", type=Path, default=None, help="where figures and tables go (default: --out)")
    run_options(s)
    s.set_defaults(func=cmd_detectors)


def add_circuit(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("circuit", help="sparse feature circuits: node/edge effects by token type, faithfulness, cross-task ablation (Sec. 4)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--task", default="antonyms", help="one task name or task file")
    g.add_argument("--tasks", default=None, help="'all', or comma-separated task names (cross-task ablation when > 1)")
    add_layers(s, "11-12", "layers with SAEs, e.g. '11-12' (the starter suite) or '10-17'")
    s.add_argument("--kinds", default="resid,attn,transcoder", help="SAE kinds spliced at every layer")
    s.add_argument("--sae", "--saes", action="append", metavar="KIND.LAYER=PATH",
                   help="your own SAE for one site (repeatable, comma-separated; then give all): KIND.LAYER=PATH, "
                        "KIND:LAYER (the starter suite's) or a PATH whose config names kind and layer")  # fmt: skip
    s.add_argument("--metric", choices=["all_but_first", "last", "all"], default="all_but_first",
                   help="log-prob of the outputs of all pairs but the first (the paper's text), of the query only (original SFC) "
                        "or of every pair (the authors' code)")
    s.add_argument("--n-prompts", type=int, default=8, help="prompts in the IE batch and in the held-out batch")
    add_score_tokens(s)
    s.add_argument("--n-shots", type=int, default=12, help="shots per prompt (the authors: 12)")
    s.add_argument("--rank-by", choices=["signed", "abs"], default="signed",
                   help="circuit = top-N nodes by signed effect (the authors') or by |effect|")
    s.add_argument("--rank-over", choices=["mean", "sum"], default="mean",
                   help="rank a node by its effect averaged over its token type's positions (the authors') or summed over them")
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
    run_options(s)
    s.set_defaults(func=cmd_circuit)
