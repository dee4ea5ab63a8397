"""`icl-circuits task-vectors` (layer sweep) and `icl-circuits clean` (Task Vector Cleaning)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from icl_circuits.core.distributed import is_main
from icl_circuits.cli.common import RangeLayers, add_layers, add_score_tokens, check_layers, load_lm, mean_of, one_layer, parse_layers, run_options, sae_refs

if TYPE_CHECKING:  # the CLI imports the method modules only once a command runs
    from icl_circuits.methods.cleaning import CleaningConfig
    from icl_circuits.methods.task_vectors import TaskVectorConfig

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


def cmd_task_vectors(args: argparse.Namespace) -> int:
    from icl_circuits.experiments.task_vectors import run_layer_sweep
    from icl_circuits.methods.task_vectors import TaskVectorConfig
    from icl_circuits.data.tasks import load_tasks

    tasks = load_tasks(args.tasks, strict=getattr(args, "strict", False))  # fail on a bad task before the slow model load
    check_layers(args.layers)
    lm = load_lm(args)
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
    from icl_circuits.viz.report import write_report

    print(f"  {write_report(args.out, 'Task-vector layer sweep')}")
    return 0


def _clean_sae(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The SAERef of `clean --sae` (None: each layer's starter resid SAE), checked before the model load."""
    refs = sae_refs(None if args.sae == "starter" else args.sae)
    if len(refs) > 1:
        raise ValueError(f"--sae {args.sae}: clean steers with one SAE")
    ref = refs[0] if refs else None
    if ref is not None and ref.kind not in (None, "resid"):
        raise ValueError(f"--sae {args.sae}: cleaning steers resid_pre; give a resid SAE (e.g. resid:12) or a path")
    if ref is not None:
        ref.check_path()  # a missing local path fails now, without the network
    return ref


def clean_configs(args: argparse.Namespace) -> tuple["CleaningConfig", "TaskVectorConfig"]:
    """The configs `clean` runs with, the defaults the library fills in included (λ by --setting)."""
    from icl_circuits.methods.cleaning import CleaningConfig
    from icl_circuits.methods.task_vectors import TaskVectorConfig

    given = dict(l1_coeff=args.l1, lr=args.lr, patience=args.patience, max_steps=args.max_steps, n_train=args.n_train, n_eval=args.n_eval)
    cfg = CleaningConfig(
        **{k: v for k, v in given.items() if v is not None}, n_score_tokens=args.n_score_tokens, setting=args.setting, seed=args.seed,
        init=args.init, ito_k=args.ito_k,
    )
    return cfg, TaskVectorConfig(n_prompts=args.n_prompts, n_shots=args.n_shots, arrows=args.arrows, seed=args.seed)


def _clean_effective(args: argparse.Namespace) -> dict[str, dict]:
    """What reproduce logs of a `clean` stage beyond its parsed options, so a library default that moves shows."""
    cfg, tv_cfg = clean_configs(args)
    return {"cleaning": cfg.to_dict(), "task_vector": tv_cfg.to_dict()}


