"""Which firings become examples: seeded bottom-k sampling keys, and a columnar pool of candidates
pruned to the top-k per latent and the per_bin smallest keys per (latent, bin)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from icl_circuits.methods.examples.config import TOP, ExampleConfig

_M32 = 0xFFFFFFFF


# -- the sampling key -----------------------------------------------------------------------------
def sample_keys(uid: Tensor, latent: Tensor, seed: int) -> Tensor:
    """Pseudo-random 32-bit keys (int64 tensor) of firings: murmur3's finaliser of (uid, latent, seed).

    Integer overflow in int64 wraps (two's complement), which leaves the low 32 bits we keep exact.
    """
    h = (uid.long() * 0x9E3779B1 + latent.long() * 0x7FEB352D + (seed * 0x846CA68B + 0x165667B1)) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _group_rank(group: Tensor, rank: Tensor, uid: Tensor) -> tuple[Tensor, Tensor]:
    """(order, rank within group) sorting rows by (group, rank, uid); ties in rank go to the smaller uid."""
    order = torch.argsort(uid, stable=True)
    order = order[torch.argsort(rank[order], stable=True)]
    order = order[torch.argsort(group[order], stable=True)]
    _, counts = torch.unique_consecutive(group[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(len(order)) - torch.repeat_interleave(starts, counts)
    return order, within


# -- candidates: a columnar pool of examples, pruned to the top-k / bottom-k keys per group --------
@dataclass
class _Pool:
    latent: Tensor  # [n] int64
    bin: Tensor  # [n] int64 (TOP for top-k examples)
    rank: Tensor  # [n] float64: -act for top-k, the sampling key for bins (smaller = kept)
    act: Tensor  # [n] float32
    uid: Tensor  # [n] int64 global token id of the firing token
    doc: Tensor  # [n] int64 document index
    pos: Tensor  # [n] int64 position of the firing token in its chunk
    start: Tensor  # [n] int64 chunk position of the window's first token
    length: Tensor  # [n] int64 window length
    ids: Tensor  # [n, window] int64 token ids (padded)
    acts: Tensor  # [n, window] float32 latent activation on each window token (padded)

    @staticmethod
    def cat(pools: list["_Pool"]) -> "_Pool":
        return _Pool(*[torch.cat([getattr(p, f) for p in pools]) for f in _Pool.__dataclass_fields__])

    def take(self, idx: Tensor) -> "_Pool":
        return _Pool(*[getattr(self, f)[idx] for f in _Pool.__dataclass_fields__])

    def __len__(self) -> int:
        return len(self.latent)

    def kept(self, cfg: ExampleConfig) -> Tensor:
        """Indices of the rows to keep: the top_k per latent (bin TOP), the per_bin smallest keys per (latent, bin)."""
        group = self.latent * (cfg.max_bins + 1) + (self.bin + 1)
        order, within = _group_rank(group, self.rank, self.uid)
        limit = torch.where(self.bin[order] == TOP, cfg.top_k, cfg.per_bin)
        return order[within < limit]

    def prune(self, cfg: ExampleConfig) -> "_Pool":
        return self.take(self.kept(cfg)) if len(self) else self


def _candidates(
    f: Tensor,  # [batch, seq, d_sae] latent activations
    keep: Tensor,  # [batch, seq] bool: real tokens (not BOS, not padding)
    ids: Tensor,  # [batch, seq]
    lengths: Tensor,  # [batch] real length of each row (BOS included)
    row_uid: Tensor,  # [batch] global index of each chunk
    row_doc: Tensor,  # [batch] document of each chunk
    cfg: ExampleConfig,
) -> _Pool:
    """The batch's top-k and binned candidates with their windows, already pruned within the batch."""
    f = f * keep[..., None]  # [batch, seq, d_sae]
    seq = f.shape[1]
    # top-k: each chunk's maximum per latent
    row_max, row_arg = f.max(dim=1)  # [batch, d_sae]
    r_top, l_top = torch.nonzero(row_max > 0, as_tuple=True)
    p_top = row_arg[r_top, l_top]
    # bins: every firing
    r_bin, p_bin, l_bin = torch.nonzero(f > 0, as_tuple=True)
    act_bin = f[r_bin, p_bin, l_bin]
    # uid: a token's global index (chunk number * seq_len + position), unique across batches
    uid_bin = row_uid[r_bin] * cfg.seq_len + p_bin
    act_top = row_max[r_top, l_top]
    uid_top = row_uid[r_top] * cfg.seq_len + p_top
    bins = torch.clamp((act_bin / cfg.bin_width).floor().long(), 0, cfg.max_bins - 1)
    keys = sample_keys(uid_bin, l_bin, cfg.seed).double()

    row = torch.cat([r_top, r_bin])
    pos = torch.cat([p_top, p_bin])
    latent = torch.cat([l_top, l_bin])
    no_window = torch.empty(len(row), 0)
    pool = _Pool(
        latent=latent, bin=torch.cat([torch.full_like(l_top, TOP), bins]),
        rank=torch.cat([-act_top.double(), keys]), act=torch.cat([act_top, act_bin]).float(),
        uid=torch.cat([uid_top, uid_bin]), doc=row_doc[row], pos=pos, start=pos, length=pos,  # start/length: set below
        ids=no_window.long(), acts=no_window,
    )  # fmt: skip
    # prune before building windows: only the survivors need them
    kept = pool.kept(cfg)
    pool, row = pool.take(kept), row[kept]
    pos, latent = pool.pos, pool.latent
    # window: [start, end) around the firing token, clipped to the chunk's real tokens (never BOS or padding)
    start = torch.clamp(pos - cfg.context_before, min=1)  # [n]
    end = torch.minimum(pos + cfg.context_after + 1, lengths[row])  # [n]
    idx = start[:, None] + torch.arange(cfg.window)  # [n, window]
    valid = idx < end[:, None]
    idx = idx.clamp(max=seq - 1)
    pool.ids = torch.where(valid, ids[row[:, None], idx], 0)  # [n, window], padded with 0
    pool.acts = torch.where(valid, f[row[:, None], idx, latent[:, None]], 0.0)  # [n, window]
    pool.start, pool.length = start, end - start
    return pool

