"""Text the model samples itself from BOS (generated), cached on disk as JSONL and resumable."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from icl_circuits.core.storage import atomic_write_text
from icl_circuits.data.corpus.base import CorpusError


@dataclass(frozen=True)
class GenSettings:
    """Everything that determines the generated documents (stored as the cache's header line)."""

    model: str
    seed: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    batch_size: int


def _eos_ids(lm: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        eos = getattr(src, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


def bos_id(tokenizer: Any) -> int:
    """The token that starts every sequence: BOS, or EOS for tokenizers without one (GPT-2)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sequences with")
    return int(bos)


def _forward_last(lm: Any, ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
    """Logits at the last position only ([batch, vocab]); the vocab can be 262k wide."""
    import inspect

    # transformers 5.x renames `past_key_values` -> `cache` (the old name warns); use what this version takes
    name = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **({name: past} if past is not None else {}))
    return out.logits[:, -1].float(), out.past_key_values


@torch.no_grad()
def _sample_batch(lm: Any, s: GenSettings, batch: int, eos: set[int], bos: int) -> list[str]:
    """Sample s.batch_size documents from BOS with the KV cache; batch b has its own seed."""
    gen = torch.Generator(device=lm.device).manual_seed(s.seed * 1_000_003 + batch)
    ids = torch.full((s.batch_size, 1), bos, dtype=torch.long, device=lm.device)  # [batch, 1]
    done = torch.zeros(s.batch_size, dtype=torch.bool, device=lm.device)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=lm.device)
    tokens, past, step_in = [], None, ids
    for _ in range(s.max_new_tokens):
        logits, past = _forward_last(lm, step_in, past)  # [batch, vocab]
        if s.temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / s.temperature
            if s.top_k is not None:
                # exact top-k sampling that touches only k logits after one topk over the vocab
                vals, idx = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1)  # [batch, k]
                pick = torch.multinomial(vals.softmax(-1), 1, generator=gen)  # [batch, 1]
                nxt = idx.gather(-1, pick)[:, 0]  # [batch]
            else:
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]  # [batch]
        if len(eos_t):
            nxt = torch.where(done, eos_t[0], nxt)  # finished rows only repeat EOS
        tokens.append(nxt)
        done |= torch.isin(nxt, eos_t)
        if done.all():
            break
        step_in = nxt[:, None]
    seqs = torch.stack(tokens, 1).tolist()  # [batch, n_steps]
    texts = []
    for seq in seqs:
        cut = next((i for i, t in enumerate(seq) if t in eos), len(seq))  # stop the document at EOS
        texts.append(lm.tokenizer.decode(seq[:cut], skip_special_tokens=True))
    return texts


def _load_cache(path: Path, settings: GenSettings) -> list[str]:
    """Documents in a cache made with the same settings; a torn final write is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])["header"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorpusError(f"{path}: not a generated-text cache (bad header line)") from e
    if header != asdict(settings):
        raise CorpusError(
            f"{path} was generated with other settings {header}, not {asdict(settings)}; "
            "delete it or pass another cache_path"
        )
    docs = []
    for line in lines[1:]:
        try:
            docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # an interrupted append: keep what came before it
    docs = docs[: len(docs) - len(docs) % settings.batch_size]  # whole batches only
    return docs


def _cache_text(settings: GenSettings, docs: list[str]) -> str:
    lines = [json.dumps({"header": asdict(settings)})] + [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    return "\n".join(lines) + "\n"


def generated(
    lm: Any,
    n_docs: int,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
    sampler: Any = None,
) -> list[str]:
    """n_docs documents the model samples from BOS alone (temperature <= 0: greedy).

    Documents come in whole batches, batch b drawn from its own generator seeded by (seed, b),
    so the result depends only on the settings and asking for more extends the same list. The
    global torch RNG is never touched. With cache_path, a JSONL file (header line with the
    settings, then {"text": ...} per document) is reused, and extended one batch at a time with
    fsync'd appends, so an interrupted run resumes where it stopped.

    sampler: optional zero-argument callable returning the model that samples (e.g. a bf16 copy
    of `lm`, same tokenizer); it is called only if the cache does not already hold n_docs.
    """
    if lm.tokenizer is None:
        raise ValueError("generated() needs lm.tokenizer to decode the samples")
    settings = GenSettings(lm.name, seed, max_new_tokens, float(temperature), top_k, batch_size)
    path = Path(cache_path) if cache_path is not None else None
    docs = _load_cache(path, settings) if path is not None else []
    if len(docs) >= n_docs:
        return docs[:n_docs]
    if path is not None:
        atomic_write_text(path, _cache_text(settings, docs))  # rewrite without any torn tail
    if sampler is not None:
        lm = sampler()
    eos, bos = _eos_ids(lm), bos_id(lm.tokenizer)
    bar = tqdm(total=n_docs, initial=len(docs), desc="generating docs", unit="doc", disable=not progress)
    while len(docs) < n_docs:
        new = _sample_batch(lm, settings, len(docs) // batch_size, eos, bos)
        docs += new
        if path is not None:
            with path.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in new))
                f.flush()
                os.fsync(f.fileno())
        bar.update(len(new))
    bar.close()
    return docs[:n_docs]

