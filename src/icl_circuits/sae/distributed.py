"""Data-parallel training of one SAE over several processes: the rows of every batch split over ranks.

    torchrun --nproc_per_node 8 -m icl_circuits.cli sae train --cache runs/acts --saes resid:12 --out runs/sae

(one spec under torchrun trains data-parallel; several specs are spread over the ranks, one SAE
per rank, unless `--ddp`, which trains every SAE data-parallel; see `sae/training.py`.)

What is sharded: each global batch of B rows (the same batch a single process would train on) is
split by stride: rank r of w keeps rows r, r + w, r + 2w, ... (`my_rows`). A stride split commutes
with cutting a batch short (the last step of a run keeps the first n rows: each rank keeps its
first ceil((n - r) / w) rows), so every rank cuts its own share without talking to the others.
With an activation cache each rank reads only its rows from disk; with a live model stream rank 0
runs the model and broadcasts the batch, and each rank keeps its share (the model forward is then
not parallel: harvest a cache first for throughput).

What is reduced, so that one step equals the single-process step over the B rows (`RowComm`):
  * gradients: rank r's gradient of its loss (a mean over its n_r rows) is weighted by n_r / B and
    summed over ranks (one flat float32 all-reduce) = the gradient of the mean over all B rows.
    This is what DistributedDataParallel does for equal shards; it is done explicitly because the
    trainers keep a dict of parameters (no nn.Module), and shards differ by one row when w does not
    divide B. Adam then steps identically on every rank, so the replicas stay equal (checked at the end).
  * batch statistics that are not per-row means: Anthropic normalisation (row norms, counts; the
    column means with norm_centered), b_dec_init='mean', AuxK's var(y) / var(e) ratio, the ghost
    loss's recon / ghost ratio, the reported metrics (fve included): all-reduced sums.
  * BatchTopK / Matryoshka keep the k * B largest activations of the whole global batch: each rank
    all-gathers its own top k * B values, finds the global cut-off, and keeps its entries at or
    above it (exact up to ties at the cut-off, which have probability 0 for float activations; the
    kept zeros a single process drops are dropped here too). The inference threshold's update uses
    the global smallest kept activation (all-reduced min).
  * dead-latent counters: per-latent fire counts and the batch's row count are summed over ranks,
    so every rank holds the same dead mask.
  * a non-finite loss on any rank makes every rank skip the step (and raise), never desynchronise.

Differences from one process are float rounding in sums taken in another order (tests/sae/test_distributed.py,
2 ranks: float32 weights within 5e-7 of one process after 8 steps). bfloat16 weights get a bfloat16
gradient per rank before the reduction (autograd casts it to the parameter's dtype), so they round
once more per rank than in one process.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def my_rows(n: int, rank: int, world: int) -> slice:
    """This rank's rows of a global batch of n rows: a stride split (see the module docstring)."""
    return slice(rank, n, world)


class RowComm:
    """Batch statistics of one global batch; this base class is the single process (everything exact
    as before: means are `.mean()`, nothing is communicated). `DistRowComm` splits rows over ranks."""

    world = 1

    # -- primitives --------------------------------------------------------------------------
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_true(self, flag: bool) -> bool:
        return flag

    # -- batch statistics (detached; every rank gets the same value) -------------------------
    def rows(self, n_local: int) -> int:
        """Rows of the global batch."""
        return n_local

    def col_mean(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, d] -> [d] column means over the global batch."""
        return x.mean(0)

    def row_mean(self, v: torch.Tensor) -> torch.Tensor:
        """v: [rows] -> [] mean over the global batch."""
        return v.mean()

    def means(self, local: torch.Tensor, n_local: int) -> torch.Tensor:
        """local: [m] means over this rank's rows -> [m] means over the global batch (detached)."""
        return local

    def min_or_none(self, v: torch.Tensor) -> torch.Tensor | None:
        """v: [nnz] -> [] smallest entry over all ranks, None when every rank's v is empty."""
        return v.min() if v.numel() else None

    def global_topk_flat(self, a: torch.Tensor, n_keep: int) -> torch.Tensor:
        """Sorted flat indices of this rank's entries of a [rows, d] among the n_keep largest of the global batch."""
        raise NotImplementedError("only under DistRowComm; one process uses batch_topk_indices")

    # -- gradients ---------------------------------------------------------------------------
    def reduce_grads(self, params: Iterable[torch.nn.Parameter], n_local: int, n: int) -> None:
        """Replace each rank's gradient (of a mean over its n_local rows) by the global batch's."""

    def check_replicas(self, params: dict[str, torch.Tensor]) -> None:
        """Raise if the ranks' parameters differ (they never should)."""


