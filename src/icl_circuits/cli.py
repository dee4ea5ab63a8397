"""Command line: a thin layer over the Python API.

    icl-circuits tasks
    icl-circuits task-vectors --model gemma-3-270m --tasks all [--layers 0-17] [--out runs/tv]
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
