"""Helpers shared by the test files, in one place (a test file never imports another test file):

- the repository and the tiny settings every stage test uses (REPO, TINY, GOLDEN), and the lines a fidelity test
  reports at the end of the session (report_line);
- an entry point run as the shell runs it, a launcher run through bash, the one-line error check;
- main() observed from outside: cut at a step (a kill between saves), what it hands to the run, what a step gets;
- what a run leaves behind, read back (metrics, losses, weights, JSON files), and the small inputs tests write
  (a result file, an image-folder dataset);
- filesystems that fail as real ones do, for the tests of unreadable inputs and unwritable outputs:
  `unprivileged(code, argv)` runs Python code in a subprocess whose permissions are checked (root reads and
  writes through any mode bits, so as root the child imports what it needs, the interpreter's own files sitting
  under a private home, and then drops to the `nobody` user; other users run it as they are); `open_tmp()` is a
  temporary folder that user can reach (pytest's tmp_path is private to its owner); `small_filesystem(size)` mounts
  a tmpfs of `size` bytes, to be filled up (needs root and CAP_SYS_ADMIN; the test is skipped elsewhere, and each
  such case also has a simulated twin that always runs).
"""
import contextlib
import gzip
import json
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import scipy.io
from PIL import Image

import training
import utils
from data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")
TINY = ["--model_name", "vit-mae-tiny", "--device", "cpu", "--workers", "0", "--log_every", "1"]

REPORTED: list[str] = []


def report_line(text: str) -> None:
    """A line for the end of the session's output (what a fidelity test measured, e.g. how many elements used
    a tolerance's allowance), shown whatever the verbosity (conftest prints them)."""
    REPORTED.append(text)


NOT_TEST_FILES = ("conftest.py", "helpers.py", "stop_driver.py")  # the only .py files under tests/ without tests


def uncollected(tests_dir, collected: set) -> list[str]:
    """The .py files under `tests_dir` (but NOT_TEST_FILES) that are not among the `collected` paths, relative to
    the folder above `tests_dir` (tests/unit/test_x.py), sorted."""
    on_disk = {os.path.join(root, f) for root, _, files in os.walk(tests_dir) for f in files
               if f.endswith(".py") and f not in NOT_TEST_FILES}
    return sorted(os.path.relpath(p, os.path.dirname(tests_dir)) for p in on_disk - set(collected))


# ----------------------------------------------------------------------------- entry points and launchers

def cli_output(module, argv, monkeypatch, capsys):
    """Run a script's entry point as the shell would; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__name__.split(".")[-1] + ".py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(module.get_args_parser, module.main)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def tool_output(module, argv, monkeypatch, capsys):
    """Like cli_output, for a command that may succeed (run_cli returns): exit code 0 when it does."""
    monkeypatch.setattr(sys, "argv", [module.__name__.split(".")[-1] + ".py", *map(str, argv)])
    try:
        utils.run_cli(module.get_args_parser, module.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(module, argv, monkeypatch, capsys):
    """Run a script's entry point as the shell would; returns (exit code, stderr)."""
    code, _, err = cli_output(module, argv, monkeypatch, capsys)
    return code, err


def assert_one_line(err: str, *words: str) -> str:
    """stderr is exactly one `error: ...` line, no traceback, containing every one of `words`; returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def assert_parse_error(err: str, flag: str, *words: str) -> str:
    """stderr is argparse's refusal of `flag`: the usage, then one `error: argument FLAG: ...` line holding
    every one of `words`, no traceback; returns that line."""
    last = err.strip().splitlines()[-1]
    assert f"error: argument {flag}: " in last and "Traceback" not in err, err
    for w in words:
        assert w in last, (w, last)
    return last


def launch(cmd: str, cwd, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    """A shell command line (a launcher as users type it) run by bash in `cwd`, with this interpreter as $PYTHON."""
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, script, argv, cwd, timeout=300) -> subprocess.CompletedProcess:
    """`script` (a path) run as `nproc` processes by torch.distributed.run on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- observing main() from outside

class Cut(Exception):
    """Raised when a run asks for the draws of the step it is cut at (see cut_at)."""


class WatchedSteps:
    """For draws handed to training.supplied_draws: `starting(step)`, called where a step asks for its data order,
    records the step, calls `on_step(step)` the first time and raises Cut at step `stop`."""

    def __init__(self, stop=None, on_step=None):
        self.stop, self.on_step, self.started = stop, on_step, []

    def starting(self, step) -> None:
        if step not in self.started:
            self.started.append(step)
            if self.on_step is not None:
                self.on_step(step)
        if step == self.stop:
            raise Cut


