"""Helpers and constants shared by the test files: tiny models, tokenizers, SAEs, task pairs, run directories.

Layout rules (tests/test_layout.py checks the first one):
  * No test file imports another test file, and none imports a conftest: a helper or constant that more
    than one test file uses lives here, and every test file (the one it came from too) imports it from here:
    `from tests.helpers import ...` (`from .helpers import ...` in tests/conftest.py).
  * conftest.py files hold fixtures only; the plain functions their fixtures need are imported from here.
  * Tests mirror the package tree, subpackages included: tests/<dir>/test_<module>.py tests
    src/icl_circuits/<dir>/<module>.py, or the package <dir>/<module>/ as a whole (tests/core/test_model.py:
    icl_circuits/core/model.py; tests/sae/formats/test_saex.py: icl_circuits/sae/formats/saex.py;
    tests/sae/test_formats.py: the package icl_circuits/sae/formats/; tests/test_cli.py: the package
    icl_circuits/cli/). A new test goes in the folder of the package it tests (each test folder has an empty
    __init__.py). Tests that cut across modules are named for what they check and listed, with the reason, in
    CROSS_CUTTING in tests/test_layout.py (test_device.py, test_bundled.py, test_layout.py, tests/reliability/
    for fault injection, tests/viz/test_viewer_contract.py, tests/viz/test_browser.py).

Sections below group the helpers by what they build; word lists that differ between uses carry a prefix
(CIRCUIT_WORDS, VIEWER_WORDS, DASHBOARD_WORDS, EXAMPLE_WORDS).
"""

from __future__ import annotations

import atexit
import sys
from contextlib import contextmanager
from typing import Iterator
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
import transformers as tf
from torch.overrides import TorchFunctionMode

from icl_circuits import LM, Task, zero_shot_prompts
from icl_circuits.methods.circuits import ERROR, KIND_SITES, CircuitConfig, Edge, FaithfulnessCurve, NodeEffects, circuit_graph, circuit_saes, save_graph
from icl_circuits.methods.cleaning import CleaningConfig, CleaningResult
from icl_circuits.methods.dashboards import DashboardConfig, DashboardStore, build_dashboards
from icl_circuits.methods.examples import ExampleConfig, ExampleStore, build_example_store
from icl_circuits.data.prompts import icl_prompts
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
from icl_circuits.methods.heatmaps import HeatmapConfig, HeatmapResult
from icl_circuits.core.storage import write_json
from icl_circuits.interventions.steer import Steerer


# -- tiny models of every family, word tokenizers, torch.distributed ranks -------------------------------------

VOCAB = 160
D = 32
# family -> (config, name of the module whose *input* is resid_mid, i.e. the MLP's input norm)
FAMILIES: dict[str, tuple[object, str]] = {
    "gemma": (
        lambda: tf.GemmaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "post_attention_layernorm",
    ),
    "gemma2": (
        lambda: tf.Gemma2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                sliding_window=4, final_logit_softcapping=5.0, attn_logit_softcapping=20.0),
        "pre_feedforward_layernorm",
    ),
    "gemma3": (
        lambda: tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                                    sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
        "pre_feedforward_layernorm",
    ),
    "llama": (
        lambda: tf.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2),
        "post_attention_layernorm",
    ),
    "qwen2": (
        lambda: tf.Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2),
        "post_attention_layernorm",
    ),
    "phi3": (
        lambda: tf.Phi3Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
        "post_attention_layernorm",
    ),
    "gpt2": (
        lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=64),
        "ln_2",
    ),
}  # fmt: skip


def make_tiny(family: str, seed: int = 0) -> tuple[LM, str]:
    """A 2-layer random model of `family`, with every weight (norms included) randomised."""
    config_fn, mlp_in = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_fn()  # type: ignore[operator]
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: default init (ones/zeros) would hide wrong hook points
                p.add_(0.2 * torch.randn_like(p))
    return LM(model.eval(), None, name=f"tiny-{family}"), mlp_in


