"""Atomic writes: a crash mid-write never leaves a half-written result behind."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def save_figure(fig: Any, stem: str | os.PathLike) -> list[Path]:
    """Save a matplotlib figure as PNG and SVG next to each other, atomically."""
    paths = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight")
        paths.append(atomic_write_bytes(f"{stem}.{ext}", buf.getvalue()))
    return paths


class ResumeLog:
    """Append-only JSON-lines log of finished units of work (one line per key), for resuming.

    The first line holds `header` (the run's configuration); a log written under another
    header is ignored, so changing a setting starts afresh instead of mixing results. A torn
    last line from a crash is dropped: that unit is simply redone.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))  # normalise tuples etc. as JSON sees them
        self.done: dict[str, Any] = self._read()
        if not self.done:
            atomic_write_text(self.path, json.dumps({"header": self.header}) + "\n")

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            if json.loads(lines[0]).get("header") != self.header:
                return {}
        except (IndexError, json.JSONDecodeError, AttributeError):
            return {}
        done = {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                done[rec["key"]] = rec["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                break
        return done

    def add(self, key: str, value: Any) -> None:
        self.done[key] = value
        with self.path.open("a", encoding="utf-8") as f:  # a crash loses at most this unit
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
