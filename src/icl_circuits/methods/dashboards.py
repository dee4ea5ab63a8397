"""Feature dashboards, computed once per run: `build_dashboards(lm, saes, run_dir)` -> RUN_DIR/dashboards.sqlite.

What the viewer's feature page shows next to the max-activating examples (Neuronpedia / SAE-Vis style):

  * logit lens: the top +/- output tokens of each latent's decoder direction d, read through the
    model's final norm (when it has one) and the unembedding: logits = (norm(d) - norm(0)) @ W_U^T.
    Subtracting norm(0) drops a LayerNorm's bias (RMSNorm(0) = 0), so only the direction is read.
    The final-logit soft-cap (Gemma 2) is monotonic and left out. With `final_norm=False` it is
    plain W_dec @ W_U^T. Computed `chunk` latents at a time with a top-k per chunk: Gemma 3's
    262k vocabulary never needs a [d_sae, vocab] matrix (4096 x 262k floats would be 4 GB).
  * activation density and a histogram of the non-zero activations (`n_bins` bins from 0 to the
    latent's max), over every non-BOS token of the tasks' ICL prompts (and `docs`, when given);
  * activations on the tasks' ICL prompts: per task, the mass per token type (prompt, input,
    arrow, output, newline, extra) and the activations on one example prompt (its first);
  * neighbours: the latents with the most similar decoder direction (cosine), `chunk` rows at a time.

Storage is one SQLite file (stdlib, like the example store): a row per (SAE, latent) holding the
sortable scalars as columns and the rest as a small JSON document, so a feature page is one
primary-key look-up (~0.1 ms) and a sorted feature list is one ORDER BY. The file is built as
`dashboards.sqlite.partial` and renamed when complete. Readers go through `DashboardStore`,
whose `feature()` returns typed `FeatureDashboard` objects.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from icl_circuits.methods.examples.schema import token_text
from icl_circuits.methods.masses import MASS_TYPES
from icl_circuits.core.model import LM
from icl_circuits.data.batching import padded_batches
from icl_circuits.data.prompts import TOKEN_TYPES, TYPE_ID, icl_prompts
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.core.sites import Site
from icl_circuits.core.storage import ReadOnlySQLite

SCHEMA_VERSION = 1
FILE_NAME = "dashboards.sqlite"
# columns of the feature list a page may sort by (whitelisted: they go into ORDER BY)
SORT_COLUMNS: tuple[str, ...] = ("latent", "density", "n_fired", "max_act", "mean_act", "top_logit", "n_tasks", "top_type", "top_token")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE saes (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, site TEXT NOT NULL, d_sae INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL, info TEXT NOT NULL);
CREATE TABLE prompts (task TEXT PRIMARY KEY, tokens TEXT NOT NULL, types TEXT NOT NULL);
CREATE TABLE features (sae INTEGER NOT NULL, latent INTEGER NOT NULL, n_fired INTEGER NOT NULL, density REAL NOT NULL,
    max_act REAL NOT NULL, mean_act REAL NOT NULL, top_token TEXT NOT NULL, top_logit REAL NOT NULL, top_type TEXT NOT NULL,
    n_tasks INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (sae, latent)) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class DashboardConfig:
    n_prompts: int = 8  # ICL prompts per task
    n_shots: int = 8  # demonstrations per prompt (fewer when a task is small)
    seed: int = 0
    batch_size: int = 8  # prompts per forward
    top_tokens: int = 10  # logit-lens tokens per sign
    n_neighbours: int = 8
    n_bins: int = 20  # histogram bins of non-zero activations
    final_norm: bool = True  # logit lens through the model's final norm
    chunk: int = 0  # latents per logit-lens / cosine block (0: as many as fit in ~256 MB of logits)
    max_seq: int = 128  # corpus documents are cut to this many tokens
    cache_mb: int = 1024  # site activations kept between the two passes (beyond this, the forwards are redone)

    def __post_init__(self) -> None:
        for name in ("n_prompts", "batch_size", "top_tokens", "n_bins", "max_seq"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DashboardConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.n_shots < 0 or self.n_neighbours < 0 or self.chunk < 0:
            raise ValueError(f"DashboardConfig: n_shots, n_neighbours and chunk must be >= 0, got {self}")


# -- typed records ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LensToken:
    token_id: int
    text: str
    value: float


@dataclass(frozen=True)
class TaskActivation:
    """A latent on one task's ICL prompts: mass per token type (summed activation) and its
    activation on every token of the task's example prompt."""

    task: str
    masses: dict[str, float]
    tokens: list[str]
    types: list[str]
    acts: list[float]

    @property
    def total(self) -> float:
        return sum(self.masses.values())


