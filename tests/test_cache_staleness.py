"""The decode-once cache (data/cache.py) is never staler than the files: a rewrite that keeps sizes and times
(cp -p, rsync -a, an archive) decodes again; a cache that cannot be written is a one-line notice and the run
goes on; no temporary file survives a failed write, and those of dead processes are removed."""
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from data import ImageDataset, cache, write_lmdb

from helpers import TINY, fill, small_filesystem

RED, BLUE = (200, 10, 10), (10, 10, 200)


def _bmp(colour) -> bytes:
    """An uncompressed image: every colour gives the same number of bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="BMP")
    return buf.getvalue()


def _folder(root, colour=RED):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            os.makedirs(root / "mine" / split / cls, exist_ok=True)
            for i in range(3):
                (root / "mine" / split / cls / f"{i}.bmp").write_bytes(_bmp(colour if cls == "a" else BLUE))


def _decoded(root, split="train"):
    return cache.load_or_decode(ImageDataset("mine", split, str(root), 8), 0, write=True)


def _first_pixel(images):
    return tuple(images[0, :, 0, 0].tolist())


def _rewrite_in_place(path, data):
    """What `cp -p` and an in-place editor do: the same file (inode), new bytes, the old times put back."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _swap(path, data):
    """What `rsync -a` and archive extraction do: a new file with the old times, renamed over the old one."""
    st = os.stat(path)
    tmp = f"{path}.new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


@pytest.mark.parametrize("rewrite", [_rewrite_in_place, _swap])
def test_a_same_size_image_rewritten_with_its_old_times_is_decoded_again(rewrite, tmp_path):
    _folder(tmp_path)
    images, _, how = _decoded(tmp_path)
    assert how == "decoded once" and _first_pixel(images) == RED
    assert _decoded(tmp_path)[2].startswith("read from")
    path = tmp_path / "mine" / "train" / "a" / "0.bmp"
    before = os.stat(path)
    rewrite(path, _bmp((30, 220, 30)))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # what the cache trusted
    images, _, how = _decoded(tmp_path)
    assert how == "decoded once" and _first_pixel(images) == (30, 220, 30)  # served old pixels before


@pytest.mark.parametrize("rewrite", [_rewrite_in_place, _swap])
def test_an_lmdb_file_rewritten_with_its_old_size_and_times_is_decoded_again(rewrite, tmp_path):
    root = tmp_path / "mine"
    write_lmdb(str(root / "train.lmdb"), [(_bmp(RED), 0), (_bmp(BLUE), 1)])
    write_lmdb(str(tmp_path / "other.lmdb"), [(_bmp((30, 220, 30)), 0), (_bmp(BLUE), 1)])
    other = (tmp_path / "other.lmdb").read_bytes()
    assert len(other) == os.path.getsize(root / "train.lmdb")
    images, _, _ = _decoded(tmp_path)
    assert _first_pixel(images) == RED
    rewrite(root / "train.lmdb", other)
    images, _, how = _decoded(tmp_path)
    assert how == "decoded once" and _first_pixel(images) == (30, 220, 30)


def test_data_cache_auto_and_off_agree_after_a_rewrite(tmp_path):
    """The issue's symptom: the two settings gave different results on the same files."""
    _folder(tmp_path)

    def run(results, *extra):
        argv = [*TINY, "--dataset", "mine", "--data_dir", tmp_path, "--scratch", "True", "--steps", 2,
                "--batch_size", 4, "--results_dir", tmp_path / results, *extra]
        finetune.main(finetune.get_args_parser().parse_args(list(map(str, argv))))
        return json.load(open(tmp_path / results / "mine" / "initial" / "seed0.json"))
    run("first")  # decodes both splits into the disk cache
    for i in range(3):
        _rewrite_in_place(tmp_path / "mine" / "test" / "a" / f"{i}.bmp", _bmp(BLUE))
    auto, off = run("auto"), run("off", "--data_cache", "off")
    assert (auto["test_acc"], auto["test_loss"]) == (off["test_acc"], off["test_loss"])


# ----------------------------------------------------------------------------- a cache that cannot be written

def _no_temporaries(root):
    folder = root / "mine" / cache.CACHE_DIR
    return not folder.exists() or not [f for f in os.listdir(folder) if ".tmp" in f]


