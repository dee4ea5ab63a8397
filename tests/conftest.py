"""Shared fixtures: tiny random models of every supported family, a tiny tokenizer, the bundled model."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from icl_circuits import LM

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


@pytest.fixture(params=sorted(FAMILIES))
def tiny(request: pytest.FixtureRequest) -> tuple[LM, str]:
    return make_tiny(request.param)


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


@pytest.fixture(scope="session")
def bundled() -> LM:
    """The real Gemma 3 270M (first load de-quantizes the GGUF, ~1 min; later loads use the cache)."""
    from icl_circuits import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second thread only adds contention on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_ranks(worker: object, world: int, root: object, out: object) -> None:
    """Run worker(rank, world, init_method, str(out)) in `world` spawned processes (a gloo group through a
    file in `root`) and check that every one exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    init = f"file://{root}/pg"
    procs = [ctx.Process(target=worker, args=(r, world, init, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
