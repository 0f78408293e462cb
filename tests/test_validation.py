"""Bad numbers that need the model or the data, paths and checkpoints: each is refused with one line (exit code 2,
no traceback) before anything is written, by the stage (`error: ...`, via UserError); a bad number through a launcher
too. (Numbers checked when parsed, flag by flag: tests/unit/test_flag_values.py.)"""
import argparse
import os
import subprocess
import sys

import pytest
import torch

import finetune
import pretrain
import selftrain
import utils
from data import ImageDataset
from models import load_mae, save_model
from models import checkpoints, hub
from tools import visualize

from helpers import REPO, assert_one_line as _assert_one_line, cli as _cli


def test_bad_steps_through_the_launcher_writes_nothing(data_dir, tmp_path):
    """`bash run_pretrain.sh cpu digits 0` used to save θ₀ as further-pretrain-0."""
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", f"{REPO}/run_pretrain.sh", "cpu", "digits", "0", "--model_name", "vit-mae-tiny",
                           "--data_dir", data_dir], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "pretrain.py: error: argument --steps: must be at least 1, got 0"
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- numbers that need the model or the data

@pytest.mark.parametrize("ratio,visible", [("0.999", 0), ("1e-17", 64)])
def test_mask_ratio_that_hides_all_or_no_patches_of_the_model(ratio, visible, stage_args, monkeypatch, capsys,
                                                             tmp_path):
    """vit-mae-tiny has 64 patches; transformers keeps int(64 · (1 - ratio)) visible."""
    code, err = _cli(pretrain, stage_args("--mask_ratio", ratio), monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, f"--mask_ratio {float(ratio)} leaves {visible} of the model's 64 patches visible")
    assert not (tmp_path / "ckpt").exists()


def test_val_split_that_empties_either_part(stage_args, monkeypatch, capsys, tmp_path):
    base = stage_args("--scratch", "True", "--results_dir", tmp_path / "res")
    n = len(ImageDataset("digits", "train", base[base.index("--data_dir") + 1], 32))
    code, err = _cli(finetune, [*base, "--val_split", "0.9999"], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, f"--val_split 0.9999 holds out all {n} training images, leaving none to train on")
    code, err = _cli(finetune, [*base, "--val_split", "0.0001"], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, f"--val_split 0.0001 holds out none of the {n} training images")
    assert not (tmp_path / "res").exists()
    train, val = finetune.train_val_split(n, 1 / n)  # the smallest fraction the message suggests, rounded
    assert len(val) == 1 and len(train) == n - 1


# ----------------------------------------------------------------------------- checkpoints that cannot be read

@pytest.fixture
def tiny_dir(tmp_path):
    """A complete model directory of vit-mae-tiny (config.json + model.safetensors + processor file), where
    fine-tuning looks for --checkpoint_dir ckroot --ckpt_name ck."""
    path = tmp_path / "ckroot" / "ck" / "digits"
    save_model(load_mae("vit-mae-tiny"), str(path))
    return path


def test_model_directory_without_weights(tiny_dir, stage_args, monkeypatch, capsys, tmp_path):
    """As the teacher, as the checkpoint fine-tuning starts from, and as θ₀."""
    os.remove(tiny_dir / "model.safetensors")
    finetune_argv = stage_args("--checkpoint_dir", tmp_path / "ckroot", "--ckpt_name", "ck",
                               "--results_dir", tmp_path / "res")
    for module, argv in ((selftrain, stage_args("--teacher", tiny_dir)), (finetune, finetune_argv),
                         (pretrain, [*stage_args(), "--model_name", tiny_dir])):
        code, err = _cli(module, argv, monkeypatch, capsys)
        assert code == 2, module
        _assert_one_line(err, f"'{tiny_dir}' has config.json but no model.safetensors")
    assert os.listdir(tmp_path) == ["ckroot"]  # nothing written


def test_corrupt_teacher_files_are_named(tiny_dir, stage_args, monkeypatch, capsys, tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"\x00 not a pickle \xff" * 10)
    code, err = _cli(selftrain, stage_args("--teacher", garbage), monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, f"cannot read {garbage}", "the release's model.pt")
    torch.save({"args": None, "state_dict": [1, 2]}, garbage)  # a readable pickle, but no state dict
    code, err = _cli(selftrain, stage_args("--teacher", garbage), monkeypatch, capsys)
    _assert_one_line(err, f"{garbage} holds no state dict of tensors")
    code, err = _cli(selftrain, stage_args("--teacher", tiny_dir / "model.safetensors"), monkeypatch, capsys)
    _assert_one_line(err, f"{tiny_dir / 'model.safetensors'} is one file of a model directory; pass the "
                          f"directory {tiny_dir}")
    (tiny_dir / "model.safetensors").write_bytes(b"")
    code, err = _cli(selftrain, stage_args("--teacher", tiny_dir), monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, f"cannot read the model in {tiny_dir / 'model.safetensors'}")
    (tiny_dir / "config.json").write_text("{not json")
    code, err = _cli(selftrain, stage_args("--teacher", tiny_dir), monkeypatch, capsys)
    _assert_one_line(err, f"cannot read {tiny_dir / 'config.json'}")
    assert not (tmp_path / "ckpt").exists()


