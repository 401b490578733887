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
