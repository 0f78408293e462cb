"""Data that used to train or score silently wrong, or crash without a word: image folders whose splits
disagree, 16-bit images, truncated LMDB files, a deleted digits split, labels out of range."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import finetune
from data import ImageDataset, LMDBReader, decode_image, write_lmdb
from data.prepare import get_args_parser as prepare_parser
from data.prepare import main as prepare_main
from errors import UserError

from helpers import REPO, TINY, assert_one_line as _one_error_line, cli as _cli, folder_dataset

COLOURS = {"a": (230, 20, 20), "b": (20, 220, 20), "c": (20, 20, 230)}


def _colour(cls, i):
    return COLOURS.get(cls, (128, 128, 128))


def _save(path, colour, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _finetune_argv(data_dir, tmp_path, dataset, *extra, steps=1):
    return [*TINY, "--dataset", dataset, "--data_dir", data_dir, "--scratch", "True", "--steps", steps,
            "--batch_size", 4, "--warmup_steps", 0, "--results_dir", tmp_path / "res", *extra]


# ----------------------------------------------------------------------------- A: image folders

def test_folder_splits_share_train_class_list_and_hidden_folders_are_not_classes(tmp_path):
    root = tmp_path / "data" / "mine"
    folder_dataset(str(root), {"a": 2, "b": 2, "c": 2}, {"a": 1, "c": 1}, colour=_colour)
    _save(str(root / "train" / ".ipynb_checkpoints" / "0.png"), (0, 0, 0))  # Jupyter's, not a class
    _save(str(root / "test" / ".ipynb_checkpoints" / "0.png"), (0, 0, 0))
    train = ImageDataset("mine", "train", str(tmp_path / "data"), 8)
    test = ImageDataset("mine", "test", str(tmp_path / "data"), 8)
    assert train.reader.labels() == [0, 0, 1, 1, 2, 2]
    assert test.reader.labels() == [0, 2]  # c keeps train's label 2, not 1
    assert train.num_classes() == test.num_classes() == 3
    # the label matches the image's colour (class folder), in both splits
    for dataset in (train, test):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert tuple(image[:, 0, 0].tolist()) == COLOURS["abc"[label]]


def test_test_class_unknown_to_train_is_one_line(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data" / "mine"
    folder_dataset(str(root), {"a": 2, "b": 2}, {"a": 1, "zebra": 1}, colour=_colour)
    with pytest.raises(UserError, match="zebra"):
        ImageDataset("mine", "test", str(tmp_path / "data"), 8)
    code, err = _cli(finetune, _finetune_argv(tmp_path / "data", tmp_path, "mine"), monkeypatch, capsys)
    assert code == 2
    _one_error_line(err, "test has class folders that train/ lacks: zebra")
    assert not (tmp_path / "res" / "mine" / "initial" / "seed0.json").exists()


def test_empty_and_single_image_training_classes_get_one_warning_line(tmp_path, capsys):
    root = tmp_path / "data" / "mine"
    folder_dataset(str(root), {"a": 3, "b": 1, "c": 0}, {"a": 1}, colour=_colour)
    dataset = ImageDataset("mine", "train", str(tmp_path / "data"), 8)
    assert dataset.num_classes() == 3  # the empty class keeps its label
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: dataset 'mine'"), lines
    assert "no images: c" in lines[0] and "one image: b" in lines[0]
    ImageDataset("mine", "test", str(tmp_path / "data"), 8)
    assert capsys.readouterr().err == ""  # the test split's sizes are not the model's concern


def test_finetune_on_a_folder_with_a_missing_test_class_scores_right(tmp_path):
    """train/{a,b,c} and test/{a,c} plus a hidden folder: a model that learns the colours must score 100 %,
    where test labels numbered apart from train's scored 50 % and the hidden folder shifted every label."""
    root = tmp_path / "data" / "mine"
    folder_dataset(str(root), {"a": 4, "b": 4, "c": 4}, {"a": 2, "c": 2}, colour=_colour)
    _save(str(root / "train" / ".ipynb_checkpoints" / "0.png"), (0, 0, 0))
    argv = _finetune_argv(tmp_path / "data", tmp_path, "mine", "--lr", 1e-3, "--dropout", 0, "--weight_decay", 0,
                          steps=30)
    finetune.main(finetune.get_args_parser().parse_args(list(map(str, argv))))
    result = json.load(open(tmp_path / "res" / "mine" / "initial" / "seed0.json"))
    assert result["num_test"] == 4
    assert result["test_acc"] == 1.0


