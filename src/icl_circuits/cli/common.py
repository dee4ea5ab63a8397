"""What every command shares: the run options, layer lists, SAE options, --config files, small helpers.

The command modules import from here; nothing here imports torch at module level (the CLI starts fast).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icl_circuits.sae.registry import SAERef

N_SCORE_TOKENS = 2  # = prompts.N_SCORE_TOKENS (a literal: the CLI starts without importing torch; a test checks)
LAYERS_HELP = "'all', '12', '2-9', '1,4,6-8'"


# -- the parser ------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (rc 2, like every other failure) and `--config FILE` defaults.

    The top parser (`handles_config`) gives a command's --config values to that command as defaults,
    except for options the command line gives (one of a group of exclusive options, e.g. --task,
    counts for the whole group), so options on the command line always win."""

    handles_config = False

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):  # type: ignore[no-untyped-def, override]
        argv = list(sys.argv[1:] if args is None else args)
        path = _config_arg(argv) if self.handles_config else None
        sub = _command_of(self, argv) if path is not None else None
        if path is None or sub is None:  # no --config, or no such command (the plain parse says so)
            return super().parse_known_args(argv, namespace)
        values = config_defaults(path, sub)
        with _overridden(sub, {a.dest: _UNSET if a.nargs != 0 and not isinstance(a, argparse._AppendAction) else None
                               for a in sub._actions}, optional=True):  # fmt: skip
            given = {k for k, v in vars(super().parse_known_args(argv, None)[0]).items() if v is not _UNSET and v is not None}
        for group in sub._mutually_exclusive_groups:  # --task on the command line drops tasks = ... of the file
            if given & {a.dest for a in group._group_actions}:
                given |= {a.dest for a in group._group_actions}
        values = {k: v for k, v in values.items() if k not in given}
        with _overridden(sub, values, optional=set(values)):
            return super().parse_known_args(argv, namespace)


_UNSET = object()  # a default no command line gives: tells which options the command line named


def _config_arg(argv: list[str]) -> Path | None:
    """The value of the last --config in argv (as argparse reads it), or None."""
    found = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--config="):
            found = a.partition("=")[2]
    return Path(found) if found is not None else None


