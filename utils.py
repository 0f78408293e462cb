"""Plumbing shared by the three stages, written once: flags, device and precision, distributed
setup, seeding, data order, optimizer and schedule, checkpoints of the training state, run records.

Randomness is a pure function of (seed, step, sample index) — data order, MAE masking noise, flips
and dropout. So one process and N processes take the same optimizer steps, and a resumed run needs no
saved random-number state to continue bit-identically.
"""
import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from errors import RunFailed, UserError  # noqa: F401  (re-exported: stages raise utils.UserError)


# ----------------------------------------------------------------------------- command line

def str2bool(value: str) -> bool:
    """The original launchers' spelling: True/true/False/false (also 1/0, yes/no)."""
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got '{value}'")


# Numeric flags are checked where they are parsed: argparse then prints the usage and one line
# ("argument --steps: must be at least 1, got 0") and exits with code 2, before anything runs.

def device_spec(value: str) -> str:
    """An argparse type for --device / --teacher_device: auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got '{value}'")
    return value


def int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{value}'") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number
    parse.__name__ = f"int_at_least({minimum})"
    return parse


def finite_float(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, none: bool = False):
    """An argparse type: a finite float in the interval from `low` to `high` (either end open or closed,
    None: unbounded). none=True also accepts 'none' (any case) as None."""
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"greater than {low:g}" if low_open else f"at least {low:g}"
    elif high is not None:
        wanted = f"less than {high:g}" if high_open else f"at most {high:g}"
    else:
        wanted = ""

    def parse(value: str) -> float | None:
        if none and value.strip().lower() == "none":
            return None
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number{' or none' if none else ''}, got '{value}'") from None
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and (number >= high if high_open else number > high)
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' * bool(wanted)}{wanted}, got {value}")
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return number
    parse.__name__ = f"finite_float({wanted or 'any'})"
    return parse


def shared_parser() -> argparse.ArgumentParser:
    """Flags common to the three stages. Defaults are the paper's recipe for the MAE stages;
    finetune.py overrides the few that differ with set_defaults()."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True,
                   help="aircraft, chest_xray, cub, dtd, stanford_dogs, vgg_flower_102, digits (built in), "
                        "or the name of your own folder under --data_dir")
    g.add_argument("--data_dir", default="data", help="root holding <dataset>/{train,test}.lmdb or image folders")
    g.add_argument("--workers", type=int_at_least(0), default=4,
                   help="DataLoader worker processes per training process")
    g = p.add_argument_group("model")
    g.add_argument("--model_name", default="facebook/vit-mae-base",
                   help="the initial MAE model θ₀: a hub id, a local directory from save_pretrained, "
                        "or vit-mae-tiny (a small built-in config for CPU runs)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int_at_least(1), default=20000, help="optimizer steps")
    g.add_argument("--batch_size", type=int_at_least(1), default=64,
                   help="global batch size (split evenly over the processes of a torchrun job)")
    g.add_argument("--lr", type=finite_float(0, low_open=True), default=1.5e-4, help="peak learning rate (AdamW)")
    g.add_argument("--weight_decay", type=finite_float(0), default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup_steps", type=int_at_least(0), default=0,
                   help="linear warmup steps, then linear decay to 0")
    g.add_argument("--clip_grad", type=finite_float(0, low_open=True, none=True), default=None,
                   help="clip the gradient norm to this value ('none': no clipping)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seeds data order, masking noise, flips, dropout, new heads")
    g.add_argument("--device", type=device_spec, default="auto", help="auto (cuda if available), cpu, cuda, or cuda:N")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32 reproduces the original numerics")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--checkpoint_dir", default="checkpoints", help="where the MAE stages write and are read from")
    g.add_argument("--output_dir", default=None, help="this run's directory (default: derived, see README)")
    g.add_argument("--log_every", type=int_at_least(1), default=50, help="steps between metrics lines")
    g.add_argument("--save_every", type=int_at_least(0), default=0,
                   help="steps between resumable training states (0: only at the end); re-running the same "
                        "command continues from the latest one")
    g.add_argument("--overwrite", action="store_true",
                   help="move what the run directory holds aside (to <dir>.old-<time>) and start again; re-run "
                        "without it to continue a killed run")
    g.add_argument("--plot", type=str2bool, nargs="?", const=True, default=False,
                   help="write loss curves (loss_curves.png) into the run directory at the end")
    g.add_argument("--data_cache", default="auto", choices=["auto", "off"],
                   help="auto: decode and resize each split once into memory (on the GPU when it fits) and "
                        "gather batches by index, reusing <data_dir>/<dataset>/.cache/ across runs; a split "
                        "larger than half the available memory streams through the workers. off: always "
                        "stream. Batches are the same either way")
    g.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=False,
                   help="experimental, not yet run on a GPU: capture the whole training step in one CUDA "
                        "graph (static input buffers, capturable AdamW with the learning rate as a tensor); "
                        "on CPU the same static-buffer step runs without capture. One process only")
    return p


