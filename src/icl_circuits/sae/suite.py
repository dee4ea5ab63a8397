"""The starter SAE suite: SAEs the package ships for its bundled model, or trains and caches on demand.

`starter_sae(lm, "resid:12")` looks in three places, in order:
  1. the package's shipped files  icl_circuits/data/saes/<model>/<name>/
  2. the user cache              <cache_dir>/saes/v<SUITE_VERSION>/<model>/<name>/saes/<name>/
  3. neither: trains it with STARTER_RECIPE (progress shown, resumable) into the cache.
Every starter SAE records its suite version (`cfg.extra["suite_version"]`), and the cache path holds
it too, so an SAE of another suite version is never returned under the same name.
`export_suite(run_dir, dest)` turns a training run into shippable folders (bf16 weights, fp32
biases) with a model card each.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.loading import cache_dir
from icl_circuits.core.model import LM
from icl_circuits.core.storage import read_json
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.sae.formats import load_sae, save_sae, with_config
from icl_circuits.sae.registry import SAERef
from icl_circuits.sae.training import TrainConfig

SUITE_VERSION = 2
STARTER_SPECS = (
    "resid:6", "resid:10", "resid:11", "resid:12", "resid:13", "attn:11", "attn:12", "transcoder:11", "transcoder:12",
)  # fmt: skip
STARTER_CORPUS = "debian:dict-gcide+debian:python3-doc"
# What the shipped suite v2 was trained with (`make saes`; the recipe comparison in docs/saes.md picked
# TopK with AuxK). A missing starter SAE is trained on demand with the same settings from a live stream.
STARTER_RECIPE: dict[str, Any] = dict(
    arch="topk", k=64, d_sae=4096, n_tokens=2_000_000, batch_tokens=1024, dead_window=200, dead_steps=400,
    b_dec_init="mean", norm_centered=True, checkpoint_every=100, skip_docs=400, trainer={"ghost_grads": False},
)  # fmt: skip


def shipped_dir(model: str) -> Path:
    return Path(str(files("icl_circuits").joinpath("data", "saes", model.replace("/", "_"))))


def suite_cache_dir(model: str) -> Path:
    """Where starter SAEs trained on demand live; the suite version is part of the path."""
    return cache_dir() / "saes" / f"v{SUITE_VERSION}" / model.replace("/", "_")


def cached_starter_dir(model: str, name: str) -> Path:
    """The folder of starter SAE `name` in the user cache (trained on demand, or exported there)."""
    return suite_cache_dir(model) / name / "saes" / name


def starter_sae(lm: LM, spec: str, train_if_missing: bool = True, progress: bool = True) -> JumpReLUSAE:
    """The starter SAE `spec` ('resid:12', 'attn:11', 'transcoder:12', any SAERef spelling) for `lm`, as float32 on lm's device."""
    ref = SAERef.parse(spec)
    if not ref.is_starter:
        raise ValueError(f"starter_sae: {spec!r} names a file, not a starter SAE (use SAERef.parse(spec).resolve(lm))")
    name = ref.name
    for folder in (shipped_dir(lm.name) / name, cached_starter_dir(lm.name, name)):
        if (folder / "config.json").is_file():
            sae = load_sae(folder, dtype=torch.float32)
            version = sae.cfg.extra.get("suite_version", 1)
            if version != SUITE_VERSION:
                raise ValueError(f"{folder} holds a starter SAE of suite v{version}, not v{SUITE_VERSION}; delete it")
            sae.check_compatible(lm)
            return sae.to(lm.device)
    if not train_if_missing:
        raise FileNotFoundError(f"no starter SAE {name!r} (suite v{SUITE_VERSION}) for {lm.name!r} (shipped or cached)")
    from icl_circuits.data.corpus import from_spec
    from icl_circuits.sae.training import train_saes

    run = suite_cache_dir(lm.name) / name
    cfg = TrainConfig(specs=[ref.spec], **STARTER_RECIPE)  # 'resid:12', as train_config.json always recorded
    print(f"training the missing starter SAE {name} for {lm.name} into {run} (resumes if interrupted)")
    sae = train_saes(lm, from_spec(STARTER_CORPUS, lm, progress=progress), cfg, run, progress=progress)[name].float()
    return _stamp(sae, run / "saes" / name).to(lm.device)


def _stamp(sae: JumpReLUSAE, folder: Path) -> JumpReLUSAE:
    """Record the suite version in the SAE and its saved folder."""
    sae = with_config(sae, extra={**sae.cfg.extra, "suite_version": SUITE_VERSION})
    save_sae(sae, folder)
    return sae


