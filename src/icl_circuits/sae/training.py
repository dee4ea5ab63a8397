"""Train a set of SAEs / transcoders from one activation stream, with checkpoints and resume.

One model forward per token batch feeds every SAE (several sites and layers at once). Under
`torch.distributed` (`torchrun --nproc_per_node N -m icl_circuits.cli sae train ...`) there are two
ways to use the ranks. The rule: `ddp=None` (the CLI's default) trains data-parallel when exactly one
SAE spec is given and spreads the SAEs over the ranks when several are; `--ddp` / `--no-ddp` force either.

  * spread (several SAEs): rank 0 reads the activations and broadcasts each batch; SAE i trains on
    rank i % world_size. Every SAE's result is the same as in a single-process run with the same seed.
  * data-parallel (one wide SAE on many GPUs): every rank trains every SAE on its share of the rows
    of each global batch (cfg.batch_tokens rows, split over ranks); gradients, batch statistics and
    dead-latent counters are reduced so each step equals the single-process step over the global
    batch, up to float rounding (`sae/distributed.py` says what is sharded and what is reduced).
    Only rank 0 writes checkpoints, metrics and SAEs; every rank resumes from rank 0's checkpoint.

Run directory:
    train_config.json            what was asked for (a resume must match it, but for n_tokens)
    .train.lock                  held by the run training here (a second run into the folder gets RunBusy)
    checkpoint-rank{r}.pt        trainers (+ the activation store on rank 0), written atomically
                                 (data-parallel: checkpoint-rank0.pt only, read by every rank)
    metrics.jsonl                one line per logged step (spread over ranks: metrics-rank{r}.jsonl)
    saes/<name>/                 final SAEs in our format (sae.safetensors + config.json)
    saelens/<name>/              the same SAEs in SAELens format
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from icl_circuits.core.distributed import init_from_env, main_only, rank_world
from icl_circuits.core.model import LM
from icl_circuits.core.sites import SAE_KIND_SITES, Site
from icl_circuits.core.storage import ConfigMismatch, FolderLock, atomic_write_bytes, diff_keys, write_json
from icl_circuits.sae.activations import ActivationStore
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
from icl_circuits.sae.distributed import DistRowComm, my_rows
from icl_circuits.sae.formats import save_sae, save_saelens
from icl_circuits.sae.registry import SAERef
from icl_circuits.sae.trainers import SAETrainer, TrainerConfig

if TYPE_CHECKING:
    from icl_circuits.sae.cache import ActivationCache

K_ARCHS = ("topk",)  # archs whose exported SAE keeps top-k at inference (BatchTopK exports a global threshold)


@dataclass(frozen=True)
class SAESpec:
    """What to train: 'resid:12' (resid_pre.12), 'attn:12' (attn_out.12), 'transcoder:12' (resid_mid.12 -> mlp_out.12)."""

    kind: str
    layer: int

    @classmethod
    def parse(cls, text: str) -> "SAESpec":
        """Any SAERef spelling of a kind and layer ('resid:12', 'resid_12', 'attn_out.12'); not a path."""
        ref = SAERef.parse(text)
        if ref.kind is None or ref.layer is None or not ref.is_starter:
            raise ValueError(f"bad SAE spec {text!r}: training needs a kind and layer, e.g. 'resid:12', 'attn:12' or 'transcoder:12'")
        return cls(ref.kind, ref.layer)

    @property
    def ref(self) -> SAERef:
        return SAERef(self.kind, self.layer)

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def in_site(self) -> Site:
        return Site(self.layer, SAE_KIND_SITES[self.kind][0][0])  # we train the starter suite's sites

    @property
    def out_site(self) -> Site:
        return Site(self.layer, SAE_KIND_SITES[self.kind][0][1])

    def sae_config(self, lm: LM, d_sae: int, k: int | None = None) -> SAEConfig:
        return self.sae_config_for(lm.name, lm.d_model, d_sae, k)

    def sae_config_for(self, model: str, d_model: int, d_sae: int, k: int | None = None) -> SAEConfig:
        return SAEConfig(
            d_in=d_model, d_sae=d_sae, kind=self.kind, model=model, site=str(self.in_site),
            out_site=str(self.out_site) if self.kind == "transcoder" else None, layer=self.layer, k=k,
            source="icl-circuits",
        )  # fmt: skip


@dataclass
class TrainConfig:
    specs: list[str]  # e.g. ["resid:12", "attn:12", "transcoder:12"]
    arch: str = "gated"
    d_sae: int = 4096
    n_tokens: int = 1_000_000  # training tokens (BOS excluded); the corpus is re-read in new epochs if short
    batch_tokens: int = 1024
    seq_len: int = 128
    prompts_per_forward: int = 16
    buffer_batches: int = 8  # forwards in the shuffle buffer (checkpoints hold it: keep it modest)
    l1_coeff: float | None = None  # None: the trainer's default for arch
    l1_by_kind: dict[str, float] | None = None  # e.g. {"transcoder": 4.0}: overrides l1_coeff per SAE kind
    k: int = 32
    lr: float = 1e-3
    param_dtype: str = "bfloat16"
    dead_window: int = 1000
    dead_steps: int = 2000
    b_dec_init: str = "zeros"  # 'mean' helps short runs on models whose residual has a large mean (Gemma)
    norm_centered: bool = False  # normalise by the norm around the mean (see TrainerConfig.norm_centered)
    checkpoint_every: int = 200  # steps
    log_every: int = 20
    skip_docs: int = 0  # documents held out for evaluation come first in the corpus
    seed: int = 0
    trainer: dict | None = None  # more TrainerConfig fields by name (e.g. {"aux_k": 256, "l0_coeff": 2.0})

    def trainer_config(self, d_in: int, kind: str = "resid") -> TrainerConfig:
        l1 = (self.l1_by_kind or {}).get(kind, self.l1_coeff)
        return TrainerConfig(
            arch=self.arch, d_in=d_in, d_sae=self.d_sae, d_out=d_in, lr=self.lr, l1_coeff=l1,
            k=self.k, param_dtype=self.param_dtype, dead_window=self.dead_window, dead_steps=self.dead_steps,
            b_dec_init=self.b_dec_init, norm_centered=self.norm_centered, seed=self.seed, **(self.trainer or {}),
        )  # fmt: skip


def _rank_world() -> tuple[int, int]:
    return rank_world()


def use_ddp(ddp: bool | None, n_specs: int, world: int) -> bool:
    """The rule (module docstring): data-parallel if asked, or by default when one SAE meets several ranks."""
    if world == 1:
        return False
    return n_specs == 1 if ddp is None else ddp


def train_saes(
    lm: LM, docs: Sequence[str], cfg: TrainConfig, out_dir: str | Path, progress: bool = True, ddp: bool | None = None
) -> dict[str, JumpReLUSAE]:
    """Train every SAE in cfg.specs on a live activation stream (this rank's share under torch.distributed;
    `ddp`: data-parallel, see `use_ddp`)."""
    rank, world = _rank_world()
    specs = _parse_specs(cfg, lm.n_layers, lm.name)
    sites = sorted({site for s in specs for site in (s.in_site, s.out_site)}, key=lambda s: s.order)

    def new_store(epoch: int) -> ActivationStore:
        return ActivationStore(
            lm, sites, docs, seq_len=cfg.seq_len, batch_size=cfg.prompts_per_forward,
            buffer_batches=cfg.buffer_batches, seed=cfg.seed + epoch, skip_docs=cfg.skip_docs,
        )  # fmt: skip

    ddp = use_ddp(ddp, len(specs), world)
    feed = _StoreFeed(new_store, sites, lm.d_model, rank, world, ddp)
    header = dict(model=lm.name, world_size=world, config=asdict(cfg), **({"data_parallel": True} if ddp else {}))
    return _train(specs, lm.name, lm.d_model, feed, cfg, header, Path(out_dir), rank, world, progress, lm.device, ddp)


def train_from_cache(
    cache: "ActivationCache", cfg: TrainConfig, out_dir: str | Path, progress: bool = True,
    device: torch.device | str = "cpu", ddp: bool | None = None,
) -> dict[str, JumpReLUSAE]:
    """Train every SAE in cfg.specs on the training rows of an on-disk activation cache (`sae/cache.py`),
    the SAEs' parameters and optimiser on `device` (rows are moved there batch by batch).

    Epochs re-read the cache in a new shuffled order until cfg.n_tokens rows are seen; a killed run
    resumes exactly (the order is a function of (seed, epoch), so the checkpoint holds only a position).
    Data-parallel (`ddp`, see `use_ddp`): each rank reads only its rows of each global batch.
    """
    rank, world = _rank_world()
    m = cache.manifest
    specs = _parse_specs(cfg, int(m["n_layers"]), str(m["model"]))
    sites = sorted({site for s in specs for site in (s.in_site, s.out_site)}, key=lambda s: s.order)
    cache.check(str(m["model"]), int(m["d_model"]), sites)
    ddp = use_ddp(ddp, len(specs), world)
    feed = _CacheFeed(cache, sites, cfg.batch_tokens, cfg.seed, (rank, world) if ddp else (0, 1))
    header = dict(model=m["model"], world_size=world, cache=cache_fingerprint(cache), config=asdict(cfg),
                  **({"data_parallel": True} if ddp else {}))  # fmt: skip
    return _train(specs, str(m["model"]), int(m["d_model"]), feed, cfg, header, Path(out_dir), rank, world, progress,
                  device, ddp)  # fmt: skip


def cache_fingerprint(cache: "ActivationCache") -> str:
    """What a training run depends on in a cache: model, sites, corpus and every shard's hash."""
    import hashlib

    m = cache.manifest
    ident = {k: m.get(k) for k in ("model", "sites", "corpus_fingerprint", "seq_len", "storage_dtype", "forward_dtype")}
    ident["shards"] = [s.get("sha256") for s in m["shards"]]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _parse_specs(cfg: TrainConfig, n_layers: int, model: str) -> list[SAESpec]:
    specs = [SAESpec.parse(s) for s in cfg.specs]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"duplicate SAE specs in {cfg.specs}")
    for s in specs:
        if s.layer >= n_layers:
            raise ValueError(f"{s.name}: {model!r} has only {n_layers} layers (0..{n_layers - 1})")
    return specs


