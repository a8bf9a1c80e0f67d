"""The process group of a run started by ``torchrun``: who this process is, its device, and the few collectives
training needs. A plain ``python train.py`` is `SINGLE`: world size 1, no process group, every call a no-op.

    torchrun --nproc_per_node 4 train.py --data-dir DATA --out-dir runs/ddp        # one machine, 4 GPUs

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT) for each process it starts, on one node or
several (``--nnodes``, ``--rdzv-endpoint``): this module only reads them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits at a collective before it gives up. torchrun stops every process as soon as one fails,
# so this is only the backstop for a peer that hangs without dying; it must outlast rank 0's longest lone task
# between two collectives (a validation pass over a large validation set).
TIMEOUT = timedelta(minutes=30)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run. ``rank`` 0 is the one that reads the run folder and writes to it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True under torchrun (with one process or more): a process group exists."""
        return dist.is_available() and dist.is_initialized()

    def device(self, choice: str) -> torch.device:
        """The device of this rank for ``--device choice``: one process a device, cuda:LOCAL_RANK on GPUs.

        Raises ValueError (one line, naming --device) for a choice that cannot be shared out by rank.
        """
        if choice in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        if choice in ("auto", "cpu"):
            return torch.device("cpu")
        raise ValueError(
            f"--device {choice} does not apply under torchrun: each process takes cuda:LOCAL_RANK (choose the GPUs "
            "with CUDA_VISIBLE_DEVICES), or give --device cpu"
        )

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (others pass anything); also a barrier. Identity in one process."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if not self.active:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)  # a CPU tensor: gloo carries it, NCCL or not
        return total.item() / self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def start() -> Distributed:
    """Join torchrun's process group if this process was started by torchrun, else `SINGLE`.

    The group gets both backends: gloo for CPU tensors (and CPU-only machines), NCCL for CUDA ones where there
    are GPUs, so the device can be chosen after the run's settings are known (a resume reads them from last.pt).
    """
    if not launched_by_torchrun():
        return SINGLE
    here = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(here.local_rank % torch.cuda.device_count())  # NCCL's collectives use this device
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, rank=here.rank, world_size=here.world_size, timeout=TIMEOUT)
    return here


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def record_failure(message: str) -> None:
    """Hand torchrun this process's one-line error, so its failure summary shows that line instead of
    "To enable traceback see ..." (torchrun names the file in TORCHELASTIC_ERROR_FILE; absent elsewhere)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    extra = {"py_callstack": message, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w", encoding="utf-8") as file:
            json.dump({"message": {"message": message, "extraInfo": extra}}, file)
    except OSError:  # the summary then says less; the error itself is already in the log
        pass