def run_cli(get_args_parser, main) -> None:
    """Entry-point wrapper: user mistakes become one line on stderr and exit code 2 (a run that failed
    though what was asked was fine, RunFailed: exit code 1)."""
    args = get_args_parser().parse_args()
    try:
        main(args)
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _one_line(e: Exception) -> str:
    # A DataLoader worker re-raises our error with its traceback in the message; keep the last line.
    lines = [line for line in str(e).splitlines() if line.strip()]
    line = lines[-1] if lines else type(e).__name__
    return line.split("UserError: ", 1)[-1]


# ----------------------------------------------------------------------------- files

def write_json(path: str, obj) -> None:
    """Atomic: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str) -> None:
    """Write to a temporary file, then rename: a kill mid-save leaves the previous file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    import torchvision
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "transformers": transformers.__version__}


# ----------------------------------------------------------------------------- randomness

def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby (seed, step) pairs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


STREAM_ORDER, STREAM_NOISE, STREAM_FLIP, STREAM_DROPOUT, STREAM_SPLIT = range(5)


def generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one (seed, purpose, step-or-epoch)."""
    return torch.Generator().manual_seed(_mix(seed, stream, index))


class StepSampler(torch.utils.data.Sampler):
    """Yields this process's slice of the global batch for steps start_step .. steps-1.

    The global batch of step s is positions [s*B, (s+1)*B) of the endless sequence of per-epoch
    permutations of the dataset (epoch e permuted by generator(seed, ORDER, e)); process r of W takes
    the r-th contiguous part. So the data a step sees does not depend on how many processes there are."""

    def __init__(self, n: int, global_batch: int, seed: int, start_step: int, steps: int, rank: int, world: int):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start_step, self.steps, self.rank, self.local = start_step, steps, rank, global_batch // world

    @functools.lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=generator(self.seed, STREAM_ORDER, epoch))

    def global_batch_indices(self, step: int) -> list[int]:
        positions = range(step * self.global_batch, (step + 1) * self.global_batch)
        return [int(self._permutation(p // self.n)[p % self.n]) for p in positions]

    def indices(self, start: int, stop: int) -> torch.Tensor:
        """This process's indices for steps start .. stop-1 as one (stop - start, B_local) tensor: what
        __iter__ yields for those steps, drawn ahead for a chunk of steps without a loop per sample."""
        positions = torch.arange(start * self.global_batch, stop * self.global_batch).view(stop - start, -1)
        positions = positions[:, self.rank * self.local:(self.rank + 1) * self.local]
        epochs, out = positions // self.n, torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            rows = epochs == epoch
            out[rows] = self._permutation(epoch)[positions[rows] % self.n]
        return out

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            yield self.global_batch_indices(step)[self.rank * self.local:(self.rank + 1) * self.local]

    def __len__(self):
        return max(0, self.steps - self.start_step)


class GlobalBatchDropout(torch.nn.Module):
    """nn.Dropout whose mask is drawn for the whole global batch and sliced to this process's rows, so the
    mask of a sample depends on (seed, step, its place in the global batch), not on the number of processes.
    Draws from the default generator, which Run.batches seeds from (seed, step) before every step; every
    process makes the same draws in the same order. x: (B_local, ...)."""

    def __init__(self, p: float, rank: int, world: int):
        super().__init__()
        self.p, self.rank, self.world = p, rank, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        b = x.shape[0]
        noise = torch.rand(b * self.world, *x.shape[1:], device=x.device)[self.rank * b:(self.rank + 1) * b]
        return x * (noise >= self.p) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, rank={self.rank}, world={self.world}"


def use_global_batch_dropout(model: torch.nn.Module, rank: int, world: int) -> None:
    """Replace every active nn.Dropout of `model` by GlobalBatchDropout (no parameters: the state dict is unchanged)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.Dropout and child.p > 0:
                setattr(parent, name, GlobalBatchDropout(child.p, rank, world))


class Draws:
    """The randomness a training step sees, as pure functions of (seed, step, sample): the data order, uniform
    draws per purpose (MAE masking noise, flips) and the seed of dropout's default generator. Every process of a
    job draws the global batch's values and keeps its own rows, so 1 and N processes take the same steps.
    Values are drawn a chunk of steps at a time (one copy to the device per chunk); each step keeps its own
    generator, so they do not depend on the chunking.

    A Run makes one with `Draws(seed, batch_size, steps, rank, world, device)`; `supplied_draws` hands a run other
    draws (the golden tests replay the release's noise, flips and data order through main())."""

    def __init__(self, seed: int, global_batch: int, steps: int, rank: int, world: int, device: torch.device):
        self.seed, self.global_batch, self.steps = seed, global_batch, steps
        self.rank, self.world, self.device = rank, world, device
        self.local_batch = global_batch // world
        self._order, self._uniform = {}, {}

    def indices(self, n: int, step: int) -> torch.Tensor:
        """(B_local,) positions in a dataset of n items: this process's part of step `step`'s global batch."""
        if n not in self._order:
            sampler = StepSampler(n, self.global_batch, self.seed, 0, self.steps, self.rank, self.world)
            self._order[n] = _DrawnAhead(sampler.indices, self.device, self.steps)
        return self._order[n][step]

    def uniform(self, step: int, stream: int, *shape: int) -> torch.Tensor:
        """This process's rows (B_local, *shape) of a (global_batch, *shape) uniform tensor drawn from
        (seed, stream, step)."""
        if (stream, shape) not in self._uniform:
            def draw(start: int, stop: int) -> torch.Tensor:  # (stop - start, B_local, *shape)
                rows = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
                return torch.stack([torch.rand(self.global_batch, *shape, generator=generator(self.seed, stream, s))[rows]
                                    for s in range(start, stop)])
            self._uniform[(stream, shape)] = _DrawnAhead(draw, self.device, self.steps)
        return self._uniform[(stream, shape)][step]

    def dropout_seed(self, step: int) -> int:
        """The default generator's seed for step `step` (GlobalBatchDropout draws from it)."""
        return _mix(self.seed, STREAM_DROPOUT, step)


