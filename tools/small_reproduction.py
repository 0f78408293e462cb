"""The paper's claim at laptop scale: the three routes and Fig. 1, on 2 CPU cores in about 30 minutes.

The protocol (and why each number is what it is) is in SMALL_REPRODUCTION.md. In short:
  θ₀      vit-mae-tiny pre-trained with MAE (pretrain.py) on random crops of the two photographs that ship
          with scikit-learn (china.jpg, flower.jpg): the "source domain"
  target  scikit-learn's handwritten digits, low-data: a fixed, seeded subset of --shots labelled images per
          class for training (and for further pre-training / self-distillation), the full 500-image test split
  routes  fine-tune from θ₀ / from further pre-training (pretrain.py) / from self-distillation (selftrain.py
          --teacher = the further pre-trained model of the same step count), --seeds fine-tuning seeds each
  Fig. 1  the same at every step count of --fig1_steps (the table's --further_steps is one of them)

    python -m tools.small_reproduction                 # all of it (= make reproduce-small, bash run_small_reproduction.sh)
    python -m tools.small_reproduction --source_steps 4 --further_steps 2 --fig1_steps 2 4 --finetune_steps 3 \\
        --seeds 1 --source_crops 64 --out_dir /tmp/smoke           # the same pipeline in seconds (the test)

Every stage runs in this process through the stage's own `main` (pretrain.main, selftrain.main, finetune.main,
report.main) with the arguments its command line would get. Everything goes under --out_dir:
    data/natural_patches/train.lmdb     the source crops          data/digits_low/{train,test}.lmdb  the target
    initial_model/                      θ₀, a model directory (what --model_name takes)
    checkpoints/{further,self-further}-pretrain-<steps>/digits_low/         the MAE stages
    results/digits_low/<init>/seed<k>.json                                  fine-tuning
    report.md, report.csv (the table, report.py), fig1.md, fig1.csv, fig1.png, summary.md (all of it, with
    times and machine), protocol.json (the settings), timings.jsonl (seconds per run)
Re-running the command continues where it stopped: finished runs are skipped ("already complete") and an
interrupted MAE run resumes from its train_state.pt. A different protocol in the same --out_dir is refused.

The time estimate printed up front uses fixed per-step costs (STEP_SECONDS, measured on the machine of
SMALL_REPRODUCTION.md); while running, the remaining time is rescaled by how fast the finished runs went.
"""
import argparse
import datetime
import io
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

import finetune
import mae_common
import outputs
import pretrain
import report
import selftrain
import utils
from data import LMDBReader, dataset_dir, write_lmdb

