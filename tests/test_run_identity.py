"""A run is also what it reads: each start records the content fingerprints of the weights and splits it reads
(and the numerics it ran with), so a resume or "already complete" after an input changed is refused with one line
naming what changed, and report.py tells runs from different checkpoints apart; --overwrite moves only a run's
directory; a write that fails (state, record, metrics, model) is one line."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import pretrain
import report
import selftrain
import training

from helpers import Cut, assert_one_line, cut_at, folder_dataset, read_json, tool_output

MINE = {"c0": 6, "c1": 6}  # an image folder `mine`: 6 images a class in each split


def _grey(cls, i):
    """Image i of class c0 or c1: grey, a value of its own."""
    return (20 * i + 100 * int(cls[1]),) * 3


def cli(module, argv, monkeypatch, capsys):
    """(exit code, stderr) of the entry point run as the shell runs it (0: it returned)."""
    code, _, err = tool_output(module, argv, monkeypatch, capsys)
    return code, err


def test_each_start_records_what_it_read(stage_args, tmp_path):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=2)))
    teacher = tmp_path / "ckpt" / "further-pretrain-2" / "digits"
    selftrain.main(selftrain.get_args_parser().parse_args(stage_args("--teacher", teacher, steps=2)))
    record = read_json(tmp_path / "ckpt" / "self-further-pretrain-2" / "digits" / training.RECORD_FILE)
    inputs = record["history"][0]["inputs"]
    assert sorted(inputs) == ["teacher", "train split", "θ₀"]
    assert inputs["teacher"]["kind"] == "model directory" and set(inputs["teacher"]["files"]) == {
        "config.json", "model.safetensors"}
    assert inputs["train split"]["format"] == "lmdb" and inputs["train split"]["records"] == 1297
    assert inputs["θ₀"]["kind"] == "built-in"
    assert record["history"][0]["device_type"] == "cpu"


def test_a_resumed_self_distillation_refuses_a_teacher_trained_again(stage_args, tmp_path, monkeypatch, capsys):
    """The issue's case: killed, its teacher re-trained (other weights, same path), resumed: the distillation
    loss would have jumped; now one line naming the teacher, and --overwrite as the way on."""
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args("--seed", 1, steps=2)))
    teacher = tmp_path / "ckpt" / "further-pretrain-2" / "digits"
    argv = stage_args("--teacher", teacher, "--save_every", 1, "--output_dir", tmp_path / "student", steps=4)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        selftrain.main(selftrain.get_args_parser().parse_args(argv))
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args("--seed", 2, "--overwrite", steps=2)))
    code, err = cli(selftrain, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "unfinished run that read other inputs", "teacher: model.safetensors changed", "--overwrite")
    assert training.STATE_FILE in os.listdir(tmp_path / "student")  # nothing was changed
    code, err = cli(selftrain, [*argv, "--overwrite"], monkeypatch, capsys)
    assert code == 0, err


def test_a_resumed_run_refuses_images_added_to_its_training_folder(tmp_path, stage_args, monkeypatch, capsys):
    folder_dataset(tmp_path / "data" / "mine", MINE, colour=_grey)
    argv = [a if a != stage_args()[stage_args().index("--data_dir") + 1] else str(tmp_path / "data")
            for a in stage_args("--save_every", 1, "--output_dir", tmp_path / "run", steps=4)]
    argv[argv.index("--dataset") + 1] = "mine"
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "mine" / "train" / "c0" / "new.png")
    code, err = cli(pretrain, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "train split: 12 -> 13 records")
    # an image rewritten with its old size and times: the same number of records, other content
    os.remove(tmp_path / "data" / "mine" / "train" / "c0" / "new.png")
    image = tmp_path / "data" / "mine" / "train" / "c1" / "3.png"
    st = os.stat(image)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, err = cli(pretrain, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "train split: same number of records (12), other content")


def test_a_finished_fine_tuning_run_whose_test_images_changed_is_not_already_complete(tmp_path, stage_args,
                                                                                      monkeypatch, capsys):
    folder_dataset(tmp_path / "data" / "mine", MINE, colour=_grey)
    argv = stage_args("--scratch", "True", "--results_dir", tmp_path / "res", steps=2)
    argv[argv.index("--data_dir") + 1], argv[argv.index("--dataset") + 1] = str(tmp_path / "data"), "mine"
    assert cli(finetune, argv, monkeypatch, capsys)[0] == 0
    code, out_err = cli(finetune, argv, monkeypatch, capsys)
    assert code == 0  # unchanged: already complete
    os.remove(tmp_path / "data" / "mine" / "test" / "c1" / "5.png")
    code, err = cli(finetune, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "is a finished run that read other inputs", "test split: 12 -> 11 records", "--overwrite")
    # a deleted input does not make a finished run unfinished (its result stands)
    shutil.rmtree(tmp_path / "data" / "mine" / "test")
    os.makedirs(tmp_path / "data" / "mine" / "test")
    code, err = cli(finetune, argv, monkeypatch, capsys)
    assert code == 0 and not err, err


def test_report_keeps_runs_from_two_checkpoints_under_one_name_apart(tmp_path, stage_args):
    """Two seeds fine-tuned from `further-pretrain-2`, the checkpoint re-trained in between: the same name and
    arguments, other weights -- a mixed cell, not one mean."""
    for seed in (1, 2):
        pretrain.main(pretrain.get_args_parser().parse_args(stage_args("--seed", seed, "--overwrite", steps=2)))
        finetune.main(finetune.get_args_parser().parse_args(stage_args(
            "--ckpt_name", "further-pretrain-2", "--seed", seed, "--results_dir", tmp_path / "res", steps=2)))
    summary = report.summarize(str(tmp_path / "res"))[("digits", "further-pretrain-2")]
    assert summary["mean_acc"] is None and len(summary["groups"]) == 2
    assert [sorted(g["settings"]) for g in summary["groups"]] == [["start content"]] * 2
    # the same checkpoint for both: one cell
    finetune.main(finetune.get_args_parser().parse_args(stage_args(
        "--ckpt_name", "further-pretrain-2", "--seed", 3, "--results_dir", tmp_path / "res", steps=2)))
    summary = report.summarize(str(tmp_path / "res"), seeds=[2, 3])[("digits", "further-pretrain-2")]
    assert summary["groups"] == [] and summary["n"] == 2


def test_a_run_resumed_with_other_numerics_is_refused(stage_args, tmp_path, monkeypatch, capsys):
    argv = stage_args("--save_every", 1, "--output_dir", tmp_path / "run", steps=4)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    for other, change in ((["--precision", "bf16"], "precision: 'fp32' there, 'bf16' now"),
                          (["--compile"], "compile: False there, True now")):
        code, err = cli(pretrain, [*argv, *other], monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, "computed with other numerics", change)
    assert cli(pretrain, [*argv, "--precision", "fp32", "--log_every", 3], monkeypatch, capsys)[0] == 0  # the same


def test_overwrite_moves_only_a_runs_directory(stage_args, tmp_path, monkeypatch, capsys):
    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, err = cli(pretrain, stage_args("--output_dir", mine, "--overwrite"), monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "--overwrite moves only a run's directory", "notes.txt", "nothing was moved")
    assert os.listdir(tmp_path) == ["my_folder"] and os.listdir(mine) == ["notes.txt"]


def test_a_state_that_cannot_be_written_is_one_line_and_keeps_the_previous(stage_args, tmp_path, monkeypatch,
                                                                          capsys):
    real, saves = torch.save, []

    def save(obj, f, *a, **kw):
        saves.append(1)
        if len(saves) == 2:  # torch.save reports a full disk as a RuntimeError
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", save)
    argv = stage_args("--save_every", 1, "--output_dir", tmp_path / "run", steps=4)
    code, err = cli(pretrain, argv, monkeypatch, capsys)
    assert code == 1
    assert_one_line(err, f"cannot write the training state {tmp_path / 'run' / training.STATE_FILE}",
                    "the state saved before is kept")
    assert torch.load(tmp_path / "run" / training.STATE_FILE, weights_only=True)["step"] == 1
    assert not [n for n in os.listdir(tmp_path / "run") if ".tmp" in n]
