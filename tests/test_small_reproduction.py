"""small_reproduction.py end to end with tiny step counts: the two datasets it builds, the hand-over between
the stages (θ₀ -> teacher -> student -> classifiers), the table and Fig. 1 against the result files,
resuming without recomputing, and refusing a changed protocol in the same folder."""
import io
import json
import os

import pytest
import torch
from PIL import Image
from transformers import ViTMAEForPreTraining

from tools import small_reproduction
from data import LMDBReader
from models import load_mae
from errors import UserError

SHOTS, FIG1_STEPS, SEED = 3, (2, 3), 1
TINY_RUN = ["--source_crops", 40, "--source_steps", 4, "--source_warmup_steps", 1, "--shots", SHOTS,
            "--further_steps", 2, "--fig1_steps", *FIG1_STEPS, "--finetune_steps", 3, "--finetune_warmup_steps", 1,
            "--seeds", SEED, "--workers", 0, "--log_every", 1000]
INITS = ["initial"] + [f"{prefix}further-pretrain-{k}" for k in FIG1_STEPS for prefix in ("", "self-")]


def run(out_dir, *extra):
    argv = [str(a) for a in TINY_RUN + list(extra)] + ["--out_dir", str(out_dir)]
    small_reproduction.main(small_reproduction.get_args_parser().parse_args(argv))


def _read(path):
    with open(path) as f:
        return f.read()


def _args(run_dir):
    with open(os.path.join(run_dir, "args.json")) as f:
        return json.load(f)["args"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("small_reproduction")
    threads = torch.get_num_threads()
    run(out_dir)
    assert torch.get_num_threads() == threads  # the thread setting does not leak out of main
    return out_dir


def test_datasets_source_crops_and_a_low_data_subset_of_digits(out):
    crops = LMDBReader(str(out / "data" / "natural_patches" / "train.lmdb"))
    assert len(crops) == 40
    sides = set()
    for i in range(len(crops)):
        image_bytes, label = crops[i]
        with Image.open(io.BytesIO(image_bytes)) as img:
            assert img.format == "JPEG" and img.width == img.height and 48 <= img.width <= 160
            sides.add(img.width)
        assert label == 0
    assert len(sides) > 5  # random sizes, not one

    digits, low = out / "data" / "digits", out / "data" / "digits_low"
    full_train, subset = LMDBReader(str(digits / "train.lmdb")), LMDBReader(str(low / "train.lmdb"))
    assert sorted(subset.labels()) == sorted(list(range(10)) * SHOTS)  # SHOTS per class
    indices = json.loads(_read(low / "counts.json"))["train_indices_in_digits"]
    assert [subset[i] for i in range(len(subset))] == [full_train[i] for i in indices]  # byte for byte
    full_test, low_test = LMDBReader(str(digits / "test.lmdb")), LMDBReader(str(low / "test.lmdb"))
    assert len(low_test) == 500
    assert [low_test[i] for i in range(500)] == [full_test[i] for i in range(500)]  # the whole test split


def test_every_stage_starts_from_the_right_model(out):
    initial = str(out / "initial_model")
    theta0 = ViTMAEForPreTraining.from_pretrained(initial).state_dict()  # an ordinary model directory
    random_init = load_mae("vit-mae-tiny").state_dict()
    assert not torch.equal(theta0["vit.layers.0.mlp.fc1.weight"], random_init["vit.layers.0.mlp.fc1.weight"])
    assert _args(initial)["dataset"] == "natural_patches" and _args(initial)["model_name"] == "vit-mae-tiny"
    for k in FIG1_STEPS:
        teacher = out / "checkpoints" / f"further-pretrain-{k}" / "digits_low"
        student = out / "checkpoints" / f"self-further-pretrain-{k}" / "digits_low"
        assert _args(teacher)["model_name"] == initial and _args(teacher)["steps"] == k
        assert _args(student)["model_name"] == initial and _args(student)["steps"] == k
        assert os.path.samefile(_args(student)["teacher"], teacher)  # the teacher of the same step count
    for init in INITS:
        result = json.loads(_read(out / "results" / "digits_low" / init / f"seed{SEED}.json"))
        assert result["args"]["model_name"] == initial and result["num_test"] == 500
        expected = initial if init == "initial" else str(out / "checkpoints" / init / "digits_low")
        assert result["checkpoint"] == expected


def test_table_and_fig1_show_the_fine_tuning_results(out):
    acc = {init: 100 * json.loads(_read(out / "results" / "digits_low" / init / f"seed{SEED}.json"))["test_acc"]
           for init in INITS}
    table = _read(out / "report.md")
    for row, init in (("Fine-tuning (initial model)", "initial"), ("Further pre-training (2)", "further-pretrain-2"),
                      ("Self-distillation (2)", "self-further-pretrain-2")):
        line = next(line for line in table.splitlines() if line.startswith(f"| {row}"))
        assert f"{acc[init]:.2f} (n=1)" in line
    assert "(3)" not in table  # the table is at --further_steps only

    lines = _read(out / "fig1.csv").splitlines()
    assert lines[0] == "steps,route,n,mean_acc,std_acc"
    rows = {(int(s), route): float(mean) for s, route, _, mean, _ in (line.split(",") for line in lines[1:])}
    expected = {(0, "further"): acc["initial"], (0, "self"): acc["initial"]}
    expected.update({(k, "further"): acc[f"further-pretrain-{k}"] for k in FIG1_STEPS})
    expected.update({(k, "self"): acc[f"self-further-pretrain-{k}"] for k in FIG1_STEPS})
    assert rows == pytest.approx(expected, abs=1e-4)
    assert "| 0 (θ₀) |" in _read(out / "fig1.md")
    with Image.open(out / "fig1.png") as img:
        assert img.format == "PNG"
    summary = _read(out / "summary.md")
    assert table in summary and "machine:" in summary


def test_rerun_skips_finished_runs_and_a_changed_protocol_is_refused(out, capsys):
    timings = _read(out / "timings.jsonl")
    assert len(timings.splitlines()) == 1 + 4 + 5  # θ₀, 2 x (teacher, student), 5 fine-tunings
    result = out / "results" / "digits_low" / "initial" / f"seed{SEED}.json"
    before = result.stat().st_mtime_ns
    capsys.readouterr()
    run(out, "--workers", 1)  # a run-control flag may differ
    assert "10 runs, 10 already complete" in capsys.readouterr().out
    assert _read(out / "timings.jsonl") == timings and result.stat().st_mtime_ns == before

    with pytest.raises(UserError, match="finetune_lr"):
        run(out, "--finetune_lr", 5e-4)
    with pytest.raises(UserError, match="must be one of --fig1_steps"):
        run(out, "--further_steps", 5)
