"""`icl-circuits tasks`, `view` and `reproduce`: list tasks, browse a run, run a whole recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icl_circuits.cli.common import run_options, words


def cmd_tasks(args: argparse.Namespace) -> int:
    from icl_circuits.data.tasks import list_tasks, load_task

    for name in list_tasks():
        task = load_task(name)
        x, y = task.pairs[0]
        print(f"{name:30s} {len(task):4d} pairs   e.g. {x} -> {y}")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from icl_circuits.viz.viewer import serve

    try:
        serve(args.run_dir, host=args.host, port=args.port, example_stores=args.examples, allow_hosts=args.allow_host)
    except FileNotFoundError:
        raise
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Every experiment of a recipe, resumably, then the claims report."""
    from icl_circuits.experiments.claims import claims_markdown
    from icl_circuits.experiments.reproduce import ReproduceConfig, reproduce

    cfg = ReproduceConfig(
        recipe=args.recipe, out=args.out, docs=args.docs, model=args.model, tasks=args.tasks, device=args.device,
        dtype=args.dtype, threads=args.threads, seed=args.seed, include=tuple(words(args.include)), rerun=tuple(words(args.rerun)),
        only=tuple(words(args.only)), progress=not args.quiet, jobs=args.jobs,
    )  # fmt: skip
    res = reproduce(cfg)
    print("\nclaims of the paper, on this run (rules and figures in the report):")
    print(claims_markdown(res.claims))
    print(f"\nreport: {res.report}\n        {res.report.with_name('report.md')}")
    return 0


def add_tasks(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("tasks", help="list the built-in ICL tasks")
    s.set_defaults(func=cmd_tasks)


def add_view(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("view", help="browse a run in a local web page (tasks, features, examples, circuits, plots)")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--examples", action="append", help="an example store outside RUN_DIR (repeatable)")
    s.add_argument("--allow-host", action="append", default=[],
                   help="a Host name to answer besides loopback (e.g. the LAN name with --host 0.0.0.0); repeatable")
    s.set_defaults(func=cmd_view)


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("reproduce", help="every experiment of the paper from a recipe file, resumably, with the claims report")
    s.add_argument("--recipe", default="paper",
                   help="'paper' (everything, hours on a CPU), 'demo' (≤ 15 min), 'saes' (docs/saes.md: the starter suite "
                        "and the SAE recipe comparison, hours; no claims table) or a .toml file")  # fmt: skip
    s.add_argument("--tasks", default=None, help="'all', or comma-separated task names / your task files (default: the recipe's)")
    s.add_argument("--out", type=Path, default=Path("runs/paper"), help="run folder: one sub-folder per stage (resumes if present)")
    s.add_argument("--docs", type=Path, default=None, help="where the report, figures and tables go (default: <out>/results)")
    s.add_argument("--include", default="", help="optional stages to run too (comma-separated), e.g. circuits_10_17")
    s.add_argument("--only", default="", help="run only these stages (the report covers whatever has finished)")
    s.add_argument("--rerun", default="", help="finished stages to run again ('all'); their commands resume what they can")
    s.add_argument("--jobs", type=int, default=1, help="stages run side by side (independent ones, each in its own process)")
    run_options(s)
    s.set_defaults(func=cmd_reproduce)
