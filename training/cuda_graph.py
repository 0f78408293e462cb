"""--cuda_graph: a stage's step function, the same one the eager loop calls, captured in one CUDA graph and replayed
(experimental: not yet run on a GPU). A stage writes its step once, as the function its loop calls:

    @run.graphed                                 # without --cuda_graph: the function itself
    def train_step(step, images, noise):
        for micro in run.micro_batches(images, noise):  # one micro-batch: --cuda_graph refuses --accum_steps > 1
            with run.forward(step):              # autocast; dropout seeded from (seed, step)
                loss, terms = training_loss(model, *micro)
            run.backward(loss, terms)
        run.step(step)                           # clip, AdamW, non-finite flag; schedule, log, save

A graph must hold forward, backward and AdamW together, so what is captured is that whole function; what runs on
the host -- dropout's seed, the schedule, the non-finite check, logging, saving, stop signals -- stays outside it:
GraphedStep seeds dropout before every call or replay (`before(step)`), and inside the function Run.step does the
device work only and hands its outputs here (`hold`), for `after(step, loss, grad_norm, terms)` once the step ran.

Every call copies its inputs into static buffers, which the function reads. On CUDA the first WARMUP_STEPS calls
run it on a side stream, the next one captures it and replays, and every later call only replays: the Python of
the function runs no more, so nothing in it may depend on `step` but run.forward's, run.backward's and run.step's
bookkeeping, which live outside the graph. On CPU every call runs it on the static buffers without capture, so CPU
tests cover the same logic.

What a capture needs (found by probes of a whole-step capture of plain transformers models on torch 2.11 on an
H200, BENCHMARKS.md): capturable fused AdamW and the learning rate as a tensor the schedule fills in place
(training/step.adamw), autocast without its weight cache (run.forward), gradients zeroed in place, not set to
None, and clipping inside the graph (TrainStep, static), inputs copied into static tensors rather than rebound."""
import torch


class GraphedStep:
    """fn(step, *inputs) on static input buffers, captured in one CUDA graph on CUDA (see the module docstring).
    `before(step)`: host work before the step (dropout's seed); `after(step, *outputs)`: host work after it,
    with the outputs the function handed to `hold` (on CUDA, tensors the replays refill)."""

    WARMUP_STEPS = 3

    def __init__(self, fn, device: torch.device, before, after):
        self.fn, self.device, self.before, self.after = fn, device, before, after
        self.capture = device.type == "cuda"
        self.inputs, self.outputs, self.graph, self.calls = None, None, None, 0
        self.running = False  # inside fn: Run.step hands its outputs to hold()

    def hold(self, *outputs) -> None:
        self.outputs = outputs

    def _run(self, step: int) -> None:
        self.running, self.outputs = True, None
        try:
            self.fn(step, *self.inputs)
        finally:
            self.running = False
        if self.outputs is None:
            raise RuntimeError("a --cuda_graph step function must call run.step(step)")

    def __call__(self, step: int, *inputs: torch.Tensor) -> None:
        if self.inputs is None:
            self.inputs = [x.detach().clone() for x in inputs]
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        self.before(step)  # a replay reads the generator's seed: the step's dropout masks
        if not self.capture:
            self._run(step)
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls < self.WARMUP_STEPS:  # real steps, on a side stream, before the capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run(step)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._run(step)
            self.graph.replay()  # the capture only recorded this step
        self.calls += 1
        self.after(step, *self.outputs)
