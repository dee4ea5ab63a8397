"""Sources of training text for SAEs and transcoders: documents as plain strings.

Every source can be iterated more than once and skipped into (a list, or an object with a
`skip(n)` method), so an activation store can resume a run from the document it stopped at.

    text_files(["data/*.jsonl"])   -- local .txt / .jsonl files
    hf_dataset()                   -- a streaming Hugging Face dataset (needs network)
    generated(lm, 10_000)          -- text the model samples itself, from BOS only
    debian_docs("dict-gcide")      -- documents parsed from a Debian package (apt-get download, cached)
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


def python_docs() -> list[str]:
    """The Python reference documentation bundled with CPython (pydoc_data): offline English prose, one doc per topic."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def from_spec(spec: str, lm: Any, progress: bool = True) -> list[str] | Iterable[str]:
    """A corpus from a command-line spec; 'A+B' concatenates sources (list sources only).

    'generated:N'          N documents the model samples from BOS (top-k 50, seed 0), cached on disk;
                           sampled with a bfloat16 copy of the bundled model (only the text is used)
    'python-docs'          CPython's bundled reference documentation (offline, deterministic)
    'debian:PKG'           documents parsed from a Debian package (apt-get download once, then a JSONL
                           cache), e.g. debian:dict-gcide (a dictionary), debian:python3-doc (manuals)
    'hf:NAME[:CONFIG]'     a streaming Hugging Face dataset (online only), e.g. hf:HuggingFaceFW/fineweb:sample-10BT
    'PATH[,PATH...]'       .txt / .jsonl files, directories or globs
    """
    if "+" in spec:
        parts = [from_spec(p, lm, progress) for p in spec.split("+")]
        if not all(isinstance(p, list) for p in parts):
            raise CorpusError(
                f"{spec!r}: only finite sources (generated, python-docs, debian, files) can be joined with '+'"
            )
        return [doc for p in parts for doc in p]  # type: ignore[union-attr]
    if spec == "python-docs":
        return python_docs()
    if spec.startswith("debian:"):
        return debian_docs(spec.split(":", 1)[1])
    if spec.startswith("generated:"):
        from .loading import cache_dir, load_model

        n = int(spec.split(":", 1)[1])
        # a bf16 copy samples ~2.7x faster on CPU; it is loaded only if the cache falls short
        sampler = (lambda: load_model(lm.name, dtype=torch.bfloat16, device=lm.device)) if lm.name == "gemma-3-270m" else None
        name = lm.name.replace("/", "_")
        cache = cache_dir() / "corpus" / f"{name}-top50-seed0.jsonl"
        return generated(lm, n, top_k=50, seed=0, batch_size=128, cache_path=cache, progress=progress, sampler=sampler)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return hf_dataset(name, config=config or None)
    return text_files([p for p in spec.split(",") if p])


# -- Debian packages ---------------------------------------------------------------------------
# 'debian:PKG' downloads PKG's .deb with apt-get (no root needed, no install), unpacks it with
# dpkg-deb -x, parses its files into documents and caches them as JSONL. Later uses read the
# cache only. Bump DEBIAN_PARSER_VERSION whenever a parser's output changes.
DEBIAN_FORMAT = "icl_circuits.debian_docs"
DEBIAN_PARSER_VERSION = 1
DEBIAN_CHUNK_CHARS = 4000  # long HTML pages are cut into chunks of about this many characters


def _debian_dir() -> Path:
    from .loading import cache_dir

    return cache_dir() / "debian"


def _run_tool(args: list[str], package: str, cwd: Path | None = None) -> str:
    """Run apt-get / dpkg-deb; any failure is one CorpusError naming the package and the fix."""
    import shutil
    import subprocess

    if shutil.which(args[0]) is None:
        raise CorpusError(
            f"debian:{package}: `{args[0]}` is not installed; this source needs a Debian/Ubuntu machine "
            f"(apt-get and dpkg-deb), or a cached {package}.jsonl in {_debian_dir()}"
        )
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        hint = " (run `apt-get update` first, and check the package name)" if args[0] == "apt-get" else ""
        raise CorpusError(f"debian:{package}: `{' '.join(args)}` failed{hint}: {msg}")
    return proc.stdout


