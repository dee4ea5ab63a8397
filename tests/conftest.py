"""Shared fixtures: tiny random models of every supported family, the bundled model, one torch thread.

Fixtures only: plain helpers (make_tiny, word_tokenizer, FAMILIES, ...) live in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import LM

from .helpers import FAMILIES, device_audit, make_tiny


@pytest.fixture(params=sorted(FAMILIES))
def tiny(request: pytest.FixtureRequest) -> tuple[LM, str]:
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def bundled() -> LM:
    """The real Gemma 3 270M (first load de-quantizes the GGUF, ~1 min; later loads use the cache)."""
    from icl_circuits import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second thread only adds contention on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _device_audit(request: pytest.FixtureRequest):
    """Tests marked `device_audit` (whole commands) run under the factory audit of tests/test_device.py."""
    if request.node.get_closest_marker("device_audit") is None:
        yield
        return
    with device_audit():
        yield
