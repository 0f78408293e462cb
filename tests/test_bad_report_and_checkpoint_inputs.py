"""Bad inputs of report.py and of the checkpoints and datasets a stage reads, each one line: report.py as the shell
runs it (no results, a broken result file: exit code 2); result folders it walks (an unreadable
one dropped its seeds from a cell; a FIFO named seed1.json hung it), --init as the launcher spells a checkpoint
name, a damaged counts.json (a traceback in three places), a --ckpt_name given as a path (fine-tuning wrote its
results into the checkpoint tree), and an unreadable config.json of a model directory (a traceback)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import finetune
import report
from data import ImageDataset
from data.prepare import get_args_parser as prepare_parser
from data.prepare import main as prepare_main
from errors import UserError

from helpers import REPO, TINY, assert_one_line, cli, open_tmp, result_file, unprivileged, world_readable


def test_report_names_an_unreadable_results_folder():
    with open_tmp() as tmp:
        results = os.path.join(tmp, "results")
        for seed in (1, 2, 3):
            result_file(results, "cub", "initial", seed, 0.5 + seed / 100)
        result_file(results, "cub", os.path.join("runs", "further-pretrain-9"), 1, 0.6)
        world_readable(tmp)
        os.chmod(os.path.join(results, "cub", "runs"), 0o000)
        proc = unprivileged("""
            try:
                report.main(report.get_args_parser().parse_args(["--results_dir", sys.argv[1], "--out_dir",
                                                                  sys.argv[2]]))
            except errors.UserError as e:
                print("error:", e)
        """, results, tmp)
        assert proc.returncode == 0, proc.stderr
        # before: the table without that row, not a word
        assert proc.stdout.strip().splitlines()[-1].startswith("error: ") and \
            os.path.join(results, "cub", "runs") in proc.stdout, proc.stdout


def test_report_refuses_a_result_file_that_is_a_fifo_without_hanging(tmp_path):
    result_file(tmp_path, "cub", "initial", 1, 0.5)
    os.mkfifo(tmp_path / "cub" / "initial" / "seed2.json")
    proc = subprocess.run([sys.executable, "report.py", "--results_dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, str(tmp_path / "cub" / "initial" / "seed2.json"), "FIFO")


def test_report_command_errors_exit_2(tmp_path):
    """report.py as the shell runs it: no results, or a broken result file, is one line and exit code 2."""
    def cli(results_dir):
        return subprocess.run([sys.executable, "report.py", "--results_dir", str(results_dir)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    (tmp_path / "empty" / "cub" / "initial" / "seed1").mkdir(parents=True)
    proc = cli(tmp_path / "empty")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no fine-tuning results") and proc.stderr.count("\n") == 1

    result_file(tmp_path / "bad", "cub", "initial", 1, 0.5)
    (tmp_path / "bad" / "cub" / "initial" / "seed1.json").write_text("{")
    proc = cli(tmp_path / "bad")
    assert proc.returncode == 2
    assert "seed1.json" in proc.stderr and proc.stderr.count("\n") == 1


def test_report_init_as_the_launcher_spells_a_checkpoint_name(tmp_path, capsys):
    """run_finetune.sh passes CKPT as given; `further-pretrain-9/` wrote results/<d>/further-pretrain-9/, and the
    summary's --init further-pretrain-9/ found nothing (exit 2 after every run had succeeded)."""
    result_file(tmp_path, "cub", "further-pretrain-9", 1, 0.5)
    report.main(report.get_args_parser().parse_args(["--results_dir", str(tmp_path), "--init",
                                                     "further-pretrain-9/"]))
    assert capsys.readouterr().out.startswith("cub further-pretrain-9: test accuracy 50.00 %")


@pytest.mark.parametrize("content", ["{not json", '{"classes": ["a"]}', '["a list"]', '{"num_classes": "ten"}'])
def test_a_damaged_counts_json_is_one_line_naming_it(content, data_dir, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data" / "mine"
    shutil.copytree(os.path.join(data_dir, "digits"), root, ignore=shutil.ignore_patterns(".cache"))
    (root / "counts.json").write_text(content)
    with pytest.raises(UserError, match=str(root / "counts.json")):
        ImageDataset("mine", "train", str(tmp_path / "data"), 8).num_classes()
    code, err = cli(finetune, [*TINY, "--dataset", "mine", "--data_dir", tmp_path / "data", "--scratch", "True",
                               "--steps", 1, "--batch_size", 4, "--results_dir", tmp_path / "res", "--save_model"],
                    monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, str(root / "counts.json"))
    with pytest.raises(UserError, match=str(root / "counts.json")):
        prepare_main(prepare_parser().parse_args(["--check", "mine", "--out", str(tmp_path / "data")]))


@pytest.mark.parametrize("name", ["ABS", "../elsewhere", "a/../../b"])
def test_a_ckpt_name_given_as_a_path_is_refused(name, data_dir, tmp_path, monkeypatch, capsys):
    """The results went to <results_dir>/<dataset>/<ckpt_name>/seed<k>: an absolute name put them (and what
    --overwrite moves aside) inside the checkpoint tree; `..` climbed out of the results folder."""
    name = str(tmp_path / "ckpt" / "x") if name == "ABS" else name
    code, err = cli(finetune, [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--ckpt_name", name,
                               "--checkpoint_dir", tmp_path / "ckpt", "--results_dir", tmp_path / "res"],
                    monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "--ckpt_name", "--checkpoint_dir")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "res").exists()


def test_an_unreadable_config_json_is_one_line(tmp_path):
    from models import load_mae, save_model
    with open_tmp() as tmp:
        save_model(load_mae("vit-mae-tiny"), os.path.join(tmp, "teacher"))
        world_readable(tmp)
        os.chmod(os.path.join(tmp, "teacher", "config.json"), 0o000)
        proc = unprivileged("""
            import models
            try:
                models.load_encoder_state(sys.argv[1], "vit-mae-tiny")
            except errors.UserError as e:
                print("error:", e)
        """, os.path.join(tmp, "teacher"))
        assert proc.returncode == 0, proc.stderr[-1500:]
        assert proc.stdout.strip().startswith("error: ") and "config.json" in proc.stdout, proc.stdout