def _apt_download(package: str, dest: Path) -> Path:
    """Download PKG's .deb into dest with `apt-get download`; returns its path (tests patch this)."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    _run_tool(["apt-get", "download", package], package, cwd=dest)
    new = sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob(f"{package}_*.deb"))
    if not new:
        raise CorpusError(f"debian:{package}: apt-get download left no .deb in {dest}")
    return new[-1]


def _deb_field(deb: Path, field: str, package: str) -> str:
    return _run_tool(["dpkg-deb", "-f", str(deb), field], package).strip()


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _doc_depends(deb: Path, package: str) -> list[str]:
    """The '-doc' packages a documentation metapackage depends on (first alternative of each)."""
    import re

    deps = _deb_field(deb, "Depends", package)
    names = [re.split(r"[\s(]", alt.split("|")[0].strip(), maxsplit=1)[0] for alt in deps.split(",") if alt.strip()]
    return [n.split(":")[0] for n in names if n.endswith("-doc")]


# dictd (.index + .dict.dz) --------------------------------------------------------------------
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_int(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def dictd_entries(index: Path, data: Path) -> list[tuple[str, str]]:
    """(headword, raw text) of each distinct entry of a dictd dictionary, in file order.

    The data file is dictzip (gzip-compatible) or plain; headwords that point to the same text are
    merged; the dictd metadata entries ('00-database-*', '00databaseinfo', ...) are skipped.
    """
    import gzip

    opener = gzip.open if data.suffix == ".dz" or data.suffix == ".gz" else open
    with opener(data, "rb") as f:
        raw = f.read()
    seen: dict[tuple[int, int], str] = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        head = parts[0]
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        key = (_b64_int(parts[1]), _b64_int(parts[2]))
        seen.setdefault(key, head)
    return [(head, raw[o : o + n].decode("utf-8", errors="replace")) for (o, n), head in sorted(seen.items())]


def _reflow(text: str) -> str:
    """Blank-line separated paragraphs, each unwrapped onto one line; paragraphs joined by '\\n'."""
    import re

    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n".join(p for p in paras if p)


_GCIDE_MARKS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303", "=": "\u0304",
                ",": "\u0327", ".": "\u0307", "-": "\u0304"}  # fmt: skip
_GCIDE_SYMBOLS = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "deg": "°", "eth": "ð", "thorn": "þ", "ng": "ŋ",
                  "frac12": "½", "frac14": "¼", "frac34": "¾", "cced": "ç", "sect": "§", "para": "¶"}  # fmt: skip


def _gcide_char(m: Any) -> str:
    import unicodedata

    code = m.group(1)
    if code in _GCIDE_SYMBOLS:
        return _GCIDE_SYMBOLS[code]
    if len(code) == 2 and code[0] in _GCIDE_MARKS and code[1].isalpha():  # ['e] = é
        return unicodedata.normalize("NFC", code[1] + _GCIDE_MARKS[code[0]])
    if len(code) == 2 and code[1] in "^~" and code[0].isalpha():  # [i^] = ĭ-like: keep the letter
        return code[0]
    return m.group(0)  # a label such as [Obs.]: removed with the other brackets


def gcide_text(entry: str) -> str:
    """One GCIDE entry as plain English: definitions and quotations, markup stripped.

    Removed: the pronunciation (\\Af*fect"\\), every [bracketed] part (etymology, grammatical
    forms, usage labels like [Obs.], source tags like [1913 Webster]), quotation attributions
    (--Milton.); {cross references} keep their text; letter codes like ['e] become é; hard-wrapped
    lines are joined, one paragraph (sense, quotation, note) per line.
    """
    import re

    text = re.sub(r"\\[^\\\n]*\\", "", entry)  # pronunciation
    text = re.sub(r"\(\?[^()\n]*\)", "", text)  # unknown pronunciations: (? or ?)
    # the source data sometimes runs the next headword onto a source tag's line: "[1913 Webster] Pearlite"
    text = re.sub(r"(?m)(\[[^\[\]\n]*(?:Webster|PJC|WordNet|Century|Chambers)[^\[\]\n]*\])[^\n]*$", r"\1", text)
    text = re.sub(r"\[([^\[\]\s]{1,6})\]", _gcide_char, text)  # letter codes (labels stay bracketed)
    prev = None
    while prev != text:  # innermost brackets first: etymologies may nest letter codes or labels
        prev, text = text, re.sub(r"\[[^\[\]]*\]", "", text)
    text = re.sub(r"[{}]", "", text)  # cross references
    text = re.sub(r"(?m)\s*--(?=[A-Z0-9(]).*$", "", text)  # attributions: --Milton.  --1 Sam. xx. 3.
    text = re.sub(r"\s+([,.;:])", r"\1", _reflow(text))  # 'Affect , v. t.' -> 'Affect, v. t.'
    text = re.sub(r"^([,.;:]\s*)+", "", text, flags=re.M)
    lines = [ln.strip() for ln in text.split("\n")]
    return "\n".join(ln for ln in lines if re.search(r"[A-Za-z]", ln))


def _dictd_docs(root: Path, clean: Any) -> list[str]:
    docs = []
    for index in sorted(root.glob("usr/share/dictd/*.index")):
        data = next((p for p in (index.with_suffix(".dict.dz"), index.with_suffix(".dict")) if p.is_file()), None)
        if data is None:
            continue
        for _head, raw in dictd_entries(index, data):
            text = clean(raw)
            if text:
                docs.append(text)
    return docs


# HTML --------------------------------------------------------------------------------------------
_BLOCK_TAGS = {"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt",
               "dd", "pre", "table", "tr", "blockquote", "br", "hr", "figure", "figcaption", "caption",
               "main"}  # fmt: skip
_SKIP_TAGS = {"script", "style", "nav", "head", "header", "footer", "noscript", "template", "svg", "button", "form"}
_SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "headerlink", "clearer", "mobile-nav", "menu-wrapper",
                 "toctree-wrapper",
                 "inline-search", "version_switcher_placeholder", "language_switcher_placeholder"}  # fmt: skip
_VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


def html_text(html: str) -> str:
    """Visible text of an HTML page with the stdlib parser: script/style/navigation/sidebars/footers
    and Sphinx permalink marks dropped; only the main content when the page marks it
    (role="main"); one block (paragraph, heading, list item, code block) per paragraph, blocks
    separated by blank lines; whitespace kept inside <pre>.
    """
    from html.parser import HTMLParser

    class _P(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.blocks: list[str] = []  # finished blocks, whole page and main part
            self.main_blocks: list[str] | None = None
            self.cur: list[str] = []
            self.skip: list[str] = []  # stack of open tags while inside skipped content
            self.pre = 0
            self.main_depth: list[str] | None = None  # open tags inside the main element

        def flush(self) -> None:
            text = "".join(self.cur)
            self.cur = []
            if not self.pre:
                text = " ".join(text.split())
            text = text.strip("\n")
            if text.strip():
                self.blocks.append(text)
                if self.main_depth is not None and self.main_blocks is not None:
                    self.main_blocks.append(text)

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag in _VOID_TAGS:
                if tag in ("br", "hr") and not self.skip:
                    self.flush() if tag == "hr" else self.cur.append("\n" if self.pre else " ")
                return
            if self.skip:
                self.skip.append(tag)
                return
            a = dict(attrs)
            classes = set((a.get("class") or "").split())
            if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or a.get("role") in ("navigation", "search"):
                self.skip.append(tag)
                return
            if tag in _BLOCK_TAGS:
                self.flush()
            if self.main_depth is not None:
                self.main_depth.append(tag)
            elif a.get("role") == "main" or tag == "main":
                self.flush()
                self.main_depth, self.main_blocks = [], []
            if tag == "pre":
                self.pre += 1

        def handle_endtag(self, tag: str) -> None:
            if tag in _VOID_TAGS:
                return
            if self.skip:
                if tag in self.skip:  # tolerate unclosed tags: pop up to the matching one
                    while self.skip and self.skip.pop() != tag:
                        pass
                return
            if tag in _BLOCK_TAGS:
                self.flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
            if self.main_depth is not None:
                if tag in self.main_depth:
                    while self.main_depth and self.main_depth.pop() != tag:
                        pass
                elif not self.main_depth:
                    self.flush()
                    self.main_depth = None  # closed the main element (main_blocks stay)

        def handle_data(self, data: str) -> None:
            if not self.skip:
                self.cur.append(data)

    p = _P()
    p.feed(html)
    p.close()
    p.flush()
    blocks = p.main_blocks if p.main_blocks else p.blocks
    return "\n\n".join(blocks)


def chunk_text(text: str, max_chars: int = DEBIAN_CHUNK_CHARS) -> list[str]:
    """Blank-line separated paragraphs packed greedily into chunks of at most ~max_chars
    (a single longer paragraph stays whole)."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if cur and size + len(para) + 2 > max_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return [c for c in chunks if c.strip()]


_SKIP_PAGES = ("genindex", "py-modindex", "search.html", "modindex", "contents.html")  # indexes, tables of contents


def _real_files(top: Path) -> list[Path]:
    """Regular files under top, symlinks (files and folders) not followed, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) / d).is_symlink())
        out += [Path(dirpath) / f for f in filenames if not (Path(dirpath) / f).is_symlink()]
    return sorted(out)


def _python_doc_docs(root: Path) -> list[str]:
    docs = []
    for html_dir in sorted(root.glob("usr/share/doc/python3*/html")):
        if html_dir.is_symlink():
            continue
        for page in _real_files(html_dir):
            rel = page.relative_to(html_dir).as_posix()
            if page.suffix != ".html" or rel.startswith("_") or any(s in rel for s in _SKIP_PAGES):
                continue
            docs += chunk_text(html_text(page.read_text(encoding="utf-8", errors="replace")))
    return docs


def _generic_docs(root: Path) -> list[str]:
    """Any package: dictd dictionaries if it has some, else text and HTML files under usr/share/doc
    (copyright and changelogs skipped; .gz files decompressed)."""
    import gzip

    docs = _dictd_docs(root, _reflow)
    if docs:
        return docs
    for path in _real_files(root / "usr" / "share" / "doc") if (root / "usr/share/doc").is_dir() else []:
        name = path.name.lower()
        if name.startswith(("copyright", "changelog")):
            continue
        raw = gzip.open(path).read() if name.endswith(".gz") else path.read_bytes()
        base = name[:-3] if name.endswith(".gz") else name
        if b"\0" in raw[:4096]:
            continue  # binary
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if base.endswith((".html", ".htm")):
            text = html_text(text)
        elif "." in base and not base.endswith((".txt", ".md", ".rst", ".debian")):
            continue  # images, scripts, data
        docs += chunk_text(text.strip())
    return docs


DEBIAN_PARSERS: dict[str, Any] = {
    "dict-gcide": lambda root: _dictd_docs(root, gcide_text),
    "python3-doc": _python_doc_docs,
}


def _parser_for(package: str) -> tuple[str, Any]:
    import re

    if package in DEBIAN_PARSERS:
        return package, DEBIAN_PARSERS[package]
    if re.fullmatch(r"python3(\.\d+)?-doc", package):
        return "python3-doc", _python_doc_docs
    return "generic", _generic_docs


def _read_debian_cache(path: Path, parser: str) -> tuple[dict[str, Any], list[str]] | None:
    """(header, docs) of a complete cache built by this parser version, else None."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        try:
            header = json.loads(f.readline())["header"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        if header.get("format") != DEBIAN_FORMAT or header.get("parser") != parser:
            return None
        if header.get("parser_version") != DEBIAN_PARSER_VERSION:
            return None
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    if len(docs) != header.get("n_docs"):
        return None
    return header, docs


def debian_docs(
    package: str,
    *,
    deb_path: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    refresh: bool = False,
) -> list[str]:
    """Documents parsed from the Debian package `package`, cached as JSONL.

    First use: `apt-get download PKG` into cache_dir()/debian/ (or use deb_path, an existing
    .deb), unpack with `dpkg-deb -x`; a documentation metapackage with nothing to parse (e.g.
    python3-doc) pulls the '-doc' packages it depends on too. Parsers: dict-gcide (dictionary
    entries, markup stripped), python3-doc (Sphinx HTML, one document per page or ~4000-character
    chunk of it), anything else: dictd dictionaries, or the text/HTML files under usr/share/doc.
    The result goes to cache_dir()/debian/PKG.jsonl (a header line with the package versions, the
    .deb sha256s and the parser version, then {"text": ...} per document); later uses read only
    that file, without apt. refresh=True rebuilds it.
    """
    return _debian(package, deb_path=deb_path, cache=cache, refresh=refresh)[1]


def debian_header(package: str, **kwargs: Any) -> dict[str, Any]:
    """The cache header of debian_docs(package): packages, versions, .deb sha256, parser version."""
    return _debian(package, **kwargs)[0]


def _debian(
    package: str,
    *,
    deb_path: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    refresh: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    import shutil
    import tempfile

    parser_name, parser = _parser_for(package)
    folder = _debian_dir()
    path = Path(cache) if cache is not None else folder / f"{package}.jsonl"
    if not refresh and (hit := _read_debian_cache(path, parser_name)) is not None:
        return hit
    debs = [Path(deb_path)] if deb_path is not None else [_apt_download(package, folder / "debs")]
    work = Path(tempfile.mkdtemp(prefix=f"{package}.", dir=folder if folder.is_dir() else None))
    try:
        root = work / "root"
        _run_tool(["dpkg-deb", "-x", str(debs[0]), str(root)], package)
        docs = parser(root)
        if not docs and deb_path is None:  # a metapackage: parse the documentation it points to
            for dep in _doc_depends(debs[0], package):
                debs.append(_apt_download(dep, folder / "debs"))
                _run_tool(["dpkg-deb", "-x", str(debs[-1]), str(root)], package)
            docs = parser(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not docs:
        raise CorpusError(f"debian:{package}: the package holds no documents the {parser_name!r} parser can read")
    header = {
        "format": DEBIAN_FORMAT,
        "package": package,
        "parser": parser_name,
        "parser_version": DEBIAN_PARSER_VERSION,
        "debs": [
            {"package": _deb_field(d, "Package", package), "version": _deb_field(d, "Version", package),
             "sha256": _sha256_file(d), "file": d.name}
            for d in debs
        ],  # fmt: skip
        "n_docs": len(docs),
        "n_chars": sum(map(len, docs)),
    }
    lines = [json.dumps({"header": header})] + [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return header, docs


# provenance and held-out splits ----------------------------------------------------------------
def docs_fingerprint(docs: Iterable[str]) -> str:
    """sha256 over the documents in order (length-prefixed, so boundaries count)."""
    import hashlib

    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def provenance(spec: str) -> dict[str, Any]:
    """What the corpus `spec` is built from, for model cards: one record per '+' part.

    debian:PKG -> the packages, versions and .deb sha256s (from the cache header; building the
    cache if needed); python-docs -> the Python version; files -> paths with sha256; others the spec.
    """
    import hashlib
    import sys

    parts = []
    for part in spec.split("+"):
        if part.startswith("debian:"):
            h = debian_header(part.split(":", 1)[1])
            parts.append({"source": part, "parser": h["parser"], "parser_version": h["parser_version"],
                          "debs": h["debs"], "n_docs": h["n_docs"], "n_chars": h["n_chars"]})  # fmt: skip
        elif part == "python-docs":
            parts.append({"source": part, "python": sys.version.split()[0]})
        elif part.startswith(("generated:", "hf:")):
            parts.append({"source": part})
        else:
            files = _expand([p for p in part.split(",") if p])
            parts.append({"source": part, "files": [
                {"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files]})  # fmt: skip
    return {"spec": spec, "parts": parts}


def split_docs(docs: Sequence[str], n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval): eval holds the n_eval documents with the smallest sha256(seed, text), so the
    same texts are held out on every machine and in every order; both keep the input order.
    Duplicated texts share a hash, so an eval text never also appears in train unless n_eval cuts
    through a group of duplicates."""
    import hashlib

    if not 0 <= n_eval <= len(docs):
        raise ValueError(f"n_eval must be in [0, {len(docs)}], got {n_eval}")
    keys = [hashlib.sha256(f"{seed}\0{d}".encode("utf-8")).digest() for d in docs]
    held = set(sorted(range(len(docs)), key=lambda i: (keys[i], i))[:n_eval])
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [d for i, d in enumerate(docs) if i in held]


def pack_docs(docs: Iterable[str], target_chars: int = 2000, sep: str = "\n\n") -> list[str]:
    """Consecutive short documents joined with `sep` into documents of about target_chars
    (a longer document stays alone). Dictionary entries (median ~100 characters for GCIDE) are
    otherwise mostly padding in a 128-token batch, and those under min_tokens are dropped."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for d in docs:
        if cur and size + len(sep) + len(d) > target_chars:
            out.append(sep.join(cur))
            cur, size = [], 0
        cur.append(d)
        size += len(d) + (len(sep) if size else 0)
    if cur:
        out.append(sep.join(cur))
    return out


def harvest_docs(spec: str, n_eval: int, seed: int = 0, lm: Any = None, progress: bool = True) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) of a finite corpus, as `sae harvest` uses them: the
    held-out ones chosen by content hash (`split_docs`), the training ones shuffled by `seed` (a harvest
    takes the first N tokens, so the sources mix), and both packed into ~2,000-character documents
    (`pack_docs`), so forward passes run on full-length chunks."""
    import random

    docs = from_spec(spec, lm, progress=progress)
    if not isinstance(docs, list):
        raise CorpusError(f"corpus {spec!r} is a stream; harvesting needs a finite corpus (files, debian:, python-docs)")
    train, held = split_docs(docs, n_eval, seed=seed)
    random.Random(seed).shuffle(train)
    return pack_docs(train), pack_docs(held)
