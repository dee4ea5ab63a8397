"""Atomic writes: a crash mid-write never leaves a half-written result behind."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import socket
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any


class WriteFailed(OSError):
    """A write that could not complete (disk full, read-only folder...); nothing partial was left behind."""


def _write_error(path: Path, e: OSError) -> WriteFailed:
    why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    err = WriteFailed(f"cannot write {path}: {why}; nothing was written there (finished work is kept, rerun to resume)")
    err.errno = e.errno
    return err


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteFailed):
            raise _write_error(path, e) from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


class BadFile(ValueError):
    """A file that exists but cannot be read as what it should be; the message names the file."""


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; garbage or bad UTF-8 raises BadFile naming the file (missing: FileNotFoundError)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadFile(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise BadFile(f"{path}: invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except IsADirectoryError:
        raise BadFile(f"{path}: is a folder, expected a JSON file") from None


# Result files that a viewer, the claims or a later stage read carry "schema": "<kind>/<version>". A reader
# refuses a file of another kind or of a newer version; a file without the key predates the stamps (version 1).
RESULT_VERSIONS: dict[str, int] = {
    "cleaning": 1, "heatmap": 1, "negative": 1, "link": 1, "faithfulness": 1, "cross_task": 1,
    "graph": 1, "sweep": 1, "detection_sweep": 1, "masses": 1,
}  # fmt: skip


def stamp(kind: str, d: dict[str, Any]) -> dict[str, Any]:
    """`d` with its schema stamp first (see RESULT_VERSIONS)."""
    return {"schema": f"{kind}/{RESULT_VERSIONS[kind]}", **d}


def check_schema(kind: str, d: Any, where: str = "") -> dict[str, Any]:
    """`d` without its stamp, after checking that it is a `kind` result this version can read (BadFile if not)."""
    where = where or f"a {kind} result"
    if not isinstance(d, dict):
        raise BadFile(f"{where}: expected a JSON object (a {kind} result), got {type(d).__name__}")
    d = dict(d)
    s = d.pop("schema", None)
    if s is None:
        return d  # written before the stamps: version 1
    got, _, version = str(s).partition("/")
    if got != kind:
        raise BadFile(f"{where}: holds a {got} result, not a {kind} result")
    if not version.isdigit() or int(version) > RESULT_VERSIONS[kind]:
        raise BadFile(f"{where}: {kind} result version {version!r}; this icl-circuits reads up to version {RESULT_VERSIONS[kind]}")
    return d


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


def canonical(obj: Any) -> Any:
    """obj as JSON sees it (tuples -> lists, keys -> str), so configs compare the same before and after a save."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def fingerprint(*parts: Any) -> str:
    """A short content hash of JSON-able parts (key order does not matter)."""
    blob = json.dumps(canonical(list(parts)), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def tensor_digest(*tensors: Any, sample: int = 1 << 16) -> str:
    """A content hash of tensors (shape, dtype and an evenly strided sample of at most `sample` entries each):
    cheap for big SAE matrices. Two SAEs trained or loaded differently differ in practically every entry, so
    the sample tells them apart; a change confined to unsampled entries would go unnoticed."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        part = flat[::step].contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
    return h.hexdigest()[:20]


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two JSON-like values, with old -> new."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{name}: (absent) -> {_short(new[k])}")
            elif k not in new:
                out.append(f"{name}: {_short(old[k])} -> (absent)")
            else:
                out += diff_keys(old[k], new[k], name)
        return out
    return [] if old == new else [f"{prefix or 'value'}: {_short(old)} -> {_short(new)}"]


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (busy, or made with other settings)."""


class RunBusy(RunDirError):
    """Another process is writing into this run directory."""


class ConfigMismatch(RunDirError):
    """The run directory holds work made under another configuration."""


class AppendLog:
    """Append-only JSON-lines log of finished units (one {"key", "value"} record a line) after a header line.

    Torn-line tolerant: on open, a last line without its newline (a crash mid-append) is cut off
    before anything else is appended, so it can never be glued to the next record; an unreadable
    line in the middle is skipped, not the end of the log. Each append is one write + fsync; a
    failed append (disk full) is rolled back to the previous length. A log written under another
    header is replaced (`fresh=True`) or refused (ConfigMismatch).
    """

    def __init__(self, path: str | os.PathLike, header: Any, *, on_other_header: str = "fresh") -> None:
        self.path = Path(path)
        self.header = canonical(header)
        self.torn = 0  # torn tails cut off on open
        self.skipped = 0  # unreadable lines ignored
        self.done: dict[str, Any] = {}
        if self.path.is_file() and self._read(on_other_header):
            return
        atomic_write_text(self.path, json.dumps({"header": self.header}, sort_keys=True) + "\n")

    def _read(self, on_other_header: str) -> bool:
        """Load the records; False when the log must be started afresh."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # torn tail: cut it off now, before any append
            keep = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            data = data[:keep]
            self.torn += 1
        lines = data.decode("utf-8", errors="replace").splitlines()
        try:
            head = json.loads(lines[0])["header"]
        except (IndexError, json.JSONDecodeError, KeyError, TypeError):
            return False
        if head != self.header:
            if on_other_header == "refuse":
                raise ConfigMismatch(f"{self.path} was written under other settings: " + "; ".join(diff_keys(head, self.header)))
            return False
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                self.done[rec["key"]] = rec["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                self.skipped += 1
        return True

    def add(self, key: str, value: Any) -> None:
        data = (json.dumps({"key": key, "value": value}) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:  # a crash loses at most this unit
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                try:
                    os.ftruncate(fd, size)  # roll back the partial record
                except OSError:
                    pass
                raise _write_error(self.path, e) from e
        finally:
            os.close(fd)
        self.done[key] = value


class FolderLock:
    """One writer per folder: an exclusive flock on `folder/.NAME.lock`, which records its holder.

    A second writer gets RunBusy naming the holder, or with `wait=True` waits for it (a shared cache that
    whoever comes first fills). The kernel drops an flock when its holder dies, so a
    run killed with `kill -9` never leaves a stale lock behind. Holding the lock, no one else writes
    there, so temp files of atomic writes (NAME.XXXXXXXX.tmp) are leftovers of a killed run: removed.
    Every long job that writes a folder takes one (RunDir, `harvest`, SAE training, the bundled model's conversion).
    """

    def __init__(self, folder: str | os.PathLike, name: str = "run", wait: bool = False) -> None:
        self.path = Path(folder)
        self._fd: int | None = None
        lock = self.path / f".{name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock (Windows): no lock
            self._fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            if wait:
                print(f"{self.path} is in use by {holder}: waiting for it", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                raise RunBusy(f"{self.path} is in use by another run ({holder}); wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        for tmp in self.path.rglob("*.tmp"):
            if tmp.is_file() and len(tmp.suffixes) >= 2:
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.release()


class RunDir:
    """One run directory: a lock (one writer at a time), a config fingerprint, content-keyed finished work.

        with RunDir(out, dict(model=lm.name, layers=layers, config=cfg.to_dict())) as run:
            log = run.log("partial.jsonl")
            key = run.key(task.digest)        # content hash of the task + this run's config and model
            if key not in log.done: log.add(key, compute(task))

    - A second writer (another process, or another RunDir on the same folder) gets RunBusy (a FolderLock:
      a killed run never leaves a stale lock behind).
    - `name`.json holds the configuration. Opening the folder under another configuration raises
      ConfigMismatch naming the differing keys; nothing in the folder is touched.
    - Keys of finished units hash everything that determines them, so a task that shares a name
      with an earlier one but not its pairs is computed afresh, never served the old result.
    - lock=False: another process of the *same* run joins while its rank 0 holds the lock (the flock is
      per open file, so the ranks cannot all take it; see `icl_circuits.core.distributed.shared_run`).
    """

    def __init__(
        self, path: str | os.PathLike, cfg: dict[str, Any], *, kind: str = "run", name: str = "run", lock: bool = True
    ) -> None:
        self._lock: FolderLock | None = None
        self.path = Path(path)
        self.kind = kind
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} exists and is not a folder; use another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config = canonical(cfg)
        self.fingerprint = fingerprint(kind, self.config)
        if lock:
            self._lock = FolderLock(self.path, name)
        try:
            self._check_config()
        except BaseException:
            self.close()
            raise

    def _check_config(self) -> None:
        path = self.path / f"{self.name}.json"
        if path.is_file():
            try:
                data = read_json(path)
                saved, saved_kind = data["config"], data.get("kind", self.kind)
            except (BadFile, KeyError, TypeError):
                raise RunDirError(f"{path} is not a run configuration this tool wrote; use another --out") from None
            if saved_kind != self.kind:
                raise ConfigMismatch(f"{self.path} holds a {saved_kind} run, not a {self.kind} run; use another --out")
            if saved != self.config:
                diffs = diff_keys(saved, self.config)
                raise ConfigMismatch(
                    f"{self.path} holds a run made with other settings ({'; '.join(diffs)}); "
                    f"rerun with the same settings to resume, or use another --out"
                )
        else:
            write_json(path, {"kind": self.kind, "fingerprint": self.fingerprint, "config": self.config})

    def key(self, *parts: Any) -> str:
        """Key of a finished unit: a hash of its content parts and this run's config (model included)."""
        return fingerprint(self.fingerprint, *parts)

    def log(self, filename: str) -> AppendLog:
        return AppendLog(self.path / filename, {"run": self.fingerprint})

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self.close()


class ReadOnlySQLite:
    """Mixin for a reader of a SQLite file: one read-only connection per thread (the viewer serves
    requests from several threads). The class sets `self.path` and `self._local = threading.local()`."""

    path: Path

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            self._local.con = con
        return con

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
