"""What users type: every bad input answered with one line (the launchers: tests/test_launchers.py)."""
import os

import pytest
import torch

import finetune
import pretrain
import selftrain
from models import load_mae, save_model

from helpers import REPO, TINY, assert_one_line as _assert_one_line, cli as _cli, launch


def test_unknown_dataset_lists_the_valid_ones(monkeypatch, capsys, tmp_path):
    code, err = _cli(pretrain, [*TINY, "--dataset", "cubb", "--data_dir", tmp_path], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "unknown dataset 'cubb'", "aircraft", "vgg_flower_102")
    assert not (tmp_path / "checkpoints").exists() and os.listdir(tmp_path) == []  # nothing written


def test_missing_dataset_folder_says_where_and_how(monkeypatch, capsys, tmp_path):
    code, err = _cli(pretrain, [*TINY, "--dataset", "cub", "--data_dir", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "cub/train.lmdb", "data.tar.gz", "data.prepare")


def test_corrupt_image_record_names_dataset_split_and_key(monkeypatch, capsys, tmp_path):
    from data import write_lmdb
    good = open(os.path.join(REPO, "tests", "conftest.py"), "rb").read()  # not an image
    for split in ("train", "test"):
        write_lmdb(str(tmp_path / "mine" / f"{split}.lmdb"), [(good, 0), (good, 1)])
    argv = [*TINY, "--dataset", "mine", "--data_dir", tmp_path, "--steps", 1, "--batch_size", 2,
            "--checkpoint_dir", tmp_path / "ckpt"]
    code, err = _cli(pretrain, argv, monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "dataset 'mine'", "split 'train'", "record b'0000000")
    # the same through DataLoader workers (the error crosses a process boundary)
    code, err = _cli(pretrain, [*argv, "--workers", 1], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "dataset 'mine'", "split 'train'", "record b'0000000")


def test_missing_teacher_names_the_command_that_creates_it(monkeypatch, capsys, data_dir, tmp_path):
    argv = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--steps", 7, "--checkpoint_dir", tmp_path]
    code, err = _cli(selftrain, argv, monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "teacher not found", "further-pretrain-7", "run_pretrain.sh GPU digits 7")


def test_missing_finetune_checkpoint_names_the_command_that_creates_it(monkeypatch, capsys, data_dir, tmp_path):
    argv = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--checkpoint_dir", tmp_path]
    code, err = _cli(finetune, argv, monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "self-further-pretrain-20000", "run_selftrain.sh GPU digits 20000")
    code, err = _cli(finetune, [*argv, "--ckpt_name", "further-pretrain-500"], monkeypatch, capsys)
    _assert_one_line(err, "run_pretrain.sh GPU digits 500")


def test_model_name_not_loadable(monkeypatch, capsys, data_dir, tmp_path):
    argv = ["--device", "cpu", "--dataset", "digits", "--data_dir", data_dir, "--checkpoint_dir", tmp_path]
    code, err = _cli(pretrain, [*argv, "--model_name", "facebook/vit-mae-base"], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "facebook/vit-mae-base", "--model_name DIR")
    code, err = _cli(pretrain, [*argv, "--model_name", tmp_path], monkeypatch, capsys)
    _assert_one_line(err, "not a model directory")


def test_cuda_asked_where_there_is_none(monkeypatch, capsys, data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--device", "cuda", "--checkpoint_dir", tmp_path]
    code, err = _cli(pretrain, argv, monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "no CUDA device", "--device cpu")
    proc = launch(f"bash {REPO}/run_pretrain.sh 0 digits 2 --model_name vit-mae-tiny --data_dir {data_dir}", tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_with_another_architecture(monkeypatch, capsys, data_dir, tmp_path):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    cfg = ViTMAEConfig(**{**load_mae("vit-mae-tiny").config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    other = ViTMAEForPreTraining(cfg)  # a smaller model than --model_name vit-mae-tiny
    save_model(other, str(tmp_path / "further-pretrain-3" / "digits"))
    torch.save({"state_dict": other.vit.state_dict()}, tmp_path / "model.pt")
    argv = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--steps", 3, "--checkpoint_dir", tmp_path]
    # as a teacher directory (it carries its own config) and as a release model.pt (read as --model_name's)
    for extra in ([], ["--teacher", tmp_path / "model.pt"]):
        code, err = _cli(selftrain, [*argv, *extra], monkeypatch, capsys)
        assert code == 2
        _assert_one_line(err, "does not match the model's architecture")


def test_finished_run_is_not_overwritten(monkeypatch, capsys, data_dir, tmp_path):
    argv = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--steps", 2, "--batch_size", 4,
            "--checkpoint_dir", tmp_path]
    pretrain.main(pretrain.get_args_parser().parse_args(map(str, argv)))
    weights = tmp_path / "further-pretrain-2" / "digits" / "model.safetensors"
    before = weights.read_bytes()
    pretrain.main(pretrain.get_args_parser().parse_args(map(str, [*argv, "--log_every", 5])))
    assert "already complete" in capsys.readouterr().out
    code, err = _cli(pretrain, [*argv, "--seed", 5], monkeypatch, capsys)  # another run: refused, not reported
    assert code == 2
    _assert_one_line(err, "finished run with other arguments (seed: 0 there, 5 now)", "--overwrite")
    assert weights.read_bytes() == before
