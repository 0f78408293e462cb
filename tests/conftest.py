"""Shared fixtures. Makes the repository root importable (`import data`, `import utils`) however pytest
is started, and keeps the tests off the network (the Hub is never reachable here)."""
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
