"""Documents from Debian packages, on tiny .deb files built here (nothing is downloaded)."""

from __future__ import annotations

import gzip
import hashlib
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from icl_circuits.data.corpus import debian as C
from icl_circuits.data.corpus import CorpusError, chunk_text, debian_docs, from_spec, html_text, provenance, split_docs

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")

GCIDE = """\

00-database-info
   This file was converted from the original database.

Affect \\Af*fect"\\, v. t. [imp. & p. p. {Affected}; p. pr. & vb.
   n. {Affecting}.] [L. affectus, p. p. of afficere. See {Fact}.]
   1. To act upon; to produce an effect or change upon.
      [1913 Webster]

            As might affect the earth with cold heat. --Milton.
      [1913 Webster]

   2. To love; to regard with affection. [Obs.]
      [1913 Webster]

Caf['e] \\Ca*f['e]"\\, n. [F. caf['e], fr. Turk. [=a]h[aum].]
   A coffee house; a restaurant. See {Coffee}.
   [1913 Webster] Cafeteria

Zero \\Ze"ro\\ (? or ?), n.
   1. A cipher; nothing.
   [PJC]
"""

GCIDE_DOCS = [
    "Affect, v. t. 1. To act upon; to produce an effect or change upon.\n"
    "As might affect the earth with cold heat.\n"
    "2. To love; to regard with affection.",
    "Café, n. A coffee house; a restaurant. See Coffee.",
    "Zero, n. 1. A cipher; nothing.",
]

PAGE = """<!DOCTYPE html>
<html><head><title>9. Classes</title><script>var x = "<p>no</p>";</script><style>p { color: red }</style></head>
<body><div class="related" role="navigation"><a href="#">previous</a> | <a href="#">next</a></div>
<div class="document"><div class="body" role="main">
<section id="classes"><h1>9. Classes<a class="headerlink" href="#classes" title="Permalink">¶</a></h1>
<p>Classes provide a means of <em>bundling</em> data
and functionality   together.</p>
<div class="highlight"><pre><span class="k">class</span> A:
    pass
</pre></div>
<ul><li><p>First &amp; second.</p></li></ul>
</section></div></div>
<div class="sphinxsidebar" role="navigation"><h3>Table of Contents</h3></div>
<div class="footer">&copy; Copyright 2001</div></body></html>
"""
PAGE_DOC = (
    "9. Classes\n\nClasses provide a means of bundling data and functionality together.\n\n"
    "class A:\n    pass\n\nFirst & second."
)


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = C._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def _build_deb(folder: Path, package: str, files: dict[str, bytes], depends: str | None = None) -> Path:
    root = folder / f"{package}-root"
    (root / "DEBIAN").mkdir(parents=True)
    control = f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: T <t@example.org>\n"
    control += (f"Depends: {depends}\n" if depends else "") + "Description: test package\n"
    (root / "DEBIAN" / "control").write_text(control)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    deb = folder / f"{package}_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


def _gcide_files() -> dict[str, bytes]:
    data = GCIDE.encode()
    # an entry starts at a line that is not indented
    starts = [i + 1 for i in range(len(data) - 1) if data[i : i + 1] == b"\n" and data[i + 1 : i + 2] not in b" \n"]
    bounds = list(zip(starts, [*starts[1:], len(data)]))
    heads = ["00-database-info", "Affect", "Cafe", "Zero"]
    index = [(h, o, e - o) for h, (o, e) in zip(heads, bounds)]
    index.append(("affect", bounds[1][0], bounds[1][1] - bounds[1][0]))  # two headwords, one entry
    lines = "".join(f"{h}\t{_b64(o)}\t{_b64(n)}\n" for h, o, n in sorted(index, key=lambda t: t[0].lower()))
    return {
        "usr/share/dictd/gcide.index": lines.encode(),
        "usr/share/dictd/gcide.dict.dz": gzip.compress(data, mtime=0),
    }


HTML_FILES = {
    "usr/share/doc/python3.11/html/tutorial/classes.html": PAGE.encode(),
    "usr/share/doc/python3.11/html/genindex-A.html": b"<html><body><p>index junk</p></body></html>",
    "usr/share/doc/python3.11/html/_static/x.html": b"<p>static</p>",
}


@pytest.fixture()
def debs(tmp_path: Path) -> dict[str, Path]:
    return {
        "dict-gcide": _build_deb(tmp_path, "dict-gcide", _gcide_files()),
        "python3-doc": _build_deb(tmp_path, "python3-doc", {"usr/share/doc/python3-doc/README.Debian": b"see html\n"},
                                  depends="python3.11-doc (>= 3.11.2-1~)"),  # fmt: skip
        "python3.11-doc": _build_deb(tmp_path, "python3.11-doc", HTML_FILES),
    }


