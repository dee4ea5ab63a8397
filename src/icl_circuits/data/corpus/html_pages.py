"""HTML manual pages as documents: markup stripped to paragraphs (html_text), cut into chunks
(chunk_text); the Sphinx pages of python3-doc packages."""

from __future__ import annotations

import os
from pathlib import Path

DEBIAN_CHUNK_CHARS = 4000  # long HTML pages are cut into chunks of about this many characters


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

