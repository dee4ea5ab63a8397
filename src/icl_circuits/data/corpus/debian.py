"""Documents parsed from a Debian package (debian_docs): apt-get download once, then a JSONL cache.

'debian:PKG' downloads PKG's .deb with apt-get (no root needed, no install), unpacks it with
dpkg-deb -x, parses its files into documents and caches them as JSONL. Later uses read the
cache only. Bump DEBIAN_PARSER_VERSION whenever a parser's output changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from icl_circuits.core.storage import FolderLock, atomic_write_text
from icl_circuits.data.corpus.base import CorpusError
from icl_circuits.data.corpus.html_pages import _python_doc_docs, _real_files, chunk_text, html_text

DEBIAN_FORMAT = "icl_circuits.debian_docs"
DEBIAN_PARSER_VERSION = 1


def _debian_dir() -> Path:
    from icl_circuits.core.loading import cache_dir

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
    parser_name, _ = _parser_for(package)
    folder = _debian_dir()
    path = Path(cache) if cache is not None else folder / f"{package}.jsonl"
    if not refresh and (hit := _read_debian_cache(path, parser_name)) is not None:
        return hit
    if deb_path is not None:
        return _build(package, [Path(deb_path)], path, folder, follow_deps=False)
    # One download at a time: two first uses at once (two harvests) would share apt's folder and race on it.
    (folder / ".build").mkdir(parents=True, exist_ok=True)
    with FolderLock(folder / ".build", "apt", wait=True):
        if not refresh and (hit := _read_debian_cache(path, parser_name)) is not None:
            return hit  # made by the process we waited for
        return _build(package, [_apt_download(package, folder / "debs")], path, folder, follow_deps=True)


def _build(package: str, debs: list[Path], path: Path, folder: Path, follow_deps: bool) -> tuple[dict[str, Any], list[str]]:
    """Parse the documents of `debs` and cache them at `path`; follow_deps: a metapackage's -doc packages too."""
    import shutil
    import tempfile

    parser_name, parser = _parser_for(package)
    work = Path(tempfile.mkdtemp(prefix=f"{package}.", dir=folder if folder.is_dir() else None))
    try:
        root = work / "root"
        _run_tool(["dpkg-deb", "-x", str(debs[0]), str(root)], package)
        docs = parser(root)
        if not docs and follow_deps:  # a metapackage: parse the documentation it points to
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