@pytest.fixture()
def fake_apt(tmp_path: Path, debs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """apt-get download replaced by a copy of the fake .debs; returns the packages asked for."""
    monkeypatch.setenv("ICL_CIRCUITS_CACHE", str(tmp_path / "cache"))
    asked: list[str] = []

    def download(package: str, dest: Path) -> Path:
        asked.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(debs[package], dest))

    monkeypatch.setattr(C, "_apt_download", download)
    return asked


def test_gcide_entries_become_plain_english(debs, tmp_path):
    assert debian_docs("dict-gcide", deb_path=debs["dict-gcide"], cache=tmp_path / "g.jsonl") == GCIDE_DOCS


def test_html_manual_pages(debs, tmp_path):
    docs = debian_docs("python3.11-doc", deb_path=debs["python3.11-doc"], cache=tmp_path / "p.jsonl")
    assert docs == [PAGE_DOC]  # genindex and _static pages skipped
    assert html_text(PAGE) == PAGE_DOC


def test_spec_downloads_once_follows_doc_metapackage_and_records_provenance(fake_apt, debs, tmp_path, monkeypatch):
    docs = from_spec("debian:dict-gcide+debian:python3-doc", lm=None)
    assert docs == [*GCIDE_DOCS, PAGE_DOC]
    assert fake_apt == ["dict-gcide", "python3-doc", "python3.11-doc"]
    cached = tmp_path / "cache" / "debian" / "dict-gcide.jsonl"
    header = C.json.loads(cached.read_text().splitlines()[0])["header"]
    assert header["parser_version"] == C.DEBIAN_PARSER_VERSION and header["n_docs"] == 3

    def no_apt(package, dest):
        raise AssertionError("apt used although the documents are cached")

    monkeypatch.setattr(C, "_apt_download", no_apt)
    assert from_spec("debian:dict-gcide+debian:python3-doc", lm=None) == docs
    prov = provenance("debian:dict-gcide+debian:python3-doc")
    assert [p["source"] for p in prov["parts"]] == ["debian:dict-gcide", "debian:python3-doc"]
    debs_used = prov["parts"][1]["debs"]
    assert [(d["package"], d["version"]) for d in debs_used] == [("python3-doc", "1.0-1"), ("python3.11-doc", "1.0-1")]
    assert debs_used[1]["sha256"] == hashlib.sha256(debs["python3.11-doc"].read_bytes()).hexdigest()
    assert prov["parts"][0]["n_docs"] == 3 and prov["parts"][0]["n_chars"] == sum(map(len, GCIDE_DOCS))


def test_two_first_uses_at_once_download_and_parse_once(fake_apt, monkeypatch):
    import threading
    import time

    download = C._apt_download

    def slow(package, dest):  # still copying when the second process asks
        time.sleep(0.3)
        return download(package, dest)

    monkeypatch.setattr(C, "_apt_download", slow)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(debian_docs("dict-gcide"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [GCIDE_DOCS, GCIDE_DOCS]
    assert fake_apt == ["dict-gcide"]  # the second waited, then read the first one's cache


def test_missing_tools_or_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ICL_CIRCUITS_CACHE", str(tmp_path / "cache"))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package nope-pkg' >&2\nexit 100\n")
    (fake_bin / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    msg = r"debian:nope-pkg: `apt-get download nope-pkg` failed \(run `apt-get update`.*Unable to locate"
    with pytest.raises(CorpusError, match=msg):
        debian_docs("nope-pkg")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CorpusError, match=r"debian:nope-pkg: `apt-get` is not installed"):
        debian_docs("nope-pkg")


def test_chunking_long_pages():
    paras = [f"paragraph {i} " + "x" * 50 for i in range(10)]
    chunks = chunk_text("\n\n".join(paras), max_chars=130)
    assert all(len(c) <= 130 for c in chunks) and len(chunks) == 5
    assert "\n\n".join(chunks) == "\n\n".join(paras)


def test_split_docs_is_stable_and_order_free():
    docs = [f"document number {i}" for i in range(50)]
    train, ev = split_docs(docs, 10, seed=0)
    assert len(ev) == 10 and len(train) == 40 and set(train).isdisjoint(ev)
    assert [d for d in docs if d in set(ev)] == ev  # input order kept
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert set(split_docs(shuffled, 10, seed=0)[1]) == set(ev)  # chosen by text, not position
    assert set(split_docs(docs, 10, seed=1)[1]) != set(ev)
    assert split_docs(docs, 10, seed=0) == (train, ev)
    with pytest.raises(ValueError):
        split_docs(docs, 51)


def test_pack_docs():
    from icl_circuits.data.corpus import pack_docs

    docs = ["a" * 10, "b" * 10, "c" * 10, "d" * 50, "e" * 5]
    assert pack_docs(docs, target_chars=25, sep="|") == ["a" * 10 + "|" + "b" * 10, "c" * 10, "d" * 50, "e" * 5]
    assert pack_docs(docs, target_chars=1000, sep="|") == ["|".join(docs)]
