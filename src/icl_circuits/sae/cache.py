"""An on-disk activation cache: harvest once, train many SAEs for many epochs.

    harvest(lm, sites, docs, "acts/", n_tokens=2_000_000)   -- writes shards + manifest.json
    cache = ActivationCache("acts/")
    cache.check(lm.name, lm.d_model, sites)                  -- refuses a cache of another model/site
    for batch in cache.batches(sites, 4096, seed=0, epoch=e, eval_shards=2):
        batch[site]                                          # [4096, d_model] float32, rows aligned

Layout of a cache folder:

    manifest.json          format + version, model, d_model, n_layers, sites, corpus fingerprint and
                           provenance, seq_len, batch_size, min_tokens, forward and storage dtype,
                           rows per shard, n_tokens asked, the shards written (rows, sha256), the
                           resume cursor, and whether the harvest is complete
    shard-00000.safetensors  {site name: [rows, d_model] (bf16), "token_ids": [rows] int32,
                              "positions": [rows] int16 (position in its chunk, BOS = 0)}

Rows are the real tokens of `token_batches` (BOS + chunks of seq_len-1 tokens; BOS and padding
dropped) in corpus order; row i of every site in a shard is the same token. Every shard has
`shard_rows` rows except the last. Each shard is written atomically and the manifest updated
after it, so a harvest killed at any point resumes from its last complete shard and ends with
files bitwise identical to an uninterrupted harvest (same machine, torch version and threads).

Held-out rows: `batches(..., eval_shards=N)` trains on all shards but the last N and
`batches(..., split="eval", eval_shards=N)` reads those N in order. The last shard is usually
short, so N=2 holds out between 1 and 2 shards' worth of rows (see `split_rows`).

The reading side (ActivationCache, HarvestRun, manifest_summary) is in sae/cache_reader.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icl_circuits.data.corpus import docs_fingerprint
from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site, SiteLike
from icl_circuits.core.storage import FolderLock, atomic_write_bytes, read_json, write_json
from icl_circuits.sae.activations import Cursor, cursor_batches
from icl_circuits.sae.cache_reader import FORMAT_NAME, FORMAT_VERSION, MANIFEST, ActivationCache, _check_format, _check_same, shard_name


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# settings that must match for a harvest to resume into an existing folder
_IDENTITY = ("model", "d_model", "n_layers", "sites", "corpus_fingerprint", "seq_len", "batch_size", "min_tokens",
             "forward_dtype", "storage_dtype", "shard_rows", "n_tokens")  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")



def _write_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Serialise one shard and write it atomically (tests patch this to simulate a kill)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))



class _Pending:
    """Rows harvested but not yet in a shard, with where each run of them came from."""

    def __init__(self, names: list[str]) -> None:
        self.parts: dict[str, list[Tensor]] = {n: [] for n in names}
        self.segs: list[list[Any]] = []  # [batch start cursor, index of first row within batch, n rows]
        self.n = 0

    def add(self, rows: dict[str, Tensor], start: Cursor, offset: int) -> None:
        n = next(iter(rows.values())).shape[0]
        if n == 0:
            return
        for k, v in rows.items():
            self.parts[k].append(v)
        self.segs.append([start, offset, n])
        self.n += n

    def take(self, k: int) -> dict[str, Tensor]:
        """The first k rows; the rest stay pending."""
        out = {}
        for name, parts in self.parts.items():
            allrows = torch.cat(parts) if len(parts) > 1 else parts[0]
            out[name], rest = allrows[:k], allrows[k:]
            self.parts[name] = [rest] if rest.shape[0] else []
        self.n -= k
        while k:
            seg = self.segs[0]
            used = min(k, seg[2])
            seg[1] += used
            seg[2] -= used
            k -= used
            if seg[2] == 0:
                self.segs.pop(0)
        return out


def harvest(
    lm: LM,
    sites: Sequence[SiteLike],
    docs: Iterable[str],
    out_dir: str | Path,
    n_tokens: int,
    seq_len: int = 128,
    batch_size: int = 16,
    shard_rows: int = 16384,
    storage_dtype: torch.dtype = torch.bfloat16,
    min_tokens: int = 8,
    corpus_id: str | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> "ActivationCache":
    """Run `lm` over `docs` and store n_tokens rows of every site in out_dir (resuming if started).

    One forward per token batch reads every site (LM.activations stops after the last needed
    layer); the LM may be float32 or bfloat16, rows are cast to storage_dtype. The harvest ends
    after n_tokens rows or at the end of the corpus. A non-finite activation raises ValueError
    naming the site and the shard it would go into.

    docs must be re-iterable in the same order (a list); the cache records
    docs_fingerprint(docs) unless corpus_id names the corpus (needed for non-list sources).
    provenance (e.g. corpus.provenance(spec)) is stored as is in the manifest.

    Resuming: a folder with a manifest must have been started with the same model, sites,
    corpus, seq_len, batch_size, min_tokens, dtypes, shard_rows and n_tokens (else ValueError);
    the harvest goes on from the last complete shard. A complete cache is returned untouched. A second
    harvest into a folder another process is harvesting into gets RunBusy.
    """
    if lm.tokenizer is None:
        raise ValueError("harvest needs lm.tokenizer")
    site_list = list(dict.fromkeys(Site.parse(s) for s in sites))
    if not site_list:
        raise ValueError("harvest needs at least one site")
    if n_tokens < 1 or shard_rows < 1:
        raise ValueError(f"need n_tokens >= 1 and shard_rows >= 1; got {n_tokens}, {shard_rows}")
    if _dtype_name(storage_dtype) not in _DTYPES:
        raise ValueError(f"storage_dtype must be one of {sorted(_DTYPES)}, got {storage_dtype}")
    if corpus_id is None:
        if not isinstance(docs, Sequence):
            raise ValueError("harvest of a non-list corpus needs corpus_id= (a name that identifies it)")
        corpus_id = docs_fingerprint(docs)
    out = Path(out_dir)
    path = out / MANIFEST
    config = {
        "model": lm.name,
        "d_model": lm.d_model,
        "n_layers": lm.n_layers,
        "sites": [str(s) for s in site_list],
        "corpus_fingerprint": corpus_id,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "min_tokens": min_tokens,
        "forward_dtype": _dtype_name(lm.dtype),
        "storage_dtype": _dtype_name(storage_dtype),
        "shard_rows": shard_rows,
        "n_tokens": n_tokens,
    }
    out.mkdir(parents=True, exist_ok=True)
    # one harvest per folder: a second is refused, not interleaved; the lock also removes the temp files of a
    # write killed mid-way (SIGKILL skips atomic_write's cleanup)
    with FolderLock(out, "harvest"):
        if path.is_file():
            manifest = read_json(path)
            _check_format(path, manifest)
            for key in _IDENTITY:
                _check_same(path, key, manifest.get(key), config[key])
            if manifest["complete"]:
                return ActivationCache(out)
        else:
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                **config,
                "provenance": provenance,
                "shards": [],
                "total_rows": 0,
                "cursor": {"doc": 0, "chunk": 0, "skip_rows": 0},
                "complete": False,
            }
            write_json(path, manifest)

        cur = manifest["cursor"]
        start: Cursor = (int(cur["doc"]), int(cur["chunk"]))
        skip = int(cur["skip_rows"])
        written = int(manifest["total_rows"])
        names = [str(s) for s in site_list]
        pos_dtype = torch.int16 if seq_len <= torch.iinfo(torch.int16).max else torch.int32
        pending = _Pending([*names, "token_ids", "positions"])
        last_after: Cursor = start

        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, initial=written, desc="harvesting", unit="tok", disable=not progress)

        def flush(k: int) -> None:
            nonlocal written
            i = len(manifest["shards"])
            tensors = pending.take(k)
            name = shard_name(i)
            # one metadata key only: safetensors writes several in an arbitrary order, breaking bitwise equality
            _write_shard(out / name, tensors, {"icl_circuits": f"{FORMAT_NAME} v{FORMAT_VERSION} {name}"})
            written += k
            if pending.segs:  # the next shard starts inside a batch already run: redo that batch, skip its rows
                (doc, chunk), offset, _ = pending.segs[0]
            else:
                (doc, chunk), offset = last_after, 0
            digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
            manifest["shards"].append({"file": name, "rows": k, "sha256": digest})
            manifest["total_rows"] = written
            manifest["cursor"] = {"doc": doc, "chunk": chunk, "skip_rows": offset}
            write_json(path, manifest)
            bar.update(k)

        with torch.no_grad():
            batch_start = start
            for ids, mask, after in cursor_batches(lm.tokenizer, docs, seq_len, batch_size, min_tokens, start):
                acts = lm.activations(ids, site_list, attention_mask=mask)  # site -> [batch, seq, d_model]
                keep = mask.bool()  # [batch, seq]
                keep[:, 0] = False  # BOS
                rows: dict[str, Tensor] = {}
                shard_i = len(manifest["shards"]) + pending.n // shard_rows
                for s, name in zip(site_list, names):
                    a = acts[s]
                    if a.shape[-1] != lm.d_model:
                        raise ValueError(f"{path}: site {name} gives rows of width {a.shape[-1]}, not d_model={lm.d_model}")
                    r = a[keep.to(a.device)].to("cpu", storage_dtype)  # [n, d_model]
                    if not torch.isfinite(r).all():
                        bad = int((~torch.isfinite(r)).any(-1).sum())
                        raise ValueError(
                            f"{path}: {bad} rows with NaN/inf activations at site {name} in shard {shard_name(shard_i)}"
                        )
                    rows[name] = r
                rows["token_ids"] = ids[keep].to(torch.int32)  # [n]
                rows["positions"] = torch.arange(ids.shape[1]).expand_as(ids)[keep].to(pos_dtype)  # [n]
                offset = skip if batch_start == start else 0
                room = n_tokens - written - pending.n
                rows = {k: v[offset : offset + room] for k, v in rows.items()}
                pending.add(rows, batch_start, offset)
                last_after, batch_start = after, after
                while pending.n >= shard_rows:
                    flush(shard_rows)
                if written + pending.n >= n_tokens:
                    break
        if pending.n:
            flush(pending.n)
        bar.close()
        manifest["complete"] = True
        write_json(path, manifest)
        return ActivationCache(out)



# -- bf16 vs fp32 forward -----------------------------------------------------------------------
@torch.no_grad()
def compare_forward_dtypes(
    lm_fp32: LM,
    lm_low: LM,
    sites: Sequence[SiteLike],
    batches: Sequence[tuple[Tensor, Tensor]],
) -> dict[str, dict[str, float]]:
    """Relative error of lm_low's activations (e.g. a bf16 copy) against lm_fp32's at each site.

    Over the real tokens of the (input_ids, attention_mask) batches, BOS dropped as in harvest:
    {site: {"rel_err": ||low - fp32||_F / ||fp32||_F, "row_rel_err_median": median per-row
    relative error, "cos_min": the smallest per-row cosine similarity, "storage_rel_err": the
    error of merely storing the fp32 rows in bfloat16 (the floor of any bf16 cache)}}.
    """
    site_list = [Site.parse(s) for s in sites]
    num = {s: 0.0 for s in site_list}
    den = {s: 0.0 for s in site_list}
    store = {s: 0.0 for s in site_list}
    row_err: dict[Site, list[Tensor]] = {s: [] for s in site_list}
    cos_min = {s: 1.0 for s in site_list}
    for ids, mask in batches:
        a = lm_fp32.activations(ids, site_list, attention_mask=mask)
        b = lm_low.activations(ids, site_list, attention_mask=mask)
        keep = mask.bool()
        keep[:, 0] = False
        for s in site_list:
            x, y = a[s][keep].float(), b[s][keep].float()  # [n, d_model]
            num[s] += float(((y - x) ** 2).sum())
            den[s] += float((x**2).sum())
            store[s] += float(((x.bfloat16().float() - x) ** 2).sum())
            row_err[s].append((y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12))
            cos_min[s] = min(cos_min[s], float(torch.nn.functional.cosine_similarity(x, y, dim=-1).min()))
    return {
        str(s): {"rel_err": math.sqrt(num[s] / den[s]), "row_rel_err_median": float(torch.cat(row_err[s]).median()),
                 "cos_min": cos_min[s], "storage_rel_err": math.sqrt(store[s] / den[s])}  # fmt: skip
        for s in site_list
    }



__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "ActivationCache", "compare_forward_dtypes", "harvest",
    "shard_name",
]  # fmt: skip

