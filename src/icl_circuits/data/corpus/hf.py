"""A streaming Hugging Face dataset as a corpus (hf_dataset; needs `datasets` and network)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any


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

