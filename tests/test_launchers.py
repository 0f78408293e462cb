"""The launchers as users type them: run_all.sh end to end, runs side by side (JOBS) giving the same
results as one after another, a failed run reported without losing the others, runs spread over a GPU
list, and bad input answered with one line before anything runs."""
import json
import os
import stat
import subprocess
import sys

import pytest

from helpers import REPO


TINY_FLAGS = "--model_name vit-mae-tiny --batch_size 8 --workers 0 --log_every 1"


def _launch(cmd: str, cwd, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _fake_python(tmp_path, fail_seed=None):
    """A $PYTHON that records each call (CUDA_VISIBLE_DEVICES and arguments) instead of training, and
    fails the run of `fail_seed`; -> (its path, the calls file)."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake_python"
    fail = f'case " $* " in *" --seed {fail_seed} "*) echo "boom" >&2; exit 1;; esac\n' if fail_seed else ""
    script.write_text(f'#!/usr/bin/env bash\n{fail}echo "${{CUDA_VISIBLE_DEVICES:-none}}|$*" >> {calls}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), calls


def test_launchers_end_to_end_on_digits_and_rerun_continues(data_dir, tmp_path):
    """run_all.sh runs the MAE stages and fine-tuning from the three starting points, then report.py;
    again with JOBS=2 it redoes nothing."""
    flags = f"{TINY_FLAGS} --data_dir {data_dir}"
    env = {"SEEDS": "1", "STEPS": "4", "FINETUNE_STEPS": "4"}
    proc = _launch(f"bash {REPO}/run_all.sh cpu digits {flags}", tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # outputs land relative to where the command runs, under the documented names
    assert (tmp_path / "checkpoints" / "further-pretrain-4" / "digits" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "self-further-pretrain-4" / "digits" / "model.safetensors").exists()
    for init in ("initial", "further-pretrain-4", "self-further-pretrain-4"):
        result = json.load(open(tmp_path / "results" / "digits" / init / "seed1.json"))
        assert result["args"]["steps"] == 4  # FINETUNE_STEPS
        summary = [line for line in proc.stdout.splitlines() if line.startswith(f"digits {init}:")]
        assert len(summary) == 1 and "over 1 seed" in summary[0]  # mean ± std of each route
        assert f"{100 * result['test_acc']:.2f}" in summary[0]
    table = (tmp_path / "results" / "report.md").read_text()
    assert "Self-distillation" in table and "digits" in table
    before = (tmp_path / "results" / "digits" / "initial" / "seed1.json").read_bytes()
    proc = _launch(f"bash {REPO}/run_all.sh cpu digits {flags}", tmp_path, {**env, "JOBS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [line for line in proc.stdout.splitlines() if "] done: " in line]
    assert len(done) == 1 + 3 and all("already complete" in line for line in done)
    assert (tmp_path / "results" / "digits" / "initial" / "seed1.log").exists()
    assert (tmp_path / "results" / "digits" / "initial" / "seed1.json").read_bytes() == before


def _metrics(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "peak_mem_mb")} for line in f]


def test_side_by_side_runs_equal_one_after_another(data_dir, tmp_path):
    cmd = f"bash {REPO}/run_finetune.sh cpu digits True {TINY_FLAGS} --data_dir {data_dir} --steps 3"
    runs = {}
    for jobs in ("1", "2"):
        (tmp_path / jobs).mkdir()
        proc = _launch(cmd, tmp_path / jobs, {"SEEDS": "1 2", "JOBS": jobs})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[jobs] = proc.stdout
    for seed in (1, 2):
        one, two = (tmp_path / jobs / "results" / "digits" / "initial" for jobs in ("1", "2"))
        a, b = (json.load(open(d / f"seed{seed}.json")) for d in (one, two))
        assert (a["test_acc"], a["test_loss"]) == (b["test_acc"], b["test_loss"])
        assert _metrics(one / f"seed{seed}" / "metrics.jsonl") == _metrics(two / f"seed{seed}" / "metrics.jsonl")
        # side by side: each run's output in its own log, one line per finished run on the terminal
        assert not (one / f"seed{seed}.log").exists()
        assert f"seed {seed}: test accuracy" in (two / f"seed{seed}.log").read_text()
        assert f"[digits initial seed {seed}] done: [finetune] digits from initial, seed {seed}" in runs["2"]
    assert "over 2 seeds (1 2)" in runs["1"] and "over 2 seeds (1 2)" in runs["2"]


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path):
    python, calls = _fake_python(tmp_path, fail_seed=2)
    proc = _launch(f"bash {REPO}/run_finetune.sh cpu digits True", tmp_path,
                   {"PYTHON": python, "SEEDS": "2 1 3", "JOBS": "2"})
    assert proc.returncode == 1
    log = "results/digits/initial/seed2.log"
    assert f"  digits initial seed 2: exit code 1, log {log}" in proc.stderr.splitlines()
    header, *output = (tmp_path / log).read_text().splitlines()
    assert header.startswith("==== ") and "digits initial seed 2 on cpu" in header and output == ["boom"]
    seeds = sorted(line.split("--seed ")[1].split()[0] for line in calls.read_text().splitlines())
    assert seeds == ["1", "3"]  # both still ran; no summary (report.py) after a failure
    # one at a time (JOBS=1, the default on cpu), the same: the next seeds still run
    calls.unlink()
    proc = _launch(f"bash {REPO}/run_finetune.sh cpu digits True", tmp_path, {"PYTHON": python, "SEEDS": "2 1"})
    assert proc.returncode == 1 and "  digits initial seed 2: exit code 1" in proc.stderr.splitlines()
    assert len(calls.read_text().splitlines()) == 1


def test_gpu_list_gives_each_run_one_gpu(tmp_path):
    python, calls = _fake_python(tmp_path)
    proc = _launch(f"bash {REPO}/run_finetune.sh 0,1 digits True", tmp_path,
                   {"PYTHON": python, "SEEDS": "1 2 3 4", "JOBS": "1"})
    assert proc.returncode == 0, proc.stderr
    runs = [line.split("|") for line in calls.read_text().splitlines() if "finetune.py" in line]
    assert len(runs) == 4
    assert all(gpu in ("0", "1") and "torch.distributed.run" not in argv for gpu, argv in runs)
    assert {runs[0][0], runs[1][0]} == {"0", "1"}  # the first two go to different GPUs

    # run_all.sh: one dataset on two GPUs -> its MAE stages use both (DDP); two datasets -> one GPU each
    for datasets, ddp in (("digits", True), ("digits cub", False)):
        calls.unlink()
        proc = _launch(f"bash {REPO}/run_all.sh 0,1 {datasets}", tmp_path,
                       {"PYTHON": python, "SEEDS": "1", "STEPS": "5", "JOBS": "1"})
        assert proc.returncode == 0, proc.stderr
        lines = [line.split("|") for line in calls.read_text().splitlines()]
        mae = [(gpu, argv) for gpu, argv in lines if "pretrain.py" in argv or "selftrain.py" in argv]
        assert len(mae) == 2 * len(datasets.split())
        for gpu, argv in mae:
            assert (gpu == "0,1" and "--nproc_per_node=2" in argv) if ddp else (gpu in ("0", "1")), (gpu, argv)
        finetune_runs = [(gpu, argv) for gpu, argv in lines if "finetune.py" in argv]
        assert len(finetune_runs) == 3 * len(datasets.split())
        assert all(gpu in ("0", "1") for gpu, _ in finetune_runs)


def test_run_all_keeps_finetuning_flags_from_the_mae_stages(tmp_path):
    """pretrain.py and selftrain.py would refuse --results_dir and --save_model (exit 2, stopping the pool)."""
    python, calls = _fake_python(tmp_path)
    proc = _launch(f"bash {REPO}/run_all.sh cpu digits --results_dir res --save_model --results_dir=res2 --lr 1e-3",
                   tmp_path, {"PYTHON": python, "SEEDS": "1", "STEPS": "5"})
    assert proc.returncode == 0, proc.stderr
    lines = [argv for _, argv in (line.split("|") for line in calls.read_text().splitlines())]
    mae = [argv for argv in lines if "pretrain.py" in argv or "selftrain.py" in argv]
    finetune_runs = [argv for argv in lines if "finetune.py" in argv]
    assert len(mae) == 2 and len(finetune_runs) == 3
    assert all("--results_dir" not in argv and "--save_model" not in argv and "--lr 1e-3" in argv for argv in mae)
    assert all("--results_dir res --save_model --results_dir=res2" in argv for argv in finetune_runs)


def test_run_all_refuses_steps(tmp_path):
    for flag in ("--steps 3", "--steps=3"):  # abbreviations (--st) are refused by every stage's parser
        proc = _launch(f"bash {REPO}/run_all.sh cpu digits --model_name vit-mae-tiny {flag}", tmp_path)
        assert proc.returncode == 2
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: run_all.sh takes no --steps:"), proc.stderr
        assert "STEPS=N for the MAE stages (now 20000)" in lines[0] and "FINETUNE_STEPS=N" in lines[0]
        assert os.listdir(tmp_path) == []  # nothing ran


def test_launcher_usage_errors(tmp_path):
    proc = _launch(f"bash {REPO}/run_pretrain.sh cpu", tmp_path)
    assert proc.returncode == 2 and "usage: bash run_pretrain.sh GPU DATASET" in proc.stderr
    proc = _launch(f"bash {REPO}/run_finetune.sh cpu digits maybe", tmp_path)
    assert proc.returncode == 2 and "SCRATCH must be True or False" in proc.stderr
    proc = _launch(f"bash {REPO}/run_selftrain.sh gpu0 digits", tmp_path)
    assert proc.returncode == 2 and "GPU must be" in proc.stderr
    proc = _launch(f"bash {REPO}/run_finetune.sh cpu digits True", tmp_path, {"JOBS": "0"})
    assert proc.returncode == 2 and "error: JOBS must be a whole number >= 1" in proc.stderr
    proc = _launch(f"bash {REPO}/run_all.sh 0,x digits", tmp_path)
    assert proc.returncode == 2 and "GPU must be" in proc.stderr
    for var in ("STEPS", "FINETUNE_STEPS"):
        proc = _launch(f"bash {REPO}/run_all.sh cpu digits", tmp_path, {var: "2k"})
        assert proc.returncode == 2 and f"error: {var} must be a whole number" in proc.stderr
    assert os.listdir(tmp_path) == []


def _image_folder_dataset(root):
    """data_dir/pets/{train,test}/{cat,dog}/*.png: a dataset of image folders with named classes."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / "pets" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 100, (12, 12, 3)) + 150 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def _lmdb_with_class_names(data_dir, root):
    """data_dir/named: digits' LMDB files with a counts.json naming the classes (as data.prepare writes)."""
    import shutil
    shutil.copytree(os.path.join(data_dir, "digits"), root / "named")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (root / "named" / "counts.json").write_text(json.dumps({"num_classes": 10, "classes": names}))
    return names


def test_finetune_save_model_opens_with_from_pretrained(data_dir, tmp_path):
    """--save_model: stock from_pretrained opens the classifier; it gives the run's test loss and accuracy
    (so its logits are the trained model's) with the saved preprocessing; id2label names the classes."""
    import torch
    import torch.nn.functional as F
    from transformers import ViTForImageClassification, ViTImageProcessor

    import finetune
    from data import ImageDataset
    from helpers import TINY

    local = tmp_path / "data"
    _image_folder_dataset(local)
    named = _lmdb_with_class_names(data_dir, local)
    cases = {"digits": (data_dir, [str(i) for i in range(10)]), "pets": (local, ["cat", "dog"]),
             "named": (local, named)}
    for dataset, (root, labels) in cases.items():
        argv = [*TINY, "--dataset", dataset, "--data_dir", root, "--scratch", "True", "--steps", 2,
                "--batch_size", 4, "--results_dir", tmp_path / "results", "--save_model"]
        finetune.main(finetune.get_args_parser().parse_args(map(str, argv)))
        result = json.load(open(tmp_path / "results" / dataset / "initial" / "seed0.json"))
        model_dir = tmp_path / "results" / dataset / "initial" / "seed0" / "model"
        assert result["model"] == str(model_dir)

        model = ViTForImageClassification.from_pretrained(model_dir).eval()
        assert model.config.id2label == dict(enumerate(labels))
        processor = ViTImageProcessor.from_pretrained(model_dir)
        assert processor.size == {"height": 32, "width": 32}
        test_set = ImageDataset(dataset, "test", str(root), 32)
        images = torch.stack([test_set[i][0] for i in range(len(test_set))]).float() / 255
        labels_t = torch.tensor([test_set[i][1] for i in range(len(test_set))])
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
        with torch.no_grad():
            logits = model((images - mean) / std).logits
        assert F.cross_entropy(logits, labels_t).item() == pytest.approx(result["test_loss"], rel=1e-5)
        assert (logits.argmax(-1) == labels_t).float().mean().item() == pytest.approx(result["test_acc"])

    # off by default (a ViT-Base classifier is 330 MB a run)
    argv = [*TINY, "--dataset", "pets", "--data_dir", local, "--scratch", "True", "--steps", 1, "--batch_size", 4,
            "--results_dir", tmp_path / "results", "--seed", 1]
    finetune.main(finetune.get_args_parser().parse_args(map(str, argv)))
    assert os.path.exists(tmp_path / "results" / "pets" / "initial" / "seed1.json")
    assert not os.path.exists(tmp_path / "results" / "pets" / "initial" / "seed1" / "model")