class _StoreFeed:
    """Rows from a live ActivationStore; rank 0 reads and broadcasts (data-parallel: each rank keeps its rows).

    `rows`: the global batch's rows of the last `next`."""

    def __init__(self, new_store, sites: list[Site], d_model: int, rank: int, world: int, ddp: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.new_store, self.sites, self.d_model, self.rank, self.world = new_store, sites, d_model, rank, world
        self.ddp, self.rows = ddp, 0
        self.store: ActivationStore | None = new_store(0) if rank == 0 else None

    def next(self, n: int) -> dict[Site, torch.Tensor] | None:
        batch = _next_batch(self.store, self.sites, self.d_model, n, self.rank, self.world)
        if batch is not None:
            self.rows = next(iter(batch.values())).shape[0]
            if self.ddp:
                batch = {s: t[my_rows(self.rows, self.rank, self.world)] for s, t in batch.items()}  # [my rows, d_model]
        return batch

    def new_epoch(self, epoch: int) -> None:
        self.store = self.new_store(epoch) if self.rank == 0 else None

    def state_dict(self) -> dict | None:
        return self.store.state_dict() if self.store is not None else None

    def load_state_dict(self, epoch: int, state: dict | None) -> None:
        self.new_epoch(epoch)
        if self.store is not None and state is not None:
            self.store.load_state_dict(state)


class _CacheFeed:
    """Rows from an on-disk cache: every rank reads it itself, so nothing is broadcast.

    part = (rank, world): data-parallel, this rank reads only its rows (`my_rows`) of each global
    batch. `rows`: the global batch's rows of the last `next`."""

    def __init__(self, cache: "ActivationCache", sites: list[Site], batch_rows: int, seed: int,
                 part: tuple[int, int] = (0, 1)) -> None:  # fmt: skip
        self.cache, self.sites, self.batch_rows, self.seed, self.part = cache, sites, batch_rows, seed, part
        self.epoch, self.index, self.rows = 0, 0, 0
        self._it = None

    def next(self, n: int) -> dict[Site, torch.Tensor] | None:
        if self._it is None:
            self._it = iter(self.cache.batches(self.sites, self.batch_rows, seed=self.seed, epoch=self.epoch,
                                               start_batch=self.index, part=self.part))  # fmt: skip
        batch = next(self._it, None)
        if batch is None:
            return None
        self.index += 1
        rank, world = self.part
        left = self.cache.split_rows("train") - (self.index - 1) * self.batch_rows  # rows from this batch on
        self.rows = min(n, self.batch_rows, left)  # the global batch's rows (the epoch's last may be short)
        if n < self.batch_rows:  # the last step of a run may want fewer rows (a stride split: cut my share)
            batch = {s: t[: len(range(rank, n, world))] for s, t in batch.items()}
        return batch

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self.index, self._it = epoch, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, epoch: int, state: dict | None) -> None:
        self.new_epoch(epoch)
        if state is not None:
            self.index = int(state["index"])