def export_suite(
    run_dir: str | Path, dest: str | Path | None, corpus: str = STARTER_CORPUS, provenance: Any = None,
    eval_path: str | Path | None = None,
) -> list[Path]:  # fmt: skip
    """Copy a run's SAEs to `dest`/<name>/ with bf16 weights and a model card (README.md) each.

    dest None: into the user cache, where `starter_sae` finds them (SAEs of sites the shipped suite lacks,
    e.g. layers 10-17, trained once with `sae harvest` + `sae train` rather than one live stream each)."""
    run = Path(run_dir)
    header = read_json(run / "train_config.json")
    extra = {"provenance": provenance} if provenance else {}
    eval_file = Path(eval_path) if eval_path is not None else run / "eval.json"
    evals = {e["site"]: e for e in (read_json(eval_file) if eval_file.is_file() else [])}
    out = []
    for sae_dir in sorted((run / "saes").iterdir()):
        sae = load_sae(sae_dir)
        sae = with_config(sae, extra={**sae.cfg.extra, "suite_version": SUITE_VERSION, "corpus": corpus, **extra})
        target = cached_starter_dir(header["model"], sae_dir.name) if dest is None else Path(dest) / sae_dir.name
        save_sae(sae, target, weight_dtype=torch.bfloat16, card=model_card(sae, header, evals.get(sae.cfg.site), corpus))
        out.append(target)
    return out


def model_card(sae: JumpReLUSAE, header: dict, ev: dict | None, corpus: str) -> str:
    c, t = sae.cfg, header["config"]
    norm = "centred (E||x - mean|| = sqrt(d))" if t.get("norm_centered") else "E||x|| = sqrt(d)"
    where = f"`{c.site}` → `{c.out_site}`" if c.out_site else f"`{c.site}`"
    arch = t["arch"]
    if arch in ("gated", "relu"):
        l1 = (t.get("l1_by_kind") or {}).get(c.kind, t["l1_coeff"])
        sparsity = f"decoder-norm-weighted L1 (coefficient {l1 if l1 is not None else 'default'}), ghost grads on dead latents"
    elif arch == "jumprelu":
        sparsity = f"L0 penalty with straight-through threshold gradients ({json.dumps(t.get('trainer') or {})})"
    elif arch == "topk":
        sparsity = f"the top {t['k']} latents of each token, AuxK loss on dead latents"
    else:  # batchtopk, matryoshka
        sparsity = f"the top {t['k']} x batch latents of each batch (one global threshold at inference), AuxK loss on dead latents"
    prov = sae.cfg.extra.get("provenance")
    lines = [
        f"# {c.kind} SAE, layer {c.layer}, {header['model']} (starter suite v{SUITE_VERSION})",
        "",
        f"- reads {where}; {c.d_sae} latents (d_in {c.d_in}); JumpReLU inference format (exported exactly from a {arch} SAE"
        + (f", top-k {c.k}" if c.k else "") + ")",
        f"- trained with `icl-circuits sae train` on {t['n_tokens']:,} tokens of `{corpus}`"
        + (f" (cache {header['cache']}, held-out documents chosen by content hash)" if "cache" in header else
           f" (the first {t['skip_docs']} documents held out for evaluation)"),
        f"- recipe: Adam lr {t['lr']}, betas (0.0, 0.99), orthogonal init with decoder = encoder transpose, "
        f"Anthropic input normalisation, {norm} (input scale {c.input_scale:.4g}, output scale {c.output_scale:.4g}), "
        f"{sparsity}; dead: no fire for {t['dead_steps']} steps or density < 5e-6 over {t['dead_window']} batches; "
        f"{t['param_dtype']} weights with fp32 biases, batch {t['batch_tokens']} tokens, b_dec init `{t['b_dec_init']}`, centred encoder input",
        "- stored: bf16 W_enc/W_dec, fp32 biases and thresholds (`load_sae` computes in float32)",
    ]
    if prov:
        lines.append(f"- corpus provenance: `{json.dumps(prov, sort_keys=True)}`")
    lines.append("")
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
        if "rows_fve" in ev:  # `sae eval --cache`: held-out rows, dead latents over training rows, ICL prompts
            lines += [
                "| held-out rows | FVE | latents silent over | share | ICL FVE arrow | input | output |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                f"| {ev['rows']:,} | {ev['rows_fve']:.3f} | {ev['dead_rows']:,} training rows | {ev['dead_fraction_train']:.3f} "
                f"| {ev['icl_fve_arrow']:.3f} | {ev['icl_fve_input']:.3f} | {ev['icl_fve_output']:.3f} |",
                "",
            ]
    return "\n".join(lines)