# ----------------------------------------------------------------------------- B: 16-bit images

def _gradient16(size=32):
    """(size, size) uint16 covering 0..65535 left to right, and its 8-bit rule round(v / 257)."""
    row = np.linspace(0, 65535, size).round().astype(np.uint16)
    values = np.tile(row, (size, 1))
    return values, np.round(values / 257).astype(np.uint8)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I", "TIFF")])
def test_16bit_images_are_scaled_to_8_bits_not_clipped(mode, fmt):
    values, expected = _gradient16()
    image = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32))
    encoded = _encode(image, fmt)
    with Image.open(io.BytesIO(encoded)) as reopened:
        assert reopened.mode == mode  # the case under test, as PIL reads the file
    decoded = decode_image(encoded, 32).numpy()  # (3, 32, 32); same size: no resampling
    for channel in decoded:
        np.testing.assert_array_equal(channel, expected)
    assert decoded.min() == 0 and decoded.max() == 255 and len(np.unique(decoded)) == 32


def test_prepare_and_check_keep_16bit_pngs_scaled(tmp_path, capsys):
    values, expected = _gradient16()
    src = tmp_path / "xrays"
    for split in ("train", "test"):
        for cls in ("normal", "pneumonia"):
            os.makedirs(src / split / cls)
            # mirrored in test/: the same bytes in both splits would be a leak to --check
            Image.fromarray(values if split == "train" else np.ascontiguousarray(values[:, ::-1])).save(
                src / split / cls / "0.png")
    out = tmp_path / "data"
    prepare_main(prepare_parser().parse_args(["imagefolder", "--src", str(src), "--name", "xr", "--out", str(out)]))
    prepare_main(prepare_parser().parse_args(["--check", "xr", "--out", str(out)]))
    assert "ok, every record decodes" in capsys.readouterr().out
    image, _ = ImageDataset("xr", "train", str(out), 32)[0]  # original bytes stored, scaled when read
    np.testing.assert_array_equal(image[0].numpy(), expected)
    # --resize re-encodes: the JPEG must hold the scaled values (JPEG-close), not white
    prepare_main(prepare_parser().parse_args(["imagefolder", "--src", str(src), "--name", "xr_small",
                                              "--out", str(out), "--resize", "32"]))
    stored, _ = LMDBReader(str(out / "xr_small" / "train.lmdb"))[0]
    with Image.open(io.BytesIO(stored)) as jpeg:
        assert jpeg.format == "JPEG" and jpeg.mode == "L"
        assert np.abs(np.asarray(jpeg).astype(int) - expected).max() <= 4


# ----------------------------------------------------------------------------- C: truncated LMDB files