SOURCE_DATASET = "natural_patches"
TARGET_DATASET = "digits_low"
NUM_DIGIT_CLASSES = 10
MAE_BATCH_SIZE = 64  # the recipe's batch (pretrain.py's default), used for the epoch counts shown in fig1.md
SAVE_EVERY_STEPS = 100  # resumable state of the MAE runs; a tiny model saves in milliseconds
# Seconds per optimizer step with one torch thread on a 2-core AMD EPYC (KVM), another job on the other core,
# and seconds per run for loading, a DataLoader worker and the test evaluation: the up-front time estimate.
STEP_SECONDS = {"source": 0.16, "further": 0.16, "self": 0.38, "finetune": 0.12}
RUN_SECONDS = {"source": 1.5, "further": 1.5, "self": 1.5, "finetune": 2.5}
# Flags that change how the experiment runs, not what it computes: free to differ when resuming.
RUN_CONTROL_FLAGS = {"out_dir", "threads", "workers", "log_every", "device"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description="The paper's table and Fig. 1 at small scale, on CPU "
                                            "(SMALL_REPRODUCTION.md).")
    g = p.add_argument_group("source domain (θ₀)")
    g.add_argument("--source_crops", type=int, default=4000,
                   help="random square crops of scikit-learn's two sample photographs")
    g.add_argument("--crop_min", type=int, default=48,
                   help="smallest crop side in pixels (the loader resizes every crop to the model's 32)")
    g.add_argument("--crop_max", type=int, default=160, help="largest crop side in pixels")
    g.add_argument("--source_steps", type=int, default=1500, help="MAE steps of θ₀ from vit-mae-tiny's random init")
    g.add_argument("--source_lr", type=float, default=1e-3, help="peak learning rate of θ₀'s MAE training")
    g.add_argument("--source_warmup_steps", type=int, default=100,
                   help="linear warmup of θ₀'s MAE training (it starts from random weights)")
    g = p.add_argument_group("target domain (low-data digits)")
    g.add_argument("--shots", type=int, default=10,
                   help="labelled training images per class; the same images are further pre-trained on")
    g.add_argument("--data_seed", type=int, default=0, help="seeds the source crops and the choice of the subset")
    g = p.add_argument_group("further pre-training and self-distillation")
    g.add_argument("--further_steps", type=int, default=200,
                   help="steps of both MAE stages in the table (the default of Fig. 1's x axis)")
    g.add_argument("--fig1_steps", type=int, nargs="+", default=[100, 200, 400, 800],
                   help="Fig. 1's step counts (θ₀ is the point at 0 steps, always included)")
    g.add_argument("--mae_lr", type=float, default=1e-3, help="peak learning rate of both MAE stages")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--finetune_steps", type=int, default=150, help="fine-tuning steps (batch 32)")
    g.add_argument("--finetune_warmup_steps", type=int, default=15, help="linear warmup of fine-tuning")
    g.add_argument("--finetune_lr", type=float, default=1e-3, help="peak learning rate of fine-tuning")
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="fine-tuning seeds of every init")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="runs/small_reproduction", help="everything goes here (see the docstring)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 leaves a core to the DataLoader worker (on a shared 2-core machine, "
                        "2 threads were 10x slower than 1)")
    g.add_argument("--workers", type=int, default=1, help="DataLoader worker processes of every stage")
    g.add_argument("--device", type=utils.device_spec, default="auto", help="passed to every stage (auto: cuda if available)")
    g.add_argument("--log_every", type=int, default=100, help="steps between a stage's metrics lines")
    return p


# ----------------------------------------------------------------------------- the two datasets

