"""Names are names, and folders and files are what they seem: --dataset given as a path is refused (it made the
run directory the dataset folder itself, which --overwrite then renamed away); `data.prepare --overwrite` keeps
the old dataset; unreadable folders and files are errors naming them (an unreadable test class folder dropped
its images without a word); special files are refused instead of hanging; float images are scaled, not clipped."""
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import finetune
import pretrain
from data import ImageDataset, decode_image
from data.prepare import get_args_parser as prepare_parser
from data.prepare import main as prepare_main
from errors import UserError
from tools import visualize

from helpers import (REPO, TINY, assert_one_line, assert_parse_error, cli, fake_cub, fake_vgg_flower_102,
                     folder_dataset, open_tmp, unprivileged, world_readable)


def _images(folder, n, colour=(90, 20, 20)):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), colour).save(os.path.join(folder, f"{i}.png"))


def _tree(path) -> dict:
    return {os.path.relpath(os.path.join(r, f), path): os.path.getsize(os.path.join(r, f))
            for r, _, files in os.walk(path) for f in files}


# ----------------------------------------------------------------------------- names are names

@pytest.mark.parametrize("name", ["ABS", "./mine", "data/mine", "mine/", "..", ".", "", ".hidden"])
def test_a_dataset_given_as_a_path_is_refused_pointing_to_data_dir(name, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    folder_dataset(str(data / "mine"), {"a": 2, "b": 2})
    before = _tree(data)
    name = str(data / "mine") if name == "ABS" else name
    monkeypatch.chdir(tmp_path)
    code, err = cli(pretrain, [*TINY, "--dataset", name, "--data_dir", data, "--steps", 1, "--batch_size", 2,
                               "--overwrite"], monkeypatch, capsys)
    assert code == 2
    line = assert_parse_error(err, "--dataset", "--data_dir")  # refused when parsed, before anything is read
    assert "dataset name" in line or "hidden" in line, line
    assert _tree(data) == before and sorted(os.listdir(data)) == ["mine"]  # nothing moved, nothing written
    assert not (tmp_path / "checkpoints").exists()


def test_visualize_and_prepare_check_refuse_a_path_too(tmp_path, monkeypatch, capsys):
    folder_dataset(str(tmp_path / "data" / "mine"), {"a": 2, "b": 2})
    code, err = cli(visualize, ["--checkpoint", "vit-mae-tiny", "--dataset", str(tmp_path / "data" / "mine"),
                                "--out", tmp_path / "r.png"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "--data_dir")
    with pytest.raises(UserError, match="--out"):
        prepare_main(prepare_parser().parse_args(["--check", str(tmp_path / "data" / "mine")]))


def test_prepare_overwrite_moves_the_old_dataset_aside(tmp_path, capsys):
    src = tmp_path / "src"
    folder_dataset(str(src), {"a": 2, "b": 2})
    out = tmp_path / "data"
    args = ["imagefolder", "--src", str(src), "--name", "mine", "--out", str(out)]
    prepare_main(prepare_parser().parse_args(args))
    old = {f: (out / "mine" / f).read_bytes() for f in os.listdir(out / "mine")}
    _images(str(src / "train" / "a"), 3)  # one more image
    capsys.readouterr()
    prepare_main(prepare_parser().parse_args([*args, "--overwrite"]))
    aside = [e for e in os.listdir(out) if e != "mine"]
    assert len(aside) == 1 and aside[0].startswith("mine.old-"), os.listdir(out)
    assert {f: (out / aside[0] / f).read_bytes() for f in os.listdir(out / aside[0])} == old  # kept as it was
    assert json.loads((out / "mine" / "counts.json").read_text())["splits"]["train"]["total"] == 5
    assert f"moved the previous {out / 'mine'} to {out / aside[0]}" in capsys.readouterr().out
    prepare_main(prepare_parser().parse_args([*args, "--overwrite"]))  # again: a second, distinct old folder
    assert len([e for e in os.listdir(out) if e.startswith("mine.old-")]) == 2


# ----------------------------------------------------------------------------- unreadable folders and files
# Root reads through any mode bits: these run in a child that drops to an unprivileged user (fs_helpers).

_SPLIT_SIZES = """
    try:
        for split in ("train", "test"):
            ds = data.ImageDataset("mine", split, sys.argv[1], 8)
            print(split, len(ds))
    except errors.UserError as e:
        print("error:", e)
"""


def _unreadable_case(tmp, make_unreadable):
    root = os.path.join(tmp, "mine")
    for split in ("train", "test"):
        for cls in "abcdefghij":
            _images(os.path.join(root, split, cls), 10)
    world_readable(tmp)
    path = make_unreadable(root)
    proc = unprivileged(_SPLIT_SIZES, tmp)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines(), path


@pytest.mark.parametrize("what", ["test class folder", "test folder", "train folder", "test image",
                                  "train class folder without x"])
def test_an_unreadable_folder_or_image_is_an_error_naming_it(what):
    def unreadable(root):
        path, mode = {"test class folder": ("test/c", 0o000), "test folder": ("test", 0o000),
                      "train folder": ("train", 0o000), "test image": ("test/d/3.png", 0o000),
                      "train class folder without x": ("train/e", 0o444)}[what]
        os.chmod(os.path.join(root, path), mode)
        return os.path.join(root, path)
    with open_tmp() as tmp:
        out, path = _unreadable_case(tmp, unreadable)
    # before: an unreadable test class folder gave "test 90" (accuracy over 90 of 100 images), a test image
    # failed only when evaluated (after training), and train/ was a PermissionError traceback
    assert len(out) <= 2 and out[-1].startswith("error: ") and path in out[-1], out
    assert "ermission denied" in out[-1]


def _special_files_case(tmp_path, kind):
    root = tmp_path / "data" / "mine"
    folder_dataset(str(root), {"a": 2, "b": 2})
    path = str(root / "train" / "a" / "x.png")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.close()
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device file needs root")
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
    elif kind == "broken link":
        os.symlink(str(root / "nowhere.png"), path)
    return root, path


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "broken link"])
def test_a_special_file_named_like_an_image_is_refused_without_hanging(kind, tmp_path):
    """A FIFO named x.png hung the decoding for ever (open() waits for a writer)."""
    root, path = _special_files_case(tmp_path, kind)
    code = ("import sys\nfrom data import ImageDataset, cache\nfrom errors import UserError\n"
            "try:\n    cache.load_or_decode(ImageDataset('mine', 'train', sys.argv[1], 8), 0, write=False)\n"
            "    print('decoded')\nexcept UserError as e:\n    print('error:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(root.parent)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: ") and path in out[0], out


