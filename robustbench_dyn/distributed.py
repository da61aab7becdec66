"""Evaluation over several processes, on one machine or many, as started by ``torchrun``.

torchrun tells each process its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``). :func:`evaluate` gives rank r the work units r, r + N, r + 2N, ... of the full plan
(N ranks), so the shares do not depend on what an earlier, interrupted run finished. Rank 0 writes
into the results store itself; every other rank writes its own store file under
``<out>/parts/rank-<r>/``, and rank 0 merges those into ``<out>/results.sqlite`` once every rank is
done. Parts left behind by a run that was stopped are merged at the start of the next run, whatever
its number of ranks, so nothing already evaluated is lost.

The process group (gloo, over TCP) only carries a barrier and the ranks' counts at the end; the
images and models never travel between processes, so gloo serves GPU ranks as well as CPU ones.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from robustbench_dyn.errors import DynrobustError

PARTS_FOLDER = "parts"
# how long a rank waits at a barrier for the others: the last one waits for the slowest rank to
# finish its share, which on a full ImageNet-C can be hours behind on a shared cluster
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


def part_folder(out, rank: int) -> Path:
    """Where rank ``rank`` (> 0) of a distributed run keeps its store until rank 0 merges it."""
    return Path(out) / PARTS_FOLDER / f"rank-{rank}"


def _environment_int(environ, name: str) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise DynrobustError(f"{name}={text!r} in the environment is not an integer (torchrun sets it)") from None


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one evaluation: rank ``rank`` of ``world_size``,
    ``local_rank`` on its machine. One process alone is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this machine

    @classmethod
    def from_environment(cls, environ=None) -> "Ranks":
        """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` as torchrun sets
        them; without ``WORLD_SIZE`` this is a process alone."""
        environ = os.environ if environ is None else environ
        world_size = _environment_int(environ, "WORLD_SIZE")
        if world_size is None:
            return cls()
        rank = _environment_int(environ, "RANK")
        local_rank = _environment_int(environ, "LOCAL_RANK")
        if world_size < 1:
            raise DynrobustError(f"WORLD_SIZE={world_size} in the environment: it must be at least 1")
        if rank is None or not 0 <= rank < world_size:
            raise DynrobustError(f"WORLD_SIZE={world_size} but RANK={environ.get('RANK')!r}: start the ranks with "
                                 "torchrun, which sets both (RANK from 0 to WORLD_SIZE - 1)")
        local_world_size = _environment_int(environ, "LOCAL_WORLD_SIZE")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank if local_rank is not None else 0,
                   local_world_size=max(1, local_world_size) if local_world_size is not None else 1)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, unit_index: int) -> bool:
        """Whether work unit ``unit_index`` of the full plan is this rank's."""
        return unit_index % self.world_size == self.rank

    def device(self, device: str) -> str:
        """The device this rank evaluates on: ``cuda`` is ``cuda:LOCAL_RANK`` when there are
        several ranks (one GPU each); one named GPU for every rank is refused."""
        if not self.distributed:
            return device
        if device == "cuda":
            return f"cuda:{self.local_rank}"
        if device.startswith("cuda:"):
            raise DynrobustError(f"--device {device} under torchrun would put every rank on one GPU: give --device "
                                 "cuda, and rank r uses cuda:LOCAL_RANK (limit the GPUs with CUDA_VISIBLE_DEVICES)")
        return device


class ProcessGroup:
    """The ranks' process group for the duration of a ``with`` block (nothing for a process alone)."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self._started = False

    def __enter__(self) -> "ProcessGroup":
        if not self.ranks.distributed:
            return self
        import torch.distributed as dist

        if not dist.is_available():
            raise DynrobustError("this torch build has no torch.distributed: run dynrobust eval without torchrun")
        if not dist.is_initialized():
            missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
            if missing:
                raise DynrobustError(f"WORLD_SIZE={self.ranks.world_size} but {' and '.join(missing)} not set: start "
                                     "the ranks with torchrun (e.g. torchrun --nproc-per-node 4 -m robustbench_dyn "
                                     "eval ...)")
            dist.init_process_group("gloo", rank=self.ranks.rank, world_size=self.ranks.world_size,
                                    timeout=BARRIER_TIMEOUT)
            self._started = True
        return self

    def __exit__(self, *exc):
        if self._started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._started = False

    def barrier(self) -> None:
        if self.ranks.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.ranks.distributed:
            return [value]
        import torch.distributed as dist

        values = [None] * self.ranks.world_size
        dist.all_gather_object(values, value)
        return values


def merge_parts(store, out) -> int:
    """Merge every rank's part store under ``<out>/parts`` into ``store`` (the open store of
    ``out``), then delete the parts; return how many records they held."""
    from robustbench_dyn.store import STORE_NAME

    folder = Path(out) / PARTS_FOLDER
    if not folder.is_dir():
        return 0
    merged = 0
    for part in sorted(folder.glob("rank-*"), key=lambda p: (len(p.name), p.name)):
        if (part / STORE_NAME).is_file():
            merged += store.merge_store(part / STORE_NAME)
        for suffix in ("", "-wal", "-shm"):  # only once its records are in the store
            (part / (STORE_NAME + suffix)).unlink(missing_ok=True)
        try:
            part.rmdir()
        except OSError:
            pass  # something else is in it: not ours to delete
    try:
        folder.rmdir()
    except OSError:
        pass
    return merged
