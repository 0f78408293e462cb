"""The paper's claims at laptop scale (protocol 2 of SMALL_REPRODUCTION.md), on 2 CPU cores in about 60-90 minutes.

The protocol (and why each number is what it is) is in SMALL_REPRODUCTION.md. In short:
  θ₀      vit-mae-tiny pre-trained with MAE (pretrain.py) from its random init on --source_crops 32x32 crops of
          natural images from Debian packages (`python -m data.prepare natural_crops`; --source_src DIR: yours)
  target  Fashion-MNIST (`python -m data.prepare fashion_mnist`): --shots labelled training images per class,
          which are also what further pre-training and self-distillation see; tested on all 10,000 test images
  routes  fine-tuning (--seeds seeds each) from vit-mae-tiny's random init, from θ₀, and from further
          pre-training (pretrain.py) and self-distillation (selftrain.py, teacher: the further pre-training of the
          same step count) at each of --fig1_steps; the table is at --further_steps
  reading two gates first, transfer (θ₀ beats the random init) and fit (every fine-tuning run fits its training
          set); only if both pass, the two claims, by the rules fixed in SMALL_REPRODUCTION.md (read_outcome)
  reported, not read: memorisation (MAE loss with fixed masks on the training images vs as many held-out ones),
          logistic regression on the pixels, linear probes on the frozen CLS features (scikit-learn)

    python -m lab.small_reproduction            # all of it (= make reproduce-small, bash run_small_reproduction.sh)
    python -m lab.small_reproduction --source_src IMAGES --target_src IDX_DIR --source_crops 64 \\
        --source_steps 4 --further_steps 2 --fig1_steps 2 4 --finetune_steps 3 --seeds 1 --out_dir /tmp/smoke

The runs are the nodes of launch.graph.fig1_table (θ₀'s pre-training, the random-init route, the table at each
step count), each a process `python pretrain.py|selftrain.py|finetune.py ...` run by launch.pool: independent runs
side by side, --jobs at a time (--threads torch threads each; their output goes to <out_dir>/logs/); --jobs 1 runs
them one after the other, their output on the terminal. Every run is deterministic from its seed, so both give
the same numbers. Everything goes under --out_dir:
    data/natural_crops/, data/fashion_mnist_low/   the source crops and the target (data.prepare's layout)
    initial_model/                                 θ₀, a model directory (what --model_name takes)
    checkpoints/{further,self-further}-pretrain-<steps>/fashion_mnist_low/          the MAE stages
    results/fashion_mnist_low/<init>/seed<k>.json  fine-tuning; <init>: random-init, initial (θ₀), the checkpoints
    summary.md (gates, claims, table, Fig. 1, diagnostics, times, machine), report.md/.csv (report.py --train),
    fig1.md/.csv/.png, diagnostics.json, outcome.json, protocol.json (the settings), timings.jsonl, logs/
Re-running the command continues where it stopped: finished runs are skipped, an interrupted MAE run resumes
from its train_state.pt. A different protocol in the same --out_dir is refused once a run has started; before,
only a change to what an already built dataset was made from (check_protocol).

The time estimate printed up front comes from per-step costs measured on the machine of SMALL_REPRODUCTION.md
(STEP_SECONDS and the constants next to it) and a simulation of the schedule over --jobs processes; while
running, the remaining time is rescaled by how fast the finished runs went.
"""
import argparse
import datetime
import io
import json
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import mae_common
import outputs
import report
import utils
from data import ImageDataset, LMDBReader
from data import prepare, sources
from errors import RunFailed
from launch import graph, pool
from launch.pool import Job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the stages' scripts
SOURCE_DATASET = "natural_crops"
TARGET_DATASET = "fashion_mnist_low"
MODEL = "vit-mae-tiny"
RANDOM_INIT = "random-init"  # results/<target>/random-init/: fine-tuned from vit-mae-tiny's MAE initialisation
INITIAL = report.INITIAL  # results/<target>/initial/: fine-tuned from θ₀
MAE_BATCH_SIZE = 64  # pretrain.py's default, for the epoch counts shown in fig1.md
SAVE_EVERY_STEPS = 250  # resumable state of the MAE runs; a tiny model saves in milliseconds
FIT_GATE = 0.95  # every fine-tuning run's training accuracy must reach this (the fit gate)
MEMORISATION_MASK_SEED = 1234  # the fixed masks of the memorisation measure, the same for every model
FASHION_MNIST_TEST_IMAGES = 10000
PROBE_MAX_ITER = 5000  # scikit-learn's logistic regression, for the pixel baseline and the linear probes

# The up-front estimate, measured on the machine of SMALL_REPRODUCTION.md (2 cores shared with other jobs, load
# average 1.5-2.5) with 400-step runs on the real data, one torch thread: seconds per optimizer step (batch 64 for
# the MAE stages, 32 for fine-tuning); seconds per run for starting (θ₀'s includes decoding the 60,000 crops once);
# fine-tuning's evaluation per image (the test split and the training images); the data builds (natural_crops
# from the Debian packages: download, unpack, survey, crops; fashion_mnist); the diagnostics per model and image.
STEP_SECONDS = {"source": 0.07, "further": 0.07, "self": 0.20, "finetune": 0.085}
RUN_SECONDS = {"source": 30.0, "further": 2.0, "self": 4.0, "finetune": 3.0}
EVAL_SECONDS_PER_IMAGE = 0.001
BUILD_SECONDS = {"source": 300.0, "target": 15.0}
DIAGNOSTIC_SECONDS_PER_IMAGE = 0.0015  # per model: probe features of both splits, memorisation on the training set
# Each of two runs side by side on the 2 cores, against one alone: 1.15-1.85 measured (load average 1.5-3).
SIDE_BY_SIDE_SLOWDOWN = 1.4
# Flags that change how the experiment runs, not what it computes: free to differ when resuming.
RUN_CONTROL_FLAGS = {"out_dir", "jobs", "threads", "workers", "log_every", "device", "download_dir"}
# What each dataset is built from (build_datasets); every other setting reaches the runs only.
DATASET_SETTINGS = {SOURCE_DATASET: ("source_crops", "source_src", "data_seed"),
                    TARGET_DATASET: ("shots", "target_src", "data_seed")}