def word_tokenizer(words: list[str]) -> tf.PreTrainedTokenizerFast:
    """Word-level tokenizer: pieces are '\\n' or an optional space + non-space run. Token ids are hand-checkable."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "\n": 3}
    for w in words:
        for piece in (w, " " + w):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| ?[^\s]+"), behavior="isolated")
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


def _rank_main(worker: object, *args: object) -> None:
    """One rank: run the worker, then leave at once. After the group is destroyed, gloo's background
    threads can still be shutting down when the interpreter runs its exit handlers, and once in a while
    that aborts the process ("terminate called without an active exception", exit code -6) after every
    check has passed. An exception in the worker still exits non-zero, with its traceback."""
    import os

    worker(*args)  # type: ignore[operator]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker: object, world: int, root: object, out: object) -> None:
    """Run worker(rank, world, init_method, str(out)) in `world` spawned processes (a gloo group through a
    file in `root`) and check that every one exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    init = f"file://{root}/pg"
    procs = [ctx.Process(target=_rank_main, args=(worker, r, world, init, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"


# -- task pairs and a tiny model that knows their words (steering, TVC, heatmaps, detection) -------------------

ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "new"), ("dark", "light"),
            ("hard", "soft"), ("tall", "short"), ("rich", "poor"), ("wet", "dry"), ("early", "late"), ("full", "empty")]  # fmt: skip
UPPER = [(w, w.upper()) for w in ("cat", "dog", "sun", "car", "tree", "book", "fish", "bird", "moon", "star", "milk", "rain")]


def random_sae(lm, layer: int = 1, d_sae: int = 12, seed: int = 0) -> JumpReLUSAE:
    """A random JumpReLU SAE at resid_pre.{layer} (no threshold, input/output scale 0.5)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=lm.d_model, d_sae=d_sae, site=f"resid_pre.{layer}", layer=layer, input_scale=0.5, output_scale=0.5)
    tensors = {"W_enc": torch.randn(lm.d_model, d_sae, generator=g), "W_dec": torch.randn(d_sae, lm.d_model, generator=g),
               "b_dec": torch.randn(lm.d_model, generator=g)}  # fmt: skip
    return JumpReLUSAE(cfg, tensors)


# -- SAEs and a zero-shot steerer on that model (TVC, ITO, the reliability tests) ------------------------------

MANY = ANTONYMS + UPPER + [(y, x) for x, y in ANTONYMS + UPPER]  # 48 pairs, no new words (the tiny vocab is 160)


def pair_lm(family: str = "gemma3", dtype: torch.dtype = torch.float32) -> LM:
    """A tiny random `family` model in `dtype` whose word tokenizer knows the ICL template words, "X" and "Y"
    (fake pairs) and ANTONYMS + UPPER."""
    lm, _ = make_tiny(family)
    lm.model.to(dtype)
    words = ["Follow", "the", "pattern:", "->", "X", "Y"] + [w for x, y in ANTONYMS + UPPER for w in (x, y)]
    lm.tokenizer = word_tokenizer(words)
    return lm


def unit_sae(lm, layer: int = 1, d_sae: int = 24, seed: int = 0, scale: float = 1.0) -> JumpReLUSAE:
    """A JumpReLU SAE at resid_pre.{layer} with unit decoder rows (times `scale`) and an encoder close to their
    transpose, in the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    d = lm.d_model
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    tensors = dict(
        W_enc=W_dec.T.clone() + 0.3 * torch.randn(d, d_sae, generator=g),
        b_enc=0.1 * torch.randn(d_sae, generator=g),
        W_dec=W_dec * scale,
        b_dec=0.05 * torch.randn(d, generator=g),
        threshold=torch.full((d_sae,), 0.05),
    )
    cfg = SAEConfig(d_in=d, d_sae=d_sae, site=f"resid_pre.{layer}", layer=layer, model=lm.name)
    return JumpReLUSAE(cfg, tensors).to(lm.dtype)


def antonym_steerer(lm, layer: int = 1, n: int = 6) -> Steerer:
    """Zero-shot steering at `layer` over `n` ANTONYMS prompts (what TVC cleaning optimises through)."""
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), n, seed=1)
    return Steerer(lm, zero, layers=[layer])


# -- circuits: a toy task, random SAEs at every kind of site ---------------------------------------------------

PAIRS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("wet", "dry"), ("old", "new"),
         ("rich", "poor"), ("hard", "soft"), ("dark", "light"), ("early", "late"), ("high", "low"), ("full", "empty")]  # fmt: skip
CIRCUIT_WORDS = ["Follow", "the", "pattern:", "->"] + [w for p in PAIRS for w in p]