_supplied_draws = []  # a stack of factories (args, rank, world, device) -> Draws, innermost last


@contextlib.contextmanager
def supplied_draws(make):
    """Runs created inside this block take their per-step randomness from `make(args, rank, world, device)`
    (an object with Draws' three methods) instead of Draws: the one seam for replaying given noise, flips and
    data order through a stage's main() (tests/test_golden.py). Nothing else about the run changes."""
    _supplied_draws.append(make)
    try:
        yield
    finally:
        _supplied_draws.remove(make)


# ----------------------------------------------------------------------------- optimizer and schedule

def param_groups(model: torch.nn.Module, weight_decay: float, no_decay) -> list[dict]:
    """Two AdamW groups: `no_decay(name, param)` selects the parameters without weight decay.
    Frozen parameters (the MAE's fixed sin-cos position embeddings) are left out."""
    decay, no = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device,
          static: bool = False) -> torch.optim.AdamW:
    """AdamW, fused on CUDA. static (--cuda_graph): the learning rate is a tensor the schedule fills in
    place, and on CUDA the step is capturable (its state stays on the device), so a captured graph reads
    the current rate. On CPU the tensor is float64, so the update equals the one from a Python float."""
    if not static:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")
    cuda = device.type == "cuda"
    lr_tensor = torch.tensor(lr, dtype=torch.float32 if cuda else torch.float64, device=device)
    return torch.optim.AdamW(groups, lr=lr_tensor, betas=betas, fused=cuda, capturable=cuda)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over warmup_steps, then linear decay to 0 at total_steps
    (transformers' get_linear_schedule_with_warmup)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- one run

STATE_FILE = "train_state.pt"
RECORD_FILE = "args.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
# Flags that change how a run is executed or reported, not what it computes, and the flags that only say where
# the run directory is (we are in it): a resumed or re-run run may differ in them. Every start is in the history.
RUN_CONTROL_FLAGS = {"workers", "log_every", "save_every", "plot", "overwrite", "device", "teacher_device",
                     "save_model", "compile", "precision", "data_cache", "output_dir", "results_dir"}
# Flags added after runs were already being recorded: a record without one ran as its default does.
LATER_FLAG_DEFAULTS = {"cuda_graph": False}
_TEMPORARY = re.compile(r"\.tmp\d+$")  # write_json / atomic_torch_save's files before their rename


def resolve_device(requested: str, local_rank: int) -> torch.device:
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


_held_locks: dict[str, int] = {}  # lock file -> descriptor, for the run directories this process holds


def lock_run_dir(path: str) -> str:
    """Create run directory `path` if needed and hold an exclusive lock on it (its LOCK_FILE) until
    unlock_run_dir or the end of the process. An flock dies with its process, so a killed run (even kill -9)
    leaves no stale lock. A process that already holds the lock keeps it (main() called again in one
    process after an exception, as tests do). Returns the lock file's path."""
    lock_path = os.path.abspath(os.path.join(path, LOCK_FILE))
    fd = _held_locks.get(lock_path)
    if fd is not None:
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return lock_path
        except OSError:
            pass
        unlock_run_dir(lock_path)  # the directory was removed or replaced under us
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write to the run directory {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UserError(f"cannot lock the run directory {path}: {e.strerror or e}") from None
        raise RunFailed(f"{path} is in use by another run ({holder or 'pid unknown'}); wait for it to end or "
                        f"stop it, or pass --output_dir for a separate run") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
    _held_locks[lock_path] = fd
    return lock_path


def unlock_run_dir(lock_path: str) -> None:
    fd = _held_locks.pop(lock_path, None)
    if fd is not None:
        os.close(fd)  # releases the flock


def _read_record(path: str) -> dict:
    """A run record (args.json, or finetune's result file, which holds the record too)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the run record {path} ({type(e).__name__}: {e}); nothing was changed; "
                        f"--overwrite moves this run aside and starts again") from None
    if not isinstance(record, dict) or not isinstance(record.get("args"), dict):
        raise UserError(f"{path} is not a run record (no 'args'); nothing was changed; --overwrite moves this run "
                        f"aside and starts again")
    return record


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line a kill cut short (or no line at all) counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Run:
    """Everything about one training run that is not the method: processes, device, precision,
    data batches, the optimizer step, metrics, resumable state and the run record.

        run = Run(args, out_dir, stage, done_file, preprocessing)  # processes, device, seed; reads, writes nothing
        if run.already_done: return                              # done_file exists, same arguments: never redo
        model = run.prepare(model, optimizer, scheduler)         # lock the directory; record; resume; DDP; compile
        for step, (images, labels, indices) in run.batches(dataset):
            run.train_step(step, objective, images, ...)           # objective under autocast, then run.step
        run.finish()                                             # after the stage wrote done_file

    A finished run (done_file) or an unfinished one (train_state.pt) with other arguments is refused, naming
    the argument; --overwrite moves whatever the directory holds aside (<out_dir>.old-<time>) and starts again.
    """

    def __init__(self, args, out_dir: str, stage: str, done_file: str, preprocessing):
        self.args, self.out_dir, self.stage, self.done_file = args, out_dir, stage, done_file
        self.preprocessing = preprocessing  # models.Preprocessing: resize filter, mean, std
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = resolve_device(args.device, self.local_rank)
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if args.batch_size % self.world:
            raise UserError(f"--batch_size {args.batch_size} is the global batch and must divide evenly over "
                            f"{self.world} processes")
        self.local_batch = args.batch_size // self.world
        precision = args.precision if args.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.precision = precision
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                          enabled=precision == "bf16")
        self.mean = torch.tensor(preprocessing.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing.std, device=self.device).view(1, 3, 1, 1)
        self.is_main = self.rank == 0
        self.start_step = 0
        self.model = self.optimizer = self.scheduler = None
        self._params = []
        self.state_path = os.path.join(out_dir, STATE_FILE)
        self.record_path = os.path.join(out_dir, RECORD_FILE)
        self._lock_path = None
        self._record = self._resumed_record = None
        torch.manual_seed(_mix(args.seed, self.rank))  # new heads, anything built before the loop
        make = _supplied_draws[-1] if _supplied_draws else (
            lambda a, rank, world, device: Draws(a.seed, a.batch_size, a.steps, rank, world, device))
        self.draws = make(args, self.rank, self.world, self.device)
        # Checked here, before the stage loads anything, and again under the lock in prepare().
        self.already_done = not args.overwrite and self._finished()
        if self.already_done:
            self.print(f"[{stage}] already complete: {done_file} (same arguments; --overwrite moves it aside "
                       f"and runs again)")
            return
        if not args.overwrite:
            self._check_resume()

    # -- records
    def _start_entry(self) -> dict:
        """Who runs from which step, how: one entry of the record's history per (re)start."""
        return {"stage": self.stage, "args": vars(self.args), "command": sys.argv, "git_commit": git_commit(),
                "versions": library_versions(), "device": self.device_name(), "host": platform.node(),
                "world_size": self.world, "precision": self.precision,
                "preprocessing": dataclasses.asdict(self.preprocessing),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "start_step": self.start_step}

    def record(self) -> dict:
        """The run record (args.json): the first start's entry at the top level, every start in "history"."""
        return self._record

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return platform.processor() or platform.machine()

    def print(self, *a) -> None:
        if self.is_main:
            print(*a, flush=True)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _differences(self, before: dict) -> str:
        """'flag: value there, value now' for each argument that changes what the run computes ('' if none)."""
        now = json.loads(json.dumps(vars(self.args), default=str))
        before = {**LATER_FLAG_DEFAULTS, **before}
        return "; ".join(f"{k}: {before.get(k, '(not recorded)')!r} there, {now[k]!r} now" for k in now
                         if k not in RUN_CONTROL_FLAGS and before.get(k, "(not recorded)") != now[k])

    def _finished(self) -> bool:
        """Whether done_file exists; a finished run with other arguments is refused (never reported as this one)."""
        if not os.path.exists(self.done_file):
            return False
        candidates = (self.done_file, self.record_path) if self.done_file.endswith(".json") else (self.record_path,)
        path = next((p for p in candidates if os.path.exists(p)), None)
        if path is None:
            return True  # a finished directory we did not write (no record): nothing to compare
        differences = self._differences(_read_record(path)["args"])
        if differences:
            raise UserError(f"{self.done_file} is a finished run with other arguments ({differences}); pass "
                            f"--overwrite to move it aside and run again, or --output_dir for a new run")
        return True

    def _check_resume(self) -> None:
        if not os.path.exists(self.state_path):
            return
        if not os.path.exists(self.record_path):
            raise UserError(f"{self.state_path} has no {RECORD_FILE} beside it, so it cannot be told whether it is "
                            f"this run; nothing was changed; --overwrite moves it aside and starts again")
        record = _read_record(self.record_path)
        differences = self._differences(record["args"])
        if differences:
            raise UserError(f"{self.out_dir} holds an unfinished run with other arguments ({differences}); pass "
                            f"the same arguments to resume it, --overwrite to move it aside and start again, or "
                            f"--output_dir for a new run")
        self._resumed_record = record

    # -- the run directory: lock, --overwrite, leftovers
    def _take_directory(self) -> None:
        """Rank 0: lock out_dir; with --overwrite move what is there aside; remove a killed run's temporary files."""
        self._lock_path = lock_run_dir(self.out_dir)
        if self.args.overwrite:
            self._move_aside()
        leftovers = [os.path.join(self.out_dir, n) for n in os.listdir(self.out_dir) if _TEMPORARY.search(n)]
        if not self._done_file_inside():
            folder, name = os.path.split(os.path.abspath(self.done_file))
            leftovers += [os.path.join(folder, n) for n in os.listdir(folder)
                          if n.startswith(name + ".tmp") and _TEMPORARY.search(n)]
        for path in leftovers:  # we hold the lock: their writer is dead
            os.remove(path)
        if leftovers:
            self.print(f"[{self.stage}] removed {len(leftovers)} temporary file(s) of an interrupted run")

    def _done_file_inside(self) -> bool:
        return os.path.dirname(os.path.abspath(self.done_file)) == os.path.abspath(self.out_dir)

    def _move_aside(self) -> None:
        """--overwrite: rename the run directory (and a done_file beside it) to <out_dir>.old-<time>[.json],
        before anything new is written; nothing is deleted."""
        base = os.path.normpath(self.out_dir)
        beside = None if self._done_file_inside() or not os.path.exists(self.done_file) else self.done_file
        suffix = os.path.normpath(beside)[len(base):] if beside else ""  # finetune: ".json"
        contents = [n for n in os.listdir(base) if n != LOCK_FILE]
        if not contents and beside is None:
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside, i = f"{base}.old-{stamp}", 2
        while os.path.exists(aside) or os.path.exists(aside + suffix):
            aside, i = f"{base}.old-{stamp}-{i}", i + 1
        moved = []
        if contents:  # the directory first: a kill between the two renames leaves the done_file, still true
            old_lock = _held_locks.pop(self._lock_path)
            os.rename(base, aside)
            try:
                self._lock_path = lock_run_dir(self.out_dir)
            finally:
                os.close(old_lock)
            moved.append(aside)
        if beside:
            os.rename(beside, aside + suffix)
            moved.append(aside + suffix)
        self.print(f"[{self.stage}] --overwrite: moved the previous run to {' and '.join(moved)}")

    # -- model, optimizer, resume
    def prepare(self, model: torch.nn.Module, optimizer, scheduler) -> torch.nn.Module:
        """Lock the run directory, write the run record, move to the device, load the latest training state
        if there is one, draw dropout masks for the global batch, wrap for DDP / compile. Nothing is written
        to disk before this point."""
        if self.is_main:
            self._take_directory()
        self._barrier()
        # Under the lock: another run may have finished, or saved a state, since __init__ looked.
        if self._finished():
            raise UserError(f"{self.done_file} was completed by another run while this one was starting; "
                            f"nothing was written")
        self._check_resume()
        model.to(self.device)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._params = [p for p in model.parameters() if p.requires_grad]
        if os.path.exists(self.state_path):
            self._load_state()
        self._write_record()
        self._open_metrics()
        self._first_bad = torch.zeros((), dtype=torch.int64, device=self.device)  # 0: no non-finite loss yet
        use_global_batch_dropout(model, self.rank, self.world)
        if self.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.args.compile:
            model = torch.compile(model)
        return model

    def _load_state(self) -> None:
        try:
            state = torch.load(self.state_path, map_location=self.device, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.start_step = int(state["step"])
        except Exception as e:  # a damaged file fails in torch.load with many exception types
            reason = _one_line(e) if str(e).strip() else type(e).__name__
            raise UserError(f"cannot resume: {self.state_path} is unreadable ({reason[:200]}); nothing was changed; "
                            f"--overwrite moves this run aside and starts again") from None
        self.print(f"[{self.stage}] resuming from step {self.start_step} ({self.state_path})")

    def _write_record(self) -> None:
        """args.json: a fresh run's record, or the resumed run's with this start appended to its history."""
        entry = self._start_entry()
        if self.start_step > 0 and self._resumed_record is not None:
            record = self._resumed_record
            history = record.get("history") or [dict(record, start_step=0)]  # a record from before histories
            record["history"] = [*history, entry]
        else:
            record = {k: v for k, v in entry.items() if k != "start_step"}
            record["history"] = [entry]
        self._record = json.loads(json.dumps(record, default=str))
        if self.is_main:
            write_json(self.record_path, self._record)

    def save_state(self, step: int) -> None:
        """Everything needed to continue after `step` steps (randomness is recomputed from the seed)."""
        if self.is_main:
            atomic_torch_save({"step": step, "model": self.model.state_dict(),
                               "optimizer": self.optimizer.state_dict(),
                               "scheduler": self.scheduler.state_dict()}, self.state_path)
        self._barrier()

    # -- data
    def batches(self, dataset):
        """(step, (images, labels, indices)) for the remaining steps: images (B_local, 3, H, W) normalised on
        the device, labels (B_local,) and the batch's positions in `dataset` (B_local,) on the device.

        With --data_cache auto the split is decoded once (data/cache.py) and batches are gathered from it by
        index; otherwise DataLoader workers decode and resize every batch. Both give the same batches. The
        indices of a chunk of steps are drawn at once (the same values as StepSampler's, step by step)."""
        store = self._decoded(dataset)
        if store is None:  # the workers decode each step's batch: the sampler yields this process's indices
            order = _StepOrder(self.draws, len(dataset), self.start_step, self.args.steps)
            loader = iter(self._loader(dataset, batch_sampler=order))
        for step in range(self.start_step, self.args.steps):
            index = self.draws.indices(len(dataset), step)  # (B_local,)
            images, labels = next(loader) if store is None else store.gather(index)
            # dropout (GlobalBatchDropout, the only draws from the default generator): a function of (seed, step)
            torch.manual_seed(self.draws.dropout_seed(step))
            yield step, (self.normalize(images), labels.to(self.device, non_blocking=True), index)

    def _loader(self, dataset, **kw):
        workers = self.args.workers
        return torch.utils.data.DataLoader(
            dataset, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None, **kw)

    def eval_batches(self, dataset):
        """This process's share of a dataset, in order, for evaluation."""
        indices = torch.arange(self.rank, len(dataset), self.world)
        store = self._decoded(dataset)
        if store is None:
            loader = self._loader(torch.utils.data.Subset(dataset, indices.tolist()), batch_size=self.local_batch)
            for images, labels in loader:
                yield self.normalize(images), labels.to(self.device, non_blocking=True)
            return
        for index in indices.to(self.device).split(self.local_batch):
            images, labels = store.gather(index)
            yield self.normalize(images), labels.to(self.device, non_blocking=True)

    def ordered_batches(self, dataset):
        """(indices, images) over the whole of `dataset` in order (every process gets all of it), in batches
        of B_local, the training steps' shape: the last batch is filled up with the first images, and
        `indices` names its real rows, which come first. For tables computed once per image."""
        n, b = len(dataset), self.local_batch
        order = torch.arange(-(-n // b) * b) % n  # whole batches
        store = self._decoded(dataset)
        loader = (iter(self._loader(torch.utils.data.Subset(dataset, order.tolist()), batch_size=b))
                  if store is None else None)
        for start, rows in zip(range(0, len(order), b), order.to(self.device).split(b)):
            images = next(loader)[0] if store is None else store.gather(rows)[0]
            yield rows[:n - start], self.normalize(images)

    def _decoded(self, dataset):
        """The decode-once copy of `dataset` (a data.ImageDataset or a Subset of one), or None: streaming."""
        if self.args.data_cache == "off":
            return None
        base, positions = dataset, None
        if isinstance(dataset, torch.utils.data.Subset):
            base, positions = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.int64)
        if id(base) not in self._decoded_splits:
            self._decoded_splits[id(base)] = (base, self._decode_split(base))  # base kept: its id stays unique
        split = self._decoded_splits[id(base)][1]
        if split is None:
            return None
        images, labels = split
        return _DecodedSplit(images, labels, None if positions is None else positions.to(images.device))

    @functools.cached_property
    def _decoded_splits(self) -> dict:
        return {}

    def _decode_split(self, dataset):
        from data import cache
        name = f"{getattr(dataset, 'name', type(dataset).__name__)} {getattr(dataset, 'split', '')}".strip()
        size = getattr(dataset, "image_size", None) or dataset[0][0].shape[-1]
        need = cache.split_bytes(len(dataset), size)
        if self.rank != 0:  # process 0 decodes and writes the disk copy first; the others then read it
            self._barrier()
        try:
            if need > cache.RAM_FRACTION * cache.available_ram():
                self.print(f"[{self.stage}] note: {name} decoded takes {need / 2**30:.1f} GiB, more than "
                           f"{cache.RAM_FRACTION:.0%} of the available memory: streaming it through the workers")
                return None
            start = time.perf_counter()
            images, labels, how = cache.load_or_decode(dataset, self.args.workers, write=self.is_main,
                                                       notice=self.print)
            where = "CPU memory"
            if self.device.type == "cuda":
                labels = labels.to(self.device)
                if need <= cache.GPU_FRACTION * torch.cuda.mem_get_info(self.device)[0]:
                    images, where = images.to(self.device), "the GPU"
            self.print(f"[{self.stage}] {name}: {len(dataset)} images {how} ({need / 2**20:.0f} MiB in {where}, "
                       f"{time.perf_counter() - start:.1f} s)")
            return images, labels
        finally:
            if self.rank == 0:
                self._barrier()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float, scaled to [0, 1] and normalised with the model's mean/std."""
        images = images.to(self.device, non_blocking=True).float().div_(255)
        return (images - self.mean) / self.std

    def global_rand(self, step: int, stream: int, *shape: int) -> torch.Tensor:
        """This process's rows of a (global_batch, *shape) uniform tensor drawn from (seed, stream, step)."""
        return self.draws.uniform(step, stream, *shape)

    def masking_noise(self, step: int, num_patches: int) -> torch.Tensor:
        """MAE masking noise (B_local, N): the patches with the smallest values stay visible."""
        return self.global_rand(step, STREAM_NOISE, num_patches)

    # -- the optimizer, the step, metrics, saving
    def adamw(self, model: torch.nn.Module, no_decay, betas: tuple[float, float]):
        """The stage's AdamW (no weight decay where `no_decay(name, param)`) and its linear schedule."""
        args = self.args
        if args.cuda_graph and self.world > 1:
            raise UserError("--cuda_graph runs in one process only; a torchrun job takes the eager step "
                            "(drop --cuda_graph)")
        if args.cuda_graph and args.compile:
            raise UserError("--cuda_graph and --compile do not combine; pass one of them")
        optimizer = adamw(param_groups(model, args.weight_decay, no_decay), args.lr, betas, self.device,
                          static=args.cuda_graph)
        return optimizer, linear_schedule(optimizer, args.warmup_steps, args.steps)

    def train_step(self, step: int, objective, *inputs: torch.Tensor) -> None:
        """One step of training: (loss, terms) = objective(*inputs) under autocast, then Run.step. With
        --cuda_graph the same computation runs on static copies of the inputs (StaticStep)."""
        if self.args.cuda_graph:
            if self._static_step is None:
                self._static_step = StaticStep(self, objective, inputs)
            self._static_step(step, inputs)
            return
        with self.autocast():
            loss, terms = objective(*inputs)
        self.step(step, loss, **terms)

    _static_step = None

    def step(self, step: int, loss: torch.Tensor, **terms: torch.Tensor) -> None:
        """Backward, clip, optimizer and schedule step; then log and save as asked.

        The loss is checked for NaN/inf on the device every step, but read back (a CPU-GPU sync) only at
        logging and saving steps, so the GPU never waits; a non-finite step is never saved."""
        self._first_bad = torch.where(torch.isfinite(loss.detach()) | (self._first_bad > 0),
                                      self._first_bad, step + 1)
        loss.backward()
        grad_norm = None
        if self.args.clip_grad is not None or self._logging(step + 1):  # the norm costs a pass over the gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self._max_norm())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._end_step(step + 1, loss, grad_norm, terms)

    def _max_norm(self) -> float:
        return self.args.clip_grad if self.args.clip_grad is not None else float("inf")

    def _logging(self, done: int) -> bool:
        return done % self.args.log_every == 0 or done == self.args.steps

    def _end_step(self, done: int, loss, grad_norm, terms: dict) -> None:
        logging = self._logging(done)
        saving = self.args.save_every and done % self.args.save_every == 0 and done < self.args.steps
        if logging or saving:
            self._check_finite()
        if logging:
            self._log(done, loss=loss, grad_norm=grad_norm, **terms)
        if saving:
            self.save_state(done)

    def _check_finite(self) -> None:
        first_bad = self._first_bad.clone()
        if self.world > 1:  # every process stops together, naming the earliest bad step
            first_bad = torch.where(first_bad > 0, first_bad, torch.iinfo(torch.int64).max)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            first_bad = torch.where(first_bad == torch.iinfo(torch.int64).max, 0, first_bad)
        if first_bad.item() > 0:
            last = (f"the last good state is {self.state_path}" if os.path.exists(self.state_path)
                    else "no state was saved (see --save_every)")
            raise RunFailed(f"the loss is not finite at step {first_bad.item()} (lower --lr, or check the data); "
                            f"nothing after it was saved; {last}")

    def _open_metrics(self) -> None:
        self.metrics_path = os.path.join(self.out_dir, METRICS_FILE)
        if self.is_main and os.path.exists(self.metrics_path):
            # drop lines past the resumed step (a killed run may have logged beyond its last state)
            with open(self.metrics_path) as f:
                kept = [line for line in f if _logged_step(line) <= self.start_step]
            with open(self.metrics_path, "w") as f:
                f.writelines(kept)
        self._progress = None
        if self.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            self._progress = tqdm(total=self.args.steps, initial=self.start_step, desc=self.stage, dynamic_ncols=True)
        self._clock = (time.perf_counter(), self.start_step)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _log(self, done: int, **terms) -> None:
        now = time.perf_counter()
        last_time, last_step = self._clock
        self._clock = (now, done)
        # the learning rate step `done` used (the scheduler has already moved on to the next one)
        entry = {"step": done, "lr": float(self.scheduler.base_lrs[0]) * self.scheduler.lr_lambdas[0](done - 1)}
        values = torch.stack([v.detach().float() for v in terms.values()])
        if self.world > 1:  # the mean over processes (grad_norm is already the same everywhere)
            dist.all_reduce(values)
            values /= self.world
        entry.update(zip(terms, values.tolist()))
        entry["images_per_s"] = (done - last_step) * self.args.batch_size / max(now - last_time, 1e-9)
        entry["peak_mem_mb"] = self.peak_memory_mb()
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self._progress is not None:
            self._progress.update(done - self._progress.n)
            self._progress.set_postfix(loss=f"{entry['loss']:.4f}", img_s=f"{entry['images_per_s']:.1f}")
        else:
            remaining = (self.args.steps - done) * self.args.batch_size / max(entry["images_per_s"], 1e-9)
            parts = " ".join(f"{k} {entry[k]:.4f}" for k in terms if k != "grad_norm")
            print(f"[{self.stage}] step {done}/{self.args.steps} {parts} lr {entry['lr']:.3g} "
                  f"{entry['images_per_s']:.1f} img/s eta {datetime.timedelta(seconds=round(remaining))}",
                  flush=True)

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS

    def finish(self) -> None:
        """Drop the resumable state, draw the curves if asked, release the directory. Call it after the stage
        wrote done_file: a kill before this point leaves the state to resume from, or the finished result."""
        if self._progress is not None:
            self._progress.close()
        if self.is_main:
            if os.path.exists(self.state_path):
                os.remove(self.state_path)
            if self.args.plot:
                from tools.plots import plot_metrics
                plot_metrics(self.metrics_path, os.path.join(self.out_dir, "loss_curves.png"))
        self._barrier()
        if self._lock_path:
            unlock_run_dir(self._lock_path)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()


class _StepOrder(torch.utils.data.Sampler):
    """A DataLoader batch sampler yielding draws.indices(n, step) for steps start .. stop-1 (as lists)."""

    def __init__(self, draws, n: int, start: int, stop: int):
        self.draws, self.n, self.start, self.stop = draws, n, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.draws.indices(self.n, step).tolist()

    def __len__(self):
        return max(0, self.stop - self.start)


class _DrawnAhead:
    """Per-step values drawn a chunk of steps at a time: draw(start, stop) gives the rows of steps
    start .. stop-1 on the CPU, moved to the device in one copy (from pinned memory on CUDA), so the loop
    neither draws nor copies at most steps."""

    CHUNK_STEPS = 64

    def __init__(self, draw, device: torch.device, steps: int):
        self.draw, self.device, self.steps = draw, device, steps
        self.start, self.rows = 0, None

    def __getitem__(self, step: int) -> torch.Tensor:
        if self.rows is None or not self.start <= step < self.start + len(self.rows):
            rows = self.draw(step, max(step + 1, min(step + self.CHUNK_STEPS, self.steps)))
            if self.device.type == "cuda":
                rows = rows.pin_memory()
            self.start, self.rows = step, rows.to(self.device, non_blocking=True)
        return self.rows[step - self.start]


class _DecodedSplit:
    """A decoded split (data/cache.py) and, for a Subset, its positions in the split: batches by index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None):
        self.images, self.labels, self.positions = images, labels, positions

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) positions in the dataset -> (B, 3, S, S) uint8 images and (B,) labels."""
        index = index.to(self.images.device)
        if self.positions is not None:
            index = self.positions[index]
        return self.images[index], self.labels[index.to(self.labels.device)]


class StaticStep:
    """Run.train_step for --cuda_graph (experimental, not yet run on a GPU): the whole step — forward
    under autocast, the non-finite flag, backward, clipping, AdamW — reads its inputs from static buffers
    that every call copies into. On CUDA, after WARMUP_STEPS steps on a side stream, it is captured in
    one CUDA graph and replayed; the schedule fills the learning-rate tensor between replays (see
    utils.adamw). On CPU the same static-buffer step runs without capture, so CPU tests cover its logic.

    What a capture needs (seen working on torch 2.11 with plain transformers models on an H200): capturable fused
    AdamW, autocast without its weight cache, gradients zeroed in place (not set to None), clipping inside
    the graph, inputs copied into static tensors rather than rebound."""

    WARMUP_STEPS = 3

    def __init__(self, run: Run, objective, inputs):
        self.run, self.objective = run, objective
        self.inputs = [x.detach().clone() for x in inputs]
        self.done = torch.zeros((), dtype=torch.int64, device=run.device)  # step + 1, for the non-finite flag
        self.max_norm = run._max_norm()
        self.capture = run.device.type == "cuda"
        self.calls, self.graph, self.outputs = 0, None, None

    def _body(self) -> None:
        run = self.run
        with run.autocast(cache_enabled=False):
            loss, terms = self.objective(*self.inputs)
        run._first_bad.copy_(torch.where(torch.isfinite(loss.detach()) | (run._first_bad > 0),
                                         run._first_bad, self.done))
        loss.backward()
        # always computed (the graph is the same every step); clipping at an infinite norm multiplies by 1
        grad_norm = torch.nn.utils.clip_grad_norm_(run._params, self.max_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=False)
        self.outputs = loss.detach(), grad_norm, {k: v.detach() for k, v in terms.items()}

    def __call__(self, step: int, inputs) -> None:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        self.done.fill_(step + 1)
        if not self.capture:
            self._body()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls < self.WARMUP_STEPS:  # real steps, on a side stream, before the capture
            side = torch.cuda.Stream(self.run.device)
            side.wait_stream(torch.cuda.current_stream(self.run.device))
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream(self.run.device).wait_stream(side)
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()
            self.graph.replay()  # the capture only recorded this step
        self.calls += 1
        self.run.scheduler.step()
        loss, grad_norm, terms = self.outputs
        self.run._end_step(step + 1, loss, grad_norm, terms)
