"""Shared fixtures. Makes the repository root importable (`import data`, `import utils`) however pytest
is started, and keeps the tests off the network (the Hub is never reachable here)."""
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads spinning
# against each other (and against DataLoader workers) slow steps down many times. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY = ["--model_name", "vit-mae-tiny", "--device", "cpu", "--workers", "0", "--log_every", "1"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data root holding the built-in `digits` dataset (built once per test session)."""
    from data import dataset_dir
    root = tmp_path_factory.mktemp("data")
    dataset_dir("digits", str(root))
    return str(root)


@pytest.fixture
def stage_args(data_dir, tmp_path):
    """argv builder for the three stages: tiny model, CPU, outputs under tmp_path."""
    def build(*extra, batch_size=8, steps=4):
        return [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--checkpoint_dir", str(tmp_path / "ckpt"),
                "--steps", str(steps), "--batch_size", str(batch_size), *map(str, extra)]
    return build


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


@pytest.fixture(scope="session")
def golden():
    """The release's own numbers on a tiny config (tests/golden/README.md): (expected.json, batch, expected)."""
    from safetensors.torch import load_file
    with open(os.path.join(GOLDEN, "expected.json")) as f:
        expected = json.load(f)
    return (expected, load_file(os.path.join(GOLDEN, "batch.safetensors")),
            load_file(os.path.join(GOLDEN, "expected.safetensors")))


@pytest.fixture(scope="session")
def theta0_dir(golden, tmp_path_factory):
    """θ₀ as the release saved it: transformers-4.17 names, config.json and the image-processor file."""
    from safetensors.torch import load_file, save_file
    from transformers import ViTMAEConfig
    expected = golden[0]
    path = str(tmp_path_factory.mktemp("theta0"))
    ViTMAEConfig(**expected["config"]).save_pretrained(path)
    save_file(load_file(os.path.join(GOLDEN, "theta0.safetensors")), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    pre = expected["preprocessing"]
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": pre["size"],
                   "resample": pre["resample"], "do_normalize": True, "image_mean": pre["image_mean"],
                   "image_std": pre["image_std"]}, f)
    return path


_REPORT: list[str] = []


def report_line(text: str) -> None:
    """A line for the end of the session's output (what a fidelity test measured, e.g. how many elements used
    a tolerance's allowance), shown whatever the verbosity."""
    _REPORT.append(text)


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("measured by the tests")
        for line in _REPORT:
            terminalreporter.write_line(line)


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on a real one-node SLURM on this machine "
                                       "(lab/slurm_local.sh; REAL_SLURM=0 skips, REAL_SLURM=1 must run)")
