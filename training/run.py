"""Run: what one training run is, apart from the method -- the facade the three stages use. Each concern lives
in its own room: the process and device (process.py), the run directory and its record (run_dir.py), the
step's randomness (draws.py), its batches (batches.py), the optimizer step (step.py) and its CUDA graph
(cuda_graph.py), the metrics (metrics.py, and report_to.py for --report_to)."""
import contextlib
import os

import torch

from training.batches import Batches
from training.draws import DrawInputs, make_draws, use_global_batch_dropout
from training.metrics import Metrics
from training.preemption import StepControl, Stopped
from training.process import Process
from training.report_to import new_wandb_id, reporter
from training.run_dir import RunDirectory, fingerprints
from training.cuda_graph import GraphedStep
from training.step import TrainStep, linear_schedule, optimizer_and_schedule, step_lr
from models.vit_mae import checkpoint_activations
from utils import STREAM_NOISE, RunFailed, UserError, mix_seed


class Run:
    """One training run of a stage.

        run = Run(args, out_dir, stage, done_file, preprocessing)  # who, where, which draws; reads, writes nothing
        if run.already_done: return                              # done_file exists, same arguments: never redo
        optimizer, scheduler = run.adamw(model, no_decay, betas)
        model = run.prepare(model, optimizer, scheduler)         # lock the directory; record; resume; DDP; compile

        @run.graphed                                             # --cuda_graph: captured whole (training/cuda_graph.py)
        def train_step(step, images, ...):
            for micro in run.micro_batches(images, ...):         # --accum_steps K: K slices of the batch and its draws
                with run.forward(step):                          # autocast; dropout from (seed, step), its rows
                    loss, terms = training_loss(model, *micro)
                run.backward(loss, terms)                        # scaled 1/K; DDP all-reduces after the last only
            run.step(step)                                       # clip, AdamW, schedule; log, save, stop

        for step, (images, labels, indices) in run.batches(dataset):
            train_step(step, images, ...)
        run.finish()                                             # after the stage wrote done_file

    A finished run (done_file) or an unfinished one (train_state.pt) with other arguments is refused, naming the
    argument; --overwrite moves whatever the directory holds aside (<out_dir>.old-<time>) and starts again.
    `done_holds_record`: done_file is a result carrying the run's record (fine-tuning's seed<k>.json).
    `reads`: {label: input} of what the stage reads (data.identity.SplitInput, models.identity.WeightsInput): their
    fingerprints go into each start's record, and a finished or unfinished run that read other contents is refused.
    `preprocessing` (models.Preprocessing): how images become the model's input; each start records it as applied
    (the size resolved in prepare), and a finished or unfinished run that applied another is refused too.
    `process`: this process's place in the job (default: from torchrun's environment).
    --accum_steps K: the step's batch runs as K micro-batches, each with its rows of the batch's draws (masking noise,
    flips, dropout masks) and its loss scaled by 1/K (the stages' losses are means over the batch), so the K
    gradients sum to the batch's and the optimizer step equals the unaccumulated one within float rounding.
    Run.without_directory(...): the same run writing nothing (lab/bench.py times the scripts' step with it)."""

    def __init__(self, args, out_dir: str | None, stage: str, done_file: str | None, preprocessing, *,
                 done_holds_record: bool = False, reads: dict | None = None, process: Process | None = None):
        self.args, self.out_dir, self.stage, self.preprocessing = args, out_dir, stage, preprocessing
        self.reads = reads or {}
        self.process = process or Process.from_environment(args.device, args.precision, args.threads)
        self.device, self.is_main, self.local_rank = self.process.device, self.process.is_main, self.process.local_rank
        self.autocast, self.print = self.process.autocast, self.process.print
        self.directory = None if out_dir is None else RunDirectory(out_dir, stage, done_file, done_holds_record,
                                                                   self.process)
        self.state_path = self.directory and self.directory.state_path
        self.metrics_path = self.directory and self.directory.metrics_path
        self.draws = make_draws(DrawInputs(args.seed, args.batch_size, args.steps), self.process.rank,
                                self.process.world, self.device)
        self.data = Batches(self.process, self.draws, preprocessing, stage, batch_size=args.batch_size,
                            steps=args.steps, workers=args.workers, data_cache=args.data_cache)
        self.accum_steps = args.accum_steps
        if self.data.local_batch % self.accum_steps:
            raise UserError(f"--batch_size {args.batch_size} must divide evenly into --accum_steps {self.accum_steps} "
                            f"micro-batches on each of {self.process.world} process(es); pass a batch size that "
                            f"is a multiple of {self.accum_steps * self.process.world}")
        self.micro_batch = self.data.local_batch // self.accum_steps
        self.normalize, self.eval_batches, self.ordered_batches = (self.data.normalize, self.data.evaluation,
                                                                   self.data.ordered)
        self.start_step, self.model, self.metrics, self._update, self._record = 0, None, None, None, None
        self._graph = None  # the GraphedStep of --cuda_graph, made by graphed()
        self._micro, self._loss, self._terms = 0, None, None  # the micro-batch running; the step's sums so far
        self._dropouts, self._ddp = [], None  # set by prepare
        self._observers = list(_observers)
        self.optimizer_record = None  # set by adamw
        self._control = None  # stop signals and the time-based save (training/preemption.py), set by prepare
        torch.manual_seed(mix_seed(args.seed, self.process.rank))  # whatever draws before the loop (heads seed
        # themselves: models.vit_mae.build_classifier, models.roberta_mlm.build_text_classifier)
        # Checked here, before the stage loads anything, and again under the lock in prepare().
        self.already_done = (self.directory is not None and not args.overwrite
                             and self.directory.finished(vars(args), fingerprints(self.reads, strict=False),
                                                         self.reads, preprocessing))
        if self.already_done:
            self.print(f"[{stage}] already complete: {done_file} (same arguments; --overwrite moves it aside "
                       f"and runs again)")
        elif self.directory is not None and not args.overwrite:
            self.directory.resumable(vars(args), preprocessing=preprocessing, compiled=args.compile)

    @classmethod
    def without_directory(cls, args, stage: str, preprocessing, process: Process | None = None) -> "Run":
        """A run with no directory: no lock, record, metrics or saved state; steps as a stage's run takes them."""
        return cls(args, None, stage, None, preprocessing, process=process)

    def adamw(self, model, no_decay, betas, groups=None, schedule=linear_schedule, eps: float = 1e-8):
        """The stage's AdamW (no weight decay where `no_decay(name, param)`; `groups`: the parameter groups built by
        the stage, following that rule) and its schedule (training/step.py); eps: AdamW's (torch's default, the
        release's, unless given). The record keeps what the arguments do not say: betas, eps and the rule (the first
        paragraph of its docstring)."""
        optimizer, scheduler = optimizer_and_schedule(
            model, self.process, no_decay, betas, groups, schedule, lr=self.args.lr,
            weight_decay=self.args.weight_decay, warmup_steps=self.args.warmup_steps, steps=self.args.steps,
            cuda_graph=self.args.cuda_graph, compile=self.args.compile, accum_steps=self.args.accum_steps,
            grad_checkpointing=self.args.grad_checkpointing, eps=eps)
        rule = " ".join((no_decay.__doc__ or "").strip().split("\n\n")[0].split())
        self.optimizer_record = {"betas": list(betas), "eps": optimizer.defaults["eps"], "no_weight_decay": rule}
        return optimizer, scheduler

    def prepare(self, model: torch.nn.Module, optimizer, scheduler) -> torch.nn.Module:
        """Lock the run directory, write the run record, move to the device, load the latest training state if
        there is one, draw dropout masks for the global batch, wrap for DDP / compile. Nothing is written to disk
        before this point."""
        self.model, self.optimizer, self.scheduler = model.to(self.device), optimizer, scheduler
        if self.directory is not None:  # signals first: a stop asked while resuming is honoured after the first step
            self._control = StepControl(self.process, self.args.save_every_minutes)
            self._take_directory()
        self._update = TrainStep(self.process, model, optimizer, self.args.clip_grad, self.start_step,
                                 static=self.args.cuda_graph)
        self._dropouts = use_global_batch_dropout(model, self.process.rank, self.process.world, self.accum_steps)
        if self.args.grad_checkpointing:
            checkpoint_activations(model)
        wrapped = self.process.wrap(model, self.args.compile)
        self._ddp = next((m for m in (wrapped, getattr(wrapped, "_orig_mod", None))
                          if isinstance(m, torch.nn.parallel.DistributedDataParallel)), None)
        return wrapped

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """prepare() for a run that trains nothing (probe.py's k-NN): `model` moved to the device, the run directory
        locked and its record written; no optimizer, no saved state, no DDP. finish() releases the directory."""
        self.model, self.optimizer, self.scheduler = model.to(self.device), None, None
        if self.directory is not None:
            self._control = StepControl(self.process, self.args.save_every_minutes)
            self._take_directory()
        return self.model

    def _take_directory(self) -> None:
        """Lock, check again under the lock, resume from the saved state, record this start, open the metrics."""
        directory = self.directory
        if self.is_main:
            directory.take(self.args.overwrite)
        self.process.barrier()
        inputs = fingerprints(self.reads)  # everything is readable now (θ₀ loaded, the teacher found)
        size = _image_size(self.model)
        if size is not None:  # the size applied: the model's, when the image-processor file leaves it out
            self.preprocessing = self.preprocessing.check(size)
        # under the lock: another run may have finished
        if directory.finished(vars(self.args), inputs, self.reads, self.preprocessing):
            raise RunFailed(f"{directory.done_file} was completed by another run while this one was starting; "
                            f"nothing was written")
        resumed = directory.resumable(vars(self.args), inputs, self.reads, self.preprocessing,
                                      compiled=self.args.compile)
        if resumed is not None:
            self.start_step = directory.load_state(self.model, self.optimizer, self.scheduler)
        entry = directory.start_entry(vars(self.args), self.preprocessing, self.start_step, self.optimizer_record,
                                      inputs)
        self._record = directory.write_record(entry, resumed)
        live = None
        if self.is_main and self.args.report_to != "none":
            if self.args.report_to == "wandb" and "wandb_run_id" not in self._record:
                self._record = directory.update_record(self._record, wandb_run_id=new_wandb_id())
            live = reporter(self.args.report_to, self.out_dir, self._record, self.start_step, self.stage)
        self.metrics = Metrics(self.metrics_path, self.process, self.stage, self.args.steps, self.args.batch_size,
                               self.start_step, live)

    def batches(self, dataset):
        """(step, (images, labels, indices)) for the remaining steps (training/batches.py)."""
        return self.data.training(dataset, self.start_step)

    def masking_noise(self, step: int, num_patches: int) -> torch.Tensor:
        """MAE masking noise (B_local, N): the patches with the smallest values stay visible."""
        return self.draws.uniform(step, STREAM_NOISE, num_patches)

    def token_mean_divisor(self, count: torch.Tensor) -> float:
        """For a loss summed over the selected tokens of a micro-batch: what to divide that sum by so that the
        step's gradient is the mean over the selected tokens of the whole global batch. `count`: this process's
        selected tokens in the step's batch. Run.backward scales each micro-batch by 1/K and DDP averages over
        the W processes, so the divisor is the global count / (K · W). One all-reduce of a number per step."""
        total = self.process.sum([float(count)])[0]
        return max(total, 1.0) / (self.accum_steps * self.process.world)

    def global_rand(self, step: int, stream: int, *shape: int) -> torch.Tensor:
        """This process's rows of a (global_batch, *shape) uniform tensor drawn from (seed, stream, step)."""
        return self.draws.uniform(step, stream, *shape)

    def graphed(self, fn):
        """The stage's step function fn(step, *inputs) as the loop calls it: fn itself, or with --cuda_graph fn on
        static input buffers, captured in one CUDA graph on CUDA and replayed (training/cuda_graph.py)."""
        if not self.args.cuda_graph:
            return fn
        self._graph = GraphedStep(fn, self.device, self._seed_dropout, self._after_step)
        return self._graph

    def _seed_dropout(self, step: int) -> None:
        torch.manual_seed(self.draws.dropout_seed(step))  # GlobalBatchDropout's masks: a function of (seed, step)

    def micro_batches(self, *batch: torch.Tensor):
        """The step's inputs, each (B_local, ...), as K = --accum_steps tuples of consecutive (B_local / K, ...)
        slices, in order: micro-batch k holds rows k·B_local/K .. of each, and forward() and backward() act for it.
        K = 1: the inputs themselves."""
        for micro, inputs in enumerate(zip(*(x.split(self.micro_batch) for x in batch), strict=True)):
            self._micro = micro
            yield inputs

    @contextlib.contextmanager
    def forward(self, step: int):
        """The context of the forward of step `step`'s current micro-batch: the process's autocast; dropout seeded
        from (seed, step) again for each micro-batch, drawing the masks of the whole global batch and keeping this
        micro-batch's rows (GlobalBatchDropout); under DDP, no gradient all-reduce but after the last micro-batch
        (no_sync: DDP decides at the forward). Under --cuda_graph the graph seeds before each call and replay (a
        capture cannot take a new seed), and autocast keeps no cache of cast weights (a replay must cast the
        weights the last step left)."""
        graphed = self._graph is not None
        if not graphed:
            self._seed_dropout(step)
        for dropout in self._dropouts:
            dropout.micro = self._micro
        inner = self._ddp is not None and self._micro < self.accum_steps - 1
        with self._ddp.no_sync() if inner else contextlib.nullcontext(), self.autocast(cache_enabled=not graphed):
            yield

    def backward(self, loss: torch.Tensor, terms: dict) -> None:
        """The backward pass of the current micro-batch's loss scaled by 1/K: the stages' losses are means over
        their batch, so the K gradients add up to the gradient of the batch's mean. The step's loss and `terms`
        ({name: term}) are summed the same way, to log the batch's values."""
        scale = 1 / self.accum_steps
        (loss * scale).backward()
        scaled = {"loss": loss.detach() * scale, **{k: v.detach() * scale for k, v in terms.items()}}
        if self._micro == 0:
            self._loss, self._terms = scaled.pop("loss"), scaled
        else:
            self._loss = self._loss + scaled.pop("loss")
            self._terms = {k: self._terms[k] + v for k, v in scaled.items()}

    def step(self, step: int) -> None:
        """Step `step` after the backward passes of its micro-batches (training/step.py): gradient clipping
        (--clip_grad); AdamW; the schedule. Then, at logging and saving steps only (the check reads the device
        back): the non-finite check, a metrics.jsonl line (--log_every) with the batch's loss and terms, and the
        resumable state (--save_every, --save_every_minutes, and before stopping). A stop signal
        (training/preemption.py) ends the run here, after the state is saved: Stopped, exit code 75. Inside a
        --cuda_graph step only the device work runs here; the graph does the rest after the step
        (training/cuda_graph.py)."""
        loss, terms = self._loss, self._terms
        grad_norm = self._update.update(loss, need_norm=self._logging(step + 1))
        if self._graph is not None and self._graph.running:
            self._graph.hold(loss.detach(), grad_norm, {k: v.detach() for k, v in terms.items()})
            return
        self._after_step(step, loss, grad_norm, terms)

    def _logging(self, done: int) -> bool:
        return self.metrics is not None and (done % self.args.log_every == 0 or done == self.args.steps)

    def _after_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, terms: dict) -> None:
        """The host's part of step `step`, once its device work ran: observers, the schedule, check, log, save."""
        for observe in self._observers:
            observe(step)
        self.scheduler.step()
        done = step + 1
        logging = self._logging(done)
        saving = self.directory is not None and self.args.save_every and done % self.args.save_every == 0 \
            and done < self.args.steps
        stop = False
        if self._control is not None and done < self.args.steps:  # after the last step the result is the state
            stop, due = self._control.after_step(done)
            saving = saving or stop or due
        if logging or saving:
            bad = self._update.first_bad()
            if bad:
                last = (f"the last good state is {self.state_path}" if os.path.exists(self.state_path)
                        else "no state was saved (see --save_every)")
                raise RunFailed(f"the loss is not finite at step {bad} (lower --lr, or check the data); nothing "
                                f"after it was saved; {last}")
        if logging:
            self.metrics.log(done, step_lr(self.args.lr, self.scheduler, done), loss=loss, grad_norm=grad_norm, **terms)
        if saving:
            self.directory.save_state(done, self.model, self.optimizer, self.scheduler)
            if self._control is not None:
                self._control.saved()
        if stop:  # every process waits for the state to be written: a launcher (torchrun) kills the others once
            self.process.barrier()  # one of them exits, which could cut the save short
            self._control.close()
            raise Stopped(f"stopped after step {done} of {self.args.steps} ({self._control.reason()}); the state is "
                          f"saved in {self.state_path}: the same command continues from it")

    def record(self) -> dict:
        """The run record (args.json): the first start's entry at the top level, every start in "history"."""
        return self._record

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return self.process.sum(values)

    def finish(self) -> None:
        """Drop the resumable state and release the directory. Call it after the stage wrote done_file: a kill
        before this point leaves the state to resume from, or the finished result."""
        if self.directory is None:
            return
        self._control.close()
        self.metrics.close()
        self.directory.drop_state()
        self.process.barrier()
        self.directory.release()


def _image_size(model: torch.nn.Module) -> int | None:
    """The image size `model` takes: its config's, or that of the model it wraps (the student wraps its MAE)."""
    return next((m.config.image_size for m in model.modules() if hasattr(getattr(m, "config", None), "image_size")),
                None)


_observers = []  # callbacks step -> None, the innermost observed_steps block last


@contextlib.contextmanager
def observed_steps(observe):
    """Runs created inside this block call `observe(step)` after the device work of each step (after the graph's
    replay under --cuda_graph), before the schedule, logging and saving: the seam through which a check watches
    what a step did (lab/gpu_check_parts.py reads the dropout masks a replay recorded). Nothing else changes."""
    _observers.append(observe)
    try:
        yield
    finally:
        _observers.remove(observe)