@pytest.mark.parametrize("kind", ["fifo lmdb", "fifo index"])
def test_special_files_elsewhere_are_refused_without_hanging(kind, tmp_path):
    """A FIFO as a split's LMDB file (lmdb opens it and waits), or as a source's index file (data.prepare)."""
    if kind == "fifo lmdb":
        os.makedirs(tmp_path / "data" / "mine")
        os.mkfifo(tmp_path / "data" / "mine" / "train.lmdb")
        args = ["pretrain.py", *TINY, "--dataset", "mine", "--data_dir", tmp_path / "data", "--steps", 1,
                "--checkpoint_dir", tmp_path / "ckpt"]
        named = str(tmp_path / "data" / "mine" / "train.lmdb")
    else:
        src = fake_cub(str(tmp_path / "src"))[0]
        os.remove(os.path.join(src, "images.txt"))
        os.mkfifo(os.path.join(src, "images.txt"))
        args = ["-m", "data.prepare", "cub", "--src", src, "--out", tmp_path / "out"]
        named = os.path.join(src, "images.txt")
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_one_line(proc.stderr, named, "FIFO")


def test_prepare_names_an_unreadable_source_folder():
    with open_tmp() as tmp:
        src = os.path.join(tmp, "src")
        for cls in ("cat", "dog"):
            _images(os.path.join(src, cls), 4)
        world_readable(tmp)
        os.chmod(os.path.join(src, "dog"), 0o000)
        proc = unprivileged("""
            try:
                data.prepare.main(data.prepare.get_args_parser().parse_args(
                    ["imagefolder", "--src", sys.argv[1], "--name", "pets", "--out", sys.argv[2]]))
                print("built")
            except errors.UserError as e:
                print("error:", e)
        """, src, os.path.join(tmp, "out"))
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.strip().splitlines()
        # before: built "pets" from cat/ alone, dog/'s images dropped without a word
        assert out[-1].startswith("error: ") and os.path.join(src, "dog") in out[-1], out


# ----------------------------------------------------------------------------- float images

def _float_tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def test_float_images_are_scaled_from_0_1_not_clipped_to_black_and_white():
    """A 32-bit float TIFF (PIL mode F) holds 0..1 by the float convention; PIL's convert clipped it to 0..255,
    so the image came out black (every value below 1) with white only where it reached 1."""
    row = np.linspace(0.0, 1.0, 32)
    values = np.tile(row, (32, 1))
    encoded = _float_tiff(values)
    with Image.open(io.BytesIO(encoded)) as reopened:
        assert reopened.mode == "F"
    decoded = decode_image(encoded, 32).numpy()
    expected = np.round(values * 255).astype(np.uint8)
    for channel in decoded:
        np.testing.assert_array_equal(channel, expected)
    # outside 0..1 clipped, NaN black
    odd = np.array([[-0.5, 1.5, np.nan, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(decode_image(_float_tiff(odd), 4).numpy()[0, 0], [0, 255, 0, 128])


def test_prepare_skip_bad_skips_a_listed_fifo_without_hanging(tmp_path):
    """--skip_bad opened every listed image, a FIFO among them too, and waited for ever."""
    src = fake_vgg_flower_102(str(tmp_path / "src"))[0]
    fifo = os.path.join(src, "jpg", "image_00007.jpg")
    os.remove(fifo)
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "data.prepare", "vgg_flower_102", "--src", src, "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert_one_line(proc.stderr.strip().splitlines()[-1], fifo, "FIFO")  # after the fake's class-count warning
    proc = subprocess.run([sys.executable, "-m", "data.prepare", "vgg_flower_102", "--src", src, "--out",
                           str(tmp_path / "out"), "--skip_bad"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((tmp_path / "out" / "vgg_flower_102" / "counts.json").read_text())
    assert counts["splits"]["test"]["skipped"] == [fifo]