def _train(
    specs: list[SAESpec], model: str, d_model: int, feed, cfg: TrainConfig, header: dict,  # type: ignore[no-untyped-def]
    out: Path, rank: int, world: int, progress: bool, device: torch.device | str = "cpu", ddp: bool = False,
) -> dict[str, JumpReLUSAE]:
    """The one training loop: steps, logs, checkpoints and resume, whatever feeds the rows.
    Trainers live on `device` (initialised on the CPU first, so a seed gives the same SAE anywhere)."""
    # ddp: every rank trains every SAE on its rows (the replicas stay equal) and only rank 0 writes
    mine = specs if ddp else [s for i, s in enumerate(specs) if i % world == rank]
    writes = rank == 0 or not ddp
    k = cfg.k if cfg.arch in K_ARCHS else None
    trainers = {
        s.name: SAETrainer(cfg.trainer_config(d_model, s.kind), s.sae_config_for(model, d_model, cfg.d_sae, k)).to(device)
        for s in mine
    }
    comm = DistRowComm() if ddp else None
    for tr in trainers.values():
        tr.comm = comm or tr.comm
    lock = main_only(lambda: _open_run(out, header), f"start training in {out}")  # rank 0 holds the folder's lock
    try:
        return _train_locked(trainers, mine, feed, cfg, out, rank, world, progress, ddp, comm, writes)
    finally:
        if lock is not None:
            lock.release()


