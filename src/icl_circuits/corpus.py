"""Sources of training text for SAEs and transcoders: documents as plain strings.

Every source can be iterated more than once and skipped into (a list, or an object with a
`skip(n)` method), so an activation store can resume a run from the document it stopped at.

    text_files(["data/*.jsonl"])   -- local .txt / .jsonl files
    hf_dataset()                   -- a streaming Hugging Face dataset (needs network)
    generated(lm, 10_000)          -- text the model samples itself, from BOS only
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .storage import atomic_write_text

TEXT_SUFFIXES = (".txt", ".jsonl")


class CorpusError(ValueError):
    """A corpus that cannot be read: missing or malformed file, missing field, no documents."""


def skip_docs(docs: Iterable[str], n: int) -> Iterable[str]:
    """The documents after the first n: sliced for a list, `docs.skip(n)` where the source has it."""
    if n == 0:
        return docs
    if isinstance(docs, Sequence):
        return docs[n:]
    if hasattr(docs, "skip"):
        return docs.skip(n)  # e.g. a streaming dataset skips without yielding
    return itertools.islice(docs, n, None)


def take_docs(docs: Iterable[str], n: int) -> list[str]:
    """The first n documents (e.g. a held-out set; train on skip_docs(docs, n))."""
    return list(itertools.islice(docs, n))


# -- local files --------------------------------------------------------------------------------
def _expand(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by paths, glob patterns and directories (searched recursively), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for spec in paths:
        spec = str(spec)
        if glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches the pattern {spec!r}")
            files += [p for p in matches if p.is_file()]
        elif Path(spec).is_dir():
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"directory {spec!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        elif Path(spec).is_file():
            files.append(Path(spec))
        else:
            raise FileNotFoundError(f"corpus file not found: {spec!r}")
    return files


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from e
            if not isinstance(obj, dict) or text_field not in obj:
                raise CorpusError(f"{path}:{lineno}: no {text_field!r} field in this JSON line")
            if not isinstance(obj[text_field], str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is not a string")
            yield obj[text_field]


def text_files(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    text_field: str = "text",
    split_paragraphs: bool = False,
) -> list[str]:
    """Documents from .txt files (one file = one document, or one per blank-line-separated
    paragraph when split_paragraphs) and .jsonl files (one JSON object per line, text in
    `text_field`). Paths may be files, glob patterns or directories. Blank documents are dropped.
    """
    docs: list[str] = []
    for path in _expand(paths):
        if path.suffix == ".jsonl":
            docs += _read_jsonl(path, text_field)
        elif path.suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            docs += text.split("\n\n") if split_paragraphs else [text]
        else:
            raise CorpusError(f"{path}: unsupported file type; expected one of {TEXT_SUFFIXES}")
    docs = [d.strip("\n") for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"the corpus {paths!r} holds no non-empty documents")
    return docs


# -- Hugging Face ------------------------------------------------------------------------------
class HFTexts:
    """A streaming HF dataset seen as an iterable of strings; `skip(n)` skips without tokenising."""

    def __init__(self, dataset: Any, text_field: str) -> None:
        self.dataset, self.text_field = dataset, text_field

    def __iter__(self) -> Iterator[str]:
        return (row[self.text_field] for row in self.dataset)

    def skip(self, n: int) -> "HFTexts":
        return HFTexts(self.dataset.skip(n), self.text_field)


def hf_dataset(
    name: str = "HuggingFaceFW/fineweb",
    config: str | None = "sample-10BT",
    split: str = "train",
    text_field: str = "text",
) -> HFTexts:
    """A streaming Hugging Face dataset (needs the `datasets` package and network access)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RuntimeError("HF_HUB_OFFLINE=1: cannot stream a Hugging Face dataset; use text_files() or generated()")
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("the `datasets` package is not installed; use text_files() or generated() instead") from e
    return HFTexts(datasets.load_dataset(name, config, split=split, streaming=True), text_field)


# -- model-generated text ----------------------------------------------------------------------
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
    out = lm.model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
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


def python_docs() -> list[str]:
    """The Python reference documentation bundled with CPython (pydoc_data): offline English prose, one doc per topic."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def from_spec(spec: str, lm: Any, progress: bool = True) -> list[str] | Iterable[str]:
    """A corpus from a command-line spec; 'A+B' concatenates sources (list sources only).

    'generated:N'          N documents the model samples from BOS (top-k 50, seed 0), cached on disk;
                           sampled with a bfloat16 copy of the bundled model (only the text is used)
    'python-docs'          CPython's bundled reference documentation (offline, deterministic)
    'hf:NAME[:CONFIG]'     a streaming Hugging Face dataset (online only), e.g. hf:HuggingFaceFW/fineweb:sample-10BT
    'PATH[,PATH...]'       .txt / .jsonl files, directories or globs
    """
    if "+" in spec:
        parts = [from_spec(p, lm, progress) for p in spec.split("+")]
        if not all(isinstance(p, list) for p in parts):
            raise CorpusError(f"{spec!r}: only finite sources (generated, python-docs, files) can be joined with '+'")
        return [doc for p in parts for doc in p]  # type: ignore[union-attr]
    if spec == "python-docs":
        return python_docs()
    if spec.startswith("generated:"):
        from .loading import cache_dir, load_model

        n = int(spec.split(":", 1)[1])
        # a bf16 copy samples ~2.7x faster on CPU; it is loaded only if the cache falls short
        sampler = (lambda: load_model(lm.name, dtype=torch.bfloat16)) if lm.name == "gemma-3-270m" else None
        name = lm.name.replace("/", "_")
        cache = cache_dir() / "corpus" / f"{name}-top50-seed0.jsonl"
        return generated(lm, n, top_k=50, seed=0, batch_size=128, cache_path=cache, progress=progress, sampler=sampler)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return hf_dataset(name, config=config or None)
    return text_files([p for p in spec.split(",") if p])