class _CutDraws(WatchedSteps):
    """The run's own draws (training.Draws), with `on_step(step)` called as each step starts and Cut raised
    when step `stop` is asked for."""

    def __init__(self, draws, stop, on_step):
        super().__init__(stop, on_step)
        self.draws = draws

    def indices(self, n, step):
        self.starting(step)
        return self.draws.indices(n, step)

    def uniform(self, step, stream, *shape):
        return self.draws.uniform(step, stream, *shape)

    def dropout_seed(self, step):
        return self.draws.dropout_seed(step)


def cut_at(stop=None, on_step=None):
    """A factory for training.supplied_draws: runs keep their own randomness, are told when each step starts, and
    stop (Cut) before step `stop` -- e.g. one step of a 20,000-step recipe, its schedule unchanged."""
    def make(args, rank, world, device):
        return _CutDraws(training.Draws(args.seed, args.batch_size, args.steps, rank, world, device), stop, on_step)
    return make


def spy_prepare(monkeypatch) -> dict:
    """Fills a dict with what a stage's main() hands to Run.prepare: the model it trains (and a copy of its
    state then), its optimizer and schedule, and the Run."""
    seen = {}
    real = training.Run.prepare

    def prepare(self, model, optimizer, scheduler):
        seen.update(run=self, model=model, optimizer=optimizer, scheduler=scheduler,
                    start={k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(self, model, optimizer, scheduler)
    monkeypatch.setattr(training.Run, "prepare", prepare)
    return seen


def nan_loss_at(monkeypatch, call: int) -> list:
    """pretrain.mae_loss returns NaN at its `call`-th call (1-based) and the real loss otherwise; -> the list that
    gets an entry per call."""
    import pretrain
    real, calls = pretrain.mae_loss, []

    def mae_loss(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) == call else loss
    monkeypatch.setattr(pretrain, "mae_loss", mae_loss)
    return calls


def spy(monkeypatch, module, name, record, replace=None):
    """Wraps module.<name> (which main() looks up when it runs): record(*args, **kwargs) sees every call, then the
    real function runs -- or `replace`, for tests that only look at the inputs."""
    real = getattr(module, name)

    def wrapper(*a, **kw):
        record(*a, **kw)
        return (replace or real)(*a, **kw)
    monkeypatch.setattr(module, name, wrapper)
    return real


# ----------------------------------------------------------------------------- what a run leaves, read back

TIMING = ("images_per_s", "peak_mem_mb")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def metrics(run_dir, timing=True) -> list[dict]:
    """The lines of a run's metrics.jsonl; timing=False leaves out the measured speed and memory, which differ
    between runs that are otherwise the same."""
    with open(os.path.join(run_dir, training.METRICS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    return rows if timing else [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def losses(run_dir) -> list[float]:
    """The logged loss of every step in a run's metrics.jsonl."""
    return [row["loss"] for row in metrics(run_dir)]


def mae_weights(path) -> dict:
    """A saved MAE checkpoint's tensors with transformers-5 names (files hold the library's legacy names)."""
    from transformers import ViTMAEForPreTraining
    return ViTMAEForPreTraining.from_pretrained(str(path)).state_dict()


# ----------------------------------------------------------------------------- small inputs

def result_file(results_dir, dataset, init, seed, acc, **extra) -> None:
    """A finished fine-tuning run's <results_dir>/<dataset>/<init>/seed<seed>.json (test loss 1.0)."""
    folder = os.path.join(results_dir, dataset, init)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"seed{seed}.json"), "w") as f:
        json.dump({"test_acc": acc, "test_loss": 1.0, "args": {"seed": seed}, **extra}, f)


def folder_dataset(root, train: dict, test: dict | None = None, colour=lambda cls, i: (90, 20, 20), size=8):
    """An image-folder dataset: <root>/{train,test}/<class>/<i>.png, `train` and `test` each {class: number of
    images} (test: as train when None); image i of class `cls` is a solid `colour(cls, i)`, `size` pixels square."""
    for split, classes in (("train", train), ("test", train if test is None else test)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for cls, n in classes.items():
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), colour(cls, i)).save(os.path.join(root, split, cls, f"{i}.png"))


# ----------------------------------------------------------------------------- filesystems that fail

NOBODY = 65534
# imported before the child drops root: a module imported later could not be read by `nobody`
_PRELUDE = """
import io, json, os, sys
import numpy, torch, PIL.Image
PIL.Image.init()  # the format plugins, imported lazily otherwise
import data, data.cache, data.datasets, data.prepare, errors, report
import importlib.readers, sklearn.datasets, sklearn.model_selection  # digits, built on first use, reads its file
from tools import visualize
if os.geteuid() == 0:
    os.setgroups([]); os.setgid({nobody}); os.setuid({nobody})
""".format(nobody=NOBODY)


def unprivileged(code: str, *argv, timeout=120) -> subprocess.CompletedProcess:
    """`code` run in a fresh interpreter, in the repository, as a user whom mode bits bind; sys.argv[1:] = argv."""
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
    script = _PRELUDE + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def open_tmp():
    """A temporary folder under /tmp that every user can enter and write (sticky, as /tmp itself)."""
    path = tempfile.mkdtemp(prefix="sdfp-test-", dir="/tmp")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        for root, dirs, _ in os.walk(path):  # folders a test made unreadable, so they can be removed
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(path, ignore_errors=True)


def world_readable(path) -> None:
    """Everything under `path` readable (and folders enterable) by every user."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, os.stat(root).st_mode | 0o755)
        for f in files:
            p = os.path.join(root, f)
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.chmod(p, os.stat(p).st_mode | 0o644)


@contextlib.contextmanager
def small_filesystem(path, size: int):
    """A tmpfs of `size` bytes mounted on `path` (created), unmounted afterwards; skips the test where mounting
    is not allowed."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path) -> None:
    """Fills the filesystem holding folder `path` to the last byte."""
    fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (65536, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * block):
                    pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- images, idx files, the release's names

def striped(colour, size, angle, amplitude=60.0, seed=0):
    """(H, W, 3) uint8: `colour` plus stripes at `angle` (distinct per image, so their hashes differ), a little
    noise."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    stripes = amplitude * np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / 11)
    noise = np.random.default_rng(seed).uniform(-3, 3, (h, w, 1))
    return np.clip(np.array(colour)[None, None] + stripes[..., None] + noise, 0, 255).astype(np.uint8)


def save_image(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def idx_file(array, gz):
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    return gzip.compress(data) if gz else data


def fake_fashion(folder, per_class=4, num_test=15):
    """Fashion-MNIST's four idx files with 7x5 images (rows x columns): train gzipped, test not, as both occur.
    Returns {split: (images, labels)}."""
    rng = np.random.default_rng(0)
    labels = {"train": rng.permutation(np.repeat(np.arange(10), per_class)), "test": rng.integers(0, 10, num_test)}
    arrays = {split: (rng.integers(0, 256, (len(l), 7, 5)).astype(np.uint8), l) for split, l in labels.items()}
    os.makedirs(folder, exist_ok=True)
    for split, (images_stem, labels_stem) in sources.FASHION_MNIST_FILES.items():
        gz = split == "train"
        suffix = ".gz" if gz else ""
        with open(os.path.join(folder, images_stem + suffix), "wb") as f:
            f.write(idx_file(arrays[split][0], gz))
        with open(os.path.join(folder, labels_stem + suffix), "wb") as f:
            f.write(idx_file(arrays[split][1], gz))
    return arrays


# transformers 5 parameter names -> the release's (4.17) names
_TO_V4 = [(r"\.attention\.q_proj\.", ".attention.attention.query."),
          (r"\.attention\.k_proj\.", ".attention.attention.key."),
          (r"\.attention\.v_proj\.", ".attention.attention.value."),
          (r"\.attention\.o_proj\.", ".attention.output.dense."),
          (r"\.mlp\.fc1\.", ".intermediate.dense."),
          (r"\.mlp\.fc2\.", ".output.dense."),
          (r"^vit\.layers\.", "vit.encoder.layer.")]


def v4_name(name: str) -> str:
    name = name[len("mae."):] if name.startswith("mae.") else name  # the student wrapper (MAEWithFeature)
    for pattern, old in _TO_V4:
        name = re.sub(pattern, old, name)
    return name


def group_names(model, no_weight_decay, weight_decay=0.01) -> dict:
    """{weight decay: sorted 4.17 names} of the two groups training.param_groups makes with a stage's rule."""
    ids = {id(p): v4_name(n) for n, p in model.named_parameters()}
    return {g["weight_decay"]: sorted(ids[id(p)] for p in g["params"])
            for g in training.param_groups(model, weight_decay, no_weight_decay)}


def release_groups(expected_stage: dict) -> dict:
    return {g["weight_decay"]: sorted(g["params"]) for g in expected_stage["param_groups"]}


# ----------------------------------------------------------------------------- tiny copies of the published datasets

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (210, 200, 30)]  # one per label
GRAYS = [(60, 60, 60), (190, 190, 190)]


def save_jpeg(path, colour, size=(12, 8)):
    """A flat `colour`, its path as the JPEG comment: each fake image is a distinct file, as the photos of a real
    dataset are (bytes that repeat across splits are a leak to --check), with the same pixels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "L" if colour[0] == colour[1] == colour[2] else "RGB"
    Image.new(mode, size, colour[0] if mode == "L" else colour).save(path, format="JPEG", quality=95,
                                                                     comment=path.encode())


def write_text(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def cell(strings):
    """A MATLAB N x 1 cell array of strings, as in Stanford Dogs' lists."""
    array = np.empty((len(strings), 1), dtype=object)
    array[:, 0] = strings
    return array


# Fake sources in the real layouts, for data.prepare: each returns (--src, class names by label, {split: images per
# label}, colour per label).

def fake_aircraft(root):
    data = os.path.join(root, "fgvc-aircraft-2013b", "data")
    variants = ["Cessna 172", "A340-300", "F/A-18"]  # file order, not alphabetical: it defines the labels
    per_label = {"train": [3, 2, 2], "test": [1, 2, 1]}
    write_text(os.path.join(data, "variants.txt"), variants)
    next_id = 1034300
    for split, index in (("train", "images_variant_trainval.txt"), ("test", "images_variant_test.txt")):
        lines = []
        for label, n in enumerate(per_label[split]):
            for _ in range(n):
                image_id = f"{next_id:07d}"
                next_id += 7
                save_jpeg(os.path.join(data, "images", f"{image_id}.jpg"), COLOURS[label])
                lines.append(f"{image_id} {variants[label]}")
        write_text(os.path.join(data, index), lines[::-1])
    write_text(os.path.join(data, "images_variant_train.txt"), [])  # present in the release, unused here
    return os.path.join(root, "fgvc-aircraft-2013b"), variants, per_label, COLOURS


def fake_cub(root):
    base = os.path.join(root, "CUB_200_2011")
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    per_label = {"train": [2, 3, 1], "test": [2, 1, 2]}
    images, class_labels, split_lines = [], [], []
    image_id = 0
    for label, cls in enumerate(classes):
        for split in ("test", "train"):
            for _ in range(per_label[split][label]):
                image_id += 1
                rel = f"{cls}/{cls[4:]}_{image_id:04d}_{image_id * 13}.jpg"
                save_jpeg(os.path.join(base, "images", rel), COLOURS[label])
                images.append(f"{image_id} {rel}")
                class_labels.append(f"{image_id} {label + 1}")
                split_lines.append(f"{image_id} {int(split == 'train')}")
    write_text(os.path.join(base, "classes.txt"), [f"{i + 1} {c}" for i, c in enumerate(classes)])
    write_text(os.path.join(base, "images.txt"), images)
    write_text(os.path.join(base, "image_class_labels.txt"), class_labels)
    write_text(os.path.join(base, "train_test_split.txt"), split_lines)
    return base, classes, per_label, COLOURS


def fake_dtd(root):
    base = os.path.join(root, "dtd")
    classes = ["banded", "dotted", "zigzagged"]  # sorted names are the labels
    per_file = {"train1.txt": [1, 2, 1], "val1.txt": [1, 0, 2], "test1.txt": [2, 1, 1], "train2.txt": [3, 3, 3]}
    count = 0
    for index, counts in per_file.items():
        lines = []
        for label, n in enumerate(counts):
            for _ in range(n):
                count += 1
                rel = f"{classes[label]}/{classes[label]}_{count:04d}.jpg"
                save_jpeg(os.path.join(base, "images", rel), COLOURS[label])
                lines.append(rel)
        write_text(os.path.join(base, "labels", index), lines[::-1])
    per_label = {"train": [2, 2, 3], "test": [2, 1, 1]}
    return base, classes, per_label, COLOURS


def fake_stanford_dogs(root):
    classes = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
    per_label = {"train": [2, 1, 3], "test": [1, 2, 1]}
    count = 0
    for split in ("train", "test"):
        files, labels = [], []
        for label, n in enumerate(per_label[split]):
            for _ in range(n):
                count += 1
                rel = f"{classes[label]}/{classes[label].split('-')[0]}_{1000 + count}.jpg"
                save_jpeg(os.path.join(root, "Images", rel), COLOURS[label])
                files.append(rel)
                labels.append(label + 1)
        scipy.io.savemat(os.path.join(root, f"{split}_list.mat"), {
            "file_list": cell(files), "annotation_list": cell([f[:-4] for f in files]),
            "labels": np.array(labels, dtype=np.float64).reshape(-1, 1)})
    return root, classes, per_label, COLOURS


def fake_vgg_flower_102(root):
    numbers = [2, 1, 3, 1, 2, 2, 3, 1, 3, 2, 1]  # 1-based label of image_00001.jpg, ...
    for i, number in enumerate(numbers, 1):
        save_jpeg(os.path.join(root, "jpg", f"image_{i:05d}.jpg"), COLOURS[number - 1])
    scipy.io.savemat(os.path.join(root, "imagelabels.mat"),
                     {"labels": np.array([numbers], dtype=np.float64)})  # 1 x N, as shipped
    ids = {"trnid": [3, 1, 5], "valid": [2, 9], "tstid": [4, 6, 7, 8, 10, 11]}
    scipy.io.savemat(os.path.join(root, "setid.mat"),
                     {k: np.array([v], dtype=np.float64) for k, v in ids.items()})
    per_label = {"train": [1, 2, 2], "test": [3, 2, 1]}
    return root, ["1", "2", "3"], per_label, COLOURS


def fake_chest_xray(root):
    base = os.path.join(root, "chest_xray")
    classes = ["NORMAL", "PNEUMONIA"]
    per_label = {"train": [2, 3], "test": [2, 1], "val": [1, 1]}
    for split, counts in per_label.items():
        for label, n in enumerate(counts):
            for i in range(n):
                name = f"IM-{i:04d}-0001.jpeg" if label == 0 else f"person{i}_bacteria_{i}.jpeg"
                save_jpeg(os.path.join(base, split, classes[label], name), GRAYS[label])
    with open(os.path.join(base, "train", "NORMAL", ".DS_Store"), "wb") as f:
        f.write(b"\0" * 16)
    del per_label["val"]  # shipped, not used
    return root, classes, per_label, GRAYS


def fake_imagefolder(root):
    classes = ["cat", "dog"]
    per_label = {"train": [3, 2], "test": [1, 2]}
    for split, counts in per_label.items():
        for label, n in enumerate(counts):
            for i in range(n):
                save_jpeg(os.path.join(root, split, classes[label], f"{i}.png"), COLOURS[label])
    return root, classes, per_label, COLOURS


FAKES = {"aircraft": fake_aircraft, "cub": fake_cub, "dtd": fake_dtd, "stanford_dogs": fake_stanford_dogs,
         "vgg_flower_102": fake_vgg_flower_102, "chest_xray": fake_chest_xray, "imagefolder": fake_imagefolder}


WORDS = {"pos": "good great happy fine nice love joy bright calm kind".split(),
         "neg": "bad awful sad poor hate pain grim dark cold mean".split()}


def text_dataset(data_dir, name="toy", num_train=48, num_test=24, seed=0) -> str:
    """A small two-label text dataset in the project's format (data/text.py), written directly: each text a few
    words of its label's list and a serial number (no two texts equal). -> its name."""
    rng = random.Random(seed)
    root = os.path.join(str(data_dir), name)
    os.makedirs(root, exist_ok=True)
    classes = sorted(WORDS)
    splits = {}
    for split, n in (("train", num_train), ("test", num_test)):
        rows = []
        for i in range(n):
            label = rng.randrange(len(classes))
            words = [rng.choice(WORDS[classes[label]]) for _ in range(rng.randint(2, 14))]
            rows.append({"text": " ".join(words) + f" {split}{i}", "label": label})
        with open(os.path.join(root, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        per_class = [sum(row["label"] == c for row in rows) for c in range(len(classes))]
        splits[split] = {"total": n, "per_class": per_class}
    with open(os.path.join(root, "counts.json"), "w") as f:
        json.dump({"dataset": name, "num_classes": len(classes), "classes": classes, "splits": splits}, f)
    return name
