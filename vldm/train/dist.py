"""Who am I in the job, and collectives that cannot hang forever.

Rank discovery, in order:
1. RANK / WORLD_SIZE / LOCAL_RANK (torchrun, the deepspeed launcher, or slurm/train_temporal.sbatch
   run with bash on one machine);
2. SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, but only inside an `srun` step
   (SLURM_STEP_ID set): the batch step also has SLURM_PROCID=0 and SLURM_NTASKS=N, and a batch-step
   process that believed it was rank 0 of N would wait forever for the others;
3. otherwise a single process.

MASTER_ADDR comes from the environment (the sbatch script exports the first host of the allocation,
`scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1`), MASTER_PORT likewise or from the job id so
two jobs sharing a node do not collide.

A dead rank must end the job, never hang it: every collective runs under a process-group timeout,
barriers on gloo are `monitored_barrier` (which names the missing rank), and a `Watchdog` (faulthandler)
dumps every thread's stack and exits the process when one step or one checkpoint takes longer than the
timeout, whatever the backend is stuck in.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # env | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master_addr(env: dict) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_port(env: dict) -> int:
    job = env.get("SLURM_JOB_ID", "")
    # a port per job: two jobs sharing a node (or one requeued on the same node) do not collide
    return 20000 + int(job) % 20000 if job.isdigit() else 29500


def detect_world(env: dict | None = None) -> World:
    """The process's place in the job, from the launcher's environment (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        launcher = "env"
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        rank = int(env["SLURM_PROCID"])
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        local = int(env.get("SLURM_LOCALID", 0))
        launcher = "slurm"
    else:
        # one process: any free port (a fixed default collides with other runs on the machine)
        return World(master_port=int(env.get("MASTER_PORT") or _free_port()))
    addr = env.get("MASTER_ADDR") or (_slurm_master_addr(env) if launcher == "slurm" else "127.0.0.1")
    port = int(env.get("MASTER_PORT") or _default_port(env))
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is outside world size {world}: check the launcher's environment")
    return World(rank, world, local, addr, port, launcher)


def export_env(world: World) -> None:
    """The variables torch.distributed's env:// and DeepSpeed read."""
    os.environ.update(
        RANK=str(world.rank),
        WORLD_SIZE=str(world.world_size),
        LOCAL_RANK=str(world.local_rank),
        MASTER_ADDR=world.master_addr,
        MASTER_PORT=str(world.master_port),
    )


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(world: World, backend: str, timeout_s: float) -> None:
    """Initialise torch.distributed through DeepSpeed (it keeps its own communication wrapper)."""
    import deepspeed

    export_env(world)
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(world))
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        verbose=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=world.rank,
        world_size=world.world_size,
    )


def init_torch_process_group(world: World, device: torch.device, timeout_s: float) -> None:
    """Plain torch.distributed for DDP (gloo on CPU, NCCL on GPUs), for loops that do not use DeepSpeed
    (the decoder GAN: two optimizers) and so need none of its JIT-built communication ops."""
    if world.world_size == 1 or initialized():
        return
    export_env(world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method="env://",
        rank=world.rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


_BARRIER_TIMEOUT_S = 1800.0


def set_barrier_timeout(seconds: float) -> None:
    global _BARRIER_TIMEOUT_S
    _BARRIER_TIMEOUT_S = seconds


def barrier(timeout_s: float | None = None) -> None:
    """All ranks meet here; a missing rank raises after the timeout instead of hanging."""
    if not initialized() or tdist.get_world_size() == 1:
        return
    t = datetime.timedelta(seconds=timeout_s or _BARRIER_TIMEOUT_S)
    if tdist.get_backend() == "gloo":
        # names the rank that did not arrive
        tdist.monitored_barrier(timeout=t, wait_all_ranks=True)
    else:
        tdist.barrier()  # bounded by the process group's timeout (NCCL watchdog)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum | max | min) of a small tensor; the identity on one process."""
    if initialized() and tdist.get_world_size() > 1:
        red = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}[op]
        if tdist.get_backend() == "nccl" and not t.is_cuda:  # NCCL reduces GPU tensors only
            dev = t.to(torch.device("cuda", torch.cuda.current_device()))
            tdist.all_reduce(dev, op=red)
            t.copy_(dev.cpu())
        else:
            tdist.all_reduce(t, op=red)
    return t


def all_gather_object(obj) -> list:
    if not initialized() or tdist.get_world_size() == 1:
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if initialized():
        tdist.destroy_process_group()


# start-up after the rendezvous (model loading, the DeepSpeed engine: its first call imports torch._dynamo, tens of
# seconds on a loaded node) is not a collective: it gets this bound, not deepspeed.timeout_s, which is sized for a step
STARTUP_BOUND_S = 600.0


class Watchdog:
    """Ends the process (exit 1, stacks on stderr) if it is not re-armed within the timeout.

    Armed around every step and every checkpoint: a rank stuck in a collective whose peer died is
    killed here even when the backend itself would wait forever. The surviving ranks' exits then
    end the job (srun --kill-on-bad-exit=1, or the local launcher).
    """

    def __init__(self, timeout_s: float, enabled: bool = True):
        self.timeout_s = timeout_s
        self.enabled = enabled

    def arm(self, timeout_s: float | None = None) -> None:
        if self.enabled:
            faulthandler.dump_traceback_later(timeout_s or self.timeout_s, exit=True, file=sys.stderr)

    def disarm(self) -> None:
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()


def print0(*args, world: World | None = None, **kw) -> None:
    """print on rank 0 only, flushed (SLURM buffers stdout)."""
    rank = world.rank if world is not None else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(*args, **kw, flush=True)