def _command_of(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    """The parser of the command argv names ('sae train ...' -> the train parser); None if it names none."""
    words = iter(a for a in argv if not a.startswith("-"))
    while True:
        subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subs is None:
            return parser
        parser = subs.choices.get(next(words, ""))  # type: ignore[assignment]
        if parser is None:
            return None


@contextmanager
def _overridden(parser: argparse.ArgumentParser, defaults: dict[str, Any], optional: bool | set[str]) -> Iterator[None]:
    """Parse with these defaults, and with `optional` options (all: True) not required; restored after."""
    actions = {a: (a.default, a.required) for a in parser._actions}
    groups = {g: g.required for g in parser._mutually_exclusive_groups}
    saved = dict(parser._defaults)
    try:
        parser.set_defaults(**defaults)
        for a in parser._actions:
            a.required = a.required and not (optional is True or a.dest in optional)  # type: ignore[operator]
        for g in parser._mutually_exclusive_groups:
            g.required = g.required and not (optional is True or {a.dest for a in g._group_actions} & optional)  # type: ignore[operator]
        yield
    finally:
        for a, (default, required) in actions.items():
            a.default, a.required = default, required
        for g, required in groups.items():
            g.required = required
        parser._defaults.clear()
        parser._defaults.update(saved)


class ConfigError(ValueError):
    """A --config file that cannot be used: one `error:` line and rc 2, like any bad input."""


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None


def config_defaults(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A TOML file of option values (keys: option names, '_' or '-') -> {dest: default} for `parser`."""
    out: dict[str, Any] = {}
    for key, value in read_toml(path).items():
        action = parser._option_string_actions.get("--" + key.replace("_", "-"))
        if action is None or key.replace("_", "-") in ("config", "help"):
            known = sorted({a.option_strings[0][2:] for a in parser._actions if a.option_strings and a.dest not in ("help", "config")})
            raise ConfigError(f"--config {path}: unknown option {key!r} for `{parser.prog}` (known: {', '.join(known)})")
        value = _config_value(action, key, value, path)
        negated = isinstance(action, argparse.BooleanOptionalAction) and key.replace("_", "-").startswith("no-")
        out[action.dest] = (not value) if negated else value  # no_ddp = true is ddp = false
    return out


def _config_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """A TOML value as the option's default: converted by its type, lists joined or kept, choices checked."""
    if isinstance(value, dict):
        raise ConfigError(f"--config {path}: {key} must be a value, not a table")
    if hasattr(action, "from_config"):  # our own actions say what their default looks like
        return action.from_config(value)  # type: ignore[attr-defined]
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise ConfigError(f"--config {path}: {key} must be true or false, got {value!r}")
        return value
    convert = (lambda v: action.type(str(v))) if callable(action.type) else (lambda v: v)  # noqa: E731
    try:
        if isinstance(action, argparse._AppendAction):
            value = [convert(v) for v in (value if isinstance(value, list) else [value])]
            bad = [v for v in value if action.choices is not None and v not in action.choices]
        else:
            value = ",".join(str(v) for v in value) if isinstance(value, list) else value
            value = convert(value) if action.type is not None else (str(value) if value is not None else None)
            bad = [value] if action.choices is not None and value not in action.choices else []
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"--config {path}: {key} = {value!r}: {e}") from None
    if bad:
        raise ConfigError(f"--config {path}: {key} = {bad[0]!r}: use one of {', '.join(map(str, action.choices))}")  # type: ignore[arg-type]
    return value


# -- layers ----------------------------------------------------------------------------------------
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
            raise SystemExit(f"error: bad --layers {spec!r}; use e.g. {LAYERS_HELP}") from None
        if b < a:
            raise SystemExit(f"error: bad --layers {spec!r}: the range {part.strip()} runs backwards; write {b}-{a}")
        layers.update(range(a, b + 1))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise SystemExit(f"error: --layers {spec!r}: layers {sorted(bad)} outside 0..{n_layers - 1} (the model has {n_layers} layers)")
    return sorted(layers)


def one_layer(spec: str) -> int | None:
    """'12' -> 12 (a single layer); None for a list, range or 'all'."""
    s = spec.strip()
    return int(s) if s.isdigit() else None


def add_layers(s: argparse.ArgumentParser, default: str | None, help: str, *aliases: str) -> None:
    """--layers (plus old spellings as aliases of the same dest, so old command lines parse the same)."""
    s.add_argument("--layers", *aliases, dest="layers", default=default, metavar="LAYERS", help=f"{help} ({LAYERS_HELP})")


class RangeLayers(argparse.Action):
    """`clean --compare-layers 12`: a layer comparison at one layer, kept as '12-12' (a bare '12' cleans)."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, option: str | None = None) -> None:
        setattr(ns, self.dest, self.from_config(value))

    def from_config(self, value: Any) -> str:
        s = str(value).strip()
        return f"{s}-{s}" if one_layer(s) is not None else s


# -- SAE options -----------------------------------------------------------------------------------
class _Default(str):
    """A default value of a JoinSpecs option: the first spec given on the command line replaces it."""


class JoinSpecs(argparse.Action):
    """A repeatable, comma-separated SAE option kept as one comma-joined string ('resid:12,attn:12'), so
    `--saes a,b` and `--sae a --sae b` parse to the same value as `--saes a,b` always did."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.default, str):
            self.default = _Default(self.default)

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, option: str | None = None) -> None:
        now = getattr(ns, self.dest, None)
        setattr(ns, self.dest, f"{now},{value}" if isinstance(now, str) and not isinstance(now, _Default) else str(value))

    def from_config(self, value: Any) -> str:
        return _Default(",".join(map(str, value)) if isinstance(value, list) else str(value))


