"""Shared fixtures. Makes the repository root importable (`import data`, `import utils`) however pytest
is started, and keeps the tests off the network (the Hub is never reachable here). Shared functions and constants
are in helpers.py: test files import from there, never from here or from each other."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads spinning
# against each other (and against DataLoader workers) slow steps down many times. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

from helpers import GOLDEN, REPORTED, TINY, uncollected  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


def pytest_terminal_summary(terminalreporter):
    if REPORTED:
        terminalreporter.section("measured by the tests")
        for line in REPORTED:
            terminalreporter.write_line(line)


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on a real one-node SLURM on this machine "
                                       "(lab/slurm_local.sh; REAL_SLURM=0 skips, REAL_SLURM=1 must run)")


TESTS = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_finish(session):
    """`pytest tests` (make test, CI) runs every test file under tests/: a file on disk that yields no test (a name
    pytest does not collect, an ignore added somewhere, an import that turned it into a non-test) stops the session,
    so the suite never shrinks in silence. A selection (a path below tests/, -k, -m, --deselect, --lf) is left as
    asked."""
    config = session.config
    whole = [os.path.abspath(a) for a in config.args] == [TESTS]
    selected = (config.option.keyword or config.option.markexpr or config.getoption("deselect")
                or config.getoption("lf", False) or config.getoption("stepwise", False))
    if not whole or selected:
        return
    missing = uncollected(TESTS, {str(item.path) for item in session.items})
    if missing:
        raise pytest.UsageError(f"test files that `make test` did not collect: {', '.join(missing)} (name a test "
                                f"file test_*.py; shared code goes to tests/helpers.py)")
