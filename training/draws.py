"""What a training step draws at random, as pure functions of (seed, step, sample): the data order, MAE's
masking noise and fine-tuning's flips (uniform draws per purpose), and dropout's seed. Every process of a job
draws the values of the whole global batch and keeps its own rows, so 1 and N processes take the same steps,
and a resumed run needs no saved random-number state."""
import contextlib
import dataclasses
import functools

import torch

from utils import STREAM_DROPOUT, STREAM_ORDER, generator, mix_seed


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


class DrawnAhead:
    """Per-step values drawn a chunk of steps at a time: draw(start, stop) gives the rows of steps
    start .. stop-1 on the CPU, moved to the device in one copy (from pinned memory on CUDA), so the loop
    neither draws nor copies at most steps. `start` is the first step of the chunk held."""

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


class Draws:
    """The randomness a training step sees. Values are drawn a chunk of steps at a time (DrawnAhead); each
    step keeps its own generator, so they do not depend on the chunking.

        draws.indices(n, step)            (B_local,) positions in a dataset of n items
        draws.uniform(step, stream, *s)   (B_local, *s) uniform in [0, 1): masking noise, flips
        draws.dropout_seed(step)          the seed of the default generator for the step's dropout masks

    A Run makes one of these (make_draws); `supplied_draws` hands runs other draws instead."""

    def __init__(self, seed: int, global_batch: int, steps: int, rank: int, world: int, device: torch.device):
        self.seed, self.global_batch, self.steps = seed, global_batch, steps
        self.rank, self.world, self.device = rank, world, device
        self.local_batch = global_batch // world
        self._order, self._uniform = {}, {}

    def indices(self, n: int, step: int) -> torch.Tensor:
        if n not in self._order:
            sampler = StepSampler(n, self.global_batch, self.seed, 0, self.steps, self.rank, self.world)
            self._order[n] = DrawnAhead(sampler.indices, self.device, self.steps)
        return self._order[n][step]

    def uniform(self, step: int, stream: int, *shape: int) -> torch.Tensor:
        """This process's rows of a (global_batch, *shape) uniform tensor drawn from (seed, stream, step)."""
        if (stream, shape) not in self._uniform:
            def draw(start: int, stop: int) -> torch.Tensor:  # (stop - start, B_local, *shape)
                rows = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
                drawn = [torch.rand(self.global_batch, *shape, generator=generator(self.seed, stream, s))[rows]
                         for s in range(start, stop)]
                return torch.stack(drawn)
            self._uniform[(stream, shape)] = DrawnAhead(draw, self.device, self.steps)
        return self._uniform[(stream, shape)][step]

    def dropout_seed(self, step: int) -> int:
        return mix_seed(self.seed, STREAM_DROPOUT, step)


@dataclasses.dataclass(frozen=True)
class DrawInputs:
    """What a run's draws follow from: the seed, the global batch size and the number of steps (--seed,
    --batch_size, --steps)."""
    seed: int
    batch_size: int
    steps: int


_supplied = []  # factories (inputs, rank, world, device) -> draws, the innermost supplied_draws block last


@contextlib.contextmanager
def supplied_draws(make):
    """Runs created inside this block take their per-step randomness from what `make(inputs, rank, world, device)`
    returns (inputs: DrawInputs), an object with Draws' three methods, instead of Draws: the one seam for
    replaying given masking noise, flips and data order through a stage's main() (tests/test_golden.py replays
    the release's), or for observing and cutting a run at a step (tests/helpers.cut_at). Nothing else about the
    run changes."""
    _supplied.append(make)
    try:
        yield
    finally:
        _supplied.remove(make)


def make_draws(inputs: DrawInputs, rank: int, world: int, device: torch.device):
    """The draws of a run: Draws, or what a supplied_draws block hands in."""
    if _supplied:
        return _supplied[-1](inputs, rank, world, device)
    return Draws(inputs.seed, inputs.batch_size, inputs.steps, rank, world, device)


class GlobalBatchDropout(torch.nn.Module):
    """nn.Dropout whose mask is drawn for the whole global batch and sliced to the rows running here, so the
    mask of a sample depends on (seed, step, its place in the global batch), not on the number of processes or
    of micro-batches. Draws from the default generator, which the step seeds with Draws.dropout_seed(step) before
    each forward; every process makes the same draws in the same order. x: (b, ...), micro-batch `micro` of the
    `accum_steps` micro-batches of this process's rows (Run.forward sets `micro`); b = B / (world · accum_steps)."""

    def __init__(self, p: float, rank: int, world: int, accum_steps: int = 1):
        super().__init__()
        self.p, self.rank, self.world, self.accum_steps = p, rank, world, accum_steps
        self.micro = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        b, part = x.shape[0], self.rank * self.accum_steps + self.micro  # rows part·b .. (part+1)·b of the batch
        noise = torch.rand(b * self.world * self.accum_steps, *x.shape[1:], device=x.device)[part * b:(part + 1) * b]
        return x * (noise >= self.p) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, rank={self.rank}, world={self.world}, accum_steps={self.accum_steps}"


def use_global_batch_dropout(model: torch.nn.Module, rank: int, world: int,
                             accum_steps: int = 1) -> list[GlobalBatchDropout]:
    """Replace every active nn.Dropout of `model` by GlobalBatchDropout (no parameters: the state dict is unchanged);
    -> the replacements, whose `micro` the run sets before each micro-batch's forward."""
    replaced = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.Dropout and child.p > 0:
                replaced.append(GlobalBatchDropout(child.p, rank, world, accum_steps))
                setattr(parent, name, replaced[-1])
    return replaced
