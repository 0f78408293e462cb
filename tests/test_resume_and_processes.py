"""Runs that survive interruption, stop on a non-finite loss, and give the same steps on 1 or 2 processes."""
import json
import os

import pytest
import torch

import finetune
import pretrain
import selftrain
import training
import utils

from helpers import Cut, REPO, TINY, cut_at, losses, mae_weights, nan_loss_at, torchrun


def _finetune_final_state(monkeypatch, store):
    real = finetune.evaluate

    def evaluate(model, run, dataset):
        store.setdefault("state", {k: v.clone() for k, v in model.state_dict().items()})
        return real(model, run, dataset)
    monkeypatch.setattr(finetune, "evaluate", evaluate)


@pytest.mark.parametrize("stage", ["pretrain", "selftrain", "finetune"])
def test_killed_and_resumed_run_is_bit_identical(stage, stage_args, tmp_path, monkeypatch):
    module = {"pretrain": pretrain, "selftrain": selftrain, "finetune": finetune}[stage]
    if stage != "pretrain":  # a teacher / checkpoint to start from
        pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=6)))
    extra = {"pretrain": [], "selftrain": [],
             "finetune": ["--ckpt_name", "further-pretrain-6", "--warmup_steps", 2]}[stage]

    def argv(name):
        out = ["--output_dir", tmp_path / name] + (["--results_dir", tmp_path / "res"] if stage == "finetune" else [])
        return module.get_args_parser().parse_args(stage_args(*extra, *out, "--save_every", 2, steps=6))

    finals = {}
    with monkeypatch.context() as m:
        _finetune_final_state(m, finals.setdefault("whole", {}))
        module.main(argv("whole"))
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):  # the state of step 2 is on disk, 3 is lost
        module.main(argv("resumed"))
    assert torch.load(tmp_path / "resumed" / training.STATE_FILE, weights_only=True)["step"] == 2
    with monkeypatch.context() as m:
        _finetune_final_state(m, finals.setdefault("resumed", {}))
        module.main(argv("resumed"))  # the same command again continues

    assert losses(tmp_path / "whole") == losses(tmp_path / "resumed")  # metrics: no gap, no duplicate
    assert not (tmp_path / "resumed" / training.STATE_FILE).exists()
    if stage == "finetune":
        a, b = finals["whole"]["state"], finals["resumed"]["state"]
        ra, rb = (json.load(open(f"{tmp_path / name}.json")) for name in ("whole", "resumed"))
        assert (ra["test_acc"], ra["test_loss"]) == (rb["test_acc"], rb["test_loss"])
    else:
        a, b = mae_weights(tmp_path / "whole"), mae_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_arguments(stage_args, tmp_path, monkeypatch):
    argv = stage_args("--save_every", 2, "--output_dir", tmp_path / "run", steps=6)
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    with pytest.raises(utils.UserError, match="other arguments .lr"):
        pretrain.main(pretrain.get_args_parser().parse_args(argv + ["--lr", "1e-3"]))
    # run-control flags may change
    pretrain.main(pretrain.get_args_parser().parse_args(argv + ["--log_every", "3"]))


def test_crash_between_write_and_rename_keeps_the_previous_state(stage_args, tmp_path, monkeypatch):
    argv = pretrain.get_args_parser().parse_args(
        stage_args("--save_every", 2, "--output_dir", tmp_path / "run", steps=6))
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(training.STATE_FILE):
            calls.append(dst)
            if len(calls) == 2:  # the second save dies after writing its temporary file
                raise OSError("simulated crash")
        return real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(utils.os, "replace", replace)
        with pytest.raises(utils.RunFailed, match="cannot write the training state .*simulated crash"):
            pretrain.main(argv)
    state = torch.load(tmp_path / "run" / training.STATE_FILE, weights_only=True)
    assert state["step"] == 2
    pretrain.main(argv)  # and the run continues from it
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_state(stage_args, tmp_path, monkeypatch):
    calls = nan_loss_at(monkeypatch, 5)
    argv = pretrain.get_args_parser().parse_args(stage_args("--save_every", 2, "--output_dir", tmp_path / "r", steps=8))
    with pytest.raises(utils.RunFailed, match="not finite at step 5.*train_state.pt") as failed:
        pretrain.main(argv)
    assert failed.value.exit_code == 1  # not bad input: a launcher's pool keeps running the other runs
    state = torch.load(tmp_path / "r" / training.STATE_FILE, weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "r" / "model.safetensors").exists()
    # read back only at logging / saving steps: found at step 6, still named as step 5, state 6 not written
    calls.clear()
    argv = pretrain.get_args_parser().parse_args(
        stage_args("--save_every", 3, "--log_every", 3, "--output_dir", tmp_path / "r2", steps=8))
    with pytest.raises(utils.UserError, match="not finite at step 5.*train_state.pt"):
        pretrain.main(argv)
    assert torch.load(tmp_path / "r2" / training.STATE_FILE, weights_only=True)["step"] == 3


def _torchrun(nproc, script, argv, cwd):
    proc = torchrun(nproc, os.path.join(REPO, script), argv, cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("script", ["pretrain.py", "selftrain.py"])
def test_two_processes_take_the_same_steps_as_one(script, data_dir, tmp_path):
    """DDP over gloo with global batch 8 (4 per process) == one process with batch 8."""
    common = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--steps", 3, "--batch_size", 8,
              "--checkpoint_dir", tmp_path / "ckpt"]
    if script == "selftrain.py":
        pretrain.main(pretrain.get_args_parser().parse_args(list(map(str, common))))
    _torchrun(1, script, [*common, "--output_dir", tmp_path / "one"], tmp_path)
    _torchrun(2, script, [*common, "--output_dir", tmp_path / "two"], tmp_path)
    one, two = mae_weights(tmp_path / "one"), mae_weights(tmp_path / "two")
    for k in one:
        # The key bias cancels in softmax: its true gradient is 0 and AdamW turns the rounding noise left
        # in it into ±lr steps, which differ with the summation order. Every other tensor must agree.
        if not k.endswith("k_proj.bias"):
            torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=k)
    record = json.load(open(tmp_path / "two" / training.RECORD_FILE))
    assert record["world_size"] == 2
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)


def test_two_processes_fine_tune_like_one(data_dir, tmp_path):
    """Fine-tuning with dropout 0.1 (its masks drawn for the global batch) under DDP over gloo, global batch 8,
    takes the same steps as one process with batch 8."""
    common = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--steps", 3, "--batch_size", 8,
              "--scratch", "True", "--warmup_steps", 1]
    _torchrun(1, "finetune.py", [*common, "--output_dir", tmp_path / "one"], tmp_path)
    _torchrun(2, "finetune.py", [*common, "--output_dir", tmp_path / "two"], tmp_path)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)
    one, two = (json.load(open(tmp_path / f"{name}.json")) for name in ("one", "two"))
    assert one["args"]["dropout"] == 0.1 and two["world_size"] == 2
    assert one["test_loss"] == pytest.approx(two["test_loss"], rel=1e-4)
    assert one["test_acc"] == pytest.approx(two["test_acc"], abs=1 / one["num_test"])  # at most a near-tie flips
