"""Sources of training text for SAEs and transcoders: documents as plain strings.

Every source can be iterated more than once and skipped into (a list, or an object with a
`skip(n)` method), so an activation store can resume a run from the document it stopped at.

    text_files(["data/*.jsonl"])   -- local .txt / .jsonl files
    hf_dataset()                   -- a streaming Hugging Face dataset (needs network)
    generated(lm, 10_000)          -- text the model samples itself, from BOS only
    debian_docs("dict-gcide")      -- documents parsed from a Debian package (apt-get download, cached)

One module per source (files, hf, generated, debian with its html_pages parsers); spec reads a
command-line spec and mixes sources, splits holds the held-out split and packing for harvests.
"""

from icl_circuits.data.corpus.base import CorpusError, skip_docs, take_docs
from icl_circuits.data.corpus.debian import (
    DEBIAN_FORMAT,
    DEBIAN_PARSER_VERSION,
    DEBIAN_PARSERS,
    debian_docs,
    debian_header,
    dictd_entries,
    gcide_text,
)
from icl_circuits.data.corpus.files import TEXT_SUFFIXES, text_files
from icl_circuits.data.corpus.generated import GenSettings, bos_id, generated
from icl_circuits.data.corpus.hf import HFTexts, hf_dataset
from icl_circuits.data.corpus.html_pages import DEBIAN_CHUNK_CHARS, chunk_text, html_text
from icl_circuits.data.corpus.spec import from_spec, provenance, python_docs
from icl_circuits.data.corpus.splits import docs_fingerprint, harvest_docs, pack_docs, split_docs

__all__ = [
    "DEBIAN_CHUNK_CHARS", "DEBIAN_FORMAT", "DEBIAN_PARSERS", "DEBIAN_PARSER_VERSION", "TEXT_SUFFIXES", "CorpusError",
    "GenSettings", "HFTexts", "bos_id", "chunk_text", "debian_docs", "debian_header", "dictd_entries",
    "docs_fingerprint", "from_spec", "gcide_text", "generated", "harvest_docs", "hf_dataset", "html_text",
    "pack_docs", "provenance", "python_docs", "skip_docs", "split_docs", "take_docs", "text_files",
]  # fmt: skip