def toy_task(name: str = "toy", pairs=PAIRS) -> Task:
    """A Task of `pairs` (PAIRS by default)."""
    return Task(name, tuple(pairs))


def toy_batch(n_prompts: int = 3, n_shots: int = 3, seed: int = 0, task: Task | None = None):
    """ICL prompts of `task` (toy_task() by default) and the word tokenizer over CIRCUIT_WORDS they use."""
    tok = word_tokenizer(CIRCUIT_WORDS)
    return icl_prompts(tok, task or toy_task(), n_prompts, n_shots, seed=seed), tok


def tiny_saes(lm, layers=(0, 1), kinds=("resid", "attn", "transcoder"), d_sae=12, seed=0, threshold=0.05, dtype=torch.float32):
    """Random JumpReLU SAEs with non-trivial scales, one per (kind, layer)."""
    g = torch.Generator().manual_seed(seed)
    d = lm.d_model
    out = {}
    for layer in layers:
        for kind in kinds:
            site, out_site = KIND_SITES[kind]
            cfg = SAEConfig(d_in=d, d_sae=d_sae, kind=kind, model=lm.name, site=f"{site}.{layer}",
                            out_site=f"{out_site}.{layer}" if kind == "transcoder" else None, layer=layer,
                            input_scale=0.7, output_scale=1.3)  # fmt: skip
            t = {
                "W_enc": torch.randn(d, d_sae, generator=g) * 0.5,
                "b_enc": torch.randn(d_sae, generator=g) * 0.2,
                "W_dec": torch.randn(d_sae, d, generator=g) * 0.5,
                "b_dec": torch.randn(d, generator=g) * 0.1,
                "threshold": torch.full((d_sae,), threshold),
            }
            out[f"{kind}.{layer}"] = JumpReLUSAE(cfg, t, dtype=dtype)
    return out


def setup(family: str = "gemma3", layers=(0, 1), dtype=torch.float32, **kw):
    """A tiny model, a CircuitConfig, tiny_saes spliced as circuit SAEs and a toy_batch: (lm, cfg, saes, batch)."""
    lm, _ = make_tiny(family)
    lm.model.to(dtype)
    cfg = CircuitConfig(layers=layers, **kw)
    saes = circuit_saes(lm, cfg, tiny_saes(lm, layers, cfg.kinds, dtype=dtype))
    batch, tok = toy_batch()
    return lm, cfg, saes, batch


# -- result folders as the code writes them (viewer, report) ---------------------------------------------------

SCRIPT = "<script>alert(1)</script>"
EVIL_TASK = "<img src=x onerror=alert(2)>"  # a task name carrying markup
VIEWER_WORDS = ["hot", "cold", "big", "small", "fast", "slow", "up", "down", SCRIPT] + [f"w{i}" for i in range(30)]


