"""Process-group facts for running stages under an existing launcher.

``torchrun``, ``accelerate launch`` and ``deepspeed`` all export RANK, WORLD_SIZE and
LOCAL_RANK (and MASTER_ADDR/PORT). Stages 1-4 only need the rank, the world size and a
barrier; training gets its process group from DeepSpeed/accelerate. No scheduler of our
own: a single process is simply rank 0 of 1.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as td


def world_size() -> int:
    if td.is_available() and td.is_initialized():
        return td.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    if td.is_available() and td.is_initialized():
        return td.get_rank()
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the launcher's process group (gloo on CPU, nccl on GPU) when world > 1."""
    if world_size() <= 1 or not td.is_available() or td.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    # Long timeout: rank 0 may merge a large stage output while others wait.
    td.init_process_group(backend=backend, timeout=timedelta(hours=2))


def barrier() -> None:
    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if not (td.is_available() and td.is_initialized() and td.get_world_size() > 1):
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def ensure_process_group_env() -> bool:
    """Make a lone process look like rank 0 of a 1-process launch.

    DeepSpeed wants a process group even for one process; without the launcher's
    variables it probes MPI (and fails without mpi4py). Under a launcher nothing changes.
    Returns True when the variables were set here.
    """
    need = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    if all(k in os.environ for k in need) or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return False
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                 ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    return True


def all_reduce_mean(values: list[float], device=None) -> list[float]:
    """Mean of each value over ranks (identity for one process)."""
    if not (td.is_available() and td.is_initialized() and td.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return (t / td.get_world_size()).tolist()


def all_gather_object(obj) -> list:
    """Every rank's object, in rank order (``[obj]`` for one process)."""
    if not (td.is_available() and td.is_initialized() and td.get_world_size() > 1):
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out
