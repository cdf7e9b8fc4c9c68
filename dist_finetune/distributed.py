"""The one module that owns torch.distributed: launch discovery, process group, collective helpers."""
from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main(env: DistEnv) -> bool:
    return env.is_main


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Variables a plain single process writes into its environment (DeepSpeed reads them); undone at shutdown.
_set_by_us: set[str] = set()


def _discover() -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, launcher) from the environment the launcher left."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, the deepspeed launcher
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
    return 0, 1, 0, "single"


def _pick_device(local_rank: int, debug: bool) -> tuple[torch.device, str]:
    if torch.cuda.is_available() and not debug:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed(timeout_seconds: float = 1800.0, debug: bool = False) -> DistEnv:
    """Initialise the process group once (a one-rank group when launched as a plain process)."""
    rank, world_size, local_rank, launcher = _discover()
    if launcher == "single":
        wanted = dict(MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        for key, value in wanted.items():
            if key not in os.environ:
                _set_by_us.add(key)
                os.environ[key] = value
    device, backend = _pick_device(local_rank, debug)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_seconds),
        )
    return DistEnv(rank, world_size, local_rank, device, backend, launcher)


def shutdown() -> None:
    """Leave together: a rank that tears down its group while a peer is still in a collective
    can abort the peer (seen with gloo)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _forget_deepspeed_group()
    while _set_by_us:
        os.environ.pop(_set_by_us.pop(), None)


def _forget_deepspeed_group() -> None:
    """DeepSpeed caches the world group; a later group in the same process must not meet the old one."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_WORLD_GROUP"):
        groups._WORLD_GROUP = None


def all_reduce_sum(values: torch.Tensor | list[float], env: DistEnv) -> torch.Tensor:
    """Sum a float64 vector over ranks; every rank gets the total."""
    t = torch.as_tensor(values, dtype=torch.float64)
    t = t.to(env.device if env.backend == "nccl" else "cpu").clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def broadcast_decision(decision: int, env: DistEnv, src: int = 0) -> int:
    """Rank `src` decides; every rank returns that decision."""
    t = torch.tensor([decision], dtype=torch.int64, device=env.device if env.backend == "nccl" else "cpu")
    dist.broadcast(t, src=src)
    return int(t.item())


def broadcast_object(obj, env: DistEnv, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=env.device if env.backend == "nccl" else None)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.backend == "nccl":
        dist.barrier(device_ids=[env.local_rank])
    else:
        dist.barrier()