def make_run(root: Path) -> Path:
    """A run directory as the other commands would leave it: an example store, a cleaned task
    vector, a circuit, a steering heatmap and a figure. Latent 0 fires on the <script> token."""
    lm, _ = make_tiny("llama")
    lm.tokenizer = word_tokenizer(VIEWER_WORDS)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(VIEWER_WORDS[:8] + VIEWER_WORDS[9:]) for _ in range(30)) for _ in range(20)]
    docs[3] = "w1 w2 " + SCRIPT + " " + docs[3]
    d_sae = 16
    g = torch.Generator().manual_seed(0)
    W = torch.randn(lm.d_model, d_sae, generator=g) * 15
    emb = lm.model.get_input_embeddings().weight[lm.tokenizer.convert_tokens_to_ids(" " + SCRIPT)].detach()
    W[:, 0] = 3 * emb / emb.norm() ** 2  # latent 0: act 3 on the <script> token (resid_pre.0 = its embedding)
    thr = torch.full((d_sae,), 0.1)
    thr[0] = 2.0
    cfg = SAEConfig(d_in=lm.d_model, d_sae=d_sae, model=lm.name, site="resid_pre.0", layer=0)
    sae = JumpReLUSAE(cfg, {"W_enc": W, "threshold": thr, "W_dec": torch.randn(d_sae, lm.d_model, generator=g)})
    ecfg = ExampleConfig(seq_len=16, batch_size=4, top_k=4, per_bin=2, context_before=6, context_after=3)
    build_example_store(lm, {"resid_0": sae}, docs, root / "examples" / "examples.sqlite", ecfg, progress=False)

    # every result file below is written by its real writer, from a small object
    scores = {"tv": {"l0": None, "nll": 2.0, "accuracy": 0.5, "relative_loss_decrease": 0.7},
              "tvc": {"l0": 2.0, "nll": 2.1, "accuracy": 0.5, "relative_loss_decrease": 0.61}}  # fmt: skip
    cleaning_result("antonyms", 0, "execution", {0: 1.5, 3: 0.7}, {0: 1.0, 3: 0.9, 5: 0.4, 7: 0.2}, d_sae, lm.d_model, scores).save(root / "antonyms")
    cleaning_result(EVIL_TASK, 0, "execution", {5: 0.3}, {0: 1.0, 3: 0.9, 5: 0.4, 7: 0.2}, d_sae, lm.d_model).save(root / "evil")
    # the circuit module's graph ('resid.0' names the SAE at resid_pre.0) and its faithfulness curve
    save_graph(circuit_graph_of("antonyms", d_sae), root / "antonyms" / "graph.json")
    write_json(root / "antonyms" / "faithfulness.json", FaithfulnessCurve("antonyms", [1, 3], [-1.0, -0.5], [-1.8, -1.9], -0.4, -2.0, [0, 0], 4).to_dict())
    # the steering module's heatmap (what run_heatmap writes)
    write_json(root / "heatmap.json", heatmap_result(["antonyms", "en_fr"], [0, 3], [[0.42, 0.11], [0.05, 0.0]], "execution", 0).to_dict())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from icl_circuits.core.storage import save_figure

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [0.4, 0.8, 0.9])
    ax.set_title("faithfulness")
    save_figure(fig, root / "antonyms" / "faithfulness")
    plt.close(fig)
    (root / "notes.txt").write_text(f"corpus says {SCRIPT}\n")
    return root


def cleaning_result(task: str, layer: int, setting: str, weights: dict[int, float], initial: dict[int, float], d_sae: int = 16,
                    d_model: int = 8, scores: dict | None = None) -> CleaningResult:  # fmt: skip
    """A small TVC result as clean_vector returns it (save() writes cleaning.json + cleaning.safetensors)."""
    w, w0 = torch.zeros(d_sae), torch.zeros(d_sae)
    w[list(weights)], w0[list(initial)] = torch.tensor(list(weights.values())), torch.tensor(list(initial.values()))
    return CleaningResult(
        task=task, layer=layer, setting=setting, sae_spec=f"resid:{layer}", config=CleaningConfig(l1_coeff=0.01, setting=setting).to_dict(),
        weights=w, initial_weights=w0, vector=torch.zeros(d_model), l0_history=[len(initial), len(weights)], train_loss=[2.5, 2.2],
        eval_loss=[(1, 2.4), (2, 2.1)], steps=2, stopped="patience", seconds=0.1, scores=scores or {},
        feature_effects=[{"index": i, "weight": v, "alone": 0.1 * v, "drop_without": 0.0, "bias_only": 0.0} for i, v in weights.items()],
    )  # fmt: skip


def heatmap_result(tasks: list[str], features: list[int], raw: list[list[float]], setting: str, layer: int) -> HeatmapResult:
    """A small steering heatmap (raw is tasks x features), every task owning every feature."""
    return HeatmapResult(
        tasks=tasks, features=features, raw=torch.tensor(raw, dtype=torch.float64), scales=[1.0] * len(features),
        owners={f: list(tasks) for f in features}, in_task_vector={f: list(tasks) for f in features}, baselines={t: 2.0 for t in tasks},
        grid={t: {f: [0.1] for f in features} for t in tasks}, config=HeatmapConfig(setting=setting, layer=layer).to_dict(),
    )  # fmt: skip


def circuit_graph_of(task: str, d_sae: int) -> dict:
    """circuit_graph of resid.0 -> attn.1 (3 latents each): two resid.0 latents and its error node feed attn.1 #2."""
    types = ("input", "arrow", "output")
    eff = NodeEffects(["resid.0", "attn.1"], types, {"resid.0": torch.zeros(3, d_sae + 1), "attn.1": torch.zeros(3, 4)}, -1.2)
    eff.effects["resid.0"][1, 0], eff.effects["resid.0"][2, 3], eff.effects["resid.0"][1, d_sae] = 0.5, -0.2, 0.1
    eff.effects["attn.1"][1, 2] = 0.3
    to = eff.flat_id("attn.1", 2, "arrow")
    edges = [Edge(eff.flat_id("resid.0", 0, "arrow"), to, 0.8), Edge(eff.flat_id("resid.0", 3, "output"), to, -0.1),
             Edge(eff.flat_id("resid.0", ERROR, "arrow"), to, 0.05)]  # fmt: skip
    return circuit_graph(eff, edges, task=task)  # run_circuit_task names the task