def _open_run(out: Path, header: dict) -> FolderLock:
    """Take the run folder (one training per folder: a second gets RunBusy) and check a resume's settings."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "train")  # also removes the temp files of a checkpoint write killed mid-way
    try:
        _check_or_write_header(out / "train_config.json", header)
    except BaseException:
        lock.release()
        raise
    return lock


def _train_locked(
    trainers: dict[str, SAETrainer], mine: list[SAESpec], feed, cfg: TrainConfig, out: Path, rank: int, world: int,  # type: ignore[no-untyped-def]
    progress: bool, ddp: bool, comm: DistRowComm | None, writes: bool,
) -> dict[str, JumpReLUSAE]:  # fmt: skip
    """_train's loop, in a folder this run holds."""
    state = dict(step=0, tokens=0, epoch=0, seconds=0.0)  # seconds: training wall time, summed over resumes
    ckpt = out / f"checkpoint-rank{0 if ddp else rank}.pt"
    if ckpt.is_file():
        saved = _load_checkpoint(ckpt)
        state = {"seconds": 0.0, **saved["state"]}
        for name, tr in trainers.items():
            tr.load_state_dict(saved["trainers"][name])
        feed.load_state_dict(state["epoch"], saved["store"])

    bar = tqdm(total=cfg.n_tokens, initial=state["tokens"], unit="tok", desc="SAE training", disable=not progress or rank != 0)
    metrics_file = out / (f"metrics-rank{rank}.jsonl" if world > 1 and not ddp else "metrics.jsonl")
    if writes:
        _truncate_metrics(metrics_file, state["step"])  # steps logged after the last checkpoint are redone
    empty_epoch = False  # an epoch that ended before its first batch: the corpus has no tokens
    t_last = time.perf_counter()
    while state["tokens"] < cfg.n_tokens:
        batch = feed.next(min(cfg.batch_tokens, cfg.n_tokens - state["tokens"]))
        if batch is None:  # data exhausted: start the next epoch with a freshly shuffled pass
            if empty_epoch:
                raise ValueError(
                    "the data yields no training tokens (all documents held out, empty, or shorter than "
                    "the minimum chunk); check --corpus, --eval-docs and the tokenizer"
                )
            state["epoch"] += 1
            feed.new_epoch(state["epoch"])
            empty_epoch = True
            continue
        empty_epoch = False
        n = feed.rows  # the global batch's rows (data-parallel: this rank trains on its share)
        logs = {s.name: trainers[s.name].step(batch[s.in_site], batch[s.out_site]) for s in mine}
        state["step"] += 1
        state["tokens"] += n
        now = time.perf_counter()
        state["seconds"] += now - t_last
        t_last = now
        bar.update(n)
        if logs:
            first = next(iter(logs.values()))
            bar.set_postfix(loss=f"{first['loss']:.3g}", l0=f"{first['l0']:.1f}", dead=f"{first['dead_fraction']:.2f}", fve=f"{first['fve']:.2f}")
        if writes and (state["step"] % cfg.log_every == 0 or state["tokens"] >= cfg.n_tokens):
            with open(metrics_file, "a") as f:
                for name, m in logs.items():
                    f.write(json.dumps({"step": state["step"], "tokens": state["tokens"], "sae": name, **m}) + "\n")
        if writes and state["step"] % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, state, trainers, feed.state_dict())
    bar.close()
    if comm is not None:
        for tr in trainers.values():
            comm.check_replicas(tr.params)
    if not writes:
        return {name: tr.to_jumprelu() for name, tr in trainers.items()}
    _save_checkpoint(ckpt, state, trainers, feed.state_dict())
    write_json(out / f"timing-rank{rank}.json", {"tokens": state["tokens"], "seconds": state["seconds"],
                                                 "tokens_per_s": state["tokens"] / max(state["seconds"], 1e-9)})  # fmt: skip

    saes = {name: tr.to_jumprelu() for name, tr in trainers.items()}
    for name, sae in saes.items():
        save_sae(sae, out / "saes" / name)
        save_saelens(sae, out / "saelens" / name)
    return saes


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged steps after `step` (the checkpoint we resume from) and any torn last line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    atomic_write_bytes(path, ("".join(l + "\n" for l in keep)).encode())


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which, and what to do
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart this run") from e


