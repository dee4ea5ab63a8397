"""Command line: a thin layer over the Python API.

    icl-circuits tasks
    icl-circuits task-vectors --model gemma-3-270m --tasks all [--layers 0-17] [--out runs/tv]
    icl-circuits sae train --model gemma-3-270m --sae resid:12,attn:12,transcoder:12 --corpus generated:2048 --out runs/saes
    icl-circuits sae eval --model gemma-3-270m --sae runs/saes/saes/resid_12 --corpus generated:2048
    torchrun --nproc_per_node 2 -m icl_circuits.cli sae train ...   (several SAEs: spread over ranks)
    torchrun --nproc_per_node 8 -m icl_circuits.cli sae train --cache runs/acts --sae resid:12 ...   (one SAE: data-parallel)
    torchrun --nproc_per_node 8 -m icl_circuits.cli clean|circuit --tasks all ...   (tasks split over ranks)
    icl-circuits examples --model gemma-3-270m --sae resid:12 --corpus generated:512+python-docs --out runs/examples
    icl-circuits view runs/examples [--port 8000] [--host 127.0.0.1]
    icl-circuits clean --tasks all --layers 12          (one layer: cleaning; several, e.g. 6,10-13: the layer comparison)
    icl-circuits circuit --model gemma-3-270m --tasks all --layers 11-12 --out runs/circuits
    icl-circuits reproduce --recipe paper --out runs/paper --docs docs/results/gemma-3-270m   (every experiment + claims)

One grammar everywhere: --layers LAYERS ('all', '12', '2-9', '1,4,6-8'); --sae SPEC (repeatable and
comma-separated: resid:12, resid.12, resid_12, resid_pre.12, KIND.LAYER=PATH, NAME=PATH or a path);
--model --device --dtype --threads --seed --quiet on every command that runs a model; --config FILE
(TOML, keys = option names) on every command, overridden by options on the command line.
"""

from __future__ import annotations

import argparse
import sys

from icl_circuits import __version__
from icl_circuits.core.distributed import init_from_env
from icl_circuits.cli.analysis import add_circuit, add_detectors, add_heatmap, cmd_circuit, cmd_detectors, cmd_heatmap
from icl_circuits.cli.common import N_SCORE_TOKENS, Parser, add_config, parse_layers
from icl_circuits.cli.features import add_dashboards, add_examples, cmd_dashboards, cmd_examples
from icl_circuits.cli.runs import add_reproduce, add_tasks, add_view, cmd_reproduce, cmd_tasks, cmd_view
from icl_circuits.cli.sae_cmds import add_sae_commands, cmd_sae_compare, cmd_sae_eval, cmd_sae_export, cmd_sae_harvest, cmd_sae_train
from icl_circuits.cli.vectors import BUNDLED_LAYERS, add_clean, add_task_vectors, cmd_clean, cmd_task_vectors, default_layer

__all__ = [
    "BUNDLED_LAYERS", "N_SCORE_TOKENS", "build_parser", "cmd_circuit", "cmd_clean", "cmd_dashboards", "cmd_detectors",
    "cmd_examples", "cmd_heatmap", "cmd_reproduce", "cmd_sae_compare", "cmd_sae_eval", "cmd_sae_export", "cmd_sae_harvest",
    "cmd_sae_train", "cmd_task_vectors", "cmd_tasks", "cmd_view", "default_layer", "main", "parse_layers",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="icl-circuits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.handles_config = True  # the top parser applies a command's --config file (see Parser)
    p.add_argument("--version", action="version", version=f"icl-circuits {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_tasks, add_task_vectors, add_sae_commands, add_examples, add_view, add_dashboards, add_heatmap,
                add_detectors, add_clean, add_circuit, add_reproduce):  # fmt: skip
        add(sub)
    _add_strict(p)
    add_config(p)
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


def _one_line_warnings() -> None:
    """Our data warnings (skipped task pairs, a collapsed cleaning) as one 'warning:' line each."""
    import warnings

    if getattr(warnings.formatwarning, "_icl_one_line", False):
        return
    default_format = warnings.formatwarning

    def one_line_warning(message, category, *args, **kwargs):  # noqa: ANN001, ANN202
        if category.__name__ in ("SkippedPairsWarning", "CleaningWarning"):
            return f"warning: {message}\n"
        return default_format(message, category, *args, **kwargs)

    one_line_warning._icl_one_line = True  # type: ignore[attr-defined]
    warnings.formatwarning = one_line_warning


def main(argv: list[str] | None = None) -> int:
    """Run a command; every expected failure (bad option or input, missing or damaged file, disk full) is
    one `error:` line on stderr and rc 2."""
    from safetensors import SafetensorError

    _one_line_warnings()
    try:
        args = build_parser().parse_args(argv)  # a bad option: Parser.error prints one line, rc 2
        if getattr(args, "device", None) is not None:  # e.g. --device cuda without CUDA: rc 2 before any slow step
            from icl_circuits.core.loading import resolve_device

            resolve_device(args.device)
        init_from_env()  # under torchrun (WORLD_SIZE > 1): join the process group, one GPU per rank
        return args.func(args)
    except SystemExit as e:  # commands raise SystemExit("error: ...") for bad options
        if isinstance(e.code, str):
            msg = _one_line(e.code)
            print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr)
            return 2
        return e.code if isinstance(e.code, int) else 0  # argparse: 2 after its one-line error, 0 after --help
    except (ValueError, OSError) as e:  # ConfigError is a ValueError; OSError: missing/unreadable files, disk full
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SafetensorError as e:
        print(f"error: a damaged or truncated .safetensors file ({_one_line(e)})", file=sys.stderr)
        return 2