def hf_metric(lm, batch, pairs="all_but_first") -> float:
    """Mean log-prob of the scored targets from a plain transformers forward with full logits (the spliced model's reference)."""
    sc = batch.scoring(pairs)
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = torch.log_softmax(logits.double(), -1)[sc.positions]
    return float(lp.gather(-1, sc.targets[:, None]).mean())


# -- dashboards: a real run of the dashboard builder on a tiny model -------------------------------------------

MARKUP = "<b>x</b>"  # a token carrying markup
DASHBOARD_WORDS = ["Follow", "the", "pattern:", "->", "X", "Y", MARKUP] + [w for x, y in ANTONYMS + UPPER for w in (x, y)]
SAE_NAME = "resid_1"
DASHBOARD_LAYER = 1


def dashboard_lm():
    """A tiny Gemma 3 with a word tokenizer over DASHBOARD_WORDS."""
    lm, _ = make_tiny("gemma3")  # Gemma 3: a final RMSNorm with (1 + w) weights, randomised
    lm.tokenizer = word_tokenizer(DASHBOARD_WORDS)
    return lm


def dashboard_sae(lm, d_sae: int = 24, seed: int = 0, layer: int = DASHBOARD_LAYER):
    """A JumpReLU SAE at resid_pre.{layer}, decoder rows of norm 3, output_scale 1.25."""
    from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig

    g = torch.Generator().manual_seed(seed)
    d = lm.d_model
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    tensors = dict(W_enc=W_dec.T.clone() + 0.3 * torch.randn(d, d_sae, generator=g), b_enc=0.1 * torch.randn(d_sae, generator=g),
                   W_dec=W_dec * 3.0, b_dec=0.05 * torch.randn(d, generator=g), threshold=torch.full((d_sae,), 0.05))  # fmt: skip
    cfg = SAEConfig(d_in=d, d_sae=d_sae, site=f"resid_pre.{layer}", layer=layer, model=lm.name, output_scale=1.25)
    return JumpReLUSAE(cfg, tensors)


def dashboard_tasks():
    """MANY as "antonyms" and EVIL_TASK, whose outputs are partly MARKUP."""
    from icl_circuits.data.tasks import Task

    evil = [(x, MARKUP if i % 2 == 0 else y) for i, (x, y) in enumerate(MANY)]
    return [Task("antonyms", tuple(MANY)), Task(EVIL_TASK, tuple(evil))]