def add_sae_option(s: argparse.ArgumentParser, default: str, help: str) -> None:
    """--sae / --saes SPEC: repeatable and comma-separated, any SAERef spelling."""
    s.add_argument("--sae", "--saes", dest="saes", action=JoinSpecs, default=default, metavar="SPEC", help=help)


def sae_refs(specs: str | list[str] | None, option: str = "--sae") -> list[SAERef]:
    """The SAERefs an SAE option names, in order; a bad spec is a ValueError naming the option."""
    from icl_circuits.sae.registry import parse_refs

    try:
        return parse_refs(specs)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


# -- run options -----------------------------------------------------------------------------------
def run_options(s: argparse.ArgumentParser, dtype: str = "float32", dtype_help: str = "the model's dtype",
                model: str | None = "gemma-3-270m", model_help: str | None = None) -> None:  # fmt: skip
    """--model, --device, --dtype, --threads, --seed, --quiet: the same on every command that runs a model."""
    from icl_circuits.core.loading import DTYPES

    s.add_argument("--model", default=model, help=model_help or "'gemma-3-270m' (bundled), a .gguf file, a folder or a hub id")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--device", default="cpu", help="where the model, SAEs and prompt tensors live: cpu, cuda, cuda:1, mps")
    s.add_argument("--dtype", choices=DTYPES, default=dtype, help=f"{dtype_help} (default {dtype})")


def add_score_tokens(s: argparse.ArgumentParser) -> None:
    """One default for how many output tokens are scored, on every command that scores outputs."""
    s.add_argument("--n-score-tokens", type=int, default=N_SCORE_TOKENS, help="first n output tokens scored (the authors: 2)")


def add_config(parser: argparse.ArgumentParser) -> None:
    """--config FILE on every command (and sub-command)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                add_config(sub)
            return
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="a TOML file of option values (keys: option names); options given here override it")  # fmt: skip


def load_lm(args: argparse.Namespace, spec: str | None = None):  # type: ignore[no-untyped-def]
    """load_model(spec or --model) on --device in --dtype, after --threads is applied."""
    import torch

    from icl_circuits.core.loading import load_model, resolve_dtype

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return load_model(spec if spec is not None else args.model, dtype=resolve_dtype(args.dtype), device=args.device)


def check_layers(spec: str | None) -> None:
    """A --layers value with bad syntax fails before the slow model load (the range is checked after)."""
    if spec is not None and spec != "all":
        parse_layers(spec, sys.maxsize)


# -- small helpers ---------------------------------------------------------------------------------
def floats(spec: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in spec.split(",") if x)
    except ValueError:
        raise SystemExit(f"error: bad {what} {spec!r}; use comma-separated numbers") from None


def kv_floats(items: list[str] | None) -> dict[str, float] | None:
    """['transcoder=4', 'attn=20'] -> {'transcoder': 4.0, 'attn': 20.0}"""
    return _key_values(items, float, "KIND=NUMBER")


def kv_trainer(items: list[str] | None) -> dict | None:
    """['aux_k=256', 'l0_coeff=2'] -> {'aux_k': 256, 'l0_coeff': 2.0}: more TrainerConfig fields."""
    import json

    return _key_values(items, json.loads, "NAME=VALUE (a JSON value)")


def _key_values(items: list[str] | None, convert: Any, form: str) -> dict | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = convert(value)
        except ValueError:  # json.JSONDecodeError is a ValueError
            raise SystemExit(f"error: expected {form}, got {item!r}") from None
    return out


def report(run_dir: Path, title: str) -> Path:
    """Every command leaves a static report.html (figures and tables found in its run directory)."""
    from icl_circuits.viz.report import write_report

    return write_report(run_dir, title)


def mean_of(rows: list[dict], key: str = "relative_loss_decrease", **match: object) -> float:
    vals = [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return sum(vals) / len(vals) if vals else float("nan")


def words(value: str | None) -> list[str]:
    """'a,b,,c' -> ['a', 'b', 'c']"""
    return [x for x in (value or "").split(",") if x]
