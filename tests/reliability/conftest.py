"""Fault-injection fixtures for tests/reliability: a cut-off network, a disk that fills up.

Fixtures only: the plain helpers (pair_lm, saved_model, one_line_error, write_task) live in tests/helpers.py."""

from __future__ import annotations

import errno
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
    import icl_circuits.core.storage as storage

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