def make_real_run(root: Path, d_sae: int = 24) -> dict:
    """A run directory written by the package's own code, as the CLI commands would leave it."""
    from icl_circuits.experiments.circuits import run_circuit_task
    from icl_circuits.methods.circuits import CircuitConfig, CircuitRunConfig, circuit_saes
    from icl_circuits.methods.cleaning import CleaningConfig
    from icl_circuits.experiments.clean import run_cleaning
    from icl_circuits.methods.examples import ExampleConfig, build_example_store
    from icl_circuits.methods.heatmaps import HeatmapConfig, load_feature_sets, positive_heatmap
    from icl_circuits.core.storage import write_json
    from icl_circuits.methods.task_vectors import TaskVectorConfig

    torch.set_num_threads(1)
    lm, sae, ts = dashboard_lm(), None, dashboard_tasks()
    sae = dashboard_sae(lm, d_sae)
    sae0 = dashboard_sae(lm, 16, seed=1, layer=0)  # the circuit's upstream SAE
    run_cleaning(lm, sae, ts, DASHBOARD_LAYER, root / "cleaning", CleaningConfig(n_train=4, n_eval=4, max_steps=25, patience=5, l1_coeff=0.005),
                 TaskVectorConfig(n_prompts=3, n_shots=3), sae_spec=f"resid:{DASHBOARD_LAYER}", progress=False)  # fmt: skip
    sets, meta = load_feature_sets(root / "cleaning")
    hm = positive_heatmap(lm, ts, sets, sae, HeatmapConfig(layer=DASHBOARD_LAYER, scale_grid=(1.0, 4.0), n_eval=4), out_dir=root / "heatmap", progress=False)
    write_json(root / "heatmap" / "heatmap.json", hm.to_dict())  # what run_heatmap writes
    ccfg = CircuitRunConfig(circuit=CircuitConfig(layers=(0, DASHBOARD_LAYER), kinds=("resid",)), n_prompts=3, n_shots=3, sizes=(1, 2, 4, 8),
                            ie_quality_per_sae=0, edge_k=2, edges_per_target=2)  # fmt: skip
    circ = circuit_saes(lm, ccfg.circuit, {f"resid.{DASHBOARD_LAYER}": sae, "resid.0": sae0})
    run_circuit_task(lm, ts[0], circ, ccfg, root / "circuits", progress=False)
    docs = [" ".join(w for pair in MANY[i : i + 6] for w in pair) for i in range(0, 40, 3)]
    ecfg = ExampleConfig(seq_len=16, batch_size=4, top_k=3, per_bin=2, context_before=6, context_after=3)
    build_example_store(lm, {SAE_NAME: sae, "resid_0": sae0}, docs, root / "examples" / "examples.sqlite", ecfg, progress=False)
    build_dashboards(lm, {SAE_NAME: sae, "resid_0": sae0}, root, ts, DashboardConfig(n_prompts=3, n_shots=4, top_tokens=6, n_neighbours=5), progress=False)
    return {"root": root, "lm": lm, "sae": sae, "sae0": sae0, "tasks": ts, "heatmap": hm}


_RUN: dict = {}


def real_run() -> dict:
    """Built once per test process (test_browser.py uses the same run)."""
    if not _RUN:
        root = Path(tempfile.mkdtemp(prefix="icl-real-run-"))
        atexit.register(shutil.rmtree, root, True)
        _RUN.update(make_real_run(root))
    return _RUN


def direct_lens(lm, sae, through_norm: bool = True) -> torch.Tensor:
    """[d_sae, vocab] logits of each decoder direction, computed in one go (fine for a tiny model)."""
    d = sae.W_dec.detach().float() / sae.cfg.output_scale
    if through_norm:
        norm = lm.model.model.norm
        d = norm(d) - norm(torch.zeros_like(d[:1]))
    return d @ lm.model.get_output_embeddings().weight.detach().float().T


def fired_latent(run) -> int:
    """The latent of real_run()'s SAE_NAME that is active in the most tasks (then fires most often)."""
    store = DashboardStore(run["root"] / "dashboards.sqlite")
    return max(range(run["sae"].d_sae), key=lambda i: (len(store.feature(SAE_NAME, i).tasks), store.feature(SAE_NAME, i).n_fired))


def steered_latent(run) -> int:
    """The first feature of real_run()'s steering heatmap."""
    return run["heatmap"].features[0]


# -- max-activating examples -----------------------------------------------------------------------------------

EXAMPLE_WORDS = [f"w{i}" for i in range(50)] + ["<script>alert(1)</script>"]


def example_sae(lm, site: str, d_sae: int = 12, seed: int = 0) -> JumpReLUSAE:
    """Random SAE scaled so activations spread over several 0.5-wide bins (and some over max_bins)."""
    g = torch.Generator().manual_seed(seed)
    layer = int(site.split(".")[1])
    cfg = SAEConfig(d_in=lm.d_model, d_sae=d_sae, model=lm.name, site=site, layer=layer)
    W = torch.randn(lm.d_model, d_sae, generator=g) * 15
    return JumpReLUSAE(cfg, {"W_enc": W, "threshold": torch.full((d_sae,), 0.1), "W_dec": torch.randn(d_sae, lm.d_model, generator=g)})