class DistRowComm(RowComm):
    """The rows of each batch are split over the ranks of the default process group.

    Collectives run on the backend's device (CUDA for nccl, CPU for gloo); results come back on the
    input's device, so the trainers need not know where the group lives.
    """

    def __init__(self) -> None:
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        work = t.detach().to(self.device).clone()
        dist.all_reduce(work, op=op)
        return work.to(t.device)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def all_true(self, flag: bool) -> bool:
        return bool(self._reduce(torch.tensor([int(flag)]), dist.ReduceOp.MIN).item())

    def rows(self, n_local: int) -> int:
        return int(self.all_sum(torch.tensor([n_local])).item())

    def col_mean(self, x: torch.Tensor) -> torch.Tensor:
        # float64 sums: the result should not depend on how the rows are split
        s = self.all_sum(torch.cat([x.detach().double().sum(0), x.new_tensor([x.shape[0]], dtype=torch.float64)]))
        return (s[:-1] / s[-1]).to(x.dtype)  # [d]

    def row_mean(self, v: torch.Tensor) -> torch.Tensor:
        s = self.all_sum(torch.stack([v.detach().double().sum(), v.new_tensor(v.shape[0], dtype=torch.float64)]))
        return (s[0] / s[1]).to(v.dtype)

    def means(self, local: torch.Tensor, n_local: int) -> torch.Tensor:
        # an empty shard contributes nothing (its means are NaN: 0 rows)
        part = local.detach().double() * n_local if n_local else torch.zeros_like(local, dtype=torch.float64)
        s = self.all_sum(torch.cat([part, part.new_tensor([n_local])]))  # [m + 1]
        return (s[:-1] / s[-1]).to(local.dtype)

    def min_or_none(self, v: torch.Tensor) -> torch.Tensor | None:
        local = v.detach().min() if v.numel() else torch.tensor(float("inf"), device=v.device)
        m = self._reduce(local.reshape(1).float(), dist.ReduceOp.MIN)[0]
        return None if torch.isinf(m) else m.to(v.dtype)

    def global_topk_flat(self, a: torch.Tensor, n_keep: int) -> torch.Tensor:
        flat = a.detach().reshape(-1)  # [rows * d]
        # [<= n_keep] my largest: none of my other entries can make the global cut
        mine = flat.topk(min(n_keep, flat.numel()), sorted=False).values
        sizes = self._gather_sizes(mine.numel())
        padded = torch.full((max(sizes),), float("-inf"), device=self.device)
        padded[: mine.numel()] = mine.float().to(self.device)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        every = torch.cat([p[:s] for p, s in zip(parts, sizes)])  # [sum of sizes] the candidates of all ranks
        if every.numel() < n_keep:  # (a rank sends min(n_keep, its entries): fewer means all entries are here)
            return torch.arange(flat.numel(), device=a.device)  # the global batch has < n_keep entries: keep all
        cutoff = every.topk(n_keep, sorted=False).values.min().to(a.device, a.dtype)  # the n_keep-th largest
        return (flat >= cutoff).nonzero().squeeze(-1)  # ascending

    def _gather_sizes(self, n: int) -> list[int]:
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([n], device=self.device))
        return [int(s.item()) for s in sizes]

    def reduce_grads(self, params: Iterable[torch.nn.Parameter], n_local: int, n: int) -> None:
        params = list(params)
        w = n_local / n  # this rank's share of the global mean
        chunks = []
        for p in params:  # one flat buffer: [has grad, grad...] per parameter, float32
            g = p.grad
            has = g is not None and n_local > 0  # an empty shard's loss is NaN (mean of nothing): it adds 0
            chunks.append(torch.tensor([1.0 if g is not None else 0.0], device=self.device))
            part = g.detach().float().reshape(-1).to(self.device) * w if has else None  # type: ignore[union-attr]
            chunks.append(part if part is not None else torch.zeros(p.numel(), device=self.device))
        flat = torch.cat(chunks)
        dist.all_reduce(flat)
        at = 0
        for p in params:
            has = bool(flat[at] > 0)  # some rank has a gradient for p (all do, as the graph is the same)
            g = flat[at + 1 : at + 1 + p.numel()]
            at += 1 + p.numel()
            p.grad = g.view(p.shape).to(p.device, p.dtype).clone() if has else None

    def check_replicas(self, params: dict[str, torch.Tensor]) -> None:
        sums = torch.stack([p.detach().double().sum() for p in params.values()]).to(self.device)  # [n_params]
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            bad = [k for k, a, b in zip(params, lo.tolist(), hi.tolist()) if a != b]
            raise RuntimeError(f"data-parallel replicas diverged in {bad}; this is a bug")


LOCAL = RowComm()
