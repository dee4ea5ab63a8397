"""Presets: the paper's real settings under one name each (model, published SAEs, layer, TVC lr).

    gemma-2-2b-gemma-scope   Gemma 2 2B + Gemma Scope residual SAEs, 16k and 65k, at layer 16
                             (App. D.1: "optimal task vector layer ... 16 for Gemma 2"; the
                             16k/65k SAEs of Fig. 17 have L0 78 / 128, which are Gemma Scope's
                             canonical layer_16 SAEs), TVC Adam lr 0.3 (16k) and 0.15 (65k) (App. D)
    gemma-3-270m-gemma-scope-2   the bundled Gemma 3 270M + Gemma Scope 2 residual SAEs at our
                             measured TV layer 12 (not from the paper; lr 0.15 is the paper's Gemma 1 value)

The SAEs are Hub paths: they download when online and load through formats.load_any; tests
resolve them against a fake hub folder (formats.hub._hf_download swapped), never the network.

Sites: Gemma Scope's layer_16 residual SAE reads blocks.16.hook_resid_post, i.e. our
resid_pre.17, so the TV is taken at and steered into resid_pre.17 (`--layer 17`). The paper
names this "layer 16" (the block whose output it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from icl_circuits.sae.dictionary import JumpReLUSAE


@dataclass(frozen=True)
class PresetSAE:
    label: str  # e.g. "16k"
    hub_path: str  # owner/repo/folder, as load_any takes it
    site: str  # where it reads (and what --layer steers)
    tvc_lr: float  # Adam lr of Task Vector Cleaning for this SAE
    width: int
    l0: int | None = None  # the SAE's published average L0


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # Hub id of the model
    layer: int  # resid_pre layer of the task vectors (= the SAEs' site)
    saes: tuple[PresetSAE, ...]
    source: str  # where the numbers come from
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def sae(self, label: str | None = None) -> PresetSAE:
        """The SAE called `label` (default: the first)."""
        if label is None:
            return self.saes[0]
        for s in self.saes:
            if s.label == label:
                return s
        raise KeyError(f"preset {self.name!r} has no SAE {label!r}; it has {[s.label for s in self.saes]}")

    def clean_args(self, label: str | None = None, device: str = "cuda", dtype: str = "bfloat16",
                   tasks: str = "all") -> list[str]:  # fmt: skip
        """Arguments of `icl-circuits clean` that run Task Vector Cleaning in this setting on `tasks`
        ('all' or comma-separated names: clean refuses a command line without --task / --tasks)."""
        s = self.sae(label)
        return ["clean", "--tasks", tasks, "--model", self.model, "--layer", str(self.layer), "--sae", s.hub_path,
                "--lr", str(s.tvc_lr), "--device", device, "--dtype", dtype]  # fmt: skip

    def command(self, label: str | None = None, device: str = "cuda", dtype: str = "bfloat16",
                tasks: str = "all") -> str:  # fmt: skip
        return "icl-circuits " + " ".join(self.clean_args(label, device, dtype, tasks))


_GS_RES = "google/gemma-scope-2b-pt-res"
PRESETS: dict[str, Preset] = {
    "gemma-2-2b-gemma-scope": Preset(
        name="gemma-2-2b-gemma-scope",
        model="google/gemma-2-2b",
        layer=17,
        saes=(
            PresetSAE("16k", f"{_GS_RES}/layer_16/width_16k/average_l0_78", "resid_pre.17", tvc_lr=0.3, width=16384,
                      l0=78),
            PresetSAE("65k", f"{_GS_RES}/layer_16/width_65k/average_l0_128", "resid_pre.17", tvc_lr=0.15, width=65536,
                      l0=128),
        ),  # fmt: skip
        source="Kharlapenko et al. 2025, App. D and D.1 (lr 0.3 for Gemma 2 2B 16k, 0.15 for 65k; layer 16; "
        "L0 78 / 128)",
        notes="Gemma Scope layer_16 reads blocks.16.hook_resid_post = resid_pre.17. Gemma 2 2B is ~5 GB in bf16: "
        "use a GPU.",
    ),
    "gemma-3-270m-gemma-scope-2": Preset(
        name="gemma-3-270m-gemma-scope-2",
        model="gemma-3-270m",
        layer=12,
        saes=(
            PresetSAE("16k", "google/gemma-scope-2-270m-pt/resid_post_all/layer_11_width_16k_l0_medium", "resid_pre.12",
                      tvc_lr=0.15, width=16384),
            PresetSAE("65k", "google/gemma-scope-2-270m-pt/resid_post_all/layer_11_width_65k_l0_medium", "resid_pre.12",
                      tvc_lr=0.15, width=65536),
        ),  # fmt: skip
        source="not from the paper: our measured TV layer of the bundled model (12) and the paper's Gemma 1 lr",
        notes="Gemma Scope 2 resid_post layer 11 = resid_pre.12. lr not tuned for these SAEs.",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"no preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]


def load_preset_sae(name: str, label: str | None = None, **overrides: Any) -> JumpReLUSAE:
    """Download (when online) and load one SAE of a preset, its site and model set from the preset."""
    from icl_circuits.sae.formats import load_any  # formats is heavier; presets stay importable for --help

    preset = get_preset(name)
    s = preset.sae(label)
    overrides.setdefault("site", s.site)
    overrides.setdefault("model", preset.model)
    return load_any(s.hub_path, **overrides)
