"""Fault-injection helpers for tests/reliability: tiny models, a cut-off network, a disk that fills up."""

from __future__ import annotations

import errno
import json
import os
import socket

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection or resolve a name fails at once (ENETUNREACH) and is recorded."""
    tried: list[str] = []

    def refuse(*args, **kwargs):
        tried.append(repr(args[:1]))
        raise OSError(errno.ENETUNREACH, "Network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tried


@pytest.fixture
def disk_full(monkeypatch):
    """Make the storage layer's writes fail with ENOSPC after `allow` bytes (call the fixture's result)."""
    import icl_circuits.storage as storage

    def arm(allow: int = 0):
        real_write, real_fdopen = os.write, os.fdopen
        budget = {"left": allow}

        def write(fd, data):
            n = min(len(data), budget["left"])
            if n <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget["left"] -= n
            return real_write(fd, bytes(data[:n]))

        class Full:
            def __init__(self, fd, mode="r", *a, **k):
                self.f = real_fdopen(fd, mode, *a, **k)

            def write(self, data):
                left = budget["left"]
                if len(data) > left:
                    self.f.write(data[: max(left, 0)])
                    self.f.flush()
                    budget["left"] = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                budget["left"] -= len(data)
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        monkeypatch.setattr(storage.os, "write", write)
        monkeypatch.setattr(storage.os, "fdopen", Full)
        return budget  # budget["left"] = 10**12 frees the disk again

    return arm


def tiny_lm(family: str = "gemma3"):
    from ..test_task_vectors import _setup

    return _setup(family)


def saved_model(tmp_path, lm=None):
    """A tiny model + tokenizer saved as a local folder (what --model takes)."""
    from ..test_cleaning import _lm

    lm = lm or _lm("llama")
    folder = tmp_path / "tiny_model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return lm, folder


def one_line_error(capsys) -> str:
    """stderr of a failed command: exactly one line, starting 'error:'."""
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if l.strip() and "it/s]" not in l]  # progress bars of the model load
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def write_task(path, pairs) -> str:
    path.write_text(json.dumps([{"input": x, "output": y} for x, y in pairs]))
    return str(path)