def cmd_clean(args: argparse.Namespace) -> int:
    """Task Vector Cleaning for one or many tasks (or a λ sweep / a layer comparison), resumable."""
    from icl_circuits.experiments.clean import l1_sweep, layer_comparison, run_cleaning
    from icl_circuits.sae.registry import SAERef
    from icl_circuits.data.tasks import load_tasks

    tasks = load_tasks(args.tasks or args.task, strict=getattr(args, "strict", False))  # fail before the slow model load
    for opt, v in (("--l1", args.l1), ("--lr", args.lr)):
        if v is not None and not math.isfinite(v):
            raise SystemExit(f"error: {opt} {v} is not a finite number")
    ref = _clean_sae(args)
    check_layers(args.layers)
    cfg, tv_cfg = clean_configs(args)
    lm = load_lm(args)
    spec = args.layers
    if spec is None:  # `--sae resid:10` names its layer; else the bundled model's best layer
        spec = str(ref.layer) if ref is not None and ref.layer is not None else str(default_layer(lm.name, args.setting))
    layer = one_layer(spec)
    compare = layer is None  # several layers (a list, range or 'all'): the layer comparison
    if layer is not None and not 0 <= layer < lm.n_layers:  # before any SAE is loaded or trained for it
        raise SystemExit(f"error: --layer {layer} outside 0..{lm.n_layers - 1} (the model has {lm.n_layers} layers)")

    def sae_for(layer: int):  # type: ignore[no-untyped-def]
        if ref is None:
            starter = SAERef("resid", layer)
            return starter.spec, starter.resolve(lm, train_if_missing=True, progress=not args.quiet)
        if ref.is_starter:
            if compare or ref.layer != layer:
                raise SystemExit(f"error: --sae {args.sae} is the SAE of layer {ref.layer}, but --layers {spec} steers "
                                 f"{'several layers: leave --sae out' if compare else f'layer {layer}'}")  # fmt: skip
            return ref.spec, ref.resolve(lm, train_if_missing=True, progress=not args.quiet)
        sae = ref.resolve(lm)
        from icl_circuits.core.sites import Site, same_site

        if not same_site(sae.cfg.site, Site(layer, "resid_pre")) and not compare:
            raise SystemExit(f"error: --sae {args.sae} reads {sae.cfg.site}, but --layer {layer} steers resid_pre.{layer}; "
                             f"use a residual SAE trained on resid_pre.{layer}")  # fmt: skip
        return ref.spec, sae

    if compare:
        layers = parse_layers(spec, lm.n_layers)
        rows, files = layer_comparison(lm, {l: sae_for(l)[1] for l in layers}, tasks, args.out, cfg, tv_cfg, progress=not args.quiet)
        from icl_circuits.viz.report import write_report

        files.append(write_report(args.out, "Task vector reconstructions by layer (Fig. 2)"))
        print(f"\n{'layer':>5s} " + " ".join(f"{m:>18s}" for m in ("tv", "sae_reconstruction", "ito_5", "ito_20", "tvc")))
        for l in layers:
            means = [mean_of(rows, layer=l, method=m) for m in ("tv", "sae_reconstruction", "ito_5", "ito_20", "tvc")]
            print(f"{l:5d} " + " ".join(f"{x:18.3f}" for x in means))
        print("\nwrote:", *[str(p) for p in files], sep="\n  ")
        return 0
    assert layer is not None
    spec_name, sae = sae_for(layer)
    if args.sweep_l1:
        grid = [float(x) for x in args.sweep_l1.split(",")] if args.sweep_l1 != "paper" else None
        kw = {} if grid is None else dict(l1_coeffs=grid)
        rows, files = l1_sweep(lm, sae, tasks, layer, args.out, cfg=cfg, tv_cfg=tv_cfg, sae_spec=spec_name, progress=not args.quiet, **kw)
        from icl_circuits.viz.report import write_report

        files.append(write_report(args.out, f"TVC λ sweep (layer {layer}, SAE {spec_name})"))
        print(f"\n{'l1':>8s} {'rel. loss decrease':>18s} {'TV L0 fraction':>14s}")
        for l1 in sorted({r["l1_coeff"] for r in rows if r["method"] == "tvc"}):
            print(f"{l1:8g} {mean_of(rows, method='tvc', l1_coeff=l1):18.3f} "
                  f"{mean_of(rows, method='tvc', l1_coeff=l1, key='l0_fraction'):14.3f}")  # fmt: skip
        print("\nwrote:", *[str(p) for p in files], sep="\n  ")
        return 0
    results, files = run_cleaning(lm, sae, tasks, layer, args.out, cfg, tv_cfg, sae_spec=spec_name, progress=not args.quiet)
    if not is_main():  # under torchrun rank 0 reports for all (the tasks were split over ranks)
        return 0
    _print_cleaning(args, results, files, layer, spec_name)
    return 0