def _run_python(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _truncated_copy(data_dir, tmp_path, name):
    """digits' files as dataset `name`, its train.lmdb cut to 200,000 bytes (of ~250,000), as `head -c` does."""
    root = tmp_path / "data" / name
    os.makedirs(root)
    shutil.copy(os.path.join(data_dir, "digits", "test.lmdb"), root / "test.lmdb")
    with open(os.path.join(data_dir, "digits", "train.lmdb"), "rb") as f:
        whole = f.read()
    assert len(whole) > 200_000
    (root / "train.lmdb").write_bytes(whole[:200_000])
    return root


def test_truncated_lmdb_stops_training_with_one_line_not_sigbus(data_dir, tmp_path):
    # in a subprocess: the SIGBUS it used to die of would kill pytest too
    root = _truncated_copy(data_dir, tmp_path, "cub")
    proc = _run_python(["pretrain.py", *TINY, "--dataset", "cub", "--data_dir", tmp_path / "data", "--steps", 1,
                        "--batch_size", 2, "--checkpoint_dir", tmp_path / "ckpt"], REPO)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = _one_error_line(proc.stderr, str(root / "train.lmdb"), "truncated", "200,000 bytes", "re-extract")
    assert "Traceback" not in proc.stderr, line
    assert (root / "train.lmdb").stat().st_size == 200_000  # the user's file is left as it was


def test_truncated_lmdb_is_reported_by_check_not_sigbus(data_dir, tmp_path):
    root = _truncated_copy(data_dir, tmp_path, "cub")
    proc = _run_python(["-m", "data.prepare", "--check", "cub", "--out", tmp_path / "data"], REPO)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    problem = [line for line in proc.stderr.splitlines() if "the file is truncated" in line]
    assert len(problem) == 1 and str(root / "train.lmdb") in problem[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {root}: 1 problems found; re-extract")
    assert "  total       -     500" in proc.stdout  # the intact test split is still checked


# ----------------------------------------------------------------------------- D: digits with a file deleted

@pytest.mark.parametrize("deleted", ["test", "train"])
def test_digits_rebuilds_a_deleted_split_and_keeps_the_other(data_dir, tmp_path, deleted):
    original = {split: LMDBReader(os.path.join(data_dir, "digits", f"{split}.lmdb")) for split in ("train", "test")}
    root = tmp_path / "data" / "digits"
    shutil.copytree(os.path.join(data_dir, "digits"), root)
    os.remove(root / f"{deleted}.lmdb")
    kept = "train" if deleted == "test" else "test"
    kept_stat = os.stat(root / f"{kept}.lmdb")
    rebuilt = ImageDataset("digits", deleted, str(tmp_path / "data"), 8)
    assert rebuilt.reader.keys == original[deleted].keys
    assert [rebuilt.reader[i] for i in range(len(rebuilt))] == [original[deleted][i] for i in range(len(rebuilt))]
    assert os.stat(root / f"{kept}.lmdb").st_ino == kept_stat.st_ino  # not replaced
    # no build folder left behind (.cache: the decoded splits of --data_cache, written by the runs)
    assert sorted(f for f in os.listdir(root) if f != ".cache") == ["test.lmdb", "train.lmdb"]


def test_damaged_digits_says_to_delete_the_folder(data_dir, tmp_path):
    root = tmp_path / "data" / "digits"
    os.makedirs(root)
    shutil.copy(os.path.join(data_dir, "digits", "train.lmdb"), root / "train.lmdb")
    (root / "test.lmdb").write_bytes(b"not an lmdb file, a few bytes long")
    with pytest.raises(UserError, match=f"digits is built from scikit-learn on first use: delete {root} to rebuild"):
        ImageDataset("digits", "test", str(tmp_path / "data"), 8)


# ----------------------------------------------------------------------------- E: labels out of range

def _digit_records(data_dir, n, split="train"):
    reader = LMDBReader(os.path.join(data_dir, "digits", f"{split}.lmdb"))
    return [reader[i] for i in range(n)]


def test_registry_label_out_of_range_stops_finetune_before_training(data_dir, tmp_path, monkeypatch, capsys):
    records = _digit_records(data_dir, 8)
    root = tmp_path / "data" / "cub"
    write_lmdb(str(root / "train.lmdb"), [(image, 250 if i == 5 else label) for i, (image, label) in
                                          enumerate(records)])
    write_lmdb(str(root / "test.lmdb"), records)
    code, err = _cli(finetune, _finetune_argv(tmp_path / "data", tmp_path, "cub"), monkeypatch, capsys)
    assert code == 2
    _one_error_line(err, "dataset 'cub' split 'train' has label 250", "record b'00000005'",
                    "1 of 8 records", "200 classes")
    assert not (tmp_path / "res" / "cub" / "initial" / "seed0.json").exists()


def test_negative_test_label_stops_finetune_before_training(data_dir, tmp_path, monkeypatch, capsys):
    records = _digit_records(data_dir, 8)
    root = tmp_path / "data" / "mine"
    write_lmdb(str(root / "train.lmdb"), records)
    write_lmdb(str(root / "test.lmdb"), [(image, -1) for image, _ in records[:3]])
    num_classes = max(label for _, label in records) + 1  # no counts.json: the training labels say
    code, err = _cli(finetune, _finetune_argv(tmp_path / "data", tmp_path, "mine"), monkeypatch, capsys)
    assert code == 2
    _one_error_line(err, "dataset 'mine' split 'test' has label -1", "3 of 3 records", f"{num_classes} classes")
