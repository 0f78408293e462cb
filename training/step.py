"""The optimizer step, written once for the three stages: AdamW and its linear schedule; one step = the stage's
objective under autocast (dropout seeded for the step), backward, gradient clipping, AdamW, the schedule, and a
non-finite flag kept on the device. `StaticStep` is the same step on static buffers, captured in one CUDA graph
(--cuda_graph)."""
import torch

from errors import UserError


# ----------------------------------------------------------------------------- AdamW and the schedule

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


def optimizer_and_schedule(model, args, process, no_decay, betas):
    """A stage's AdamW (args.lr, args.weight_decay except where `no_decay(name, param)`) and its linear
    schedule over args.steps after args.warmup_steps."""
    if args.cuda_graph and process.world > 1:
        raise UserError("--cuda_graph runs in one process only; a torchrun job takes the eager step "
                        "(drop --cuda_graph)")
    if args.cuda_graph and args.compile:
        raise UserError("--cuda_graph and --compile do not combine; pass one of them")
    optimizer = adamw(param_groups(model, args.weight_decay, no_decay), args.lr, betas, process.device,
                      static=args.cuda_graph)
    return optimizer, linear_schedule(optimizer, args.warmup_steps, args.steps)


def step_lr(lr: float, scheduler, step: int) -> float:
    """The learning rate step `step` (1-based) used at peak rate `lr`, whatever the scheduler has moved on to since
    (from the Python float: with --cuda_graph the optimizer's rate is a float32 tensor on the device)."""
    return lr * scheduler.lr_lambdas[0](step - 1)


# ----------------------------------------------------------------------------- one step

class TrainStep:
    """step(step, objective, inputs, dropout_seed, need_norm) -> (loss, grad_norm, terms), after which the
    optimizer and the schedule have stepped. `objective(*inputs)` -> (loss, {name: term to log}) runs under
    the process's autocast. The loss is checked for NaN/inf on the device every step; `first_bad()` reads the
    flag back (a CPU-GPU sync), so the caller does that only at logging and saving steps."""

    def __init__(self, process, model, optimizer, scheduler, clip_grad: float | None):
        self.process, self.optimizer, self.scheduler = process, optimizer, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = clip_grad if clip_grad is not None else float("inf")
        self.clipping = clip_grad is not None
        self.bad = torch.zeros((), dtype=torch.int64, device=process.device)  # step + 1 of the first bad loss; 0: none

    def __call__(self, step: int, objective, inputs, dropout_seed: int, need_norm: bool):
        torch.manual_seed(dropout_seed)  # GlobalBatchDropout's masks: a function of (seed, step)
        with self.process.autocast():
            loss, terms = objective(*inputs)
        self.flag(loss, step)
        loss.backward()
        grad_norm = None
        if self.clipping or need_norm:  # the norm costs a pass over the gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, terms

    def flag(self, loss: torch.Tensor, step) -> None:
        """Remember step + 1 if this is the first non-finite loss (in place: a captured graph keeps it)."""
        self.bad.copy_(torch.where(torch.isfinite(loss.detach()) | (self.bad > 0), self.bad, step + 1))

    def first_bad(self) -> int:
        """The first step (1-based) whose loss was not finite in any process, 0 if none."""
        return self.process.earliest(self.bad.clone())


class StaticStep:
    """TrainStep for --cuda_graph (experimental: this repository's step has not yet run on a GPU): the whole step — forward under
    autocast, the non-finite flag, backward, clipping, AdamW — reads its inputs from static buffers that every
    call copies into. On CUDA, after WARMUP_STEPS steps on a side stream, it is captured in one CUDA graph and
    replayed; the schedule fills the learning-rate tensor between replays (see adamw). On CPU the same
    static-buffer step runs without capture, so CPU tests cover its logic.

    What a capture needs (found by probes of a whole-step capture of plain transformers models on torch 2.11 on an
    H200, BENCHMARKS.md): capturable fused AdamW, autocast without its weight cache, gradients zeroed in place
    (not set to None), clipping inside the graph, inputs copied into static tensors rather than rebound."""

    WARMUP_STEPS = 3

    def __init__(self, eager: TrainStep):
        self.eager, self.device = eager, eager.process.device
        self.objective = self.inputs = None
        self.done = torch.zeros((), dtype=torch.int64, device=self.device)  # step + 1, for the non-finite flag
        self.capture = self.device.type == "cuda"
        self.calls, self.graph, self.outputs = 0, None, None

    def _body(self) -> None:
        eager = self.eager
        with eager.process.autocast(cache_enabled=False):
            loss, terms = self.objective(*self.inputs)
        eager.bad.copy_(torch.where(torch.isfinite(loss.detach()) | (eager.bad > 0), eager.bad, self.done))
        loss.backward()
        # always computed (the graph is the same every step); clipping at an infinite norm multiplies by 1
        grad_norm = torch.nn.utils.clip_grad_norm_(eager.params, eager.max_norm)
        eager.optimizer.step()
        eager.optimizer.zero_grad(set_to_none=False)
        self.outputs = loss.detach(), grad_norm, {k: v.detach() for k, v in terms.items()}

    def __call__(self, step: int, objective, inputs, dropout_seed: int, need_norm: bool):
        if self.inputs is None:
            self.objective, self.inputs = objective, [x.detach().clone() for x in inputs]
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        self.done.fill_(step + 1)
        torch.manual_seed(dropout_seed)
        if not self.capture:
            self._body()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls < self.WARMUP_STEPS:  # real steps, on a side stream, before the capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()
            self.graph.replay()  # the capture only recorded this step
        self.calls += 1
        self.eager.scheduler.step()
        return self.outputs

    def first_bad(self) -> int:
        return self.eager.first_bad()
