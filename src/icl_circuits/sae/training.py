"""Train a set of SAEs / transcoders from one activation stream, with checkpoints and resume.

One model forward per token batch feeds every SAE (several sites and layers at once). Under
`torch.distributed` (e.g. `torchrun --nproc_per_node 2 -m icl_circuits.cli sae train ...`),
rank 0 reads the activations and broadcasts each batch; SAE i trains on rank i % world_size.
Every SAE's result is the same as in a single-process run with the same seed.

Run directory:
    train_config.json            what was asked for (a resume must match it)
    checkpoint-rank{r}.pt        trainers (+ the activation store on rank 0), written atomically
    metrics.jsonl                one line per logged step
    saes/<name>/                 final SAEs in our format (sae.safetensors + config.json)
    saelens/<name>/              the same SAEs in SAELens format
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..model import LM
from ..sites import Site
from ..storage import atomic_write_bytes, write_json
from .activations import ActivationStore
from .dictionary import JumpReLUSAE, SAEConfig
from .formats import save_sae, save_saelens
from .trainers import SAETrainer, TrainerConfig

KINDS = {"resid": ("resid_pre", None), "attn": ("attn_out", None), "transcoder": ("resid_mid", "mlp_out")}


@dataclass(frozen=True)
class SAESpec:
    """What to train: 'resid:12' (resid_pre.12), 'attn:12' (attn_out.12), 'transcoder:12' (resid_mid.12 -> mlp_out.12)."""

    kind: str
    layer: int

    @classmethod
    def parse(cls, text: str) -> "SAESpec":
        kind, _, layer = text.partition(":")
        if kind not in KINDS or not layer.isdigit():
            raise ValueError(f"bad SAE spec {text!r}; use e.g. 'resid:12', 'attn:12' or 'transcoder:12'")
        return cls(kind, int(layer))

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.layer}"

    @property
    def in_site(self) -> Site:
        return Site(self.layer, KINDS[self.kind][0])

    @property
    def out_site(self) -> Site:
        out = KINDS[self.kind][1]
        return Site(self.layer, out) if out else self.in_site

    def sae_config(self, lm: LM, d_sae: int, k: int | None = None) -> SAEConfig:
        return SAEConfig(
            d_in=lm.d_model, d_sae=d_sae, kind=self.kind, model=lm.name, site=str(self.in_site),
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

    def trainer_config(self, d_in: int, kind: str = "resid") -> TrainerConfig:
        l1 = (self.l1_by_kind or {}).get(kind, self.l1_coeff)
        return TrainerConfig(
            arch=self.arch, d_in=d_in, d_sae=self.d_sae, d_out=d_in, lr=self.lr, l1_coeff=l1,
            k=self.k, param_dtype=self.param_dtype, dead_window=self.dead_window, dead_steps=self.dead_steps,
            b_dec_init=self.b_dec_init, norm_centered=self.norm_centered, seed=self.seed,
        )  # fmt: skip


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_saes(
    lm: LM, docs: Sequence[str], cfg: TrainConfig, out_dir: str | Path, progress: bool = True
) -> dict[str, JumpReLUSAE]:
    """Train every SAE in cfg.specs (this rank's share under torch.distributed); returns {name: SAE}."""
    out = Path(out_dir)
    rank, world = _rank_world()
    specs = [SAESpec.parse(s) for s in cfg.specs]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"duplicate SAE specs in {cfg.specs}")
    for s in specs:
        if s.layer >= lm.n_layers:
            raise ValueError(f"{s.name}: {lm.name!r} has only {lm.n_layers} layers")
    mine = [s for i, s in enumerate(specs) if i % world == rank]
    k = cfg.k if cfg.arch == "topk" else None
    trainers = {s.name: SAETrainer(cfg.trainer_config(lm.d_model, s.kind), s.sae_config(lm, cfg.d_sae, k)) for s in mine}
    sites = sorted({site for s in specs for site in (s.in_site, s.out_site)}, key=lambda s: s.order)

    header = dict(model=lm.name, world_size=world, config=asdict(cfg))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _check_or_write_header(out / "train_config.json", header)
    if world > 1:
        dist.barrier()

    def new_store(epoch: int) -> ActivationStore:
        return ActivationStore(
            lm, sites, docs, seq_len=cfg.seq_len, batch_size=cfg.prompts_per_forward,
            buffer_batches=cfg.buffer_batches, seed=cfg.seed + epoch, skip_docs=cfg.skip_docs,
        )  # fmt: skip

    state = dict(step=0, tokens=0, epoch=0)
    store = new_store(0) if rank == 0 else None
    ckpt = out / f"checkpoint-rank{rank}.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        state = saved["state"]
        for name, tr in trainers.items():
            tr.load_state_dict(saved["trainers"][name])
        if store is not None:
            store = new_store(state["epoch"])
            store.load_state_dict(saved["store"])

    bar = tqdm(total=cfg.n_tokens, initial=state["tokens"], unit="tok", desc="SAE training", disable=not progress or rank != 0)
    metrics_file = out / "metrics.jsonl"
    empty_epoch = False  # an epoch that ended before its first batch: the corpus has no tokens
    while state["tokens"] < cfg.n_tokens:
        batch = _next_batch(store, sites, lm.d_model, min(cfg.batch_tokens, cfg.n_tokens - state["tokens"]), rank, world)
        if batch is None:  # corpus exhausted: start the next epoch with a freshly shuffled pass
            if empty_epoch:
                raise ValueError(
                    "the corpus yields no training tokens (all documents held out, empty, or shorter than "
                    "the minimum chunk); check --corpus, --eval-docs and the tokenizer"
                )
            state["epoch"] += 1
            store = new_store(state["epoch"]) if rank == 0 else None
            empty_epoch = True
            continue
        empty_epoch = False
        n = next(iter(batch.values())).shape[0]
        logs = {s.name: trainers[s.name].step(batch[s.in_site], batch[s.out_site]) for s in mine}
        state["step"] += 1
        state["tokens"] += n
        bar.update(n)
        if logs:
            first = next(iter(logs.values()))
            bar.set_postfix(loss=f"{first['loss']:.3g}", l0=f"{first['l0']:.1f}", dead=f"{first['dead_fraction']:.2f}", fve=f"{first['fve']:.2f}")
        if state["step"] % cfg.log_every == 0 or state["tokens"] >= cfg.n_tokens:
            with open(out / f"metrics-rank{rank}.jsonl" if world > 1 else metrics_file, "a") as f:
                for name, m in logs.items():
                    f.write(json.dumps({"step": state["step"], "tokens": state["tokens"], "sae": name, **m}) + "\n")
        if state["step"] % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, state, trainers, store)
    bar.close()
    _save_checkpoint(ckpt, state, trainers, store)

    saes = {name: tr.to_jumprelu() for name, tr in trainers.items()}
    for name, sae in saes.items():
        save_sae(sae, out / "saes" / name)
        save_saelens(sae, out / "saelens" / name)
    return saes


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
    size = torch.tensor([0 if batch is None else next(iter(batch.values())).shape[0]])
    dist.broadcast(size, 0)
    if int(size) == 0:
        return None
    if batch is None:
        batch = {s: torch.empty(int(size), d_model) for s in sites}
    for s in sites:
        t = batch[s].contiguous()
        dist.broadcast(t, 0)
        batch[s] = t
    return batch


def _save_checkpoint(path: Path, state: dict, trainers: dict[str, SAETrainer], store: ActivationStore | None) -> None:
    payload = {
        "state": dict(state),
        "trainers": {name: tr.state_dict() for name, tr in trainers.items()},
        "store": store.state_dict() if store is not None else None,
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
            raise ValueError(
                f"{path.parent} holds a run with another configuration; use a new --out or delete it.\n"
                f"  old: {old}\n  new: {header}"
            )
    else:
        write_json(path, header)


def init_distributed_from_env() -> bool:
    """Join the process group torchrun describes in the environment (gloo on CPU). True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True
