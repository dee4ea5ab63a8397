"""One way to name an SAE: `SAERef.parse` reads every spelling the commands and result files use.

Accepted forms (KIND is resid, attn or transcoder; LAYER a number):

    resid:12  resid.12  resid_12       the starter-suite SAE of that kind and layer
    resid_pre.12  attn_out.12          the same, named by the site the SAE reads
    KIND:LAYER=PATH  KIND.LAYER=PATH   an SAE file/folder/Hub id for that kind and layer (circuits)
    NAME=PATH                          an SAE under a name of your choice (example stores, dashboards)
    PATH                               an SAE in any supported format (a folder, file, Hub id or
                                       'saelens:RELEASE/ID'); kind and layer come from its config

A KIND/LAYER spelling always means the starter suite: write a local folder called `resid_12` as
`./resid_12`. Names written into result files are the ones used before:
`name` ('resid_12', folder names and example stores), `key` ('resid.12', circuit nodes) and `spec`
('resid:12', `sae_spec` of cleaning results).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

# core.sites needs only torch, which `import icl_circuits` loads anyway; the model stack stays unloaded
from icl_circuits.core.sites import SAE_KIND_SITES, SAE_KINDS

if TYPE_CHECKING:  # not at import: the CLI parses specs before it loads the model stack
    from icl_circuits.core.model import LM
    from icl_circuits.sae.dictionary import JumpReLUSAE

KINDS: tuple[str, ...] = SAE_KINDS  # the name this module's users import
# site a starter SAE reads -> its kind, for SITE.LAYER spellings; only kinds that read and write one site
# (resid_pre, attn_out): a transcoder spans two, so one site does not name it
SITE_KINDS: dict[str, str] = {
    options[0][0]: kind for kind, options in SAE_KIND_SITES.items() if options[0][0] == options[0][1]
}
FORMS = ("KIND:LAYER, KIND.LAYER or KIND_LAYER (e.g. resid:12, attn.11, transcoder_12), SITE.LAYER (resid_pre.12, "
         "attn_out.12), KIND:LAYER=PATH, NAME=PATH, or a path / Hub id / saelens:RELEASE/ID; KIND is one of "
         + ", ".join(KINDS))  # fmt: skip

_KIND_LAYER = re.compile(r"^([A-Za-z][A-Za-z_]*?)([:._])(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")  # a NAME of NAME=PATH
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"bad SAE spec {spec!r}: {why}; use {FORMS}")


@dataclass(frozen=True)
class SAERef:
    """An SAE named by kind and layer (starter suite), by a path / Hub id, or both (`KIND:LAYER=PATH`)."""

    kind: str | None = None
    layer: int | None = None
    path: str | None = None  # a local path, Hub id or 'saelens:...' spec; None: the starter suite
    label: str | None = field(default=None, compare=False)  # the left side of 'LEFT=PATH' as written (example stores keep this name)

    def __post_init__(self) -> None:
        if (self.kind is None) != (self.layer is None):
            raise ValueError("SAERef: give both kind and layer, or neither")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"SAERef: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind is None and self.path is None:
            raise ValueError("SAERef: give a kind and layer, a path, or both")

    @classmethod
    def parse(cls, spec: str) -> "SAERef":
        """Any accepted spelling (module docstring) -> SAERef; a ValueError naming the accepted forms otherwise."""
        text = str(spec).strip()
        if not text:
            raise _bad(text, "it is empty")
        kind_layer = _kind_layer(text, strict=True)
        if kind_layer is not None:
            return cls(*kind_layer)
        left, eq, right = text.partition("=")
        if eq and _exists(text):  # e.g. runs/l1=0.1/sae: a path with '=' in it
            return cls(path=text)
        if eq and (_kind_layer(left) is not None or _NAME.match(left)):
            if not right.strip():
                raise _bad(text, "nothing after '='")
            return cls(*(_kind_layer(left) or (None, None)), path=right.strip(), label=left)
        if eq and not left:
            raise _bad(text, "nothing before '='")
        if ":" in text and not (text.startswith("saelens:") or _DRIVE.match(text)):
            raise _bad(text, "unknown kind or layer")
        return cls(path=text)

    # -- the names written into result files --------------------------------------------------
    @property
    def name(self) -> str:
        """'resid_12': training output folders, starter-suite folders, example-store names."""
        return f"{self._known()[0]}_{self._known()[1]}"

    @property
    def key(self) -> str:
        """'resid.12': the circuits' SAE keys (node names in nodes.csv and graph.json)."""
        return f"{self._known()[0]}.{self._known()[1]}"

    @property
    def spec(self) -> str:
        """What a result records to find this SAE again: 'resid:12' (starter) or the path as given."""
        return self.path if self.path is not None else f"{self._known()[0]}:{self._known()[1]}"

    @property
    def store_name(self) -> str:
        """The name of this SAE in example stores and dashboards: NAME of 'NAME=PATH' as written, else `name`."""
        return self.label if self.label is not None else self.name

    @property
    def is_starter(self) -> bool:
        return self.path is None

    def _known(self) -> tuple[str, int]:
        if self.kind is None or self.layer is None:
            raise ValueError(f"SAE {self.path}: its kind and layer are known only once loaded (use SAERef.with_config)")
        return self.kind, self.layer

    def with_config(self, sae: "JumpReLUSAE") -> "SAERef":
        """This ref with kind and layer from a loaded SAE's config where the spec did not give them."""
        if self.kind is not None:
            return self
        if sae.cfg.kind not in KINDS or sae.cfg.layer is None:
            raise ValueError(f"SAE {self.path}: its config names no kind/layer ({sae.cfg.kind!r}, {sae.cfg.layer!r}); "
                             "give KIND:LAYER=PATH")  # fmt: skip
        return replace(self, kind=sae.cfg.kind, layer=int(sae.cfg.layer))

    # -- loading -------------------------------------------------------------------------------
    def check_path(self) -> None:
        """A missing local path, or a saelens: name without sae-lens installed, fails now, without the network
        (before a slow model load)."""
        if self.path is None:
            return
        if self.path.startswith("saelens:"):
            from icl_circuits.sae.formats.hub import require_sae_lens

            require_sae_lens(self.path)
            return
        from icl_circuits.core.loading import resolve_spec

        resolve_spec(self.path, "--sae", hub_subfolders=True)

    def resolve(self, lm: "LM", train_if_missing: bool = False, progress: bool = True) -> "JumpReLUSAE":
        """The SAE as float32 on lm's device: the starter suite's for KIND:LAYER, else `load_any(path)`.

        Raises a ValueError when it was made for another model width."""
        if self.path is None:
            from icl_circuits.sae.suite import starter_sae

            return starter_sae(lm, self.spec, train_if_missing=train_if_missing, progress=progress)
        from icl_circuits.sae.formats import load_any  # a saelens: name without sae-lens: MissingPackageError

        sae = load_any(self.path).float()
        sae.check_compatible(lm)
        return sae.to(lm.device)


