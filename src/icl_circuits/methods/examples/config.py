"""What determines an example store's content (ExampleConfig), and the constants the store shares."""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1
TOP = -1  # the `bin` of a top-k example; sampled examples have bin >= 0


@dataclass(frozen=True)
class ExampleConfig:
    """What determines the store's content (a resumed run must use the same one)."""

    seq_len: int = 128  # tokens per chunk, BOS included
    batch_size: int = 16  # chunks per forward
    top_k: int = 16  # top examples per latent (one per chunk)
    bin_width: float = 0.5  # activation bins [b*w, (b+1)*w), as in the paper
    per_bin: int = 4  # sampled examples per (latent, bin)
    max_bins: int = 200  # activations above max_bins*bin_width fall into the last bin
    context_before: int = 24  # window tokens before the firing token
    context_after: int = 8  # window tokens after it
    seed: int = 0
    min_tokens: int = 8  # shorter chunks are skipped (as in SAE training)
    commit_every: int = 8  # forwards per SQLite commit (the resume granularity)
    corpus: str = ""  # a label for the corpus (e.g. its spec), stored with the results

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "top_k", "per_bin", "max_bins", "commit_every", "min_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ExampleConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise ValueError(f"ExampleConfig.seq_len must be >= 2, got {self.seq_len}")
        if not self.bin_width > 0:
            raise ValueError(f"ExampleConfig.bin_width must be > 0, got {self.bin_width}")
        if self.context_before < 0 or self.context_after < 0:
            raise ValueError("ExampleConfig.context_before / context_after must be >= 0")

    @property
    def window(self) -> int:
        return self.context_before + 1 + self.context_after