def _print_cleaning(args: argparse.Namespace, results: list, files: list, layer: int, spec: str) -> None:
    from icl_circuits.methods.cleaning_task import summary_rows
    from icl_circuits.viz.report import Section, write_report

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


def add_task_vectors(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("task-vectors", help="task-vector layer sweep: steer zero-shot prompts with each layer's TV")
    s.add_argument("--tasks", default="all", help="'all', or comma-separated task names / task files")
    add_layers(s, "all", "layers of the sweep")
    s.add_argument("--out", type=Path, default=Path("runs/task_vectors"), help="run directory (resumes if present)")
    s.add_argument("--n-prompts", type=int, default=16, help="n-shot prompts averaged into each TV")
    s.add_argument("--n-shots", type=int, default=16)
    s.add_argument("--arrows", choices=["all", "demos", "last"], default="all", help="which arrows the TV averages")
    s.add_argument("--n-eval", type=int, default=32, help="zero-shot prompts scored per task")
    add_score_tokens(s)
    run_options(s)
    s.set_defaults(func=cmd_task_vectors)


def add_clean(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("clean", help="Task Vector Cleaning (Sec. 3.1): TV -> sparse SAE latents, with baselines, λ sweeps, layer comparison")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="one task name or task file")
    g.add_argument("--tasks", help="'all', or comma-separated names / files")
    add_layers(s, None, "one resid_pre layer to steer (bundled model: 12 for execution, 6 for detection; others: required), "
               "or several: every method at each of them instead (Fig. 2)", "--layer")  # fmt: skip
    s.add_argument("--compare-layers", dest="layers", action=RangeLayers, metavar="LAYERS",
                   help="the layer comparison at these layers (old spelling of --layers with several layers)")
    s.add_argument("--sae", default="starter", metavar="SPEC",
                   help="'starter' (the shipped resid SAE of the layer), resid:LAYER, or a path in any supported format")
    s.add_argument("--setting", choices=["execution", "detection"], default="execution",
                   help="execution: steer the query arrow of zero-shot prompts; detection: the fake pair's output (App. G)")
    s.add_argument("--l1", type=float, default=None, help="λ; default: 0.01 for execution, 1e-3 for detection (cleaning.DEFAULT_L1)")
    s.add_argument("--lr", type=float, default=None, help="default: CleaningConfig.lr")
    s.add_argument("--patience", type=int, default=None, help="default: CleaningConfig.patience")
    s.add_argument("--max-steps", type=int, default=None, help="default: CleaningConfig.max_steps")
    s.add_argument("--n-train", type=int, default=None, help="default: CleaningConfig.n_train")
    s.add_argument("--n-eval", type=int, default=None, help="default: CleaningConfig.n_eval")
    add_score_tokens(s)
    s.add_argument("--n-prompts", type=int, default=16, help="n-shot prompts averaged into the task vector")
    s.add_argument("--n-shots", type=int, default=16)
    s.add_argument("--arrows", choices=["all", "demos", "last"], default="all")
    s.add_argument("--init", choices=["auto", "encode_mean", "mean_encode", "ito"], default="auto",
                   help="TVC's start: 'auto' (the authors': encode_mean for execution, ito for detection), the encoding of the "
                        "vector (Alg. 1), the mean of per-token encodings (App. D) or gradient pursuit with --ito-k latents")
    s.add_argument("--ito-k", type=int, default=7, help="latents of the 'ito' start (the authors' detection TVC: 7)")
    s.add_argument("--sweep-l1", help="run a λ sweep instead: 'paper' (1e-5 ... 0.1) or comma-separated values")
    s.add_argument("--out", type=Path, default=Path("runs/clean"))
    run_options(s)
    s.set_defaults(func=cmd_clean, effective=_clean_effective)
