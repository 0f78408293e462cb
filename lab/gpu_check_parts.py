"""The parts of `python -m lab.gpu_check` (lab/gpu_check.py runs each in a child process of its own, under a
time cap). A part reports through Events: one JSON line per check decided, per run made, per fact measured, so a
part killed at its cap still leaves what it had decided.

    setup         the environment; θ₀ (ViT-B/16's architecture, MAE's initialisation, random weights) and a teacher
                  (θ₀ perturbed) saved as model directories; the built-in digits dataset
    a stage       its main() three ways -- eager (the default paths), eager with --data_cache off, --cuda_graph --
                  on digits, and the loss curves compared (gpu_check_rules); self-distillation also checks the
                  teacher's features looked up against the on-line ones, fine-tuning dropout inside the graph
    bench parts   lab.bench: the three stages eager and with --cuda_graph, the data path (informational)
"""
import contextlib
import dataclasses
import json
import os
import platform
import re
import subprocess
import time
import traceback

import lmdb
import numpy as np
import PIL
import torch
import transformers
from transformers import ViTMAEConfig, ViTMAEForPreTraining

import finetune
import pretrain
import selftrain
import training
import utils
from data import ImageDataset
from models import TINY_NAME, cls_feature, load_encoder, load_mae, preprocessing_of, save_model
from models.hub import initial_config
from models.vit_mae import SINCOS_TABLES, mae_initialize
from lab import bench, bench_accumulation
from lab import gpu_check_rules as rules

DATASET = "digits"  # built in (scikit-learn), 1,297 training images: no download
SCRIPTS = {"further-pretrain": pretrain, "self-distill": selftrain, "finetune": finetune}
TERMS = {"further-pretrain": ["mae_loss"], "self-distill": ["mae_loss", "distill_loss"], "finetune": ["cls_loss"]}
# the three ways of running a stage: (name, flags, what it is)
MODES = (("default", [], "eager, the default paths (decode-once batches)"),
         ("data_cache_off", ["--data_cache", "off"], "eager, --data_cache off (batches streamed by the workers)"),
         ("cuda_graph", ["--cuda_graph"], "--cuda_graph (the whole step in one CUDA graph; on CPU the same "
                                          "static-buffer step without capture)"))
NEGATIVE_CONTROLS = {
    "stale_inputs": "the --cuda_graph runs get step 0's batch, masking noise and flips at every step (a graph that "
                    "kept its first inputs)",
    "fixed_dropout": "the --cuda_graph runs draw dropout with step 0's seed at every step (a graph that baked in "
                     "its first masks)",
}
TEACHER_NOISE = 0.1  # the teacher is θ₀ plus Gaussian noise of this fraction of each weight tensor's std
CUDA_DEFAULTS = {"steps": 200, "dropout_steps": 16, "teacher_steps": 50}
CPU_DEFAULTS = {"steps": 12, "dropout_steps": 6, "teacher_steps": 4, "batch_size": 16}


class Events:
    """A part's report: JSON lines appended to its file, flushed at once (a part may be killed at any time)."""

    def __init__(self, path: str):
        self.path = path

    def emit(self, kind: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "time": time.time(), **fields}, default=str) + "\n")

    def check(self, check_id: str, verdict: rules.Verdict | None = None, status: str | None = None,
              summary: str = "", measured: dict | None = None) -> None:
        if verdict is not None:
            status, summary, measured = verdict.status, verdict.summary, verdict.measured
        self.emit("check", id=check_id, status=status, summary=summary, measured=measured or {})
        print(f"[gpu-check] {status} {check_id}: {summary}", flush=True)

    def progress(self, what: str) -> None:
        self.emit("progress", what=what)
        print(f"[gpu-check] {what}", flush=True)


