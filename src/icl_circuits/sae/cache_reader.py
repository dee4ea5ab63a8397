"""Reading an activation cache folder (see sae/cache.py for the layout and the harvest that writes it):
the format's facts, ActivationCache (shards, splits, shuffled epochs of batches), manifest_summary,
and HarvestRun (a `sae harvest` folder: train/ and eval/ caches)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icl_circuits.core.sites import Site, SiteLike
from icl_circuits.core.storage import read_json

FORMAT_NAME = "icl_circuits.activation_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"



def _check_same(path: Path, key: str, have: Any, want: Any) -> None:
    if have != want:
        raise ValueError(f"{path}: the cache was made with {key}={have!r}, not {want!r}; use another folder")



def _check_format(path: Path, manifest: dict[str, Any]) -> None:
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path}: not an activation cache (format {manifest.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: cache format version {manifest.get('format_version')}, this code reads {FORMAT_VERSION}"
        )


class ActivationCache:
    """Reader of a harvested cache folder (complete, or the complete shards of one in progress)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST
        if not self.manifest_path.is_file():
            raise FileNotFoundError(f"{self.manifest_path}: no activation cache here (run harvest first)")
        self.manifest: dict[str, Any] = read_json(self.manifest_path)
        _check_format(self.manifest_path, self.manifest)
        self.shard_rows: list[int] = [int(s["rows"]) for s in self.manifest["shards"]]
        self.offsets = torch.tensor([0, *itertools.accumulate(self.shard_rows)], dtype=torch.long)  # [n_shards+1]

    # -- facts ---------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_shards(self) -> int:
        return len(self.shard_rows)

    @property
    def sites(self) -> list[Site]:
        return [Site.parse(s) for s in self.manifest["sites"]]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def check(self, lm_name: str, d_model: int, sites: Iterable[SiteLike] = (), seq_len: int | None = None,
              corpus_id: str | None = None) -> None:  # fmt: skip
        """ValueError (naming the manifest and both values) unless the cache fits this use."""
        p, m = self.manifest_path, self.manifest
        _check_same(p, "model", m["model"], lm_name)
        _check_same(p, "d_model", m["d_model"], d_model)
        missing = [str(Site.parse(s)) for s in sites if str(Site.parse(s)) not in m["sites"]]
        if missing:
            raise ValueError(f"{p}: the cache holds sites {m['sites']}, not {missing}")
        if seq_len is not None:
            _check_same(p, "seq_len", m["seq_len"], seq_len)
        if corpus_id is not None:
            _check_same(p, "corpus_fingerprint", m["corpus_fingerprint"], corpus_id)

    # -- reading ------------------------------------------------------------------------------
    def load_shard(self, i: int, sites: Iterable[SiteLike] | None = None, extras: bool = True) -> dict[str, Tensor]:
        """{site name: [rows, d_model] (storage dtype), 'token_ids': [rows], 'positions': [rows]}."""
        from safetensors import safe_open

        names = [str(Site.parse(s)) for s in (self.sites if sites is None else sites)]
        file = self.path / self.manifest["shards"][i]["file"]
        self.check(self.manifest["model"], self.d_model, names)
        out: dict[str, Tensor] = {}
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for name in [*names, *(["token_ids", "positions"] if extras else [])]:
                if name not in keys:
                    raise ValueError(f"{file}: no tensor {name!r} in this shard (it holds {sorted(keys)})")
                t = f.get_tensor(name)
                rows = self.shard_rows[i]
                want = (rows,) if name in ("token_ids", "positions") else (rows, self.d_model)
                if tuple(t.shape) != want:
                    raise ValueError(f"{file}: {name} has shape {tuple(t.shape)}, expected {want} (rows, d_model)")
                out[name] = t
        return out

    def split_shards(self, split: str = "train", eval_shards: int = 0) -> list[int]:
        """Shard indices of a split: 'train' all but the last eval_shards, 'eval' those, 'all' every shard."""
        if not 0 <= eval_shards <= self.n_shards:
            raise ValueError(f"eval_shards must be in [0, {self.n_shards}], got {eval_shards}")
        cut = self.n_shards - eval_shards
        if split == "train":
            return list(range(cut))
        if split == "eval":
            return list(range(cut, self.n_shards))
        if split == "all":
            return list(range(self.n_shards))
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")

    def split_rows(self, split: str = "train", eval_shards: int = 0) -> int:
        return sum(self.shard_rows[i] for i in self.split_shards(split, eval_shards))

    def epoch_order(self, seed: int = 0, epoch: int = 0, split: str = "train", eval_shards: int = 0,
                    buffer_shards: int = 8) -> Tensor:  # fmt: skip
        """Global row indices [n_split_rows] in the order an epoch serves them.

        train/all: shards in an order drawn from (seed, epoch); taken buffer_shards at a time,
        the rows of each group permuted (same generator). eval: the rows in cache order.
        Computed from the manifest only (no shard is read).
        """
        shards = self.split_shards(split, eval_shards)
        ranges = [torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in shards]
        if split == "eval" or not shards:
            return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(len(shards), generator=gen).tolist()
        groups = []
        for g in range(0, len(order), max(1, buffer_shards)):
            rows = torch.cat([ranges[j] for j in order[g : g + buffer_shards]])  # [group rows]
            groups.append(rows[torch.randperm(rows.shape[0], generator=gen)])
        return torch.cat(groups)

    def n_batches(self, batch_rows: int, split: str = "train", eval_shards: int = 0, drop_last: bool = False) -> int:
        n = self.split_rows(split, eval_shards)
        return n // batch_rows if drop_last else math.ceil(n / batch_rows)

    def batches(
        self,
        sites: Iterable[SiteLike] | None = None,
        batch_rows: int = 4096,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        split: str = "train",
        eval_shards: int = 0,
        buffer_shards: int = 8,
        drop_last: bool = False,
        extras: bool = False,
        device: torch.device | str = "cpu",
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[dict[Site | str, Tensor]]:
        """{site: float32 [batch_rows, d_model]} batches of one epoch; row i of every site is one token.

        Order: epoch_order(seed, epoch, split, eval_shards, buffer_shards), cut into batch_rows;
        the last batch is shorter unless drop_last. start_batch resumes mid-epoch: the batches
        from there are exactly those an uninterrupted epoch yields. extras adds 'token_ids' and
        'positions' ([batch_rows] each). About buffer_shards (up to twice that at group edges)
        shards are held in memory at a time. part = (rank, world): only rows rank, rank + world, ...
        of each batch are read and yielded (data-parallel training, `sae/distributed.py`).
        """
        site_list = self.sites if sites is None else [Site.parse(s) for s in sites]
        self.check(self.manifest["model"], self.d_model, site_list)
        names = [str(s) for s in site_list]
        order = self.epoch_order(seed, epoch, split, eval_shards, buffer_shards)  # [n]
        n = order.shape[0]
        n_b = n // batch_rows if drop_last else math.ceil(n / batch_rows)
        if n == 0:
            return
        shard_of = torch.searchsorted(self.offsets, order, right=True) - 1  # [n]
        # the last batch that needs each shard: a shard is dropped from memory after it
        last_use = torch.full((self.n_shards,), -1, dtype=torch.long)
        last_use.scatter_reduce_(0, shard_of, torch.arange(n) // batch_rows, reduce="amax")
        loaded: dict[int, dict[str, Tensor]] = {}
        for b in range(start_batch, n_b):
            idx = order[b * batch_rows : (b + 1) * batch_rows][part[0] :: part[1]]  # [batch_rows] (this rank's share)
            sh = shard_of[b * batch_rows : (b + 1) * batch_rows][part[0] :: part[1]]
            local = idx - self.offsets[sh]
            out: dict[Site | str, Tensor] = {}
            for s, name in zip(site_list, names):
                out[s] = torch.empty(idx.shape[0], self.d_model, dtype=torch.float32)
            if extras:
                out["token_ids"] = torch.empty(idx.shape[0], dtype=torch.int32)
                out["positions"] = torch.empty(idx.shape[0], dtype=torch.int32)
            for i in sh.unique().tolist():
                if i not in loaded:
                    loaded[i] = self.load_shard(i, site_list, extras=extras)
                m = sh == i
                for s, name in zip(site_list, names):
                    out[s][m] = loaded[i][name][local[m]].float()
                if extras:
                    out["token_ids"][m] = loaded[i]["token_ids"][local[m]]
                    out["positions"][m] = loaded[i]["positions"][local[m]].to(torch.int32)
            for i in [i for i in loaded if int(last_use[i]) <= b]:
                del loaded[i]
            yield {k: v.to(device) for k, v in out.items()}



def manifest_summary(path: str | Path) -> str:
    """One line describing a cache (for logs and CLIs)."""
    m = read_json(Path(path) / MANIFEST)
    state = "complete" if m["complete"] else "in progress"
    return (f"{m['model']} {','.join(m['sites'])}: {m['total_rows']} rows in {len(m['shards'])} shards "
            f"({m['storage_dtype']}, seq_len {m['seq_len']}, {state})")  # fmt: skip



class HarvestRun:
    """A `sae harvest` folder: harvest.json (model, corpus, held-out documents, seed), train/ and eval/."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "harvest.json").is_file():
            raise FileNotFoundError(f"{self.path}: not a `sae harvest` folder (no harvest.json)")
        self.settings: dict[str, Any] = read_json(self.path / "harvest.json")
        self.train = ActivationCache(self.path / "train")
        self.eval = ActivationCache(self.path / "eval")

    @property
    def model(self) -> str:
        return str(self.settings["model"])

    def held_out_docs(self, lm: Any = None, progress: bool = False) -> list[str]:
        """The held-out documents the eval cache was made from (the same split and packing)."""
        from icl_circuits.data.corpus import harvest_docs

        s = self.settings
        return harvest_docs(s["corpus"], s["eval_docs"], s["seed"], lm, progress)[1]