def cli_examples_end_to_end(lm, docs, tmp_path):
    """Runs `icl-circuits examples` on `lm` and an example_sae saved to tmp_path (test_examples.py's end-to-end
    test, also run by test_device.py): checks the store, the summary, the plot and the report."""
    from icl_circuits.cli import main
    from icl_circuits.sae.formats import save_sae

    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    sae = example_sae(lm, "resid_post.0", seed=1)
    sae.cfg.model = ""  # the folder's name is the model's name here
    save_sae(sae, tmp_path / "sae")
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs[:12]))
    out = tmp_path / "run"
    argv = ["examples", "--model", str(tmp_path / "model"), "--saes", f"mine={tmp_path / 'sae'}", "--corpus",
            str(tmp_path / "corpus.txt"), "--out", str(out), "--seq-len", "12", "--batch-size", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    store = ExampleStore(out / "examples.sqlite")
    assert store.saes()[0]["name"] == "mine" and store.count("mine") > 0
    for name in ("summary.csv", "latent_density.png", "latent_density.svg", "report.html"):
        assert (out / name).is_file(), name
    assert "latent_density.png" in (out / "report.html").read_text()
    assert main(argv) == 0  # a second run finds the complete store and only re-reports


# -- command-line runs: a saved model folder, one-line errors, task files --------------------------------------

def saved_model(tmp_path, lm=None):
    """A tiny model + tokenizer saved as a local folder (what --model takes)."""
    lm = lm or pair_lm("llama")
    folder = tmp_path / "tiny_model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return lm, folder


def one_line_error(capsys) -> str:
    """stderr of a failed command: exactly one line, starting 'error:'."""
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if l.strip() and "it/s]" not in l]  # progress bars of the model load
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def write_task(path, pairs) -> str:
    """Write `pairs` as a task JSON file (a list of {"input", "output"}) at `path`; returns the path as a string."""
    path.write_text(json.dumps([{"input": x, "output": y} for x, y in pairs]))
    return str(path)


def assert_recipes_refused(tmp_path, bad: dict[str, str]) -> None:
    """Each recipe text of `bad` (why -> TOML) written to a file and refused by load_recipe with `why` in the message."""
    import re

    import pytest

    from icl_circuits.experiments.recipe import RecipeError, load_recipe

    for i, (why, text) in enumerate(bad.items()):
        p = tmp_path / f"r{i}.toml"
        p.write_text(text)
        with pytest.raises(RecipeError, match=re.escape(why)):
            load_recipe(p)


# -- the device audit of tests/test_device.py (also run on the end-to-end tests marked `device_audit`) ------------

AUDIT_SRC = Path(__import__("icl_circuits").__file__).parent
FACTORIES = ("zeros", "ones", "full", "empty", "tensor", "arange", "rand", "randn", "randint", "randperm", "eye", "linspace")

# (file, function) of device-less factory calls that are meant to make CPU tensors. Each is either
# built before the model is involved and moved where it meets the model's tensors (LM.run,
# Intervention.apply, Scoring, mean_at), or CPU bookkeeping of small results.
CPU_BY_DESIGN: dict[tuple[str, str], str] = {
    ("data/prompts.py", "collate"): "prompt token ids / types: LM.run moves them",
    ("core/prefix_cache.py", "__init__"): "row bookkeeping of the prefix groups (index tensors)",
    ("interventions/steer.py", "score"): "per-vector NLL / hit sums: small results kept on the CPU",
    ("methods/circuits/spliced.py", "ablation"): "node ablation patterns (bookkeeping), moved in SplicedModel._run",
    ("methods/circuits/metric.py", "error_node_mask"): "the error-node mask over the node ids (bookkeeping, like the patterns)",
    ("methods/circuits/spliced.py", "empty_metric"): "the all-ablated pattern, moved in SplicedModel._run",
    ("methods/circuits/ie_check.py", "pearson"): "correlation of Python floats (IE quality)",
    ("methods/circuits/ie_check.py", "<lambda>"): "spearman's ranks of Python floats (IE quality)",
    ("viz/circuit_plots.py", "plot_cross_task"): "figure data",
    ("sae/activations.py", "_refill"): "the shuffle comes from the store's seeded CPU generator, then .to(device)",
    ("methods/link.py", "link_on_batch"): "per-detector sums / counts: small results, filled with .cpu()",
    ("sae/trainers/base.py", "__init__"): "SAE init on the CPU (seeded, device-independent), then SAETrainer.to",
    ("sae/trainers/base.py", "_arch_params"): "as __init__ (each arch's extra parameters)",
    ("sae/trainers/base.py", "_export_tensors"): "export is on the CPU (to_jumprelu)",
    ("sae/evaluation.py", "__init__"): "the fired-latents mask of _Acc (filled with .cpu())",
    ("sae/trainers/gated.py", "_arch_params"): "as SAETrainer.__init__",
    # result tables built from Python floats of finished runs (JSON), for figures and CSVs
    ("methods/heatmaps.py", "_heatmap_cells"): "heatmap table from the run's JSON cells",
    ("methods/negative.py", "_negative_rounds"): "drop table from the run's saved progress (Python floats)",
    ("methods/heatmaps.py", "marks"): "bool marks of the heatmap figure",
    ("viz/steering_plots.py", "plot_negative"): "marks of the figure",
    ("methods/heatmaps.py", "from_dict"): "a heatmap read back from JSON",
    ("methods/link.py", "<genexpr>"): "link sums / counts read back from the run's JSON state",
    # SAE files load on the CPU; starter_sae, SAERef.resolve, the CLI and circuit_saes move them to the model
    ("sae/formats/saelens.py", "load_saelens"): "tensors read from a file",
    # max-activating examples and dashboards copy latents to the CPU right after SAE.encode; what
    # follows is selection / statistics on the CPU, and their token batches are moved by LM.run
    ("methods/examples/sampling.py", "*"): "CPU bookkeeping after encode(...).cpu()",
    ("methods/examples/schema.py", "*"): "CPU bookkeeping after encode(...).cpu()",
    ("methods/examples/build.py", "*"): "CPU bookkeeping after encode(...).cpu()",
    ("methods/dashboards.py", "__init__"): "per-latent statistics, filled from latents on the CPU",
    ("methods/dashboards.py", "build_dashboards"): "corpus token batches (moved by LM.run) and token-type ids for the CPU latents",
}


