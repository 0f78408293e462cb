"""Stateless helpers shared by the stages, the plumbing (training/) and the tools: flag types and the flags the
three stages share, the command-line wrapper, the run's provenance (git commit, library versions), seed streams,
and which flags do not change a run's result. (Files written atomically: outputs/.) Nothing here holds state;
nothing here imports the entry scripts, training/, launch/, tools/ or lab/.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys

import torch
import torch.distributed as dist

import paper
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


def dataset_name(value: str) -> str:
    """An argparse type for --dataset: a name (a folder under --data_dir), not a path (data.datasets.check_name)."""
    from data.datasets import check_name  # data/ is not needed to import utils
    try:
        return check_name(value)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--dataset ")) from None


def threads_spec(value: str) -> str | int:
    """An argparse type for --threads: auto, or a whole number >= 1."""
    if value == "auto":
        return value
    return int_at_least(1)(value)


THREADS_HELP = ("CPU threads of this process (torch.set_num_threads): auto is 1 on the CPU -- two threads on a busy "
                "2-core machine ran 10-20x slower, and independent runs side by side (JOBS) use the cores better -- "
                "and torch's default beside a GPU; or a number")


def cpu_threads(value: str | int, device_type: str) -> int | None:
    """The thread count --threads asks for on a device of this type (None: torch's default)."""
    if value != "auto":
        return int(value)
    return 1 if device_type == "cpu" else None


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


class NotGiven:
    """Marks a flag's parser default that something else may replace when the flag is not given: the modality's
    value (text_common.resolve_defaults) or --recipe's (training/mae_recipe.py). It prints and compares as the
    value; resolved to a plain value before anything is recorded."""


class NotGivenFloat(NotGiven, float):
    pass


class NotGivenInt(NotGiven, int):
    pass


class NotGivenStr(NotGiven, str):
    pass


def not_given(value):
    """`value` as a replaceable parser default (see NotGiven)."""
    kind = {float: NotGivenFloat, int: NotGivenInt, str: NotGivenStr}[type(value)]
    return kind(value)


def given_or(given, value):
    """A flag's value: `value` (as a plain value of its type) where the flag was not given, else what was given."""
    return type(value)(value) if isinstance(given, NotGiven) else given


def plain(value):
    """A NotGiven default as the plain value it stands for; any other value as it is."""
    if isinstance(value, NotGiven):
        return next(base(value) for base in (float, int, str) if isinstance(value, base))
    return value


def shared_parser() -> argparse.ArgumentParser:
    """Flags common to the three stages. Defaults are the paper's recipe for the MAE stages;
    finetune.py overrides the few that differ with set_defaults()."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, type=dataset_name,
                   help="aircraft, chest_xray, cub, dtd, stanford_dogs, vgg_flower_102, digits (built in), "
                        "or the name of your own folder under --data_dir")
    g.add_argument("--data_dir", default="data", help="root holding <dataset>/{train,test}.lmdb or image folders")
    g.add_argument("--workers", type=int_at_least(0), default=4,
                   help="DataLoader worker processes per training process")
    g = p.add_argument_group("model")
    g.add_argument("--model_name", default=not_given("facebook/vit-mae-base"),
                   help="the initial model θ₀, ViT-MAE for images, RoBERTa for text (a text dataset's default: "
                        "roberta-base): a hub id, a local directory from save_pretrained, or vit-mae-tiny / "
                        "roberta-tiny (small built-in models for CPU runs)")
    g.add_argument("--max_length", type=int_at_least(8), default=512,
                   help="text: tokens per text after truncation, special tokens included (images: unused)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int_at_least(1), default=paper.MAE_STEPS, help="optimizer steps")
    g.add_argument("--batch_size", type=int_at_least(1), default=not_given(64),
                   help="global batch size (split evenly over the processes of a torchrun job)")
    g.add_argument("--lr", type=finite_float(0, low_open=True), default=not_given(1.5e-4),
                   help="peak learning rate (AdamW)")
    g.add_argument("--weight_decay", type=finite_float(0), default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup_steps", type=int_at_least(0), default=not_given(0),
                   help="linear warmup steps, then linear decay to 0")
    g.add_argument("--clip_grad", type=finite_float(0, low_open=True, none=True), default=None,
                   help="clip the gradient norm to this value ('none': no clipping)")
    g.add_argument("--accum_steps", type=int_at_least(1), default=1,
                   help="gradient accumulation: each optimizer step runs K micro-batches of batch_size/K (per "
                        "process) with the batch's own draws (masks, flips, dropout), so the steps equal those of "
                        "the whole batch within float rounding, with less memory; batch_size must divide by K x "
                        "processes. --steps counts optimizer steps")
    g.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each transformer layer's activations in the backward pass instead of keeping "
                        "them (transformers' activation checkpointing): the same gradients, less memory, a slower "
                        "step")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seeds data order, masking noise, flips, dropout, new heads")
    g.add_argument("--device", type=device_spec, default="auto", help="auto (cuda if available), cpu, cuda, or cuda:N")
    g.add_argument("--threads", type=threads_spec, default="auto", help=THREADS_HELP)
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32 reproduces the original numerics")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--checkpoint_dir", default="checkpoints", help="where the MAE stages write and are read from")
    g.add_argument("--output_dir", default=None, help="this run's directory (default: derived, see docs/flags.md)")
    g.add_argument("--log_every", type=int_at_least(1), default=50, help="steps between metrics lines")
    g.add_argument("--save_every", type=int_at_least(0), default=0,
                   help="steps between resumable training states (0: only at the end); re-running the same "
                        "command continues from the latest one")
    g.add_argument("--save_every_minutes", type=finite_float(0), default=0.0,
                   help="also save the resumable training state when this many minutes have passed since the last "
                        "save (0: off), so a killed node loses at most that much; under several processes the clock "
                        "is read at the steps where they agree on stopping (about every 2 s)")
    g.add_argument("--overwrite", action="store_true",
                   help="move what the run directory holds aside (to <dir>.old-<time>) and start again; re-run "
                        "without it to continue a killed run")
    g.add_argument("--plot", type=str2bool, nargs="?", const=True, default=False,
                   help="write loss curves (loss_curves.png) into the run directory at the end")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"],
                   help="also send every metrics.jsonl line, live, to TensorBoard (event files in the run directory) "
                        "or Weights & Biases (WANDB_MODE=offline works; a resumed run continues its W&B run); "
                        "optional packages; the run may resume with another value")
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
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def one_line(e: Exception) -> str:
    # A DataLoader worker re-raises our error with its traceback in the message; keep the last line.
    lines = [line for line in str(e).splitlines() if line.strip()]
    line = lines[-1] if lines else type(e).__name__
    return line.split("UserError: ", 1)[-1]


# ----------------------------------------------------------------------------- provenance

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


# ----------------------------------------------------------------------------- seed streams

def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby (seed, step) pairs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


STREAM_ORDER, STREAM_NOISE, STREAM_FLIP, STREAM_DROPOUT, STREAM_SPLIT = range(5)
STREAM_MIX, STREAM_ERASE, STREAM_RANDAUG = range(5, 8)  # fine-tuning's MAE recipe (training/mae_recipe.py)
STREAM_HEAD = 8  # the text classifier's new head (models.roberta_mlm.build_text_classifier)


def generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one (seed, purpose, step-or-epoch)."""
    return torch.Generator().manual_seed(mix_seed(seed, stream, index))


# ----------------------------------------------------------------------------- which flags change a result

# Flags that change how a run is executed or reported, not what it computes, and the flags that only say where
# the run directory is (we are in it). The one list: a run resumes, and counts as "already complete", with other
# values of these (every start is in the record's history, with the precision and device it ran on), and
# report.py averages runs that differ only in them.
# accum_steps and grad_checkpointing change the memory a step takes, and the float rounding of its sums (as compile
# and precision do), not the steps it takes: tests/test_accumulation.py holds them to the unaccumulated steps.
RESULT_NEUTRAL_FLAGS = frozenset({"workers", "threads", "log_every", "save_every", "plot", "overwrite", "device",
                                  "teacher_device", "save_model", "compile", "precision", "data_cache", "report_to",
                                  "output_dir", "results_dir", "save_every_minutes", "accum_steps",
                                  "grad_checkpointing"})
