"""Bad numbers are refused when parsed: every numeric flag of every command is checked by argparse (usage, then
one `error: argument --flag: ...` line, exit code 2, no traceback) before anything is written, and the table
below tries a bad value for every one of them. (Bad paths and checkpoints: tests/test_validation.py.)"""
import argparse
import os

import pytest

import finetune
import pretrain
import probe
import selftrain
from lab import bench, gpu_check
from tools import publish, tensorboard_logs, visualize

from helpers import assert_parse_error, cli

SCRIPTS = {"pretrain": pretrain, "selftrain": selftrain, "finetune": finetune, "probe": probe, "visualize": visualize,
           "bench": bench, "gpu_check": gpu_check, "publish": publish, "tensorboard_logs": tensorboard_logs}
REQUIRED = {"pretrain": ["--dataset", "digits"], "selftrain": ["--dataset", "digits"],
            "finetune": ["--dataset", "digits"], "probe": ["--dataset", "digits"],
            "visualize": ["--checkpoint", "vit-mae-tiny", "--dataset", "digits"],
            "bench": [], "gpu_check": [], "publish": ["dir", "me/repo"], "tensorboard_logs": ["dir"]}
SHARED = [("--steps", "0", "must be at least 1, got 0"), ("--steps", "-5", "must be at least 1, got -5"),
          ("--steps", "2.5", "expected a whole number, got '2.5'"),
          ("--batch_size", "0", "must be at least 1, got 0"),
          ("--lr", "nan", "must be a finite number greater than 0, got nan"),
          ("--lr", "0", "must be greater than 0, got 0"), ("--lr", "inf", "finite number"),
          ("--weight_decay", "-0.1", "must be at least 0, got -0.1"), ("--weight_decay", "inf", "finite number"),
          ("--warmup_steps", "-1", "must be at least 0, got -1"),
          ("--clip_grad", "0", "must be greater than 0, got 0"), ("--clip_grad", "nan", "finite number"),
          ("--clip_grad", "off", "expected a number or none, got 'off'"),
          ("--log_every", "0", "must be at least 1, got 0"), ("--save_every", "-1", "must be at least 0, got -1"),
          ("--save_every_minutes", "-1", "must be at least 0, got -1"), ("--save_every_minutes", "nan", "finite number"),
          ("--workers", "-1", "must be at least 0, got -1"), ("--seed", "-1", "must be at least 0, got -1"),
          ("--device", "cuda:x", "expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
          ("--device", "cudafoo", "expected auto, cpu, cuda or cuda:N"), ("--device", "cuda:-1", "cuda:N"),
          ("--accum_steps", "0", "must be at least 1, got 0"), ("--accum_steps", "1.5", "expected a whole number"),
          ("--max_length", "4", "must be at least 8, got 4")]
NOT_NUMERIC = {"--out", "--device", "--teacher_device"}  # checked at parse time too, but not numbers
MASK_RATIO = [("--mask_ratio", "1.5", "must be in (0, 1), got 1.5"), ("--mask_ratio", "1.0", "must be in (0, 1)"),
              ("--mask_ratio", "0", "must be in (0, 1), got 0"), ("--mask_ratio", "nan", "finite number")]
BAD = {
    "pretrain": SHARED + MASK_RATIO,
    "selftrain": SHARED + MASK_RATIO + [("--distill_weight", "-1", "must be at least 0, got -1"),
                                        ("--distill_weight", "nan", "finite number"),
                                        ("--teacher_device", "gpu1", "expected auto, cpu, cuda or cuda:N")],
    "finetune": SHARED + [("--dropout", "1", "must be in [0, 1), got 1"), ("--dropout", "-0.1", "in [0, 1)"),
                          ("--val_split", "1", "must be in [0, 1), got 1"), ("--val_split", "-0.5", "in [0, 1)"),
                          ("--val_split", "nan", "finite number"),
                          ("--layer_decay", "0", "must be in (0, 1], got 0"), ("--layer_decay", "1.5", "(0, 1]"),
                          ("--drop_path", "1", "must be in [0, 1), got 1"), ("--drop_path", "-0.1", "[0, 1)"),
                          ("--mixup", "-1", "must be at least 0, got -1"), ("--mixup", "nan", "finite number"),
                          ("--cutmix", "-1", "must be at least 0, got -1"),
                          ("--label_smoothing", "1", "must be in [0, 1), got 1"),
                          ("--reprob", "1.5", "must be in [0, 1], got 1.5"), ("--reprob", "-1", "[0, 1]")],
    "probe": SHARED + [("--knn_k", "0", "must be at least 1, got 0"),
                       ("--knn_temperature", "0", "must be greater than 0, got 0"),
                       ("--knn_temperature", "nan", "finite number")],
    "visualize": MASK_RATIO + [("--num_images", "0", "must be at least 1, got 0"),
                               ("--seed", "-3", "must be at least 0, got -3"),
                               ("--out", "figs/", "names a directory; give a file name ending in .png"),
                               ("--out", "recon.jpg", "needs a file name ending in .png, got 'recon.jpg'")],
    "bench": [("--batch_size", "0", "at least 1"), ("--warmup_steps", "-1", "at least 0"),
              ("--steps", "0", "at least 1"), ("--repeats", "0", "at least 1"),
              ("--peak_tflops", "0", "greater than 0"), ("--peak_tflops", "nan", "finite number"),
              ("--side_by_side", "0", "greater than 0"),
              ("--workers_list", "-1", "at least 0"), ("--data_images", "0", "at least 1"),
              ("--data_batch_size", "0", "at least 1"), ("--data_batches", "0", "at least 1"),
              ("--image_size", "0", "at least 1"), ("--device", "gpu", "expected auto, cpu, cuda or cuda:N")],
    "gpu_check": [("--steps", "5", "must be at least 6, got 5"), ("--batch_size", "0", "at least 1"),
                  ("--workers", "-1", "at least 0"), ("--side_by_side", "0", "greater than 0"),
                  ("--time_budget", "nan", "finite number"), ("--device", "gpu", "expected auto, cpu, cuda")],
    "publish": [], "tensorboard_logs": [],
}


def _numeric_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {a.option_strings[0] for a in parser._actions
            if a.type is not None and a.type.__name__.startswith(("int_at_least", "finite_float"))}


@pytest.mark.parametrize("script,flag,value,message", [(s, *case) for s, cases in BAD.items() for case in cases],
                         ids=lambda v: str(v))
def test_bad_number_is_refused_when_parsed(script, flag, value, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = cli(SCRIPTS[script], [*REQUIRED[script], flag, value], monkeypatch, capsys)
    assert code == 2
    assert_parse_error(err, flag, message)
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_is_validated_and_tested(script):
    """No flag parses a bare int or float (which would let 0, -5, nan or 1.5 through), and the table above
    tries a bad value for every validated one."""
    parser = SCRIPTS[script].get_args_parser()
    bare = [a.option_strings for a in parser._actions if a.type in (int, float)]
    assert bare == []
    assert _numeric_flags(parser) - NOT_NUMERIC == {flag for flag, _, _ in BAD[script]} - NOT_NUMERIC


def test_edge_values_that_are_valid_parse():
    args = finetune.get_args_parser().parse_args(
        ["--dataset", "d", "--warmup_steps", "0", "--save_every", "0", "--workers", "0", "--seed", "0",
         "--weight_decay", "0", "--val_split", "0", "--dropout", "0", "--clip_grad", "None", "--lr", "1e-9"])
    assert (args.warmup_steps, args.save_every, args.workers, args.seed, args.weight_decay) == (0, 0, 0, 0, 0.0)
    assert (args.val_split, args.dropout, args.clip_grad, args.lr) == (0.0, 0.0, None, 1e-9)
    args = selftrain.get_args_parser().parse_args(["--dataset", "d", "--distill_weight", "0", "--mask_ratio", "0.01"])
    assert (args.distill_weight, args.mask_ratio) == (0.0, 0.01)