class FactoryAudit(TorchFunctionMode):
    """Records (file, function) of device-less tensor factories called directly from icl_circuits."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple[str, str], int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and getattr(torch, name, None) is func and kwargs.get("device") is None:
            f = sys._getframe(1)  # the Python frame that called the factory
            path = Path(f.f_code.co_filename)
            if AUDIT_SRC in path.parents:
                key = (path.relative_to(AUDIT_SRC).as_posix(), f.f_code.co_name)
                self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **kwargs)


    def check(self) -> None:
        unexpected = {k: n for k, n in self.calls.items() if k not in CPU_BY_DESIGN and (k[0], "*") not in CPU_BY_DESIGN}
        assert not unexpected, f"device-less tensors created in a model-device path (add device=, or list why in CPU_BY_DESIGN): {unexpected}"


@contextmanager
def device_audit(check: bool = True) -> Iterator[FactoryAudit]:
    """Record device-less tensor factories called from icl_circuits while the block runs; with `check`, fail on
    any call site not listed in CPU_BY_DESIGN when it ends."""
    mode = FactoryAudit()
    with mode:
        yield mode
    if check:
        mode.check()


# -- detection SAEs (masses, frozen attention, the link) -------------------------------------------------------


def detection_sae(lm, layer: int, d_sae: int = 10, seed: int = 0) -> JumpReLUSAE:
    """A random resid_pre SAE with scaled input / output (model units differ from the SAE's)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=lm.d_model, d_sae=d_sae, site=f"resid_pre.{layer}", layer=layer, input_scale=0.7, output_scale=0.7)
    return JumpReLUSAE(cfg, {"W_enc": torch.randn(lm.d_model, d_sae, generator=g), "W_dec": torch.randn(d_sae, lm.d_model, generator=g)})



# -- a tiny llama with a word tokenizer and random documents (examples, activation stores, the device audit) -----


def word_lm(words: list[str], family: str = "llama") -> LM:
    """A tiny random model of `family` whose tokenizer knows exactly `words`."""
    lm, _ = make_tiny(family)
    lm.tokenizer = word_tokenizer(words)
    return lm


def random_docs(words: list[str], n: int = 30, max_words: int = 40, seed: int = 0) -> list[str]:
    """n documents of 0..max_words random words: some shorter than min_tokens, some spanning several chunks."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, max_words))) for _ in range(n)]


# -- the viewer, served on a free port for the length of a block ---------------------------------------------------


@contextmanager
def serving(run_dir, host: str = "127.0.0.1", **kw) -> Iterator:
    """make_server(run_dir, host, port 0, **kw) answering from a daemon thread; shut down and closed on exit."""
    import threading

    from icl_circuits.viz.viewer import make_server

    srv = make_server(run_dir, host, 0, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
