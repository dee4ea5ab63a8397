"""Local files as a corpus: .txt (one document per file or paragraph) and .jsonl (text_files)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from icl_circuits.data.corpus.base import CorpusError

TEXT_SUFFIXES = (".txt", ".jsonl")


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