def read_events(path: str) -> list[dict]:
    """The events of a part, a last line cut short by a kill left out."""
    events = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
    return events


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Plan:
    """What every part of one check uses; made by the setup part, which knows the device."""
    out: str
    device: str  # resolved, e.g. cuda:0
    device_type: str
    model: str  # bench.VIT_B16 or TINY_NAME
    steps: int
    batch: dict  # stage -> global batch
    workers: int
    finetune_warmup_steps: int
    dropout_steps: int
    teacher_steps: int
    negative_control: list
    bench_argv: dict  # bench part -> lab.bench argv; empty: no bench

    @property
    def theta0(self) -> str:
        return os.path.join(self.out, "setup", "theta0")

    @property
    def teacher(self) -> str:
        return os.path.join(self.out, "setup", "teacher")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out, "data")

    def run_dir(self, stage: str, name: str) -> str:
        return os.path.join(self.out, "runs", stage, name)


def make_plan(args, device: torch.device) -> Plan:
    cuda = device.type == "cuda"
    model = args.model or (bench.VIT_B16 if cuda else TINY_NAME)
    defaults = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    steps = args.steps or defaults["steps"]
    if cuda:
        batch = dict(bench.PAPER_BATCH)
    else:
        batch = dict.fromkeys(bench.STAGES, bench.CPU_VIT_B16_BATCH if model == bench.VIT_B16 else
                              CPU_DEFAULTS["batch_size"])
    if args.batch_size:
        batch = dict.fromkeys(bench.STAGES, args.batch_size)
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if cuda else 0)
    bench_argv = {}
    run_bench = cuda if args.bench is None else args.bench
    if run_bench:
        common = ["--device", str(device), "--model", model]
        # on a CPU the figures mean little (BENCHMARKS.md): the fewest steps that exercise the code
        quick = [] if cuda else ["--steps", "2", "--warmup_steps", "1", "--repeats", "1", "--batch_size", "8"]
        data_quick = (["--workers_list", "0", "4", "8", "16"] if cuda else
                      ["--workers_list", "0", "--data_images", "16", "--data_batches", "2", "--data_batch_size", "8",
                       "--image_size", "32"])
        # lab.bench_accumulation: ViT-B/16 at the paper's batch on CUDA; on a CPU the fewest steps at 32 px
        accumulation = (["--model", "vit-b16" if model == bench.VIT_B16 else "vit-ti16", "--batch_size", "64",
                         "--steps", "3", "--warmup_steps", "1"] if cuda else
                        ["--model", "vit-ti16", "--batch_size", "4", "--steps", "1", "--warmup_steps", "0",
                         "--image_size", "32", "--stages", "finetune"])
        bench_argv = {"bench": [*common, *quick, "--side_by_side", str(args.side_by_side)],
                      "bench-cuda-graph": [*common, *quick, "--cuda_graph"],
                      "bench-data": ["--device", str(device), "--data", *data_quick],
                      "bench-accumulation": ["--device", str(device), *accumulation]}
    return Plan(out=os.path.abspath(args.out), device=str(device), device_type=device.type, model=model, steps=steps,
                batch=batch, workers=workers, finetune_warmup_steps=max(1, steps // 10),
                dropout_steps=min(steps, defaults["dropout_steps"]),
                teacher_steps=min(steps, defaults["teacher_steps"]),
                negative_control=list(args.negative_control or []), bench_argv=bench_argv)


# ----------------------------------------------------------------------------- setup

def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    with contextlib.suppress(OSError), open("/proc/driver/nvidia/version") as f:
        found = re.search(r"Kernel Module\s+(\S+)", f.read())
        if found:
            return found.group(1)
    return "n/a"


def environment(device: torch.device) -> dict:
    """What the report names first: the device, its driver, CUDA, the libraries, the commit."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env = {"device": props.name, "driver": driver_version(), "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version(), "capability": f"{props.major}.{props.minor}",
               "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        env = {"device": bench.describe(device), "driver": "n/a", "cuda": "n/a", "cudnn": "n/a"}
    return {**env, "device_type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "pillow": PIL.__version__, "numpy": np.__version__,
            "lmdb": lmdb.__version__, "cpus": os.cpu_count(), "host": platform.node(), "commit": utils.git_commit()}


def initial_model(model: str) -> ViTMAEForPreTraining:
    """θ₀: vit-mae-tiny as the stages build it, or ViT-B/16 MAE (ViTMAEConfig()'s defaults are the architecture of
    facebook/vit-mae-base) with MAE's initialisation (sin-cos tables, Xavier layers), random weights: no Hub."""
    if model == TINY_NAME:
        return load_mae(TINY_NAME)
    torch.manual_seed(0)
    mae = ViTMAEForPreTraining(ViTMAEConfig())
    mae_initialize(mae)
    return mae


@torch.no_grad()
def perturbed(mae: ViTMAEForPreTraining) -> ViTMAEForPreTraining:
    """A teacher near θ₀ (as a further pre-trained model is): every weight tensor plus Gaussian noise of
    TEACHER_NOISE of its std; the fixed sin-cos tables and constant tensors (LayerNorm 1 and 0) kept."""
    generator = torch.Generator().manual_seed(1)
    for name, param in mae.named_parameters():
        if name not in SINCOS_TABLES and param.numel() > 1 and float(param.std()) > 0:
            param.add_(torch.randn(param.shape, generator=generator) * (TEACHER_NOISE * float(param.std())))
    return mae


def setup(events: Events, args) -> None:
    device = training.resolve_device(args.device, 0)
    env = environment(device)
    events.emit("info", key="environment", value=env)
    print("[gpu-check] " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    plan = make_plan(args, device)
    events.emit("info", key="plan", value=dataclasses.asdict(plan))
    start = time.perf_counter()
    mae = initial_model(plan.model)
    save_model(mae, plan.theta0)  # config.json, model.safetensors, preprocessor_config.json (bilinear, ImageNet)
    save_model(perturbed(mae), plan.teacher)
    train = ImageDataset(DATASET, "train", plan.data_dir, mae.config.image_size)  # builds both splits
    events.check("setup", status=rules.PASS,
                 summary=f"{env['device']} (driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, "
                         f"transformers {env['transformers']}); θ₀ {plan.model} "
                         f"({sum(p.numel() for p in mae.parameters()) / 1e6:.1f} M parameters, random weights) and "
                         f"its perturbed teacher saved, {DATASET} built ({len(train)} training images at "
                         f"{mae.config.image_size} px) in {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------- running a stage

class _DepartingDraws:
    """A run's own draws (training.Draws) with the negative controls' departures (NEGATIVE_CONTROLS)."""

    def __init__(self, draws, controls):
        self.draws, self.stale, self.fixed_dropout = draws, "stale_inputs" in controls, "fixed_dropout" in controls

    def indices(self, n, step):
        return self.draws.indices(n, 0 if self.stale else step)

    def uniform(self, step, stream, *shape):
        return self.draws.uniform(0 if self.stale else step, stream, *shape)

    def dropout_seed(self, step):
        return self.draws.dropout_seed(0 if self.fixed_dropout else step)


@contextlib.contextmanager
def departures(plan: Plan, mode: str):
    """The negative controls apply to the --cuda_graph runs only (through the runs' seam for their draws)."""
    if mode != "cuda_graph" or not plan.negative_control:
        yield
        return

    def make(inputs, rank, world, device):
        return _DepartingDraws(training.Draws(inputs.seed, inputs.batch_size, inputs.steps, rank, world, device),
                               plan.negative_control)
    with training.supplied_draws(make):
        yield


def stage_args(plan: Plan, stage: str, mode: str, out_dir: str | None, steps: int):
    """The stage's own parser on the check's flags: digits, θ₀, one metrics line per step."""
    flags = dict((name, f) for name, f, _ in MODES)[mode]
    argv = ["--dataset", DATASET, "--data_dir", plan.data_dir, "--model_name", plan.theta0, "--device", plan.device,
            "--workers", str(plan.workers), "--steps", str(steps), "--batch_size", str(plan.batch[stage]),
            "--log_every", "1", *flags]
    if out_dir is not None:
        argv += ["--output_dir", out_dir]
    if stage == "self-distill":
        argv += ["--teacher", plan.teacher]
    if stage == "finetune":
        argv += ["--scratch", "True", "--warmup_steps", str(plan.finetune_warmup_steps),
                 "--results_dir", os.path.join(plan.out, "runs", "results")]
    return SCRIPTS[stage].get_args_parser().parse_args(argv)


def run_stage(plan: Plan, stage: str, mode: str, name: str, steps: int) -> dict:
    """The stage's main() on the check's flags; -> its metrics.jsonl lines and what the run cost."""
    out_dir = plan.run_dir(stage, name)
    args = stage_args(plan, stage, mode, out_dir, steps)
    start = time.perf_counter()
    with departures(plan, mode):
        SCRIPTS[stage].main(args)
    seconds = time.perf_counter() - start
    with open(os.path.join(out_dir, training.METRICS_FILE)) as f:
        lines = [json.loads(line) for line in f]
    timed = [m["images_per_s"] for m in lines[rules.EARLY_STEPS:]] or [m["images_per_s"] for m in lines]
    run = {"stage": stage, "mode": mode, "name": name, "dir": out_dir, "steps": steps, "seconds": seconds,
           "images_per_s": float(np.median(timed)), "peak_mem_mb": max(m["peak_mem_mb"] for m in lines),
           "final_loss": lines[-1]["loss"]}
    if stage == "finetune":
        with open(os.path.normpath(out_dir) + ".json") as f:
            run["test_acc"] = json.load(f)["test_acc"]
    bench.free_memory()
    return {"run": run, "lines": lines}


def stage_part(events: Events, plan: Plan, stage: str) -> None:
    if stage == "self-distill":
        guarded(events, f"{stage}/teacher_features", teacher_check, events, plan)
    records = {}
    for mode, _, what in MODES:
        events.progress(f"{stage}: {plan.steps} steps, {what}")
        try:
            records[mode] = run_stage(plan, stage, mode, mode, plan.steps)
            events.emit("run", **records[mode]["run"])
        except Exception as e:  # the error is the finding (a capture that fails, say); the other runs go on
            traceback.print_exc()
            records[mode] = e
            bench.free_memory()
        if mode == "default":
            continue
        check_id = f"{stage}/{mode}"
        reference, other = records["default"], records[mode]
        if isinstance(reference, Exception):
            events.check(check_id, status="ERROR", summary=f"the reference run (eager, default paths) failed: "
                                                           f"{type(reference).__name__}: {utils.one_line(reference)}")
        elif isinstance(other, Exception):
            events.check(check_id, status="ERROR", summary=f"the run failed: {type(other).__name__}: "
                                                           f"{utils.one_line(other)}")
        else:
            events.check(check_id, rules.compare_curves(reference["lines"], other["lines"], TERMS[stage]))
    if stage == "finetune":
        guarded(events, f"{stage}/dropout_in_graph", dropout_check, events, plan)


def guarded(events: Events, check_id: str, fn, *a) -> None:
    """fn(*a) decides check_id; an exception is that check's ERROR, and the part goes on."""
    try:
        fn(*a)
    except Exception as e:
        traceback.print_exc()
        events.check(check_id, status="ERROR", summary=f"{type(e).__name__}: {utils.one_line(e)}")
        bench.free_memory()


# ----------------------------------------------------------------------------- teacher features

def teacher_check(events: Events, plan: Plan) -> None:
    """selftrain.teacher_features (the table every step looks up) against the teacher's h_T(x) computed on-line from
    each step's batch, as the loop computed it before the table existed, both under the run's autocast (bf16 on
    CUDA). The batches are the default path's (decode-once); streamed ones are the same tensors (tested on CPU)."""
    events.progress(f"self-distill: teacher features looked up vs on-line, {plan.teacher_steps} steps")
    args = stage_args(plan, "self-distill", "default", None, plan.teacher_steps)
    preprocessing = preprocessing_of(plan.theta0)
    run = training.Run.without_directory(args, "gpu-check teacher", preprocessing)
    teacher = load_encoder(plan.teacher, plan.theta0, reference=initial_config(plan.theta0))
    teacher.to(run.device).eval().requires_grad_(False)
    size = teacher.config.image_size
    dataset = ImageDataset(DATASET, "train", plan.data_dir, size, preprocessing.check(size).resample)
    table = selftrain.teacher_features(teacher, run.device, run, dataset)  # (N, D)
    comparison = rules.TeacherComparison()
    for _, (images, _, index) in run.batches(dataset):
        with torch.inference_mode(), run.autocast():
            online = cls_feature(teacher, images)  # (B, D)
        comparison.add(table[index], online)
    del teacher, table
    bench.free_memory()
    events.check("self-distill/teacher_features", comparison.verdict())


# ----------------------------------------------------------------------------- dropout inside the graph

class DropoutRecorder:
    """Watches fine-tuning's dropout from outside, through two observation hooks: a global forward hook (torch's
    register_module_forward_hook) copies, at every GlobalBatchDropout call, which of its positions were dropped
    into a buffer of its own -- inside a captured CUDA graph that copy is captured too, so after each replay the
    buffers hold that replay's masks -- and after each step (training.observed_steps: after the replay) the
    masks are compared with the eager draws of the step's seed (training.Draws.dropout_seed, what the step seeds
    with)."""

    def __init__(self, seed: int, p: float):
        self.canonical = training.Draws(seed, 1, 1, 0, 1, torch.device("cpu"))  # dropout_seed(step) only
        self.comparison = rules.DropoutComparison(p)
        # per dropout call of a forward, in order (a module may be called twice: ViTLayer's dropout is):
        # (known: the input is not 0, dropped), both (B, ...) bool
        self.buffers = []
        self.order, self.current, self.previous = [], [], None  # the modules called, in order

    def forward_hook(self, module, args, y):
        if isinstance(module, training.GlobalBatchDropout) and module.training and module.p > 0:
            x = args[0]
            call = len(self.current)
            if call == len(self.buffers):  # allocated at the first (eager, warm-up) step, before any capture
                self.buffers.append((torch.empty_like(x, dtype=torch.bool), torch.empty_like(x, dtype=torch.bool)))
            known, dropped = self.buffers[call]
            known.copy_(x != 0)
            dropped.copy_((y == 0) & (x != 0))
            self.current.append(module)

    def after_step(self, step: int) -> None:
        if self.current:  # Python ran the forward (eager, warm-up or capture); a replay runs none of it
            self.order = self.current
        self.current = []
        self.compare(step)

    def compare(self, step: int) -> None:
        torch.manual_seed(self.canonical.dropout_seed(step))  # what the step seeded, then the draws in forward order
        dropped, known, expected = [], [], []
        for module, (k, d) in zip(self.order, self.buffers):
            b = k.shape[0]
            noise = torch.rand(b * module.world, *k.shape[1:], device=k.device)[module.rank * b:(module.rank + 1) * b]
            dropped.append(d)
            known.append(k)
            expected.append(noise < module.p)
        self.comparison.add(step, dropped, known, expected, self.previous)
        self.previous = (dropped[0].clone(), known[0].clone())

    @contextlib.contextmanager
    def installed(self):
        """The forward hook and the step observer installed while the block runs."""
        handle = torch.nn.modules.module.register_module_forward_hook(self.forward_hook)
        try:
            with training.observed_steps(self.after_step):
                yield self
        finally:
            handle.remove()


def dropout_check(events: Events, plan: Plan) -> None:
    """A --cuda_graph fine-tuning run with dropout 0.1 (the recipe's), its masks recorded inside the graph."""
    steps = plan.dropout_steps
    p = finetune.get_args_parser().get_default("dropout")
    events.progress(f"finetune: dropout inside the graph, {steps} steps with --cuda_graph "
                    f"({training.GraphedStep.WARMUP_STEPS} warm-up steps, the capture, then replays)")
    recorder = DropoutRecorder(stage_args(plan, "finetune", "cuda_graph", None, steps).seed, p)
    with recorder.installed():
        run = run_stage(plan, "finetune", "cuda_graph", "dropout", steps)
    events.emit("run", **run["run"])
    events.check("finetune/dropout_in_graph", recorder.comparison.verdict())


# ----------------------------------------------------------------------------- the bench

def bench_accumulation_part(events: Events, plan: Plan) -> None:
    """lab.bench_accumulation on the plan's device: each stage's step with and without --accum_steps 4 and
    --grad_checkpointing, each configuration in a fresh process (which starts CUDA for itself)."""
    argv = plan.bench_argv["bench-accumulation"]
    events.progress(f"bench-accumulation: python -m lab.bench_accumulation {' '.join(argv)}")
    rows = bench_accumulation.main(bench_accumulation.get_args_parser().parse_args(argv))
    events.emit("info", key="bench-accumulation", value={"argv": argv, "rows": rows})
    compared = [(r, speed, memory) for r, speed, memory in bench_accumulation.ratios(rows) if speed is not None
                and memory is not None and (r["accum_steps"], r["grad_checkpointing"]) != (1, False)]
    summary = ", ".join(f"{r['stage']} K={r['accum_steps']}{' checkpointing' if r['grad_checkpointing'] else ''} "
                        f"{speed:.2f}x img/s, {memory:.2f}x memory" for r, speed, memory in compared)
    events.check("bench-accumulation", status="INFO", summary=summary or "no configuration to compare")


def bench_part(events: Events, plan: Plan, part: str) -> None:
    if part == "bench-accumulation":
        return bench_accumulation_part(events, plan)
    argv = plan.bench_argv[part]
    events.progress(f"{part}: python -m lab.bench {' '.join(argv)}")
    rows = bench.main(bench.get_args_parser().parse_args(argv))
    result = {"argv": argv, "rows": rows}
    if part != "bench-data" and {r["stage"] for r in rows} == set(bench.STAGES):
        side = float(argv[argv.index("--side_by_side") + 1]) if "--side_by_side" in argv else 1.0
        config = initial_config(TINY_NAME) if plan.model == TINY_NAME else ViTMAEConfig()
        peak = bench.bf16_peak_flops(torch.device(plan.device), None)
        ours = bench.projection({r["stage"]: r["ours_images_per_s"] for r in rows}, side)
        reference = bench.projection({r["stage"]: r["reference_images_per_s"] for r in rows})
        flops = bench.table_flops(config)
        result["projection"] = {"side_by_side": side, "ours_gpu_hours": ours, "reference_gpu_hours": reference,
                                "table_flops": flops,
                                "ours_mfu": flops / (ours * 3600 * peak) if peak else None,
                                "reference_mfu": flops / (reference * 3600 * peak) if peak else None}
    events.emit("info", key=part, value=result)
    if part == "bench-data":
        summary = ", ".join(f"{r['workers']} workers: {r['ours_images_per_s']:.0f} img/s streamed "
                            f"({r['ratio']:.2f}x the release's), {r['decoded_images_per_s']:.0f} decoded once"
                            for r in rows)
    else:
        summary = ", ".join(f"{r['stage']} {r['ours_images_per_s']:.0f} img/s ({r['ratio']:.2f}x)" for r in rows)
        if "projection" in result:
            summary += f"; the paper's table {result['projection']['ours_gpu_hours']:.3g} GPU-hours"
    events.check(part, status="INFO", summary=summary)