def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_dataset(root: str, splits: dict, info: dict) -> None:
    """{split: records} into <root>/<split>.lmdb plus counts.json, built in a hidden folder and moved into
    place once complete: an existing <root> means a finished dataset."""
    partial = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for split, records in splits.items():
        write_lmdb(os.path.join(partial, f"{split}.lmdb"), records)
    with open(os.path.join(partial, "counts.json"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(partial, root)


def build_source_patches(data_dir: str, num_crops: int, crop_min: int, crop_max: int, seed: int) -> str:
    """The source domain: random square crops (side uniform in [crop_min, crop_max], flipped half of the time)
    of china.jpg and flower.jpg, alternately, stored as JPEG at their cropped size; labels are all 0 (unused)."""
    root = os.path.join(data_dir, SOURCE_DATASET)
    if os.path.isdir(root):
        return root
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images  # [(427, 640, 3) uint8] x 2
    rng = np.random.default_rng(seed)

    def crops():
        for i in range(num_crops):
            photo = photos[i % len(photos)]
            side = int(rng.integers(crop_min, crop_max + 1))
            top = int(rng.integers(0, photo.shape[0] - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            patch = photo[top:top + side, left:left + side]  # (side, side, 3)
            yield _jpeg(patch[:, ::-1] if rng.random() < 0.5 else patch), 0

    _write_dataset(root, {"train": crops()}, {"name": SOURCE_DATASET, "num_classes": 1, "num_crops": num_crops,
                                              "photos": ["china.jpg", "flower.jpg"], "seed": seed})
    return root


def build_digits_low(data_dir: str, shots: int, seed: int) -> str:
    """The target domain: `shots` images per class drawn (seeded, without replacement) from the training
    split of `digits`, and the whole test split of `digits` (500 images); records copied byte for byte."""
    root = os.path.join(data_dir, TARGET_DATASET)
    if os.path.isdir(root):
        return root
    digits = dataset_dir("digits", data_dir)  # built from scikit-learn on first use
    train, test = LMDBReader(os.path.join(digits, "train.lmdb")), LMDBReader(os.path.join(digits, "test.lmdb"))
    labels = np.array(train.labels())
    rng = np.random.default_rng(seed)
    chosen = sorted(int(i) for c in range(NUM_DIGIT_CLASSES)
                    for i in rng.choice(np.flatnonzero(labels == c), size=shots, replace=False))
    _write_dataset(root, {"train": (train[i] for i in chosen), "test": (test[i] for i in range(len(test)))},
                   {"name": TARGET_DATASET, "num_classes": NUM_DIGIT_CLASSES, "shots": shots, "seed": seed,
                    "train_indices_in_digits": chosen, "num_train": len(chosen), "num_test": len(test)})
    return root


# ----------------------------------------------------------------------------- the plan

@dataclass
class Stage:
    kind: str  # source, further, self, finetune (the keys of STEP_SECONDS)
    label: str
    steps: int
    done_file: str  # exists once the stage is complete
    run: Callable[[], None]

    def estimated_seconds(self) -> float:
        return RUN_SECONDS[self.kind] + STEP_SECONDS[self.kind] * self.steps


def init_name(kind: str, steps: int) -> str:
    """finetune.py's --ckpt_name, and report.py's <init>."""
    return {"further": f"further-pretrain-{steps}", "self": f"self-further-pretrain-{steps}"}[kind]


def plan(args, paths: dict) -> list[Stage]:
    """θ₀; the table's three routes (θ₀, then further pre-training and self-distillation at --further_steps,
    each followed by its fine-tuning seeds); then Fig. 1's other step counts in the same way."""
    stage_flags = ["--data_dir", paths["data"], "--checkpoint_dir", paths["checkpoints"], "--workers", args.workers,
                   "--log_every", args.log_every, "--device", args.device]
    mae_flags = stage_flags + ["--model_name", paths["initial"], "--dataset", TARGET_DATASET, "--lr", args.mae_lr,
                               "--save_every", SAVE_EVERY_STEPS]

    def call(module, argv):
        return lambda: module.main(module.get_args_parser().parse_args([str(a) for a in argv]))

    stages = [Stage("source", f"θ₀: MAE on {SOURCE_DATASET} from random init", args.source_steps,
                    os.path.join(paths["initial"], "model.safetensors"),
                    call(pretrain, stage_flags + ["--model_name", "vit-mae-tiny", "--dataset", SOURCE_DATASET,
                                                  "--output_dir", paths["initial"], "--steps", args.source_steps,
                                                  "--lr", args.source_lr, "--warmup_steps", args.source_warmup_steps,
                                                  "--save_every", SAVE_EVERY_STEPS]))]

    def finetunes(init: str, init_flags: list) -> list[Stage]:
        return [Stage("finetune", f"fine-tuning from {init}, seed {seed}", args.finetune_steps,
                      os.path.join(paths["results"], TARGET_DATASET, init, f"seed{seed}.json"),
                      call(finetune, stage_flags + init_flags + [
                          "--model_name", paths["initial"], "--dataset", TARGET_DATASET,
                          "--results_dir", paths["results"], "--seed", seed, "--steps", args.finetune_steps,
                          "--warmup_steps", args.finetune_warmup_steps, "--lr", args.finetune_lr]))
                for seed in args.seeds]

    stages += finetunes("initial", ["--scratch", "True"])
    for steps in [args.further_steps] + sorted(set(args.fig1_steps) - {args.further_steps}):
        teacher = mae_common.further_pretrain_dir(paths["checkpoints"], steps, TARGET_DATASET)
        student = os.path.join(paths["checkpoints"], init_name("self", steps), TARGET_DATASET)
        stages.append(Stage("further", f"further pre-training, {steps} steps", steps,
                            os.path.join(teacher, "model.safetensors"),
                            call(pretrain, mae_flags + ["--steps", steps])))
        stages += finetunes(init_name("further", steps), ["--ckpt_name", init_name("further", steps)])
        stages.append(Stage("self", f"self-distillation, {steps} steps (teacher: further-pretrain-{steps})", steps,
                            os.path.join(student, "model.safetensors"),
                            call(selftrain, mae_flags + ["--steps", steps, "--teacher", teacher])))
        stages += finetunes(init_name("self", steps), ["--ckpt_name", init_name("self", steps)])
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


# ----------------------------------------------------------------------------- Fig. 1

def fig1_rows(results_dir: str, fig1_steps: list[int], seeds: list[int]) -> list[dict]:
    """One row per step count (0 = θ₀ for both routes): mean ± std test accuracy (%) of each route."""
    summaries = report.summarize(results_dir, [TARGET_DATASET], seeds)

    def get(init):
        return summaries.get((TARGET_DATASET, init))

    rows = [{"steps": 0, "further": get("initial"), "self": get("initial")}]
    rows += [{"steps": k, "further": get(init_name("further", k)), "self": get(init_name("self", k))}
             for k in sorted(fig1_steps)]
    return rows


def _cell(summary: dict | None) -> str:
    return report.cell(summary, "mean_acc", "std_acc", "n")


def fig1_markdown(rows: list[dict], num_train: int) -> str:
    lines = ["| further pre-training steps | epochs over the subset | further pre-training | self-distillation |",
             "|---:|---:|---|---|"]
    for r in rows:
        steps = "0 (θ₀)" if r["steps"] == 0 else str(r["steps"])
        lines.append(f"| {steps} | {r['steps'] * MAE_BATCH_SIZE / num_train:.0f} | {_cell(r['further'])} | "
                     f"{_cell(r['self'])} |")
    note = "Test accuracy (%) after fine-tuning, mean ± sample std over the fine-tuning seeds."
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


def plot_fig1(path: str, rows: list[dict], table_steps: int) -> None:
    """x: further pre-training steps, y: mean test accuracy with std error bars; θ₀ as a horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    initial = rows[0]["further"]
    if initial is not None:
        ax.axhline(initial["mean_acc"], color="gray", linestyle="--", label="fine-tuning from θ₀")
        if initial["std_acc"] is not None:
            ax.axhspan(initial["mean_acc"] - initial["std_acc"], initial["mean_acc"] + initial["std_acc"],
                       color="gray", alpha=0.15)
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
    ax.set_title(f"{TARGET_DATASET}: vit-mae-tiny, θ₀ from natural-image patches")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- records

def check_protocol(args, path: str) -> None:
    """Write the settings on the first run; refuse to mix results of other settings into the same folder."""
    protocol = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL_FLAGS}
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = [k for k in protocol if before.get(k) != protocol[k]]
        if changed:
            k = changed[0]
            raise utils.UserError(f"{os.path.dirname(path)} holds a reproduction with other settings ({k}: "
                                  f"{before.get(k)!r} there, {protocol[k]!r} now); pass the same settings to "
                                  f"continue it, or another --out_dir")
        return
    outputs.write_json(path, protocol)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


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
    if min(args.fig1_steps + [args.further_steps, args.source_steps, args.finetune_steps, args.shots]) < 1:
        raise utils.UserError("step counts and --shots must be positive (θ₀ is Fig. 1's point at 0 steps)")
    if args.further_steps not in args.fig1_steps:
        raise utils.UserError(f"--further_steps {args.further_steps} must be one of --fig1_steps "
                              f"{args.fig1_steps}: the table is Fig. 1 at its default step count")
    started = time.perf_counter()
    out = args.out_dir
    paths = {"data": os.path.join(out, "data"), "initial": os.path.join(out, "initial_model"),
             "checkpoints": os.path.join(out, "checkpoints"), "results": os.path.join(out, "results")}
    os.makedirs(paths["data"], exist_ok=True)
    check_protocol(args, os.path.join(out, "protocol.json"))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        # ---- data: the source patches for θ₀ and the low-data target
        build_source_patches(paths["data"], args.source_crops, args.crop_min, args.crop_max, args.data_seed)
        build_digits_low(paths["data"], args.shots, args.data_seed)

        # ---- the plan and its time estimate
        stages = plan(args, paths)
        todo = [s for s in stages if not os.path.exists(s.done_file)]
        estimate = sum(s.estimated_seconds() for s in todo)
        print(f"[reproduce-small] {len(stages)} runs, {len(stages) - len(todo)} already complete, into {out}/\n"
              f"{describe(stages)}\n"
              f"[reproduce-small] estimated time for the {len(todo)} to run: {clock(estimate)} (fixed per-step "
              f"costs of a 2-core CPU; rescaled by the measured speed as runs finish)", flush=True)

        # ---- the runs, one after the other
        timings_path = os.path.join(out, "timings.jsonl")
        spent = spent_estimated = 0.0
        for i, stage in enumerate(stages, start=1):
            if os.path.exists(stage.done_file):
                continue
            speed = spent / spent_estimated if spent_estimated else 1.0
            left = speed * sum(s.estimated_seconds() for s in stages[i - 1:] if not os.path.exists(s.done_file))
            print(f"\n[reproduce-small {i}/{len(stages)}] {stage.label} | elapsed "
                  f"{clock(time.perf_counter() - started)}, about {clock(left)} left", flush=True)
            t0 = time.perf_counter()
            stage.run()
            seconds = time.perf_counter() - t0
            spent, spent_estimated = spent + seconds, spent_estimated + stage.estimated_seconds()
            with open(timings_path, "a") as f:
                f.write(json.dumps({"run": stage.label, "kind": stage.kind, "steps": stage.steps,
                                    "seconds": round(seconds, 2),
                                    "estimated_seconds": round(stage.estimated_seconds(), 2)}) + "\n")

        # ---- the table (report.py) and Fig. 1
        print(f"\n[reproduce-small] the paper's table at {args.further_steps} further pre-training steps:", flush=True)
        report.main(report.get_args_parser().parse_args(
            ["--results_dir", paths["results"], "--datasets", TARGET_DATASET, "--steps", str(args.further_steps),
             "--seeds", *map(str, args.seeds), "--out_dir", out]))
        rows = fig1_rows(paths["results"], args.fig1_steps, args.seeds)
        fig1 = fig1_markdown(rows, num_train=args.shots * NUM_DIGIT_CLASSES)
        with open(os.path.join(out, "fig1.md"), "w") as f:
            f.write(fig1)
        write_fig1_csv(os.path.join(out, "fig1.csv"), rows)
        plot_fig1(os.path.join(out, "fig1.png"), rows, args.further_steps)
        print(f"\n[reproduce-small] Fig. 1 ({out}/fig1.png):\n{fig1}", flush=True)

        # ---- summary: both tables, times, machine
        timings = read_timings(timings_path)
        wall = time.perf_counter() - started
        with open(os.path.join(out, "report.md")) as f:
            table = f.read()
        summary = (f"# Small reproduction: results\n\n{table}\n## Fig. 1\n\n{fig1}\n![Fig. 1](fig1.png)\n\n"
                   f"## Time and machine\n\n"
                   f"- this invocation: {clock(wall)} wall time\n"
                   f"- all runs ({len(timings)}, over every invocation into this folder): "
                   f"{clock(sum(t['seconds'] for t in timings))}\n"
                   + "".join(f"  - {kind}: {clock(sum(t['seconds'] for t in timings if t['kind'] == kind))}\n"
                             for kind in STEP_SECONDS)
                   + f"- machine: {machine()}; torch {torch.__version__}, {args.threads} torch thread(s), "
                     f"{args.workers} DataLoader worker(s)\n")
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(summary)
        print(f"[reproduce-small] done in {clock(wall)}; {out}/summary.md", flush=True)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