RUN_OUTPUTS = ("initial_model", "checkpoints", "results", "diagnostics.json")  # under --out_dir, once a run started


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description="The paper's claims at small scale, on CPU "
                                                                "(SMALL_REPRODUCTION.md, protocol 2).")
    g = p.add_argument_group("source domain (θ₀)")
    g.add_argument("--source_crops", type=int, default=60000,
                   help="32x32 crops of natural images (data.prepare natural_crops --crops)")
    g.add_argument("--source_src", default=None,
                   help="build the crops from this folder of images instead of the Debian packages")
    g.add_argument("--source_steps", type=int, default=4000, help="MAE steps of θ₀ from vit-mae-tiny's random init")
    g.add_argument("--source_lr", type=float, default=1e-3, help="peak learning rate of θ₀'s MAE training")
    g.add_argument("--source_warmup_steps", type=int, default=200,
                   help="linear warmup of θ₀'s MAE training (it starts from random weights)")
    g = p.add_argument_group("target domain (low-data Fashion-MNIST)")
    g.add_argument("--shots", type=int, default=20,
                   help="labelled training images per class; the same images are further pre-trained on")
    g.add_argument("--target_src", default=None,
                   help="a folder with Fashion-MNIST's idx files instead of the Debian package dataset-fashion-mnist")
    g.add_argument("--data_seed", type=int, default=0, help="seeds the crops and the choice of the training images")
    g = p.add_argument_group("further pre-training and self-distillation")
    g.add_argument("--further_steps", type=int, default=1000,
                   help="steps of both MAE stages in the table (one of --fig1_steps)")
    g.add_argument("--fig1_steps", type=int, nargs="+", default=[250, 1000, 4000],
                   help="Fig. 1's step counts (θ₀ is the point at 0 steps, always included)")
    g.add_argument("--mae_lr", type=float, default=1e-3, help="peak learning rate of both MAE stages (no warmup)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--finetune_steps", type=int, default=400, help="fine-tuning steps (batch 32)")
    g.add_argument("--finetune_warmup_steps", type=int, default=40, help="linear warmup of fine-tuning")
    g.add_argument("--finetune_lr", type=float, default=3e-3, help="peak learning rate of fine-tuning")
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="fine-tuning seeds of every init")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="runs/small_reproduction_protocol2",
                   help="everything goes here (see the docstring; protocol 1's runs used runs/small_reproduction)")
    g.add_argument("--jobs", type=utils.int_at_least(1), default=2,
                   help="independent runs side by side, each a process of its own; 1: one after the other, their "
                        "output on the terminal. The numbers are the same either way")
    g.add_argument("--threads", type=utils.int_at_least(1), default=1,
                   help="torch threads of each run (on a shared 2-core machine one process with 2 threads ran "
                        "10-20x slower than with 1; two 1-thread processes side by side beat it)")
    g.add_argument("--workers", type=utils.int_at_least(0), default=0,
                   help="DataLoader worker processes of every stage (0: decode in the run's own process; the data "
                        "is decoded once and cached anyway)")
    g.add_argument("--download_dir", default=os.path.join("data", ".downloads"),
                   help="where the Debian packages are downloaded and unpacked, shared by every --out_dir")
    g.add_argument("--device", type=utils.device_spec, default="cpu", help="passed to every stage")
    g.add_argument("--log_every", type=int, default=100, help="steps between a stage's metrics lines")
    return p


# ----------------------------------------------------------------------------- the two datasets

def build_datasets(args, data_dir: str) -> list[dict]:
    """The source crops and the target, through data.prepare (skipped when the folder exists: its builds are
    atomic, so an existing folder is a finished one). Returns the timings of what was built."""
    builds = []
    source = ["natural_crops", "--crops", args.source_crops, "--seed", args.data_seed, "--workers", args.jobs]
    target = ["fashion_mnist", "--name", TARGET_DATASET, "--shots", args.shots, "--seed", args.data_seed]
    source += ["--src", args.source_src] if args.source_src else []
    target += ["--src", args.target_src] if args.target_src else []
    for kind, name, argv in (("source", SOURCE_DATASET, source), ("target", TARGET_DATASET, target)):
        if os.path.isdir(os.path.join(data_dir, name)):
            continue
        print(f"\n[reproduce-small] building {name} (python -m data.prepare {argv[0]} ...)", flush=True)
        start = time.perf_counter()
        try:
            prepare.main(prepare.get_args_parser().parse_args(
                [str(a) for a in argv + ["--out", data_dir, "--download_dir", args.download_dir]]))
        except utils.UserError as e:  # data.prepare's --src is this command's --source_src / --target_src
            flag = "--source_src" if kind == "source" else "--target_src"
            raise type(e)(f"{e} (here: {flag} DIR)") from None
        builds.append({"run": f"data: {name}", "kind": "data", "steps": 0,
                       "seconds": round(time.perf_counter() - start, 2), "estimated_seconds": BUILD_SECONDS[kind]})
    return builds


