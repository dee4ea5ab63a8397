"""Data-parallel SAE training (sae/distributed.py): 2 gloo processes, each on its share of every batch's
rows, end with the weights of one process trained on the whole batches.

One spawn runs every scenario (starting processes dominates the time):
  * trainer level: TopK (AuxK + ghost grads active: dead_steps=2), BatchTopK and Matryoshka
    (batch-global selection and threshold), Gated with b_dec_init='mean' and norm_centered; batches
    of odd size (shards differ by one row) and of one row (rank 1's shard is empty);
  * train_from_cache end to end with ddp=True: an epoch whose last batch is short, a resume from
    rank 0's checkpoint, only rank 0 writing;
  * train_saes on a live model stream (rank 0 runs the model and broadcasts, each rank keeps its rows).

Tolerance: the remaining difference is float rounding of sums taken in another order (the gradient
is a weighted sum of two shard gradients). Measured max |difference| of the float32 parameters after
8 steps: 3e-8 (TopK), 1.2e-7 (BatchTopK, Matryoshka), 4.8e-7 (Gated); 1.3e-7 after the 12 cache
steps; 1.2e-7 after the 5 live-stream steps (BatchTopK). Asserted: atol = rtol = 1e-5 (20x the
largest). Dead-latent counters must match exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from icl_circuits.sae.dictionary import SAEConfig
from icl_circuits.sae.trainers import SAETrainer, TrainerConfig

from tests.helpers import make_tiny, run_ranks, word_tokenizer

WORDS = [f"w{i}" for i in range(60)]
D_IN, D_SAE = 16, 48
SIZES = [33, 32, 1, 31, 33, 32, 2, 33]  # rows per global batch: odd sizes, and 1 row (an empty shard)
TOL = dict(rtol=1e-5, atol=1e-5)
ARCHS = {
    "topk": dict(k=4, aux_k=8, dead_steps=2, dead_window=4),  # AuxK and ghost grads from step 3 on
    "batchtopk": dict(k=4, aux_k=8, dead_steps=2, dead_window=4),
    "matryoshka": dict(k=4, aux_k=8, dead_steps=2, dead_window=4, matryoshka_groups=(12, 24, 48)),
    "gated": dict(b_dec_init="mean", norm_centered=True, dead_steps=2, dead_window=4),
}


def _trainer(arch: str) -> SAETrainer:
    cfg = TrainerConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, param_dtype="float32", norm_batches=3, **ARCHS[arch])
    sae_cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, kind="resid", model="toy", site="resid_pre.0", layer=0,
                        k=4 if arch == "topk" else None)  # fmt: skip
    return SAETrainer(cfg, sae_cfg)


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(D_IN, generator=gen) * 3  # a large mean: centring and the mean init matter
    return [torch.randn(n, D_IN, generator=gen) + mean for n in SIZES]  # [n, d_in] each


def _train_trainer(arch: str, rank: int = 0, world: int = 1) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tr = _trainer(arch)
    if world > 1:
        from icl_circuits.sae.distributed import DistRowComm

        tr.comm = DistRowComm()
    logs = [tr.step(x[rank::world]) for x in _batches()]  # this rank's rows: the stride split
    state = {k: v.detach().clone() for k, v in tr.params.items()}
    state["threshold"] = getattr(tr, "threshold", torch.zeros(()))
    state["fire_buf"] = tr.fire_buf.clone()
    state["steps_since_fire"] = tr.steps_since_fire.clone()
    return state, logs


def _lm():
    lm, _ = make_tiny("gemma3")
    lm.tokenizer = word_tokenizer(WORDS)
    return lm


def _cache_cfg(**kw):
    from icl_circuits.sae.training import TrainConfig

    base = dict(specs=["resid:1"], arch="topk", k=4, d_sae=24, n_tokens=704, batch_tokens=64, checkpoint_every=2,
                log_every=1, param_dtype="float32", dead_window=5, dead_steps=3, trainer={"aux_k": 8})  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _docs() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) for _ in range(40)]


def _live_cfg():
    from icl_circuits.sae.training import TrainConfig

    return TrainConfig(specs=["resid:1"], arch="batchtopk", k=4, d_sae=24, n_tokens=300, batch_tokens=64, seq_len=16,
                       prompts_per_forward=4, buffer_batches=2, checkpoint_every=3, log_every=2, param_dtype="float32",
                       dead_window=3, dead_steps=2)  # fmt: skip


def _worker(rank: int, world: int, init: str, root: str) -> None:
    import torch.distributed as dist

    from icl_circuits.sae.cache import ActivationCache
    from icl_circuits.sae.training import train_from_cache

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out = Path(root)
        for arch in ARCHS:
            state, logs = _train_trainer(arch, rank, world)
            torch.save({"state": state, "logs": logs}, out / f"{arch}-rank{rank}.pt")
        cache = ActivationCache(out / "cache")
        # 6 steps, then a resume (a new call, as after a kill) that trains on to 11 steps
        train_from_cache(cache, _cache_cfg(n_tokens=384), out / "ddp", progress=False, ddp=True)
        train_from_cache(cache, _cache_cfg(), out / "ddp", progress=False, ddp=True)
        from icl_circuits.sae.training import train_saes

        train_saes(_lm(), _docs(), _live_cfg(), out / "live", progress=False)  # one spec: data-parallel by default
        dist.barrier()  # every rank done with the group before teardown: gloo can abort otherwise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Path:
    from icl_circuits.sae.cache import harvest

    root = tmp_path_factory.mktemp("ddp")
    harvest(_lm(), ["resid_pre.1"], _docs(), root / "cache", n_tokens=600, seq_len=16, batch_size=4, shard_rows=64,
            progress=False)  # fmt: skip
    run_ranks(_worker, 2, root, root)
    return root


@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_ranks_equal_one_process(ran, arch):
    want, want_logs = _train_trainer(arch)
    for rank in range(2):
        got = torch.load(ran / f"{arch}-rank{rank}.pt", weights_only=True)
        for key, w in want.items():
            if w.dtype.is_floating_point:
                torch.testing.assert_close(got["state"][key], w, **TOL, msg=lambda m: f"{arch} {key}: {m}")
            else:  # dead-latent counters: exact
                assert torch.equal(got["state"][key], w), key
        for g, w in zip(got["logs"], want_logs):  # logged metrics are the global batch's
            assert g.keys() == w.keys()
            for k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (arch, k)
    if arch in ("topk", "batchtopk"):
        assert max(l["aux"] for l in want_logs) > 0  # AuxK took part
    if arch == "batchtopk":
        assert float(want["threshold"]) > 0


def test_train_from_cache_ddp_with_resume_equals_one_process(ran, tmp_path):
    from icl_circuits.sae.cache import ActivationCache
    from icl_circuits.sae.formats import load_sae
    from icl_circuits.sae.training import train_from_cache

    single = train_from_cache(ActivationCache(ran / "cache"), _cache_cfg(), tmp_path, progress=False)["resid_1"]
    got = load_sae(ran / "ddp" / "saes" / "resid_1")
    for key, w in single.tensors().items():
        torch.testing.assert_close(got.tensors()[key], w, **TOL)
    # rank 0 wrote everything; one checkpoint, one metrics file; the header records data parallelism
    assert sorted(p.name for p in (ran / "ddp").glob("checkpoint-*")) == ["checkpoint-rank0.pt"]
    assert not list((ran / "ddp").glob("metrics-rank*")) and not (ran / "ddp" / "timing-rank1.json").exists()
    assert json.loads((ran / "ddp" / "train_config.json").read_text())["data_parallel"] is True
    lines = [json.loads(l) for l in (ran / "ddp" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["tokens"] for l in lines] == [l["tokens"] for l in want]  # global rows counted, steps not redone
    assert [l["l0"] for l in lines] == pytest.approx([l["l0"] for l in want], rel=1e-4)


def test_rule_for_data_parallel():
    from icl_circuits.sae.training import use_ddp

    assert not use_ddp(None, 1, 1) and not use_ddp(True, 1, 1)  # one process: nothing to split
    assert use_ddp(None, 1, 8) and not use_ddp(None, 3, 8)  # one SAE: data-parallel; several: spread
    assert use_ddp(True, 3, 8) and not use_ddp(False, 1, 8)
    from icl_circuits.cli import build_parser

    parse = lambda *a: build_parser().parse_args(["sae", "train", *a]).ddp  # noqa: E731
    assert (parse(), parse("--ddp"), parse("--no-ddp")) == (None, True, False)


def test_live_stream_ddp_equals_one_process(ran, tmp_path):
    from icl_circuits.sae.formats import load_sae
    from icl_circuits.sae.training import train_saes

    single = train_saes(_lm(), _docs(), _live_cfg(), tmp_path, progress=False)["resid_1"]
    got = load_sae(ran / "live" / "saes" / "resid_1")
    for key, w in single.tensors().items():
        torch.testing.assert_close(got.tensors()[key], w, **TOL)
    assert json.loads((ran / "live" / "train_config.json").read_text())["data_parallel"] is True