def test_a_good_release_file_still_loads(tiny_dir, tmp_path):
    """The checks above do not refuse the real format: a v4-named encoder state dict in {'args', 'state_dict'}."""
    mae = load_mae("vit-mae-tiny")
    torch.save({"args": argparse.Namespace(lr=1e-4), "state_dict": mae.vit.state_dict()}, tmp_path / "r.pt")
    state = checkpoints.read_release_checkpoint(str(tmp_path / "r.pt"))
    assert state.keys() == mae.vit.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in mae.vit.state_dict().items())


# ----------------------------------------------------------------------------- names: local paths and hub ids

@pytest.mark.parametrize("name", ["./my-model", "/abs/missing/model", "runs/x/y", "my-model/"])
def test_missing_local_path_is_not_treated_as_a_hub_id(name, stage_args, monkeypatch, capsys, tmp_path):
    code, err = _cli(pretrain, [*stage_args(), "--model_name", name], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, f"'{name}' does not exist")
    assert "hf download" not in err


def test_owner_slash_name_under_an_existing_local_folder(stage_args, monkeypatch, capsys, tmp_path):
    """`runs/x` looks like a hub id; with a local runs/ it is a mistyped path, and said so."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("runs")
    code, err = _cli(pretrain, [*stage_args(), "--model_name", "runs/x"], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "'runs/x' does not exist", "runs/ has no 'x'")
    assert "hf download" not in err and os.listdir(tmp_path) == ["runs"]


def test_hub_id_while_offline_says_so_and_how_to_pass_a_directory(stage_args, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _cli(pretrain, [*stage_args(), "--model_name", "someone/not-cached-mae"], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "nor in the Hugging Face cache", "HF_HUB_OFFLINE=1", "--model_name DIR")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """No offline variable, and a Hub endpoint that refuses connections (as a machine without network)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub._endpoint_unreachable.cache_clear()
    yield
    hub._endpoint_unreachable.cache_clear()


def test_unreachable_hub_uses_the_cache_only(unreachable_hub, stage_args, monkeypatch, capsys):
    """huggingface_hub would retry each file for ~25 s; the endpoint is probed once and the cache used alone."""
    import huggingface_hub
    asked = []

    def fake_download(repo_id, filename, local_files_only=False, **kw):
        asked.append(local_files_only)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    code, err = _cli(pretrain, [*stage_args(), "--model_name", "someone/not-cached-mae"], monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, "nor in the Hugging Face cache", "127.0.0.1:9", "cannot be reached", "--model_name DIR")
    assert asked == [True]  # the processor file, too, only from the cache


def test_unreachable_hub_in_a_fresh_process(data_dir, tmp_path):
    """The same without any patching: huggingface_hub and transformers read the environment at import."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, f"{REPO}/pretrain.py", "--dataset", "digits", "--data_dir", data_dir,
                           "--model_name", "someone/not-cached-mae", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    _assert_one_line(proc.stderr, "cannot be reached", "--model_name DIR")
    assert "Retrying" not in proc.stderr
    assert os.listdir(tmp_path) == []  # an empty HF_HOME is not even created


# ----------------------------------------------------------------------------- messages that point the right way

def test_teacher_not_found_suggests_the_same_checkpoint_dir(stage_args, monkeypatch, capsys, tmp_path):
    code, err = _cli(selftrain, stage_args(), monkeypatch, capsys)  # --checkpoint_dir tmp_path/ckpt, --steps 4
    assert code == 2
    where = f"--checkpoint_dir {tmp_path / 'ckpt'}"
    _assert_one_line(err, f"run_pretrain.sh GPU digits 4 {where}`")
    monkeypatch.chdir(tmp_path)
    argv = stage_args()
    argv[argv.index("--checkpoint_dir") + 1] = "checkpoints"  # the default: no flag to repeat
    code, err = _cli(selftrain, argv, monkeypatch, capsys)
    _assert_one_line(err, "run_pretrain.sh GPU digits 4`")


@pytest.mark.parametrize("out", ["figs/", "existing"])
def test_visualize_out_must_be_a_png_file(out, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    os.mkdir("existing")
    monkeypatch.setattr(sys, "argv", ["visualize.py", "--checkpoint", "vit-mae-tiny", "--dataset", "digits",
                                      "--out", out])
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(visualize.get_args_parser, visualize.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(
        f"error: argument --out: '{out}' names a directory; give a file name ending in .png, "
        f"e.g. {os.path.join(out, 'recon.png')}")
    assert os.listdir(tmp_path) == ["existing"]


def test_checkpoint_not_found_suggests_the_same_checkpoint_dir(stage_args, monkeypatch, capsys, tmp_path):
    code, err = _cli(finetune, stage_args("--ckpt_name", "further-pretrain-7"), monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, f"run_pretrain.sh GPU digits 7 --checkpoint_dir {tmp_path / 'ckpt'}`")


@pytest.mark.parametrize("content", ["{not json", '{"image_mean": [0.5, 0.5], "image_std": [1, 1, 1]}',
                                     '{"resample": "bicubic"}'])
def test_unreadable_preprocessor_file_is_named(content, stage_args, monkeypatch, capsys, tmp_path):
    theta0 = tmp_path / "theta0"
    save_model(load_mae("vit-mae-tiny"), str(theta0))
    (theta0 / "preprocessor_config.json").write_text(content)
    code, err = _cli(pretrain, stage_args("--model_name", str(theta0)), monkeypatch, capsys)
    assert code == 2
    _assert_one_line(err, str(theta0 / "preprocessor_config.json"))
    assert not (tmp_path / "ckpt").exists()
