"""The optimizer step, written once for the three stages: AdamW and its linear schedule, and `TrainStep`, what a
step does after the stage's forward -- backward, gradient clipping, AdamW, a non-finite flag kept on the device.
Run.step calls it, eagerly or inside the CUDA graph of --cuda_graph (training/cuda_graph.py)."""
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
          static: bool = False, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW, fused on CUDA. static (--cuda_graph): the learning rate is a tensor the schedule fills in
    place, and on CUDA the step is capturable (its state stays on the device), so a captured graph reads
    the current rate. On CPU the tensor is float64, so the update equals the one from a Python float."""
    if not static:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")
    cuda = device.type == "cuda"
    lr_tensor = torch.tensor(lr, dtype=torch.float32 if cuda else torch.float64, device=device)
    # a group's own rate (layer decay) is a tensor too: a captured graph reads each group's current rate
    groups = [{**g, "lr": lr_tensor.new_tensor(g["lr"])} if "lr" in g else g for g in groups]
    return torch.optim.AdamW(groups, lr=lr_tensor, betas=betas, eps=eps, fused=cuda, capturable=cuda)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over warmup_steps, then linear decay to 0 at total_steps
    (transformers' get_linear_schedule_with_warmup)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_and_schedule(model, args, process, no_decay, betas, groups=None, schedule=linear_schedule,
                           eps: float = 1e-8):
    """A stage's AdamW (args.lr, args.weight_decay except where `no_decay(name, param)`, or the given `groups`) and
    its schedule (linear_schedule, or another of the same signature) over args.steps after args.warmup_steps."""
    if args.cuda_graph and process.world > 1:
        raise UserError("--cuda_graph runs in one process only; a torchrun job takes the eager step "
                        "(drop --cuda_graph)")
    if args.cuda_graph and args.compile:
        raise UserError("--cuda_graph and --compile do not combine; pass one of them")
    if args.cuda_graph and (args.accum_steps > 1 or args.grad_checkpointing):
        # a captured step cannot seed dropout again for each micro-batch, and checkpointing's recomputation
        # reads and restores the random-number state, which a capture does not allow
        raise UserError(f"--cuda_graph does not combine with "
                        f"{'--accum_steps > 1' if args.accum_steps > 1 else '--grad_checkpointing'}; pass one of them")
    if groups is None:
        groups = param_groups(model, args.weight_decay, no_decay)
    optimizer = adamw(groups, args.lr, betas, process.device, static=args.cuda_graph, eps=eps)
    return optimizer, schedule(optimizer, args.warmup_steps, args.steps)


def step_lr(lr: float, scheduler, step: int) -> float:
    """The learning rate step `step` (1-based) used at peak rate `lr`, whatever the scheduler has moved on to since
    (from the Python float: with --cuda_graph the optimizer's rate is a float32 tensor on the device)."""
    return lr * scheduler.lr_lambdas[0](step - 1)


# ----------------------------------------------------------------------------- one update

class TrainStep:
    """update(loss, need_norm) -> grad_norm: the device work of a step after the backward passes of its
    micro-batches (Run.backward) -- the non-finite flag, gradient clipping, AdamW, the gradients cleared -- written
    once for the eager step and the captured one. The schedule steps on the host after it (Run.step), outside any
    graph.

    The loss is checked for NaN/inf on the device every step: `bad` keeps step + 1 of the first non-finite loss,
    counted by `done` on the device (a captured graph replays the count), and `first_bad()` reads it back (a
    CPU-GPU sync), so the caller does that only at logging and saving steps.

    static (--cuda_graph, training/cuda_graph.py): what a capture needs -- the gradients zeroed in place (not set
    to None) and the norm computed every step (the graph is the same at every step; clipping at an infinite norm
    multiplies by 1)."""

    def __init__(self, process, model, optimizer, clip_grad: float | None, start_step: int, static: bool = False):
        self.process, self.optimizer, self.static = process, optimizer, static
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = clip_grad if clip_grad is not None else float("inf")
        self.clipping = clip_grad is not None
        self.done = torch.full((), start_step, dtype=torch.int64, device=process.device)  # steps run
        self.bad = torch.zeros((), dtype=torch.int64, device=process.device)  # step + 1 of the first bad loss; 0: none

    def update(self, loss: torch.Tensor, need_norm: bool) -> torch.Tensor | None:
        self.done.add_(1)  # in place: a captured graph counts its replays
        self.bad.copy_(torch.where(torch.isfinite(loss.detach()) | (self.bad > 0), self.bad, self.done))
        grad_norm = None
        if self.clipping or need_norm or self.static:  # the norm costs a pass over the gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.static)
        return grad_norm

    def first_bad(self) -> int:
        """The first step (1-based) whose loss was not finite in any process, 0 if none."""
        return self.process.earliest(self.bad.clone())
