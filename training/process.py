"""Who this process is in the job: its rank among how many, its device and precision; printing, barriers and
reductions over the processes of a torchrun job. One process (no torchrun) is rank 0 of 1."""
import functools
import os
import platform

import torch
import torch.distributed as dist

from errors import UserError
from utils import cpu_threads


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N) -> a torch.device; `cuda` means this process's GPU under torchrun."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: no CUDA device is available here; use --device cpu "
                            f"(or GPU 'cpu' in the launchers)")
        index = int(requested.split(":")[1]) if ":" in requested else local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if requested != "cpu":
        raise UserError(f"--device '{requested}' is not understood; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


class Process:
    """One process of a training job.

        Process.from_environment("auto", "auto", 4)           # torchrun's RANK, WORLD_SIZE, LOCAL_RANK; joins the group
        Process(rank=1, world=2, device=torch.device("cpu"))  # a view of process 1 of 2, without a group (tests)

    precision: auto is bf16 autocast on CUDA and fp32 elsewhere; `autocast()` is the one context every forward
    runs under, so bf16 and fp32 share one code path."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: torch.device = torch.device("cpu"),
                 precision: str = "auto"):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.precision = precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        self.is_main = rank == 0
        self.autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                          enabled=self.precision == "bf16")

    @classmethod
    def from_environment(cls, device: str, precision: str = "auto", threads="auto") -> "Process":
        """This process of the job; --threads applied (torch.set_num_threads)."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        resolved = resolve_device(device, local_rank)
        wanted = cpu_threads(threads, resolved.type)
        if wanted is not None:
            torch.set_num_threads(wanted)
        if world > 1 and not dist.is_initialized():
            if resolved.type == "cuda":
                torch.cuda.set_device(resolved)
            dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        return cls(rank, world, local_rank, resolved, precision)

    def local_batch(self, global_batch: int) -> int:
        """This process's share of the global batch (--batch_size is global)."""
        if global_batch % self.world:
            raise UserError(f"--batch_size {global_batch} is the global batch and must divide evenly over "
                            f"{self.world} processes")
        return global_batch // self.world

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return platform.processor() or platform.machine()

    def print(self, *a) -> None:
        if self.is_main:
            print(*a, flush=True)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the processes of a tensor every process holds."""
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def earliest(self, step: torch.Tensor) -> int:
        """The smallest positive value of an int64 scalar over the processes (0 where every process holds 0)."""
        if self.world > 1:
            never = torch.iinfo(torch.int64).max
            step = torch.where(step > 0, step, never)
            dist.all_reduce(step, op=dist.ReduceOp.MIN)
            step = torch.where(step == never, 0, step)
        return int(step.item())

    def wrap(self, model: torch.nn.Module, compile: bool) -> torch.nn.Module:
        """DistributedDataParallel in a job of several processes, then torch.compile if asked."""
        if self.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if compile else model