def parse_refs(specs: str | list[str] | tuple[str, ...] | None) -> list[SAERef]:
    """Repeatable and/or comma-separated options ('resid:12,attn:12', ['a=x', 'b=y']) -> refs, in order."""
    items = [specs] if isinstance(specs, str) else list(specs or [])
    return [SAERef.parse(s) for item in items for s in str(item).split(",") if s.strip()]


def _kind_layer(text: str, strict: bool = False) -> tuple[str, int] | None:
    """'resid:12' / 'resid.12' / 'resid_12' / 'resid_pre.12' -> ('resid', 12); None if not that shape.

    `strict`: an unknown kind in the colon form ('mlp:3') is an error; 'layer_3' or 'model.1' may be a
    name or a path, so those only fail when loaded."""
    m = _KIND_LAYER.match(text)
    if m is None:
        return None
    if m.group(1) in SITE_KINDS and m.group(2) == "_":  # 'attn_out_3' is a free name (a store may be called so)
        return None
    kind = SITE_KINDS.get(m.group(1), m.group(1))
    if kind not in KINDS:
        if strict and m.group(2) == ":":
            raise _bad(text, f"unknown kind {m.group(1)!r}")
        return None
    return kind, int(m.group(3))


def _exists(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except OSError:  # a name too long for the file system, say
        return False
