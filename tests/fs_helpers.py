"""Filesystems that fail as real ones do, for the tests of unreadable inputs and unwritable outputs.

- `unprivileged(code, argv)` runs Python code in a subprocess whose permissions are checked: root reads and
  writes through any mode bits, so as root the child imports what it needs (the interpreter's own files sit
  under a private home) and then drops to the `nobody` user; other users run it as they are.
- `open_tmp()` is a temporary folder that user can reach (pytest's tmp_path is private to its owner).
- `small_filesystem(size)` mounts a tmpfs of `size` bytes, to be filled up (needs root and CAP_SYS_ADMIN;
  the test is skipped elsewhere, and each such case also has a simulated twin that always runs).
"""
import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import REPO

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
