"""The one module that owns torch.distributed: launch discovery, process group, collective helpers."""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from .errors import UserError


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


class LaunchError(UserError, RuntimeError):
    """The launch environment is incomplete (e.g. MPI without mpi4py)."""


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    launcher: str
    master_addr: str
    master_port: str
    local_world_size: int = 1  # ranks on this node


MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
# Variables this process wrote into its own environment (DeepSpeed reads them); undone at shutdown.
_set_by_us: set[str] = set()


def discover() -> Launch:
    """Who launched us: torchrun / the deepspeed launcher, MPI, a SLURM srun step, or nobody."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun",
                      env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500"),
                      int(env.get("LOCAL_WORLD_SIZE", 1)))
    if any(key in env for key in MPI_MARKERS):
        return _from_mpi()
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return _from_slurm()
    return Launch(0, 1, 0, "single", env.get("MASTER_ADDR", "127.0.0.1"),
                  env.get("MASTER_PORT") or str(free_port()))


def _from_mpi() -> Launch:
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(
            "launched by MPI (found " + ", ".join(k for k in MPI_MARKERS if k in os.environ)
            + ") but mpi4py is not installed: pip install -e '.[mpi]'"
        ) from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, one_node = node.Get_rank(), node.Get_size() == size
    addr = os.environ.get("MASTER_ADDR") or comm.bcast(_own_address(one_node) if rank == 0 else None, root=0)
    port = os.environ.get("MASTER_PORT") or comm.bcast(str(free_port()) if rank == 0 else None, root=0)
    return Launch(rank, size, local_rank, "mpi", addr, port, node.Get_size())


def _own_address(one_node: bool) -> str:
    return "127.0.0.1" if one_node else socket.gethostbyname(socket.gethostname())


def _from_slurm() -> Launch:
    env = os.environ
    addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return Launch(int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", env["SLURM_STEP_NUM_TASKS"])),
                  int(env.get("SLURM_LOCALID", 0)), "slurm", addr, port, _slurm_tasks_on_node(env))


def _slurm_tasks_on_node(env: os._Environ | dict[str, str]) -> int:
    """SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1": the count of the node this task runs on."""
    counts = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split(","):
        match = re.match(r"^(\d+)(?:\(x(\d+)\))?$", part.strip())
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else 1


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("node[03-05,07]" -> "node03"), as scontrol expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"^([^\[,]+)(?:\[([^\],-]+))?", nodelist)
    return match.group(1) + (match.group(2) or "") if match else nodelist


def _export(launch: Launch) -> None:
    wanted = dict(MASTER_ADDR=launch.master_addr, MASTER_PORT=launch.master_port, RANK=str(launch.rank),
                  WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    for key, value in wanted.items():
        if key not in os.environ:
            _set_by_us.add(key)
            os.environ[key] = value


def _pick_device(local_rank: int, debug: bool) -> tuple[torch.device, str]:
    if torch.cuda.is_available() and not debug:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    tell_deepspeed_cpu()
    return torch.device("cpu"), "gloo"


def tell_deepspeed_cpu() -> None:
    """Before DeepSpeed is imported: told the accelerator, it does not guess aloud (a warning per rank)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def cpu_threads(ranks_on_node: int) -> int:
    """Intra-op threads of one CPU rank: OMP_NUM_THREADS when set (torchrun sets 1 for several ranks
    per node), else the cores this process may use, shared by the ranks on this node. More threads
    than cores make every rank wait for a busy neighbour's core at each parallel region."""
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, ranks_on_node))


def init_distributed(timeout_seconds: float = 1800.0, debug: bool = False) -> DistEnv:
    """Initialise the process group once (a one-rank group when launched as a plain process)."""
    launch = discover()
    _export(launch)
    rank, world_size, local_rank, launcher = launch.rank, launch.world_size, launch.local_rank, launch.launcher
    device, backend = _pick_device(local_rank, debug)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(launch.local_world_size))
    timeout = datetime.timedelta(seconds=timeout_seconds)
    global _timeout_seconds
    _timeout_seconds = timeout_seconds
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=_restart_store(world_size, timeout))
    return DistEnv(rank, world_size, local_rank, device, backend, launcher)


def _restart_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store, with keys scoped to this restart attempt.

    Without the scope, workers restarted by `torchrun --max-restarts` find the previous attempt's
    gloo addresses in the store and fail to connect (seen with torch 2.13)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_finetune/attempt_{attempt}", store)


_activity = "start-up"
_timeout_seconds = 1800.0


def set_activity(text: str) -> None:
    """What the ranks are doing now, named in the error when a collective fails."""
    global _activity
    _activity = text


def collective_failure(exc: BaseException) -> str | None:
    """A one-line explanation when `exc` is a failed collective (a peer died or hung), else None."""
    text = str(exc)
    markers = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe")
    if not (isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError)
                                                 and any(m in text.lower() for m in markers))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    where = f"rank {dist.get_rank()}/{dist.get_world_size()}" if dist.is_initialized() else "this rank"
    return (f"{where}: a collective failed during {_activity}: {first[:300]}. "
            f"Another rank died or stalled longer than distributed.timeout_seconds ({_timeout_seconds:g} s); "
            "its own log says why.")


def leave(code: int) -> NoReturn:
    """End a rank's process once its group is shut down, skipping the interpreter's teardown.

    Static destructors of the communication libraries sometimes abort a rank that already finished
    ("terminate called without an active exception", seen under mpiexec), turning a complete run
    into a failed job. Nothing is left to clean up by then: flush, finalize MPI if it was used, exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


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


def all_gather_rows(rows: torch.Tensor, counts: list[int], env: DistEnv) -> torch.Tensor:
    """Every rank's `rows` (rank r holds counts[r] of them), concatenated in rank order, on every rank."""
    width = max(counts)
    device = env.device if env.backend == "nccl" else "cpu"
    padded = torch.zeros((width, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu()


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
