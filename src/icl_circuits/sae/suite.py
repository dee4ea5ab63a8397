"""The starter SAE suite: SAEs the package ships for its bundled model, or trains and caches on demand.

`starter_sae(lm, "resid:12")` looks in three places, in order:
  1. the package's shipped files  icl_circuits/data/saes/<model>/<name>/
  2. the user cache              <cache_dir>/saes/<model>/<name>/saes/<name>/
  3. neither: trains it with STARTER_RECIPE (progress shown, resumable) into the cache.
`export_suite(run_dir, dest)` turns a training run into shippable folders (bf16 weights, fp32
biases) with a model card each.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from ..loading import cache_dir
from ..model import LM
from ..storage import read_json
from .dictionary import JumpReLUSAE
from .formats import load_sae, save_sae
from .training import SAESpec, TrainConfig

STARTER_SPECS = ("resid:11", "resid:12", "attn:11", "attn:12", "transcoder:11", "transcoder:12")
STARTER_CORPUS = "generated:512+python-docs"
# What the shipped suite was trained with (a CPU budget: see each model card for what it reached).
STARTER_RECIPE: dict[str, Any] = dict(
    arch="gated", d_sae=4096, n_tokens=600_000, batch_tokens=512, dead_window=200, dead_steps=400, l1_coeff=30.0,
    l1_by_kind={"transcoder": 4.0},
    b_dec_init="mean", norm_centered=True, checkpoint_every=100, skip_docs=64,
)  # fmt: skip


def shipped_dir(model: str) -> Path:
    return Path(str(files("icl_circuits").joinpath("data", "saes", model.replace("/", "_"))))


def starter_sae(lm: LM, spec: str, train_if_missing: bool = True, progress: bool = True) -> JumpReLUSAE:
    """The starter SAE `spec` ('resid:12', 'attn:11', 'transcoder:12', ...) for `lm`, as float32."""
    name = SAESpec.parse(spec).name
    for folder in (shipped_dir(lm.name) / name, cache_dir() / "saes" / lm.name.replace("/", "_") / name / "saes" / name):
        if (folder / "config.json").is_file():
            sae = load_sae(folder, dtype=torch.float32)
            sae.check_compatible(lm)
            return sae
    if not train_if_missing:
        raise FileNotFoundError(f"no starter SAE {name!r} for {lm.name!r} (shipped or cached)")
    from ..corpus import from_spec
    from .training import train_saes

    run = cache_dir() / "saes" / lm.name.replace("/", "_") / name
    cfg = TrainConfig(specs=[spec], **STARTER_RECIPE)
    print(f"training the missing starter SAE {name} for {lm.name} into {run} (resumes if interrupted)")
    return train_saes(lm, from_spec(STARTER_CORPUS, lm, progress=progress), cfg, run, progress=progress)[name].float()


def export_suite(run_dir: str | Path, dest: str | Path, corpus: str = STARTER_CORPUS) -> list[Path]:
    """Copy a run's SAEs to `dest`/<name>/ with bf16 weights and a model card (README.md) each."""
    run, dest = Path(run_dir), Path(dest)
    header = read_json(run / "train_config.json")
    evals = {e["site"]: e for e in (read_json(run / "eval.json") if (run / "eval.json").is_file() else [])}
    out = []
    for sae_dir in sorted((run / "saes").iterdir()):
        sae = load_sae(sae_dir)
        target = dest / sae_dir.name
        save_sae(sae, target, weight_dtype=torch.bfloat16, card=model_card(sae, header, evals.get(sae.cfg.site), corpus))
        out.append(target)
    return out


def model_card(sae: JumpReLUSAE, header: dict, ev: dict | None, corpus: str) -> str:
    c, t = sae.cfg, header["config"]
    l1 = (t.get("l1_by_kind") or {}).get(c.kind, t["l1_coeff"])
    norm = "centred (E||x - mean|| = sqrt(d))" if t.get("norm_centered") else "E||x|| = sqrt(d)"
    where = f"`{c.site}` → `{c.out_site}`" if c.out_site else f"`{c.site}`"
    lines = [
        f"# {c.kind} SAE, layer {c.layer}, {header['model']}",
        "",
        f"- reads {where}; {c.d_sae} latents (d_in {c.d_in}); JumpReLU inference format (converted exactly from a {t['arch']} SAE)",
        f"- trained with `icl-circuits sae train` on {t['n_tokens']:,} tokens of `{corpus}` "
        f"(the first {t['skip_docs']} documents held out for evaluation)",
        f"- recipe (paper App. B): Adam lr {t['lr']}, betas (0.0, 0.99), orthogonal init with decoder = encoder transpose, "
        f"Anthropic input normalisation, {norm} (input scale {c.input_scale:.4g}, output scale {c.output_scale:.4g}), "
        f"decoder-norm-weighted sparsity (coefficient {l1 if l1 is not None else 'default'}), "
        f"ghost grads on dead features (dead: no fire for {t['dead_steps']} steps or density < 5e-6 over {t['dead_window']} batches), "
        f"{t['param_dtype']} weights with fp32 biases, batch {t['batch_tokens']} tokens, b_dec init `{t['b_dec_init']}`, centred encoder input",
        "- stored: bf16 W_enc/W_dec, fp32 biases and thresholds (`load_sae` computes in float32)",
        "",
    ]
    if ev:
        lines += [
            "## Evaluation on held-out tokens",
            "",
            "| tokens | L0 | variance explained | dead fraction | CE clean | CE with SAE | CE zero-ablation | CE loss recovered |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {ev['n_tokens']} | {ev['l0']:.1f} | {ev['fve']:.3f} | {ev['dead_fraction']:.3f} | {ev['ce_clean']:.3f} "
            f"| {ev['ce_spliced']:.3f} | {ev['ce_zero']:.3f} | {ev['ce_loss_recovered']:.3f} |",
            "",
        ]
    return "\n".join(lines)