@dataclass(frozen=True)
class FeatureDashboard:
    sae: str
    latent: int
    n_tokens: int  # tokens the density and histogram were counted on
    n_fired: int
    density: float
    max_act: float
    mean_act: float
    hist: list[int]  # counts of non-zero activations in n_bins equal bins over (0, max_act]
    logit_pos: list[LensToken]
    logit_neg: list[LensToken]
    final_norm: bool  # the logit lens went through the final norm
    tasks: list[TaskActivation]  # only tasks where the latent fired
    neighbours: list[tuple[int, float]]  # (latent, decoder cosine), most similar first
    mass_types: list[str] = field(default_factory=lambda: list(MASS_TYPES))

    @property
    def hist_edges(self) -> list[float]:
        n = len(self.hist)
        return [self.max_act * i / n for i in range(n + 1)]


# -- computation -----------------------------------------------------------------------------------
def final_norm_module(lm: LM) -> torch.nn.Module | None:
    """The norm applied to the last hidden state before the unembedding, if the model has one."""
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        m = getattr(lm._base, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def _chunk_rows(cfg: DashboardConfig, width: int) -> int:
    return cfg.chunk or max(1, min(4096, (64 * 2**20) // max(width, 1)))  # 64M floats = 256 MB per block


@torch.no_grad()
def logit_lens(lm: LM, W_dec: torch.Tensor, k: int, final_norm: bool = True, chunk: int = 0) -> tuple[torch.Tensor, ...]:
    """(top values, top ids, bottom values, bottom ids), each [d_sae, k], of (norm(d) - norm(0)) @ W_U^T per decoder row d.

    Blocks of `chunk` latents: one [chunk, vocab] logit block at a time, never [d_sae, vocab]."""
    W_U = lm._lm_head.weight.detach().float()  # [vocab, d_model] (a float32 copy once, for a bf16 model)
    vocab = W_U.shape[0]
    k = min(k, vocab)
    norm = final_norm_module(lm) if final_norm else None
    step = chunk or max(1, min(4096, (64 * 2**20) // vocab))
    out: list[list[torch.Tensor]] = [[], [], [], []]
    zero = torch.zeros(1, W_dec.shape[1], device=lm.device, dtype=lm.dtype)
    bias = None if norm is None else norm(zero).float()
    for s in range(0, W_dec.shape[0], step):
        d = W_dec[s : s + step].to(device=lm.device, dtype=lm.dtype)
        if norm is not None:
            d = norm(d).float() - bias
        logits = d.float() @ W_U.T  # [chunk, vocab]
        top = logits.topk(k, dim=1)
        bot = (-logits).topk(k, dim=1)
        for lst, t in zip(out, (top.values, top.indices, -bot.values, bot.indices)):
            lst.append(t.cpu())
        del logits
    return tuple(torch.cat(x) for x in out)  # type: ignore[return-value]


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, n: int, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosines, latents), each [d_sae, n]: the most similar other decoder directions, by blocks of rows."""
    W = W_dec.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d_sae = W.shape[0]
    n = min(n, d_sae - 1)
    if n <= 0:
        return torch.zeros(d_sae, 0), torch.zeros(d_sae, 0, dtype=torch.long)
    step = chunk or max(1, min(4096, (64 * 2**20) // d_sae))
    vals, idx = [], []
    for s in range(0, d_sae, step):
        sims = W[s : s + step] @ W.T  # [chunk, d_sae]
        rows = torch.arange(s, min(s + step, d_sae), device=W.device)  # [chunk]
        sims[rows - s, rows] = -float("inf")
        t = sims.topk(n, dim=1)
        vals.append(t.values.cpu())
        idx.append(t.indices.cpu())
    return torch.cat(vals), torch.cat(idx)


def _doc_row(tokenizer: Any, doc: str, max_seq: int) -> list[int]:
    """A corpus document's token row: BOS (when the tokenizer has one) + its first max_seq-1 tokens."""
    ids = tokenizer(doc, add_special_tokens=False)["input_ids"][: max_seq - 1]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + list(ids)


def _default_tasks() -> list[Any]:
    from icl_circuits.data.tasks import list_tasks, load_tasks

    return load_tasks(list_tasks())


class _Acc:
    """Per-SAE accumulators over the tokens read."""

    def __init__(self, d_sae: int, n_tasks: int, cfg: DashboardConfig) -> None:
        self.n_tokens = 0
        self.n_fired = torch.zeros(d_sae, dtype=torch.long)
        self.sum_act = torch.zeros(d_sae, dtype=torch.float64)
        self.max_act = torch.zeros(d_sae)
        self.hist = torch.zeros(d_sae, cfg.n_bins, dtype=torch.long)
        self.masses = torch.zeros(n_tasks, d_sae, len(MASS_TYPES))
        self.example: dict[int, torch.Tensor] = {}  # task -> [seq, d_sae] acts on its example prompt


@torch.no_grad()
def build_dashboards(
    lm: LM, saes: dict[str, JumpReLUSAE], run_dir: str | os.PathLike, tasks: Sequence[Any] | None = None,
    cfg: DashboardConfig = DashboardConfig(), docs: Sequence[str] | None = None, progress: bool = True,
) -> Path:  # fmt: skip
    """Compute every latent's dashboard data for `saes` ({name: SAE}; use the example store's names,
    e.g. 'resid_12', so the viewer joins them) and write RUN_DIR/dashboards.sqlite. Returns its path.

    tasks: Task objects (default: the 23 built-in tasks); docs: an optional corpus whose tokens
    also count towards density and histogram. Replaces an existing file (builds take minutes)."""
    from tqdm.auto import tqdm

    if not saes:
        raise ValueError("build_dashboards needs at least one SAE")
    if lm.tokenizer is None:
        raise ValueError("build_dashboards needs a model with a tokenizer")
    tasks = list(tasks) if tasks is not None else _default_tasks()
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    sites = {name: Site.parse(sae.cfg.site) for name, sae in saes.items()}
    for name, site in sites.items():
        if not 0 <= site.layer < lm.n_layers:
            raise ValueError(f"SAE {name}: site {site} outside the model's layers 0..{lm.n_layers - 1}")
        if saes[name].cfg.d_in != lm.d_model:
            raise ValueError(f"SAE {name}: d_in {saes[name].cfg.d_in} != the model's d_model {lm.d_model}")
    t0 = time.perf_counter()
    accs = {name: _Acc(sae.d_sae, len(tasks), cfg) for name, sae in saes.items()}
    read = sorted(set(sites.values()), key=lambda s: s.order)
    mass_ids = torch.tensor([TYPE_ID[t] for t in MASS_TYPES])

    def batches() -> Any:
        """(task index or -1, first batch of its task, PromptBatch or corpus (ids, bool mask) [batch, seq]) per forward."""
        for ti, task in enumerate(tasks):
            shots = min(cfg.n_shots, len(task) - 1)
            batch = icl_prompts(lm.tokenizer, task, cfg.n_prompts, shots, seed=cfg.seed)
            for s in range(0, len(batch), cfg.batch_size):
                sub = batch.slice(s, s + cfg.batch_size)
                yield ti, s == 0, sub
        rows = ((_doc_row(lm.tokenizer, d, cfg.max_seq), i) for i, d in enumerate(docs or []))
        for ids, mask, _ in padded_batches(rows, cfg.batch_size, pad_id=0):  # the pad is masked out
            yield -1, False, (ids, mask.bool())

    # two passes: the first finds each latent's max (the histogram's range), the second fills the rest;
    # the sites' activations of the first pass are kept for the second while they fit in cache_bytes
    prompts_rows: dict[str, tuple[list[str], list[str]]] = {}
    work = list(batches())
    cached: dict[int, dict[Site, torch.Tensor]] = {}
    cache_bytes = 0
    for pass_no in (0, 1):
        for bi, (ti, first, sub) in enumerate(tqdm(work, desc=f"dashboards pass {pass_no + 1}/2", disable=not progress)):
            if ti >= 0:
                ids, mask, types = sub.input_ids, sub.attention_mask.bool(), sub.token_types
                counted = mask & (types != TYPE_ID["bos"])
            else:
                ids, mask = sub
                types = None
                counted = mask.clone()
                if getattr(lm.tokenizer, "bos_token_id", None) is not None:
                    counted[:, 0] = False
            acts_at = cached.pop(bi, None) or lm.activations(ids, read, attention_mask=mask.long())
            if pass_no == 0:
                size = sum(x.numel() * x.element_size() for x in acts_at.values())
                if cache_bytes + size <= cfg.cache_mb * 2**20:
                    cached[bi] = acts_at
                    cache_bytes += size
            if pass_no == 1 and ti >= 0 and first:
                p = sub.prompts[0]
                prompts_rows[names[ti]] = ([token_text(lm.tokenizer, i) for i in p.ids], [TOKEN_TYPES[t] for t in p.types])
            for name, sae in saes.items():
                acc = accs[name]
                x = acts_at[sites[name]]
                lat = sae.encode(x.to(device=sae.device, dtype=sae.dtype)).float().cpu()  # [b, seq, d_sae]
                lat = torch.where(counted[..., None], lat, torch.zeros((), dtype=lat.dtype))
                flat = lat.reshape(-1, lat.shape[-1])
                if pass_no == 0:
                    acc.max_act = torch.maximum(acc.max_act, flat.max(0).values)
                    continue
                acc.n_tokens += int(counted.sum())
                nz = flat > 0
                acc.n_fired += nz.sum(0)
                acc.sum_act += flat.sum(0).double()
                rows_i, cols = nz.nonzero(as_tuple=True)
                vals = flat[rows_i, cols]
                top = acc.max_act[cols].clamp_min(1e-30)
                b = (vals / top * cfg.n_bins).long().clamp_(0, cfg.n_bins - 1)
                acc.hist.view(-1).index_add_(0, cols * cfg.n_bins + b, torch.ones_like(b))
                if types is not None:
                    onehot = (types[..., None] == mass_ids).float()  # [b, seq, n_types]
                    acc.masses[ti] += torch.einsum("bsf,bst->ft", lat, onehot)
                    if first:
                        n = len(sub.prompts[0].ids)
                        acc.example[ti] = lat[0, :n].to_sparse()

    lens = {}
    neigh = {}
    for name, sae in tqdm(list(saes.items()), desc="logit lens and neighbours", disable=not progress):
        W_dec = sae.W_dec.detach() / getattr(sae.cfg, "output_scale", 1.0)
        lens[name] = logit_lens(lm, W_dec, cfg.top_tokens, cfg.final_norm, cfg.chunk)
        neigh[name] = decoder_neighbours(W_dec, cfg.n_neighbours, cfg.chunk)
    has_norm = cfg.final_norm and final_norm_module(lm) is not None

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / FILE_NAME
    partial = root / (FILE_NAME + ".partial")
    partial.unlink(missing_ok=True)
    con = sqlite3.connect(partial)
    try:
        con.executescript(SCHEMA)
        header = {"schema": SCHEMA_VERSION, "model": lm.name, "config": asdict(cfg), "tasks": names, "mass_types": list(MASS_TYPES),
                  "final_norm": has_norm, "n_docs": len(docs or []), "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        con.execute("INSERT INTO meta VALUES ('header', ?)", (json.dumps(header),))
        con.executemany("INSERT INTO prompts VALUES (?, ?, ?)", [(t, json.dumps(tok), json.dumps(ty)) for t, (tok, ty) in prompts_rows.items()])
        texts: dict[int, str] = {}

        def text(i: int) -> str:
            if i not in texts:
                texts[i] = token_text(lm.tokenizer, i)
            return texts[i]

        for sid, (name, sae) in enumerate(saes.items()):
            acc = accs[name]
            info = {"kind": sae.cfg.kind, "layer": sites[name].layer, "model": sae.cfg.model}
            con.execute("INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?)", (sid, name, sae.cfg.site, sae.d_sae, acc.n_tokens, json.dumps(info)))
            tv, ti_, bv, bi = lens[name]
            nv, ni = neigh[name]
            examples = {t: e.coalesce() for t, e in acc.example.items()}
            ex_by_latent: dict[int, dict[str, list[list[float]]]] = {}
            for t, e in examples.items():
                idx, v = e.indices(), e.values()
                for pos, lat, val in zip(idx[0].tolist(), idx[1].tolist(), v.tolist()):
                    if val > 0:
                        ex_by_latent.setdefault(lat, {}).setdefault(names[t], []).append([pos, round(val, 5)])
            rows = []
            masses = acc.masses.permute(1, 0, 2)  # [d_sae, n_tasks, n_types]
            for lat in range(sae.d_sae):
                m = masses[lat]
                fired = (m.sum(1) > 0).nonzero().flatten().tolist()
                per_type = m.sum(0)
                data = {
                    "pos": [[int(i), text(int(i)), round(float(v), 5)] for v, i in zip(tv[lat].tolist(), ti_[lat].tolist())],
                    "neg": [[int(i), text(int(i)), round(float(v), 5)] for v, i in zip(bv[lat].tolist(), bi[lat].tolist())],
                    "hist": acc.hist[lat].tolist(),
                    "masses": {names[t]: [round(float(x), 5) for x in m[t]] for t in fired},
                    "example": ex_by_latent.get(lat, {}),
                    "neighbours": [[int(j), round(float(c), 5)] for c, j in zip(nv[lat].tolist(), ni[lat].tolist())],
                }
                n_f = int(acc.n_fired[lat])
                rows.append((
                    sid, lat, n_f, n_f / max(acc.n_tokens, 1), float(acc.max_act[lat]) if n_f else 0.0,
                    float(acc.sum_act[lat]) / n_f if n_f else 0.0, data["pos"][0][1] if data["pos"] else "",
                    data["pos"][0][2] if data["pos"] else 0.0, MASS_TYPES[int(per_type.argmax())] if float(per_type.sum()) > 0 else "",
                    len(fired), json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                ))  # fmt: skip
            con.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        con.commit()
    finally:
        con.close()
    os.replace(partial, final)
    return final


# -- reading ---------------------------------------------------------------------------------------
class DashboardStore(ReadOnlySQLite):
    """Read-only typed access to a dashboards.sqlite; safe to share between threads (one connection each)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no dashboards file at {self.path}")
        self._local = threading.local()
        try:
            meta = dict(self._con().execute("SELECT key, value FROM meta").fetchall())
            self.header: dict[str, Any] = json.loads(meta["header"])
            rows = self._con().execute("SELECT id, name, site, d_sae, n_tokens, info FROM saes ORDER BY id").fetchall()
            self._prompts = {t: (json.loads(a), json.loads(b)) for t, a, b in self._con().execute("SELECT task, tokens, types FROM prompts")}
        except (sqlite3.DatabaseError, KeyError, ValueError) as e:
            raise ValueError(f"{self.path} is not a dashboards file ({e})") from e
        if self.header.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: dashboards schema {self.header.get('schema')}, this version reads {SCHEMA_VERSION}; rebuild it")
        self._saes = {n: {"id": i, "name": n, "site": s, "d_sae": d, "n_tokens": nt, **json.loads(info)} for i, n, s, d, nt, info in rows}


    @property
    def tasks(self) -> list[str]:
        return list(self.header.get("tasks", []))

    def saes(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self._saes.values()]

    def has(self, sae: str) -> bool:
        return sae in self._saes

    def feature(self, sae: str, latent: int) -> FeatureDashboard | None:
        """One latent's dashboard, or None when the SAE or latent is not in the file."""
        s = self._saes.get(sae)
        if s is None:
            return None
        row = self._con().execute(
            "SELECT n_fired, density, max_act, mean_act, data FROM features WHERE sae = ? AND latent = ?", (s["id"], int(latent))
        ).fetchone()
        if row is None:
            return None
        n_fired, density, max_act, mean_act, raw = row
        d = json.loads(raw)
        tasks = []
        for t in self.tasks:
            if t not in d["masses"]:
                continue
            toks, types = self._prompts.get(t, ([], []))
            acts = [0.0] * len(toks)
            for pos, a in d["example"].get(t, []):
                if 0 <= int(pos) < len(acts):
                    acts[int(pos)] = float(a)
            tasks.append(TaskActivation(t, dict(zip(self.header["mass_types"], d["masses"][t])), toks, types, acts))
        return FeatureDashboard(
            sae, int(latent), s["n_tokens"], n_fired, density, max_act, mean_act, d["hist"],
            [LensToken(*x) for x in d["pos"]], [LensToken(*x) for x in d["neg"]], bool(self.header.get("final_norm")),
            tasks, [(int(j), float(c)) for j, c in d["neighbours"]], list(self.header["mass_types"]),
        )  # fmt: skip

    def features(self, sae: str, sort: str = "density", descending: bool = True, limit: int = 200, offset: int = 0) -> list[dict[str, Any]]:
        """Rows (latent, density, n_fired, max_act, mean_act, top_token, top_logit, top_type, n_tasks) sorted by a column of SORT_COLUMNS."""
        if sort not in SORT_COLUMNS:
            raise ValueError(f"sort must be one of {SORT_COLUMNS}, got {sort!r}")
        s = self._saes.get(sae)
        if s is None:
            raise KeyError(f"no SAE {sae!r} in {self.path}; it has {sorted(self._saes)}")
        cols = "latent, density, n_fired, max_act, mean_act, top_token, top_logit, top_type, n_tasks"
        q = f"SELECT {cols} FROM features WHERE sae = ? ORDER BY {sort} {'DESC' if descending else 'ASC'}, latent LIMIT ? OFFSET ?"
        rows = self._con().execute(q, (s["id"], int(limit), int(offset))).fetchall()
        return [dict(zip([c.strip() for c in cols.split(",")], r)) for r in rows]

    def count(self, sae: str) -> int:
        s = self._saes.get(sae)
        return 0 if s is None else self._con().execute("SELECT COUNT(*) FROM features WHERE sae = ?", (s["id"],)).fetchone()[0]
