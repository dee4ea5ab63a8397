"""Several processes under `torchrun`: which rank does what, and how the ranks meet again.

Everything here is the identity in a single process (no `torch.distributed` group), so callers need
no rank checks of their own.

Multi-task experiments split their tasks over the ranks and write into ONE run directory: TVC over
tasks (`experiments.clean.run_cleaning`), circuits over tasks (`experiments.circuits.run_circuits`), the positive
steering heatmap's cells (`steering.positive_heatmap`), the detection sweep and the detector ->
executor link (`detection.run_detectors`). The pattern:

    torchrun --nproc_per_node 8 -m icl_circuits.cli clean --tasks all --out runs/tvc

    with shared_run(out, header, kind="cleaning") as run:   # rank 0 locks and checks the folder first
        mine = [compute_or_resume(t) for t in my_share(tasks)]   # rank r: tasks r, r + w, r + 2w, ...
        results = gather_in_order(tasks, mine)               # every rank's results, in task order
        if is_main(): write the combined summary             # after every rank finished its tasks

Per-task files are written exactly as in one process (each task's folder by the rank that ran it),
and resume per task works as before: a rerun with another number of ranks skips every finished task.

Why `shared_run`: a `RunDir` takes an exclusive flock, which is per open file, so every rank but one
would fail with RunBusy. Rank 0 opens the RunDir first (takes the lock, checks or writes run.json,
deletes temp files a killed run left behind); only then do the other ranks join without the lock
(`RunDir(..., lock=False)`). The lock still keeps out another run; the ranks of this one write
disjoint task folders, and identical files (the config) by atomic replace. Rank 0 releases the lock
last: it leaves after the merge, which every rank reaches only after its last task.

Runners that keep their progress in one state file (the heatmap's cells, the link's tasks) let only
rank 0 save it during the loop and `merge_across_ranks` after it (a rank killed mid-run loses its
unsaved cells, never correctness); those with an AppendLog let every rank append whole lines to it
(`main_first` opens it on rank 0 first, which may create or repair it).

Only rank 0 writes the combined outputs; the runners return the merged results on every rank, and
the CLI (`clean`, `circuit`) lets the other ranks exit after the runner. Collectives may wait as long as the slowest
rank's tasks take, hence the long timeout of `init_from_env` (ICL_DIST_TIMEOUT_MIN, default 12 h).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from icl_circuits.core.storage import RunDir

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if "torch" not in sys.modules:  # no torch, no group: the CLI starts without importing torch
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes combined outputs."""
    return rank_world()[0] == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl with GPU LOCAL_RANK per rank, else gloo.

    True when distributed. Each rank uses GPU LOCAL_RANK as its current device, so `--device cuda`
    means "my GPU".
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return rank_world()[1] > 1  # (torch is imported only under torchrun or once a group exists)
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    timeout = timedelta(minutes=float(os.environ.get("ICL_DIST_TIMEOUT_MIN", 12 * 60)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    return True


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items: rank r of w gets items r, r + w, r + 2w, ... (all of them in one process).

    Round-robin rather than blocks, so that tasks listed in some order of size spread evenly.
    """
    rank, world = rank_world()
    return list(items)[rank::world]


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in one process); obj must pickle."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * rank_world()[1]
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(items: Sequence[Any], mine: Sequence[T]) -> list[T]:
    """Every rank's results in the order of `items`, on every rank; mine[i] is the result of my_share(items)[i].

    Waits until every rank has finished its share (results must pickle)."""
    rank, world = rank_world()
    if world == 1:
        return list(mine)
    parts = all_gather_objects(list(mine))
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        if len(part) != len(range(r, len(items), world)):
            raise RuntimeError(f"rank {r} returned {len(part)} results for {len(range(r, len(items), world))} items")
        for i, v in zip(range(r, len(items), world), part):
            out[i] = v
    return out


def main_first(make: Callable[[], T]) -> T:
    """make() on rank 0, then, after a barrier, on the other ranks: for opening a shared file that rank 0
    may create or repair (an AppendLog: `main_first(lambda: run.log("x.jsonl"))`); make() in one process."""
    if rank_world()[1] == 1:
        return make()
    got = make() if is_main() else None
    barrier()
    return got if is_main() else make()  # type: ignore[return-value]


def merge_across_ranks(*stores: dict[str, Any]) -> bool:
    """Update each dict in place with every rank's entries; a dict under the same key is merged one
    level deep (e.g. {task: {cell: value}}). For state files that each rank fills for its share of
    the tasks. False (and nothing done) in one process."""
    if rank_world()[1] == 1:
        return False
    for parts, store in zip(zip(*all_gather_objects(list(stores))), stores):
        for part in parts:
            for k, v in part.items():
                if isinstance(v, dict) and isinstance(store.get(k), dict):
                    store[k].update(v)
                else:
                    store[k] = v
    return True


def main_only(make: Callable[[], T], what: str = "set up the run") -> T | None:
    """make() on rank 0 alone: its result there, None on the other ranks. An error on rank 0 is raised on
    every rank (rank 0's own, a RuntimeError naming it elsewhere), so no rank is left waiting at a barrier
    for a rank 0 that failed. make() in one process."""
    rank, world = rank_world()
    if world == 1:
        return make()
    got, err = None, None
    if rank == 0:
        try:
            got = make()
        except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised here
            err = e
    first = all_gather_objects(None if err is None else f"{type(err).__name__}: {err}")[0]  # doubles as a barrier
    if err is not None:
        raise err
    if first is not None:
        raise RuntimeError(f"rank 0 could not {what}: {first}")
    return got


def open_shared(path: str | os.PathLike, cfg: dict[str, Any], **kw: Any) -> "RunDir":
    """`RunDir(path, cfg, **kw)` opened by every rank: rank 0 first, with the lock, then the others
    without it (see the module docstring). An error opening it on rank 0 (RunBusy, ConfigMismatch)
    is raised on every rank. Close it on every rank (rank 0's close releases the lock)."""
    from icl_circuits.core.storage import RunDir

    run = main_only(lambda: RunDir(path, cfg, **kw), f"open {Path(path)}")
    return run if run is not None else RunDir(path, cfg, lock=False, **kw)


@contextmanager
def shared_run(path: str | os.PathLike, cfg: dict[str, Any], **kw: Any) -> Iterator["RunDir"]:
    """`open_shared` as a context manager: `with shared_run(out, header, kind=...) as run:`."""
    run = open_shared(path, cfg, **kw)
    try:
        yield run
    finally:
        run.close()
