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
from conftest import REPO, TINY
from data import ImageDataset, decode_image
from data.prepare import get_args_parser as prepare_parser
from data.prepare import main as prepare_main
from errors import UserError
from fs_helpers import open_tmp, unprivileged, world_readable
from helpers import assert_one_line, cli
from tools import visualize


def _images(folder, n, colour=(90, 20, 20)):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), colour).save(os.path.join(folder, f"{i}.png"))


def _folder_dataset(root, classes="ab", n=2):
    for split in ("train", "test"):
        for cls in classes:
            _images(os.path.join(root, split, cls), n)


def _tree(path) -> dict:
    return {os.path.relpath(os.path.join(r, f), path): os.path.getsize(os.path.join(r, f))
            for r, _, files in os.walk(path) for f in files}


# ----------------------------------------------------------------------------- names are names

@pytest.mark.parametrize("name", ["ABS", "./mine", "data/mine", "mine/", "..", ".", "", ".hidden"])
def test_a_dataset_given_as_a_path_is_refused_pointing_to_data_dir(name, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    _folder_dataset(str(data / "mine"))
    before = _tree(data)
    name = str(data / "mine") if name == "ABS" else name
    monkeypatch.chdir(tmp_path)
    code, err = cli(pretrain, [*TINY, "--dataset", name, "--data_dir", data, "--steps", 1, "--batch_size", 2,
                               "--overwrite"], monkeypatch, capsys)
    assert code == 2
    line = assert_one_line(err, "--data_dir")
    assert "dataset name" in line or "hidden" in line, line
    assert _tree(data) == before and sorted(os.listdir(data)) == ["mine"]  # nothing moved, nothing written
    assert not (tmp_path / "checkpoints").exists()


def test_visualize_and_prepare_check_refuse_a_path_too(tmp_path, monkeypatch, capsys):
    _folder_dataset(str(tmp_path / "data" / "mine"))
    code, err = cli(visualize, ["--checkpoint", "vit-mae-tiny", "--dataset", str(tmp_path / "data" / "mine"),
                                "--out", tmp_path / "r.png"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "--data_dir")
    with pytest.raises(UserError, match="--out"):
        prepare_main(prepare_parser().parse_args(["--check", str(tmp_path / "data" / "mine")]))


def test_prepare_overwrite_moves_the_old_dataset_aside(tmp_path, capsys):
    src = tmp_path / "src"
    _folder_dataset(str(src), n=2)
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