def test_a_failing_save_is_one_notice_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk makes torch.save raise RuntimeError (PytorchStreamWriter), not OSError: that was a traceback,
    with the half-written temporary file left (up to ~1.8 GB for cub at 224)."""
    _folder(tmp_path)

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(cache.torch, "save", full_disk)
    notices = []
    images, labels, how = cache.load_or_decode(ImageDataset("mine", "train", str(tmp_path), 8), 0, write=True,
                                               notice=notices.append)
    assert how == "decoded once" and _first_pixel(images) == RED and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(notices) == 1 and notices[0].startswith("note: decoded images not cached on disk")
    assert "RuntimeError" in notices[0] and "\n" not in notices[0]
    assert _no_temporaries(tmp_path)


def test_an_interrupted_save_leaves_no_temporary(tmp_path, monkeypatch):
    _folder(tmp_path)

    def interrupted(obj, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise KeyboardInterrupt
    monkeypatch.setattr(cache.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _decoded(tmp_path)
    assert _no_temporaries(tmp_path)


def test_a_full_filesystem_is_one_notice_and_leaves_no_temporary(tmp_path):
    with small_filesystem(tmp_path / "small", 1 << 20):
        _folder(tmp_path / "small")
        fill(tmp_path / "small")
        notices = []
        images, _, how = cache.load_or_decode(ImageDataset("mine", "train", str(tmp_path / "small"), 8), 0,
                                              write=True, notice=notices.append)
        assert how == "decoded once" and _first_pixel(images) == RED
        assert len(notices) == 1 and "not cached on disk" in notices[0], notices
        assert _no_temporaries(tmp_path / "small")


def test_a_write_that_would_fill_the_disk_is_not_started(tmp_path, monkeypatch):
    """A decoded split is large (cub at 224: ~1.8 GB); filling the disk with it would make the run's own
    training-state saves fail later, so it is not written when it would leave less than a margin free."""
    _folder(tmp_path)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 10**6))
    notices = []
    cache.load_or_decode(ImageDataset("mine", "train", str(tmp_path), 8), 0, write=True, notice=notices.append)
    assert len(notices) == 1 and "free" in notices[0] and "not cached on disk" in notices[0]
    assert not (tmp_path / "mine" / cache.CACHE_DIR).exists() or not os.listdir(tmp_path / "mine" / cache.CACHE_DIR)


def test_an_unwritable_cache_folder_is_one_notice(tmp_path):
    """A .cache that is a file (as a read-only one: the folder cannot be made or written)."""
    _folder(tmp_path)
    (tmp_path / "mine" / cache.CACHE_DIR).write_text("not a folder")
    notices = []
    images, _, how = cache.load_or_decode(ImageDataset("mine", "train", str(tmp_path), 8), 0, write=True,
                                          notice=notices.append)
    assert how == "decoded once" and _first_pixel(images) == RED
    assert len(notices) == 1 and "not cached on disk" in notices[0]


def test_a_read_only_cache_folder_is_one_notice(tmp_path):
    from helpers import open_tmp, unprivileged, world_readable
    with open_tmp() as shared:
        root = tmp_path.__class__(shared)
        _folder(root)
        os.makedirs(root / "mine" / cache.CACHE_DIR)
        world_readable(shared)
        os.chmod(root / "mine" / cache.CACHE_DIR, 0o555)
        proc = unprivileged("""
            notices = []
            ds = data.ImageDataset("mine", "train", sys.argv[1], 8)
            images, _, how = data.cache.load_or_decode(ds, 0, write=True, notice=notices.append)
            print(how, tuple(images[0, :, 0, 0].tolist()))
            print(len(notices), notices[0])
        """, shared)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.splitlines()
        assert out[0] == f"decoded once {RED}"
        assert out[1].startswith("1 note: decoded images not cached on disk") and "ermission denied" in out[1]


# ----------------------------------------------------------------------------- temporary files of dead processes

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_dead_processes_are_removed_at_start(tmp_path):
    _folder(tmp_path)
    dataset = ImageDataset("mine", "train", str(tmp_path), 8)
    path = cache.cache_path(dataset)
    os.makedirs(os.path.dirname(path))
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"dead here": f"{path}.tmp{_dead_pid()}-{host}",
                 "dead, from before hosts were named": f"{path}.tmp{_dead_pid()}",
                 "alive": f"{path}.tmp{live.pid}-{host}",
                 "another host": f"{path}.tmp{os.getpid()}-elsewhere.example",
                 "another host, untouched for hours": f"{path}.tmp{os.getpid()}-gone.example"}
        for name in names.values():
            with open(name, "wb") as f:
                f.write(b"\0" * 100)
        old = os.stat(names["another host, untouched for hours"]).st_mtime - 2 * 3600
        os.utime(names["another host, untouched for hours"], (old, old))
        cache.load_or_decode(dataset, 0, write=True)
        left = {what for what, name in names.items() if os.path.exists(name)}
        assert left == {"alive", "another host"}  # a live writer here, or one that may be alive elsewhere
    finally:
        live.kill()
        live.wait()
