"""Model activations for training SAEs and transcoders: token batches in, shuffled rows out.

    token_batches(tok, docs, seq_len, batch_size)  -- [BOS] + chunk of seq_len-1 tokens, right-padded
                                                      (cut and padded by data/batching.py)
    ActivationStore(lm, sites, docs).next(4096)    -- {site: [4096, d_model]}, rows aligned across sites

The store reads every requested site in one forward per token batch, keeps real (non-pad,
non-BOS) positions, and serves rows from a shuffle buffer. Row i of every site is the same
token, so a transcoder can read resid_mid and mlp_out of one token together.

Held-out evaluation: `held_out_batches(tok, docs, n_docs, ...)` gives the token batches of the
first n_docs documents; build the training store with `skip_docs=n_docs` so the two never overlap.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from icl_circuits.data.batching import Cursor, chunk_rows, padded_batches  # sae/cache.py takes Cursor from here
from icl_circuits.data.corpus import bos_id
from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site, SiteLike


def cursor_batches(
    tokenizer: Any, docs: Iterable[str], seq_len: int, batch_size: int, min_tokens: int, start: Cursor = (0, 0)
) -> Iterator[tuple[Tensor, Tensor, Cursor]]:
    """token_batches plus the cursor after each batch (what a resumed run starts from)."""
    if seq_len < 2 or batch_size < 1 or min_tokens < 1:
        raise ValueError(
            f"need seq_len >= 2, batch_size >= 1, min_tokens >= 1; got {seq_len}, {batch_size}, {min_tokens}"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos_id(tokenizer)  # masked out anyway
    rows = ((row, after) for row, _, after in chunk_rows(tokenizer, docs, seq_len, min_tokens, start))
    for ids, mask, afters in padded_batches(rows, batch_size, pad):
        yield ids, mask, afters[-1]


def token_batches(
    tokenizer: Any, docs: Iterable[str], seq_len: int, batch_size: int, min_tokens: int = 8
) -> Iterator[tuple[Tensor, Tensor]]:
    """(input_ids [batch, seq], attention_mask [batch, seq]) batches of the documents.

    Each document is tokenised without special tokens and cut into chunks of seq_len-1 tokens;
    each chunk gets BOS (EOS if the tokenizer has no BOS) in front, and chunks with fewer than
    min_tokens tokens are dropped. Rows are right-padded to the longest row of their batch; the
    last batch may hold fewer rows.
    """
    for ids, mask, _ in cursor_batches(tokenizer, docs, seq_len, batch_size, min_tokens):
        yield ids, mask


def held_out_batches(
    tokenizer: Any, docs: Iterable[str], n_docs: int, seq_len: int, batch_size: int, min_tokens: int = 8
) -> list[tuple[Tensor, Tensor]]:
    """Token batches of the first n_docs documents; train with ActivationStore(skip_docs=n_docs)."""
    return list(token_batches(tokenizer, itertools.islice(docs, n_docs), seq_len, batch_size, min_tokens))


@dataclass(frozen=True)
class StoreConfig:
    """What determines the stream of rows; a state_dict only loads into a store with the same one."""

    sites: tuple[str, ...]
    seq_len: int
    batch_size: int
    buffer_batches: int
    seed: int
    drop_bos: bool
    skip_docs: int
    min_tokens: int


class ActivationStore:
    """Shuffled, site-aligned activation rows from a corpus.

    batch_size is prompts per forward; the shuffle buffer holds about buffer_batches forwards
    worth of tokens and is refilled (then reshuffled as a whole) when it drops below half.
    At the end of the corpus, `next` returns the remaining rows as a shorter final batch and
    raises StopIteration on the call after that.

    Resuming: `state_dict()` holds the corpus cursor (document, chunk), the shuffle RNG state,
    counters and, by default, the rows still in the buffer, so a store that loads it yields
    exactly the batches an uninterrupted one would. `state_dict(include_buffer=False)` is small
    but drops the buffered rows (the stream then continues with the next documents). `docs`
    must be re-iterable (a list, text_files(), hf_dataset()), not a one-shot generator.
    """

    def __init__(
        self,
        lm: LM,
        sites: list[SiteLike],
        docs: Iterable[str],
        seq_len: int = 128,
        batch_size: int = 16,
        buffer_batches: int = 32,
        seed: int = 0,
        drop_bos: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        skip_docs: int = 0,
        min_tokens: int = 8,
    ) -> None:
        if lm.tokenizer is None:
            raise ValueError("ActivationStore needs lm.tokenizer")
        self.lm, self.docs = lm, docs
        self.sites = list(dict.fromkeys(Site.parse(s) for s in sites))
        if not self.sites:
            raise ValueError("ActivationStore needs at least one site")
        self.config = StoreConfig(
            tuple(map(str, self.sites)), seq_len, batch_size, buffer_batches, seed, drop_bos, skip_docs, min_tokens
        )
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else lm.device
        self.target_rows = buffer_batches * batch_size * (seq_len - 1)  # refill up to this, at half of it
        self._gen = torch.Generator().manual_seed(seed)
        self._cursor: Cursor = (skip_docs, 0)
        self._batch_iter: Iterator[tuple[Tensor, Tensor, Cursor]] | None = None
        self._exhausted = False
        self._buf = {s: torch.empty(0, lm.d_model, dtype=dtype, device=self.device) for s in self.sites}
        self._pos = 0  # rows before _pos were already served
        self.tokens_seen = 0  # rows served by next()
        self.forwards = 0  # token batches run through the model

    # -- counters ----------------------------------------------------------------------------
    @property
    def docs_consumed(self) -> int:
        """Documents read through the model in full (after skip_docs)."""
        return self._cursor[0] - self.config.skip_docs

    @property
    def rows_left(self) -> int:
        return self._buf[self.sites[0]].shape[0] - self._pos

    # -- reading -----------------------------------------------------------------------------
    def next(self, n_rows: int) -> dict[Site, Tensor]:
        """{site: [n_rows, d_model]}; row i of every site is the same token."""
        if self.rows_left < max(self.target_rows // 2, n_rows) and not self._exhausted:
            self._refill(max(self.target_rows, n_rows))
        if self.rows_left == 0:
            raise StopIteration
        n = min(n_rows, self.rows_left)
        out = {s: b[self._pos : self._pos + n] for s, b in self._buf.items()}  # [n, d_model] each
        self._pos += n
        self.tokens_seen += n
        return out

    def batches(self, n_rows: int) -> Iterator[dict[Site, Tensor]]:
        """next(n_rows) until the corpus is used up."""
        while True:
            try:
                yield self.next(n_rows)
            except StopIteration:
                return

    @torch.no_grad()
    def _refill(self, want: int) -> None:
        """Read token batches until `want` rows are buffered (or the corpus ends), then shuffle."""
        c = self.config
        if self._batch_iter is None:
            self._batch_iter = cursor_batches(self.lm.tokenizer, self.docs, c.seq_len, c.batch_size, c.min_tokens, self._cursor)
        new: dict[Site, list[Tensor]] = {s: [] for s in self.sites}
        n_new = 0
        while self.rows_left + n_new < want:
            item = next(self._batch_iter, None)
            if item is None:
                self._exhausted = True
                break
            ids, mask, cursor = item
            acts = self.lm.activations(ids, self.sites, attention_mask=mask)  # one pass reads every site
            keep = mask.bool()  # [batch, seq]
            if c.drop_bos:
                keep[:, 0] = False  # every chunk starts with BOS, an outlier no SAE should train on
            for s in self.sites:
                # boolean indexing is row-major for every site alike, so rows stay aligned
                new[s].append(acts[s][keep.to(acts[s].device)].to(self.device, self.dtype))  # [n_tokens, d_model]
            n_new += int(keep.sum())
            self._cursor = cursor
            self.forwards += 1
        if n_new == 0:
            return
        total = self.rows_left + n_new
        perm = torch.randperm(total, generator=self._gen).to(self.device)  # one permutation for all sites
        self._buf = {s: torch.cat([self._buf[s][self._pos :], *new[s]])[perm] for s in self.sites}
        self._pos = 0

    # -- resuming ----------------------------------------------------------------------------
    def state_dict(self, include_buffer: bool = True) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "cursor": list(self._cursor),
            "exhausted": self._exhausted,
            "rng": self._gen.get_state(),
            "tokens_seen": self.tokens_seen,
            "forwards": self.forwards,
            "buffer": {str(s): b[self._pos :].cpu() for s, b in self._buf.items()} if include_buffer else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        config = StoreConfig(**{**state["config"], "sites": tuple(state["config"]["sites"])})
        if config != self.config:
            raise ValueError(f"state was saved by a store with config {config}, this one has {self.config}")
        self._cursor = (int(state["cursor"][0]), int(state["cursor"][1]))
        self._exhausted = bool(state["exhausted"])
        self._gen.set_state(state["rng"])
        self.tokens_seen, self.forwards = int(state["tokens_seen"]), int(state["forwards"])
        buf = state["buffer"]
        if buf is None:  # saved without rows: they are lost, the stream goes on from the cursor
            buf = {str(s): torch.empty(0, self.lm.d_model) for s in self.sites}
        self._buf = {s: buf[str(s)].to(self.device, self.dtype) for s in self.sites}
        self._pos = 0
        self._batch_iter = None  # restarts from the cursor on the next refill