def dataset_counts(data_dir: str, name: str) -> dict:
    with open(os.path.join(data_dir, name, "counts.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- the plan

@dataclass
class Stage:
    key: str  # unique: names its log file and the runs that wait for it
    kind: str  # source, further, self, finetune (the keys of STEP_SECONDS)
    label: str
    steps: int
    done_file: str  # exists once the run is complete
    script: str  # pretrain.py, selftrain.py or finetune.py: run with argv
    argv: list[str]
    needs: list[str] = field(default_factory=list)  # keys of the runs whose output it reads
    eval_images: int = 0  # images fine-tuning evaluates after its last step

    def estimated_seconds(self) -> float:
        return RUN_SECONDS[self.kind] + STEP_SECONDS[self.kind] * self.steps + EVAL_SECONDS_PER_IMAGE * self.eval_images

    def done(self) -> bool:
        return os.path.exists(self.done_file)


def init_name(kind: str, steps: int) -> str:
    """finetune.py's --ckpt_name, and report.py's <init>."""
    return {"further": f"further-pretrain-{steps}", "self": f"self-further-pretrain-{steps}"}[kind]


def inits(args) -> list[str]:
    """Every init fine-tuned from, in table order."""
    checkpoints = [init_name(kind, k) for k in sorted(args.fig1_steps) for kind in ("further", "self")]
    return [RANDOM_INIT, INITIAL] + checkpoints


def plan(args, paths: dict, eval_images: int) -> list[Stage]:
    """The runs of graph.fig1_table, in its order: θ₀; fine-tuning from the random init and from θ₀; then per step
    count of Fig. 1 (the table's first) the teacher, the student and the fine-tuning of each (one run per seed)."""
    stage_flags = ["--data_dir", paths["data"], "--checkpoint_dir", paths["checkpoints"], "--workers", args.workers,
                   "--log_every", args.log_every, "--device", args.device]
    mae_flags = stage_flags + ["--model_name", paths["initial"], "--dataset", TARGET_DATASET, "--lr", args.mae_lr,
                               "--save_every", SAVE_EVERY_STEPS]
    source = Stage("source", "source", f"θ₀: MAE on {SOURCE_DATASET} from {MODEL}'s random init", args.source_steps,
                   os.path.join(paths["initial"], "model.safetensors"), "pretrain.py",
                   stage_flags + ["--model_name", MODEL, "--dataset", SOURCE_DATASET, "--output_dir", paths["initial"],
                                  "--steps", args.source_steps, "--lr", args.source_lr,
                                  "--warmup_steps", args.source_warmup_steps, "--save_every", SAVE_EVERY_STEPS])

    def finetunes(init: str, init_flags: list, needs: list[str]) -> list[Stage]:
        runs = []
        for seed in args.seeds:
            result = os.path.join(paths["results"], TARGET_DATASET, init, f"seed{seed}")
            what = {RANDOM_INIT: f"{MODEL}'s random init", INITIAL: "θ₀"}.get(init, init)
            runs.append(Stage(f"finetune-{init}-seed{seed}", "finetune", f"fine-tuning from {what}, seed {seed}",
                              args.finetune_steps, result + ".json", "finetune.py",
                              stage_flags + init_flags + [
                                  "--dataset", TARGET_DATASET, "--results_dir", paths["results"], "--output_dir",
                                  result, "--seed", seed, "--steps", args.finetune_steps,
                                  "--warmup_steps", args.finetune_warmup_steps, "--lr", args.finetune_lr],
                              needs, eval_images))
        return runs

    stages, keys = [], {}  # keys: node -> the keys of its runs
    steps = [args.further_steps] + sorted(set(args.fig1_steps) - {args.further_steps})
    for node in graph.fig1_table(TARGET_DATASET, steps, SOURCE_DATASET, RANDOM_INIT):
        needs = [key for name in node.after_ok for key in keys[name]]
        k = node.steps
        if node.stage == "report":  # read in this process once the runs are done (main)
            continue
        if node.dataset == SOURCE_DATASET:
            runs = [source]
        elif node.stage == "pretrain":
            teacher = mae_common.further_pretrain_dir(paths["checkpoints"], k, TARGET_DATASET)
            runs = [Stage(init_name("further", k), "further", f"further pre-training, {k} steps", k,
                          os.path.join(teacher, "model.safetensors"), "pretrain.py", mae_flags + ["--steps", k], needs)]
        elif node.stage == "selftrain":
            teacher = mae_common.further_pretrain_dir(paths["checkpoints"], k, TARGET_DATASET)
            student = mae_common.self_distill_dir(paths["checkpoints"], k, TARGET_DATASET)
            runs = [Stage(init_name("self", k), "self", f"self-distillation, {k} steps (teacher: "
                          f"{init_name('further', k)})", k, os.path.join(student, "model.safetensors"), "selftrain.py",
                          mae_flags + ["--steps", k, "--teacher", teacher], needs)]
        else:
            model = MODEL if node.init == RANDOM_INIT else paths["initial"]
            init_flags = ["--scratch", "True"] if node.init in (RANDOM_INIT, INITIAL) else ["--ckpt_name", node.init]
            runs = finetunes(node.init, ["--model_name", model] + init_flags, needs)
        keys[node.name] = [run.key for run in runs]
        stages += runs
    for stage in stages:
        stage.argv = [str(a) for a in stage.argv]
    return stages


def describe(stages: list[Stage]) -> str:
    lines = []
    for kind, name in (("source", "θ₀ source pre-training"), ("further", "further pre-training"),
                       ("self", "self-distillation"), ("finetune", "fine-tuning")):
        of_kind = [s for s in stages if s.kind == kind]
        if of_kind:
            steps = sorted({s.steps for s in of_kind})
            lines.append(f"  {len(of_kind):3d} x {name:<23} steps {', '.join(map(str, steps))}")
    return "\n".join(lines)


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


# ----------------------------------------------------------------------------- the schedule

def run_seconds(stage: Stage, jobs: int) -> float:
    """A run's estimated seconds when `jobs` runs share the machine."""
    slowdown = 1.0 if jobs == 1 else SIDE_BY_SIDE_SLOWDOWN * max(1.0, jobs / (os.cpu_count() or 1))
    return stage.estimated_seconds() * slowdown


def priorities(stages: list[Stage]) -> dict[str, float]:
    """Each run's estimated seconds plus the longest chain of runs waiting for it: the longest chains start first."""
    waiting = {s.key: [t for t in stages if s.key in t.needs] for s in stages}
    memo = {}

    def chain(stage):
        if stage.key not in memo:
            memo[stage.key] = stage.estimated_seconds() + max((chain(t) for t in waiting[stage.key]), default=0.0)
        return memo[stage.key]
    return {s.key: chain(s) for s in stages}


def next_ready(todo: list[Stage], finished: set[str], priority: dict) -> Stage | None:
    ready = [s for s in todo if all(k in finished for k in s.needs)]
    return min(ready, key=lambda s: (-priority[s.key], todo.index(s))) if ready else None


def simulate(todo: list[Stage], finished: set[str], jobs: int, priority: dict,
             running: dict[str, float] | None = None) -> float:
    """Estimated seconds until the runs `todo` are done, `jobs` at a time, started in the order of the real
    schedule; `running`: key -> estimated seconds left of runs already going."""
    todo, finished = list(todo), set(finished)
    busy = dict(running or {})  # key -> time it ends
    now = 0.0
    while todo or busy:
        while len(busy) < jobs and (stage := next_ready(todo, finished, priority)) is not None:
            todo.remove(stage)
            busy[stage.key] = now + run_seconds(stage, jobs)
        if not busy:  # what is left waits for runs that cannot finish
            break
        key = min(busy, key=busy.get)
        now = busy.pop(key)
        finished.add(key)
    return now


class Progress:
    """The "left" of the progress lines: the simulated rest of the schedule, rescaled by how the finished runs'
    seconds compare with their estimates."""

    def __init__(self, stages, jobs, priority):
        self.stages, self.jobs, self.priority = stages, jobs, priority
        self.spent = self.spent_estimated = 0.0

    def finished(self, stage: Stage, seconds: float) -> None:
        self.spent += seconds
        self.spent_estimated += run_seconds(stage, self.jobs)

    def left(self, todo, finished, running: dict[str, float]) -> float:
        speed = self.spent / self.spent_estimated if self.spent_estimated else 1.0
        return speed * simulate(todo, finished, self.jobs, self.priority, running)


def execute(stages: list[Stage], args, out: str, record) -> None:
    """Runs the stages not yet complete in launch.pool, --jobs at a time, each once the runs it reads have succeeded,
    the longest chains first; each a process `python SCRIPT ARGV --threads THREADS`. With --jobs 1 a run's output
    is on the terminal, else in <out>/logs/<key>.log. A failed run starts nothing that reads it, one that failed
    on bad input (exit code 2) nothing more; then the first failure is raised."""
    priority = priorities(stages)
    todo = sorted((s for s in stages if not s.done()), key=lambda s: -priority[s.key])  # stable: plan order on ties
    finished = {s.key for s in stages if s.done()}
    by_key = {s.key: s for s in stages}
    number = {s.key: i for i, s in enumerate(stages, start=1)}
    logs = os.path.join(out, "logs")
    progress = Progress(stages, args.jobs, priority)
    started, running, failures = time.perf_counter(), {}, []  # running: key -> its start time

    def status():
        left = {key: max(0.0, run_seconds(by_key[key], args.jobs) - (time.perf_counter() - t0))
                for key, t0 in running.items()}
        return (f"elapsed {clock(time.perf_counter() - started)}, "
                f"about {clock(progress.left(todo, finished, left))} left")

    def on_start(job, device):
        stage = by_key[job.name]
        todo.remove(stage)
        running[stage.key] = time.perf_counter()
        print(f"[reproduce-small {number[stage.key]}/{len(stages)}] started {stage.label} | {status()}", flush=True)

    def on_end(job, code, seconds):
        stage = by_key[job.name]
        del running[stage.key]
        if code != 0:
            failures.append((stage, code))
            return
        finished.add(stage.key)
        progress.finished(stage, seconds)
        record({"run": stage.label, "kind": stage.kind, "steps": stage.steps, "seconds": round(seconds, 2),
                "estimated_seconds": round(run_seconds(stage, args.jobs), 2), "jobs": args.jobs})
        print(f"[reproduce-small {number[stage.key]}/{len(stages)}] finished {stage.label} in {clock(seconds)} | "
              f"{status()}", flush=True)

    def job(stage):
        argv = [sys.executable, os.path.join(REPO, stage.script), *stage.argv, "--threads", str(args.threads)]
        return Job(stage.key, os.path.join(logs, f"{stage.key}.log"),
                   lambda device: [(argv, {"OMP_NUM_THREADS": str(args.threads)})],
                   after=tuple(key for key in stage.needs if key not in finished))

    handlers = {sig: signal.getsignal(sig) for sig in pool.STOP_CODES}
    try:  # the stages choose their device from their own --device: the pool's is a name in its lines
        runs = pool.Pool(["cpu"], args.jobs, on_start, on_end)
        runs.run([job(stage) for stage in todo])
    except pool.Stopped as e:  # the pool has stopped every run and said so
        raise SystemExit(e.code) from None
    finally:  # Ctrl-C during the reading is this process's again
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if failures:
        stage, code = failures[0]
        log = os.path.join(logs, f"{stage.key}.log")
        why = (pool.last_line(log).removeprefix("error: ") + f" (its log: {log})" if args.jobs > 1
               else f"exit code {code} (its output is above)")
        others = f"; {len(failures) - 1} other run(s) failed too" if len(failures) > 1 else ""
        cls = utils.UserError if code == pool.BAD_INPUT else RunFailed
        raise cls(f"{stage.label} failed: {why}{others}; the runs that finished are kept: run the command again to "
                  f"continue")


# ----------------------------------------------------------------------------- reading the results

def summaries(results_dir: str, args) -> dict[str, dict]:
    """init -> report.summarize's summary of its fine-tuning seeds (accuracies in percent)."""
    found = report.summarize(results_dir, [TARGET_DATASET], args.seeds)
    return {init: s for (_, init), s in found.items()}


def _compare(a: dict, b: dict) -> tuple[float, float]:
    """(difference of means, the larger of the two stds): the rule calls |difference| <= bound "no difference"."""
    return a["mean_acc"] - b["mean_acc"], max(a["std_acc"] or 0.0, b["std_acc"] or 0.0)


def _pm(s: dict) -> str:
    return report.cell(s, "mean_acc", "std_acc", "n")


def read_outcome(by_init: dict, args) -> dict:
    """The gates, then the claims, by the rules fixed in SMALL_REPRODUCTION.md before the run: {gates, claims,
    outcome}; each gate and claim {name, passed or holds (True/False/None: not read), text}."""
    gates = []
    theta0, random_init = by_init.get(INITIAL), by_init.get(RANDOM_INIT)
    diff, bound = _compare(theta0, random_init)
    gates.append({"name": "transfer", "passed": diff > bound,
                  "text": f"θ₀ {_pm(theta0)} vs random init {_pm(random_init)}: difference {diff:+.2f}, larger std "
                          f"{bound:.2f}: {'passed' if diff > bound else 'failed'} (needs difference > larger std)"})
    runs = sum(s["n"] for s in by_init.values())
    measured = sum(s["n_train"] for s in by_init.values())
    lowest = min((s["min_train_acc"] for s in by_init.values() if s["n_train"]), default=None)
    fit = measured == runs and lowest is not None and lowest >= 100 * FIT_GATE
    worst = min((i for i in by_init if by_init[i]["n_train"]), key=lambda i: by_init[i]["min_train_acc"], default=None)
    gates.append({"name": "fit", "passed": fit,
                  "text": (f"lowest training accuracy over the {runs} fine-tuning runs: {lowest:.2f} % ({worst}); "
                           f"{'passed' if fit else 'failed'} (needs every run >= {100 * FIT_GATE:.0f} %)")
                  if measured == runs else f"training accuracy recorded for {measured} of {runs} runs: failed"})

    claims = []
    reached = all(g["passed"] for g in gates)
    k, longest = args.further_steps, max(args.fig1_steps)
    further, self_ = by_init.get(init_name("further", k)), by_init.get(init_name("self", k))
    if not reached:
        for name in ("claim 1", "claim 2"):
            claims.append({"name": name, "holds": None, "text": "regime not reached"})
    else:
        d1, b1 = _compare(self_, further)
        d2, b2 = _compare(further, theta0)
        part_a, part_b = d1 > b1, d2 >= -b2
        claims.append({"name": "claim 1", "holds": part_a and part_b, "text": (
            f"at {k} steps, self-distillation {_pm(self_)} vs further pre-training {_pm(further)}: {d1:+.2f}, "
            f"larger std {b1:.2f}: {'above' if part_a else 'not above'}; further pre-training vs θ₀ {_pm(theta0)}: "
            f"{d2:+.2f}, larger std {b2:.2f}: {'not below' if part_b else 'below'}")})
        if len(args.fig1_steps) < 2:
            claims.append({"name": "claim 2", "holds": None, "text": "Fig. 1 needs two step counts"})
        else:
            parts = []
            for kind, name in (("further", "further pre-training"), ("self", "self-distillation")):
                at = {s: by_init[init_name(kind, s)] for s in args.fig1_steps}
                best = max(at, key=lambda s: at[s]["mean_acc"])
                d, b = _compare(at[best], at[longest])
                parts.append((d > b, f"{name} at {longest} steps {_pm(at[longest])}, its best at {best} steps "
                                     f"{_pm(at[best])}: {-d:+.2f}, larger std {b:.2f}: "
                                     f"{'declines' if d > b else 'does not decline'}"))
            holds = parts[0][0] and not parts[1][0]
            claims.append({"name": "claim 2", "holds": holds, "text": "; ".join(text for _, text in parts)})
    if not reached:
        failed = [g["name"] for g in gates if not g["passed"]]
        outcome = (f"regime not reached ({' and '.join(failed)} gate{'s' if len(failed) > 1 else ''} failed): no "
                   f"verdict on the claims")
    else:
        outcome = "; ".join(f"{c['name']} {({True: 'holds', False: 'does not hold', None: 'not read'})[c['holds']]}"
                            for c in claims)
    return {"gates": gates, "claims": claims, "outcome": outcome}


def outcome_markdown(outcome: dict) -> str:
    mark = {True: "passed", False: "FAILED", None: "not read"}
    lines = [f"**Outcome: {outcome['outcome']}.**", "", "## Gates (read first)", ""]
    lines += [f"- **{g['name']}**: {mark[g['passed']]}. {g['text']}" for g in outcome["gates"]]
    lines += ["", "## The claims (read only when both gates pass)", ""]
    holds = {True: "holds", False: "does not hold", None: "not read"}
    lines += [f"- **{c['name']}**: {holds[c['holds']]}. {c['text']}" for c in outcome["claims"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- Fig. 1

def fig1_rows(by_init: dict, fig1_steps: list[int]) -> list[dict]:
    """One row per step count (0 = θ₀ for both routes): the summaries of each route."""
    rows = [{"steps": 0, "further": by_init.get(INITIAL), "self": by_init.get(INITIAL)}]
    rows += [{"steps": k, "further": by_init.get(init_name("further", k)), "self": by_init.get(init_name("self", k))}
             for k in sorted(fig1_steps)]
    return rows


def fig1_markdown(rows: list[dict], num_train: int, random_init: dict | None) -> str:
    lines = ["| further pre-training steps | epochs over the training images | further pre-training | "
             "self-distillation |", "|---:|---:|---|---|"]
    for r in rows:
        steps = "0 (θ₀)" if r["steps"] == 0 else str(r["steps"])
        lines.append(f"| {steps} | {r['steps'] * MAE_BATCH_SIZE / num_train:.0f} | {_pm(r['further'])} | "
                     f"{_pm(r['self'])} |")
    note = (f"Test accuracy (%) after fine-tuning, mean ± sample std over the fine-tuning seeds; from {MODEL}'s "
            f"random init: {_pm(random_init)}.")
    return "\n".join(lines) + f"\n\n{note}\n"


def write_fig1_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.write("steps,route,n,mean_acc,std_acc\n")
        for r in rows:
            for route in ("further", "self"):
                s = r[route]
                if s is not None:
                    std = "" if s["std_acc"] is None else f"{s['std_acc']:.4f}"
                    f.write(f"{r['steps']},{route},{s['n']},{s['mean_acc']:.4f},{std}\n")


def plot_fig1(path: str, rows: list[dict], table_steps: int, random_init: dict | None) -> None:
    """x: further pre-training steps, y: mean test accuracy with std error bars; θ₀ and the random init as
    horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, label, style in ((rows[0]["further"], "fine-tuning from θ₀", "--"),
                            (random_init, f"fine-tuning from {MODEL}'s random init", ":")):
        if s is not None:
            ax.axhline(s["mean_acc"], color="gray", linestyle=style, label=label)
            if s["std_acc"] is not None:
                ax.axhspan(s["mean_acc"] - s["std_acc"], s["mean_acc"] + s["std_acc"], color="gray", alpha=0.12)
    for route, label, marker in (("further", "further pre-training", "o"), ("self", "self-distillation", "s")):
        points = [(r["steps"], r[route]) for r in rows[1:] if r[route] is not None]
        if points:
            ax.errorbar([k for k, _ in points], [s["mean_acc"] for _, s in points],
                        yerr=[s["std_acc"] or 0.0 for _, s in points], marker=marker, capsize=3, label=label)
    ax.axvline(table_steps, color="black", linewidth=0.5, linestyle=":", label=f"the table's {table_steps} steps")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["steps"] for r in rows[1:]], [str(r["steps"]) for r in rows[1:]])
    ax.set_xlabel("further pre-training steps (batch 64)")
    ax.set_ylabel("test accuracy after fine-tuning (%)")
    seeds = rows[0]["further"]["n"] if rows[0]["further"] else 0
    ax.set_title(f"Fashion-MNIST, {seeds} seed{'s' if seeds != 1 else ''} per point: {MODEL}, θ₀ from "
                 f"natural-image crops", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- reported, not read

def _images(data_dir: str, split: str, preprocessing) -> tuple[torch.Tensor, np.ndarray]:
    """A target split as the models see it: (N, 3, 32, 32) normalised, and its labels."""
    dataset = ImageDataset(TARGET_DATASET, split, data_dir, preprocessing.size, preprocessing.resample)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).float() / 255  # (N, 3, S, S)
    mean, std = torch.tensor(preprocessing.mean)[:, None, None], torch.tensor(preprocessing.std)[:, None, None]
    return (images - mean) / std, np.array(dataset.reader.labels())


def _pixels(data_dir: str, split: str) -> np.ndarray:
    """A target split's stored pixels (N, rows * columns) in [0, 1]."""
    from PIL import Image
    reader = LMDBReader(os.path.join(data_dir, TARGET_DATASET, f"{split}.lmdb"))
    return np.stack([np.asarray(Image.open(io.BytesIO(reader[i][0])).convert("L"), dtype=np.float64).ravel() / 255
                     for i in range(len(reader))])


def _logistic_accuracy(train_x, train_y, test_x, test_y, standardise: bool) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    if standardise:
        scaler = StandardScaler().fit(train_x)
        train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    classifier = LogisticRegression(max_iter=PROBE_MAX_ITER).fit(train_x, train_y)
    return 100.0 * float((classifier.predict(test_x) == test_y).mean())


@torch.no_grad()
def diagnostics(args, paths: dict) -> dict:
    """Memorisation per MAE model (MAE loss with fixed masks on the training images and on as many test images,
    drawn with --data_seed), the pixel logistic regression, and a linear probe per init (logistic regression on
    the standardised frozen CLS features). Nothing here is read by the rules."""
    from models import cls_feature, load_mae, mae_loss, preprocessing_of

    models = {RANDOM_INIT: MODEL, INITIAL: paths["initial"]}
    for k in sorted(args.fig1_steps):
        models[init_name("further", k)] = mae_common.further_pretrain_dir(paths["checkpoints"], k, TARGET_DATASET)
        models[init_name("self", k)] = mae_common.self_distill_dir(paths["checkpoints"], k, TARGET_DATASET)
    preprocessing = preprocessing_of(paths["initial"], MODEL).check(load_mae(MODEL).config.image_size)
    train_x, train_y = _images(paths["data"], "train", preprocessing)
    test_x, test_y = _images(paths["data"], "test", preprocessing)
    held_out = np.sort(np.random.default_rng(args.data_seed).choice(len(test_x), min(len(train_x), len(test_x)),
                                                                   replace=False))
    result = {"held_out_test_indices": held_out.tolist(), "memorisation": {}, "probe": {},
              "pixel_logistic_regression": _logistic_accuracy(_pixels(paths["data"], "train"), train_y,
                                                              _pixels(paths["data"], "test"), test_y, False)}
    for init, path in models.items():
        mae = load_mae(path).eval()
        num_patches = mae.vit.embeddings.patch_embeddings.num_patches
        if init != RANDOM_INIT:  # the random init has seen no image: nothing to memorise
            losses = {}
            for part, images in (("train", train_x), ("held_out", test_x[held_out])):
                noise = torch.rand(len(images), num_patches,
                                   generator=torch.Generator().manual_seed(MEMORISATION_MASK_SEED + (part == "train")))
                loss = sum(mae_loss(mae, x, n).item() * len(x) for x, n in zip(images.split(100), noise.split(100)))
                losses[part] = loss / len(images)
            result["memorisation"][init] = losses
        features = {part: torch.cat([cls_feature(mae.vit, x) for x in images.split(500)]).numpy()
                    for part, images in (("train", train_x), ("test", test_x))}
        result["probe"][init] = _logistic_accuracy(features["train"], train_y, features["test"], test_y, True)
    return result


def diagnostics_markdown(diag: dict, args) -> str:
    lines = ["### Memorisation: MAE loss with fixed masks", "",
             "| further pre-training steps | further pre-training: training images | held-out images | gap | "
             "self-distillation: training images | held-out images | gap |", "|---:|---:|---:|---:|---:|---:|---:|"]

    def cells(init):
        m = diag["memorisation"].get(init)
        return ["—"] * 3 if m is None else [f"{m['train']:.4f}", f"{m['held_out']:.4f}",
                                            f"{m['held_out'] - m['train']:+.4f}"]
    lines.append("| 0 (θ₀) | " + " | ".join(cells(INITIAL) * 2) + " |")
    for k in sorted(args.fig1_steps):
        lines.append(f"| {k} | " + " | ".join(cells(init_name("further", k)) + cells(init_name("self", k))) + " |")
    n = len(diag["held_out_test_indices"])
    lines += ["", f"Mean MAE loss (mask 0.75, per-patch normalised pixels) on the {n} training images and on {n} "
                  "test images never trained on, with the same fixed masks for every model; gap = held-out minus "
                  "training.", "",
              "### Baselines", "",
              f"- logistic regression on the raw pixels of the training images: "
              f"**{diag['pixel_logistic_regression']:.2f} %** test accuracy", "",
              "| linear probe on frozen CLS features of | test accuracy (%) |", "|---|---:|"]
    lines += [f"| {init} | {diag['probe'][init]:.2f} |" for init in inits(args) if init in diag["probe"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- records

def check_protocol(args, out: str) -> None:
    """Write the settings; refuse to mix results of other settings into the same folder. Only what was made binds:
    before any run, settings that no built dataset was made from may change (a mistyped --target_src must not lock
    the folder), and the new ones are written."""
    path = os.path.join(out, "protocol.json")
    protocol = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL_FLAGS}
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = [k for k in protocol if before.get(k) != protocol[k]]
        if not changed:
            return
        runs = any(os.path.exists(os.path.join(out, p)) for p in RUN_OUTPUTS)
        built = {k: name for name, keys in DATASET_SETTINGS.items() if os.path.isdir(os.path.join(out, "data", name))
                 for k in keys}
        bound = [k for k in changed if runs or k in built]
        if bound:
            k = bound[0]
            made_by = "" if runs else f"; data/{built[k]} was built with them"
            raise utils.UserError(f"{out} holds a reproduction with other settings ({k}: {before.get(k)!r} there, "
                                  f"{protocol[k]!r} now{made_by}); pass the same settings to continue it, or another "
                                  f"--out_dir")
        print(f"[reproduce-small] {out} has no run yet and no data built from what changed "
              f"({', '.join(changed)}): its protocol.json now holds these settings", flush=True)
    outputs.write_json(path, protocol)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "unknown"


def origin(counts: dict) -> str:
    """Where data.prepare took a dataset from: its Debian packages and their versions, or the folder."""
    if counts.get("packages"):
        return ", ".join(f"{p['package']} {p['version']}" for p in counts["packages"])
    return str(counts.get("src"))


def read_timings(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- main

def main(args):
    for name in ("fig1_steps", "seeds"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            raise utils.UserError(f"--{name} has repeated values: {getattr(args, name)}")
    if min(args.fig1_steps + [args.further_steps, args.source_steps, args.finetune_steps, args.shots,
                              args.source_crops]) < 1:
        raise utils.UserError("step counts, --shots and --source_crops must be positive (θ₀ is Fig. 1's point at "
                              "0 steps)")
    if args.further_steps not in args.fig1_steps:
        raise utils.UserError(f"--further_steps {args.further_steps} must be one of --fig1_steps "
                              f"{args.fig1_steps}: the table is Fig. 1 at its default step count")
    for flag in ("source_src", "target_src"):
        if getattr(args, flag) is not None:
            if not os.path.isdir(getattr(args, flag)):
                raise utils.UserError(f"--{flag} {getattr(args, flag)} is not a folder")
            setattr(args, flag, os.path.abspath(getattr(args, flag)))
    started, load_at_start = time.perf_counter(), load_average()
    out = args.out_dir
    paths = {"data": os.path.join(out, "data"), "initial": os.path.join(out, "initial_model"),
             "checkpoints": os.path.join(out, "checkpoints"), "results": os.path.join(out, "results")}
    os.makedirs(paths["data"], exist_ok=True)
    check_protocol(args, out)
    timings_path = os.path.join(out, "timings.jsonl")

    def record(entry):
        with open(timings_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    saved_threads, saved_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # what the runs' processes start with
    try:
        # ---- the plan and its time estimate (the data builds first, if they are still to do)
        to_build = [k for k, name in (("source", SOURCE_DATASET), ("target", TARGET_DATASET))
                    if not os.path.isdir(os.path.join(paths["data"], name))]
        num_train = args.shots * len(sources.FASHION_MNIST_CLASSES)
        num_test = dataset_counts(paths["data"], TARGET_DATASET)["splits"]["test"]["total"] \
            if "target" not in to_build else FASHION_MNIST_TEST_IMAGES
        stages = plan(args, paths, eval_images=num_test + num_train)
        todo = [s for s in stages if not s.done()]
        priority = priorities(stages)
        runs = simulate(todo, {s.key for s in stages if s.done()}, args.jobs, priority)
        diag_done = os.path.exists(os.path.join(out, "diagnostics.json"))
        diag_seconds = DIAGNOSTIC_SECONDS_PER_IMAGE * len(inits(args)) * (num_test + num_train)
        extra = sum(BUILD_SECONDS[k] for k in to_build) + (0 if diag_done else diag_seconds)
        print(f"[reproduce-small] {len(stages)} runs, {len(stages) - len(todo)} already complete, into {out}/, "
              f"{args.jobs} at a time\n{describe(stages)}\n"
              f"[reproduce-small] estimated time: {clock(runs + extra)} ({clock(runs)} for the {len(todo)} runs to "
              f"do, {clock(extra)} for the data builds and diagnostics; from per-step costs measured on a 2-core "
              f"CPU, see SMALL_REPRODUCTION.md; rescaled by the measured speed as runs finish)", flush=True)

        # ---- data, then the runs
        for entry in build_datasets(args, paths["data"]):
            record(entry)
        execute(stages, args, out, record)

        # ---- reading: the gates, then the claims; the table (report.py) and Fig. 1
        report.main(report.get_args_parser().parse_args(
            ["--results_dir", paths["results"], "--datasets", TARGET_DATASET, "--steps", str(args.further_steps),
             "--seeds", *map(str, args.seeds), "--out_dir", out, "--train"]))
        by_init = summaries(paths["results"], args)
        outcome = read_outcome(by_init, args)
        outputs.write_json(os.path.join(out, "outcome.json"), outcome)
        rows = fig1_rows(by_init, args.fig1_steps)
        fig1 = fig1_markdown(rows, num_train, by_init.get(RANDOM_INIT))
        with open(os.path.join(out, "fig1.md"), "w") as f:
            f.write(fig1)
        write_fig1_csv(os.path.join(out, "fig1.csv"), rows)
        plot_fig1(os.path.join(out, "fig1.png"), rows, args.further_steps, by_init.get(RANDOM_INIT))

        # ---- reported, not read
        diag_path = os.path.join(out, "diagnostics.json")
        if not os.path.exists(diag_path):
            print("\n[reproduce-small] diagnostics: memorisation, pixel logistic regression, linear probes", flush=True)
            start = time.perf_counter()
            outputs.write_json(diag_path, diagnostics(args, paths))
            record({"run": "diagnostics", "kind": "diagnostics", "steps": 0,
                    "seconds": round(time.perf_counter() - start, 2), "estimated_seconds": round(diag_seconds, 2)})
        with open(diag_path) as f:
            diag = diagnostics_markdown(json.load(f), args)

        # ---- summary: all of it, with times and machine
        timings = read_timings(timings_path)
        with open(os.path.join(out, "report.md")) as f:
            table = f.read()
        source, target = dataset_counts(paths["data"], SOURCE_DATASET), dataset_counts(paths["data"], TARGET_DATASET)
        kinds = ("data", "source", "further", "self", "finetune", "diagnostics")
        summary = (
            f"# Small reproduction, protocol 2: results\n\n{outcome_markdown(outcome)}\n"
            f"## The table (report.py --train, {args.further_steps} further pre-training steps)\n\n{table}\n"
            f"## Fig. 1\n\n{fig1}\n![Fig. 1](fig1.png)\n\n## Reported, not read\n\n{diag}\n"
            f"## Data\n\n- source: {source['splits']['train']['total']:,} crops of {source['images']['train']:,} "
            f"images, {source['splits']['test']['total']:,} held-out crops of {source['images']['test']:,} others "
            f"({source['images']['kept']:,} kept of {source['images']['candidates']:,}; "
            f"{', '.join(f'{n:,} {why}' for why, n in source['images']['dropped'].items() if n) or 'none dropped'}) "
            f"from {origin(source)}"
            + f"\n- target: {num_train:,} training images, {target['splits']['test']['total']:,} test images "
              f"({origin(target)})\n\n"
            f"## Time and machine\n\n"
            f"- this invocation: {clock(time.perf_counter() - started)} wall time, {args.jobs} run(s) at a time, "
            f"{args.threads} torch thread(s) each; load average at its start {load_at_start}, at its end "
            f"{load_average()}\n"
            f"- all runs ({len(timings)} entries, over every invocation into this folder): "
            f"{clock(sum(t['seconds'] for t in timings))} of run time\n"
            + "".join(f"  - {kind}: {clock(sum(t['seconds'] for t in timings if t['kind'] == kind))} "
                      f"(estimated {clock(sum(t['estimated_seconds'] for t in timings if t['kind'] == kind))})\n"
                      for kind in kinds if any(t["kind"] == kind for t in timings))
            + f"- machine: {machine()}; torch {torch.__version__}, commit {utils.git_commit()}\n")
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(summary)
        print(f"\n{outcome_markdown(outcome)}\n[reproduce-small] Fig. 1 ({out}/fig1.png):\n{fig1}\n"
              f"[reproduce-small] done in {clock(time.perf_counter() - started)}; {out}/summary.md", flush=True)
    finally:
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
