"""Reading a finished store: Example, ExampleStore (thread-safe point look-ups), summarize_store."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_circuits.core.storage import ReadOnlySQLite
from icl_circuits.methods.examples.config import ExampleConfig


@dataclass
class Example:
    """One example: the latent fired with `act` on token `target` of the window `tokens`."""

    sae: str
    latent: int
    act: float
    bin: int  # -1: a top-k example; b >= 0: sampled from activations in [b*w, (b+1)*w)
    doc: int  # document index in the corpus
    pos: int  # position of the firing token in its chunk
    target: int  # index of the firing token within `tokens`
    tokens: list[str]  # the window's token texts
    token_ids: list[int]
    acts: list[float]  # the latent's activation on each window token
    uid: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExampleStore(ReadOnlySQLite):
    """Read-only access to an example store; safe to share between threads (one connection each)."""

    def __init__(self, path: str | os.PathLike, allow_partial: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no example store at {self.path}")
        self._local = threading.local()
        try:
            meta = dict(self._con().execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not an example store ({e})") from e
        if "header" not in meta:
            raise ValueError(f"{self.path} is not an example store (no header)")
        self.header: dict[str, Any] = json.loads(meta["header"])
        self.complete = "complete" in meta
        if not (self.complete or allow_partial):
            raise ValueError(f"{self.path} is an unfinished example store; run the build again to finish it")
        self.config = ExampleConfig(**self.header["config"])
        rows = self._con().execute("SELECT id, name, site, d_sae, info FROM saes ORDER BY id").fetchall()
        self._sae_ids = {name: i for i, name, *_ in rows}
        self._saes = [{"name": n, "site": s, "d_sae": d, **json.loads(info)} for _, n, s, d, info in rows]


    def _sae_id(self, sae: str) -> int:
        if sae not in self._sae_ids:
            raise KeyError(f"no SAE {sae!r} in {self.path}; it has {sorted(self._sae_ids)}")
        return self._sae_ids[sae]

    def saes(self) -> list[dict[str, Any]]:
        """name, site, d_sae, kind, layer, ... of each SAE in the store."""
        return [dict(s) for s in self._saes]

    def progress(self) -> dict[str, Any]:
        """Tokens and documents read so far."""
        return json.loads(self._con().execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()[0])

    def latent_stats(self, sae: str, latent: int) -> dict[str, Any]:
        """n_fired, density (share of tokens where it fires), mean act when firing, max act."""
        row = self._con().execute(
            "SELECT n_fired, sum_act, max_act FROM latents WHERE sae = ? AND latent = ?", (self._sae_id(sae), int(latent))
        ).fetchone()
        n, s, m = row if row else (0, 0.0, 0.0)
        tokens = max(self.progress()["tokens"], 1)
        return {"n_fired": n, "density": n / tokens, "mean_act": s / n if n else 0.0, "max_act": m}

    def top_latents(self, sae: str, by: str = "max_act", limit: int = 100) -> list[dict[str, Any]]:
        """Latents sorted by max_act or n_fired (descending)."""
        if by not in ("max_act", "n_fired"):
            raise ValueError(f"by must be 'max_act' or 'n_fired', got {by!r}")
        rows = self._con().execute(
            f"SELECT latent, n_fired, max_act FROM latents WHERE sae = ? ORDER BY {by} DESC LIMIT ?",
            (self._sae_id(sae), int(limit)),
        ).fetchall()
        return [{"latent": l, "n_fired": n, "max_act": m} for l, n, m in rows]

    def examples(self, sae: str, latent: int, limit: int | None = None, kind: str = "all") -> list[Example]:
        """Examples of one latent: the top-k by activation, then the binned samples from the highest
        bin down (within a bin, in sampling order). kind: 'all', 'top' or 'bins'."""
        if kind not in ("all", "top", "bins"):
            raise ValueError(f"kind must be 'all', 'top' or 'bins', got {kind!r}")
        where = {"all": "", "top": " AND bin = -1", "bins": " AND bin >= 0"}[kind]
        order = "CASE WHEN bin = -1 THEN 0 ELSE 1 END, bin DESC, rank, uid"
        con = self._con()
        rows = con.execute(
            f"SELECT latent, act, bin, doc, pos, start, ids, acts, uid FROM examples "
            f"WHERE sae = ? AND latent = ?{where} ORDER BY {order} LIMIT ?",
            (self._sae_id(sae), int(latent), -1 if limit is None else int(limit)),
        ).fetchall()
        windows = [(np.frombuffer(r[6], "<i4").tolist(), np.frombuffer(r[7], "<f2").astype(float).tolist()) for r in rows]
        texts = self.token_texts({t for ids, _ in windows for t in ids})
        return [
            Example(sae, lat, act, b, doc, pos, pos - start, [texts.get(t, "") for t in ids], ids, acts, uid)
            for (lat, act, b, doc, pos, start, _, _, uid), (ids, acts) in zip(rows, windows)
        ]

    def token_texts(self, token_ids: Iterable[int]) -> dict[int, str]:
        ids = sorted(set(token_ids))
        out: dict[int, str] = {}
        for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = ids[i : i + 900]
            q = f"SELECT id, text FROM tokens WHERE id IN ({','.join('?' * len(part))})"
            out.update(self._con().execute(q, part).fetchall())
        return out

    def count(self, sae: str | None = None) -> int:
        """Stored examples (of one SAE, or all)."""
        if sae is None:
            return self._con().execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        return self._con().execute("SELECT COUNT(*) FROM examples WHERE sae = ?", (self._sae_id(sae),)).fetchone()[0]

    def latent_table(self, sae: str) -> list[dict[str, Any]]:
        """n_fired, mean and max activation of every latent that fired at least once."""
        rows = self._con().execute(
            "SELECT latent, n_fired, sum_act, max_act FROM latents WHERE sae = ? ORDER BY latent", (self._sae_id(sae),)
        ).fetchall()
        return [{"latent": l, "n_fired": n, "mean_act": s / n if n else 0.0, "max_act": m} for l, n, s, m in rows]


def summarize_store(store: ExampleStore, out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-SAE summary rows (latents fired, median firing density, max activation), written as summary.csv.
    The figure of the densities is `viz.plots.plot_latent_density`."""
    from icl_circuits.core.storage import write_csv

    tokens = max(store.progress()["tokens"], 1)
    rows = []
    for s in store.saes():
        table = store.latent_table(s["name"])
        dens = np.array([r["n_fired"] / tokens for r in table])
        rows.append({
            "sae": s["name"], "site": s["site"], "d_sae": s["d_sae"], "tokens": tokens, "latents_fired": len(table),
            "examples": store.count(s["name"]), "median_density": float(np.median(dens)) if len(dens) else 0.0,
            "max_act": max((r["max_act"] for r in table), default=0.0),
        })  # fmt: skip
    write_csv(Path(out_dir) / "summary.csv", rows)
    return rows