def _next_batch(
    store: ActivationStore | None, sites: list[Site], d_model: int, n: int, rank: int, world: int
) -> dict[Site, torch.Tensor] | None:
    """Rank 0 reads the store; other ranks receive the same rows by broadcast. None at corpus end."""
    batch = None
    if rank == 0:
        try:
            batch = store.next(n)  # type: ignore[union-attr]
        except StopIteration:
            batch = None
    if world == 1:
        return batch
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl moves only CUDA tensors
    size = torch.tensor([0 if batch is None else next(iter(batch.values())).shape[0]], device=dev)
    dist.broadcast(size, 0)
    if int(size) == 0:
        return None
    if batch is None:
        batch = {s: torch.empty(int(size), d_model) for s in sites}
    for s in sites:
        t = batch[s].to(dev).contiguous()
        dist.broadcast(t, 0)
        batch[s] = t.to(batch[s].device)
    return batch


def _save_checkpoint(path: Path, state: dict, trainers: dict[str, SAETrainer], feed_state: dict | None) -> None:
    payload = {
        "state": dict(state),
        "trainers": {name: tr.state_dict() for name, tr in trainers.items()},
        "store": feed_state,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())  # a kill mid-write leaves the previous checkpoint intact


def _check_or_write_header(path: Path, header: dict) -> None:
    """A resume must match the saved configuration, except n_tokens (training longer or shorter is fine)."""
    header = json.loads(json.dumps(header))
    if path.is_file():
        old = json.loads(path.read_text())
        same = {**old, "config": {**old["config"], "n_tokens": None}} == {**header, "config": {**header["config"], "n_tokens": None}}
        if same and old != header:
            write_json(path, header)
        elif not same:
            raise ConfigMismatch(
                f"{path.parent} holds a training run made with other settings ({'; '.join(diff_keys(old, header))}); "
                "rerun with the same settings to resume (only --tokens may change), or use another --out"
            )
    else:
        write_json(path, header)


def init_distributed_from_env() -> bool:
    """Join the process group torchrun describes in the environment (nccl with GPU LOCAL_RANK, else gloo).
    True if distributed."""
    return init_from_env()
