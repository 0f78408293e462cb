"""A run told to stop (a scheduler's signal) stops at a step boundary with its state saved and exit code 75, every
process at the same step, and the same command continues bit for bit; the time-based save; what a scheduler's job
puts into the record; the run-directory lock on shared filesystems."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import finetune
import pretrain
import training
import utils
from training import preemption, run_dir, scheduler
from transformers import ViTMAEForPreTraining

from helpers import Cut, REPO, TINY, assert_one_line, cli_output, cut_at, metrics, spy, torchrun

STOP_DRIVER = os.path.join(REPO, "tests", "stop_driver.py")  # a stage as torchrun runs it, told to stop

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")


@pytest.fixture(autouse=True)
def _outside_a_job(monkeypatch):
    for name in (*SLURM_VARIABLES, "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_DEBUG_JOB_ID", "JOB_RESTART_COUNT",
                 "STOP_SIGNALS", "SUBMITIT_PREEMPT_SIGNAL"):
        monkeypatch.delenv(name, raising=False)


def _signal_at(step):
    """cut_at's hook: SIGUSR2 to this process as step `step` (0-based) starts, as a scheduler would send it."""
    def on_step(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGUSR2)
    return cut_at(on_step=on_step)


def _record(path):
    with open(os.path.join(path, training.RECORD_FILE)) as f:
        return json.load(f)


def _stage(name, stage_args, tmp_path, run):
    """(module, argv, run directory, {final state}) for a 6-step run of `name` into tmp_path/run."""
    if name == "pretrain":
        argv = stage_args("--output_dir", tmp_path / run, steps=6)
        return pretrain, argv, tmp_path / run
    argv = stage_args("--scratch", "True", "--warmup_steps", 2, "--output_dir", tmp_path / run, "--results_dir",
                      tmp_path / "res", steps=6)
    return finetune, argv, tmp_path / run


def _final_state(module, argv, monkeypatch):
    """Runs module.main(argv) and returns the trained model's state (a fine-tuned classifier's before evaluation)."""
    seen = {}
    if module is finetune:
        spy(monkeypatch, finetune, "evaluate",
            lambda model, run, dataset: seen.setdefault("state", {k: v.clone() for k, v in model.state_dict().items()}))
        module.main(module.get_args_parser().parse_args(argv))
        return seen["state"]
    module.main(module.get_args_parser().parse_args(argv))
    return ViTMAEForPreTraining.from_pretrained(str(argv[argv.index("--output_dir") + 1])).state_dict()


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_a_stop_signal_saves_at_the_step_boundary_and_the_same_command_continues(name, stage_args, tmp_path,
                                                                                 monkeypatch, capsys):
    module, argv, whole = _stage(name, stage_args, tmp_path, "whole")
    with monkeypatch.context() as m:
        expected = _final_state(module, argv, m)
    module, argv, run = _stage(name, stage_args, tmp_path, "stopped")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    handler = signal.getsignal(signal.SIGUSR2)
    with training.supplied_draws(_signal_at(2)), pytest.raises(SystemExit) as stopped:
        utils.run_cli(module.get_args_parser, module.main)
    assert stopped.value.code == preemption.STOPPED_EXIT_CODE == 75
    assert_one_line(capsys.readouterr().err, "stopped after step 3 of 6 (SIGUSR2)", training.STATE_FILE,
                    "the same command continues")
    # the step in progress when the signal came was finished and saved; nothing after it ran
    assert torch.load(run / training.STATE_FILE, weights_only=True)["step"] == 3
    assert [line["step"] for line in metrics(run, timing=False)] == [1, 2, 3]
    assert signal.getsignal(signal.SIGUSR2) == handler  # the handler is put back
    with monkeypatch.context() as m:
        resumed = _final_state(module, argv, m)
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert metrics(run, timing=False) == metrics(whole, timing=False)
    record = _json_record(module, run)
    assert [h["start_step"] for h in record["history"]] == [0, 3]
    assert not (run / training.STATE_FILE).exists()


def _json_record(module, run):
    if module is finetune:
        with open(f"{run}.json") as f:
            return json.load(f)
    return _record(run)


def test_a_run_that_ended_by_an_exception_leaves_no_handler_behind_the_next(stage_args, tmp_path):
    """main() called again in one process (as tests do) after a run ended by an exception, without finish(): the
    next run puts back the handler that was there before the first."""
    original = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        argv = pretrain.get_args_parser().parse_args(stage_args("--output_dir", tmp_path / "run", steps=4))
        with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
            pretrain.main(argv)
        assert signal.getsignal(signal.SIGUSR2) is not signal.SIG_DFL  # the cut run's
        pretrain.main(argv)
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, original)


def test_a_stop_during_the_last_step_finishes_the_run(stage_args, tmp_path):
    argv = pretrain.get_args_parser().parse_args(stage_args("--output_dir", tmp_path / "run", steps=4))
    with training.supplied_draws(_signal_at(3)):
        pretrain.main(argv)  # no Stopped: the state after the last step is the result
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / training.STATE_FILE).exists()


@pytest.mark.parametrize("minutes,saved", [(1, [4, 7]), (0, [])])
def test_the_time_based_save_cadence(minutes, saved, stage_args, tmp_path, monkeypatch):
    """--save_every_minutes 1 with a clock that reads 25 s per step: saves after 75 s (step 4) and again 75 s
    after that save (step 7), never after the last step (8)."""
    clock = {"now": 0.0}
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock["now"])
    steps = []
    spy(monkeypatch, run_dir.RunDirectory, "save_state", lambda self, step, *a: steps.append(step))

    def on_step(step):
        clock["now"] = 25.0 * step
    argv = pretrain.get_args_parser().parse_args(
        stage_args("--save_every_minutes", minutes, "--output_dir", tmp_path / "run", steps=8))
    with training.supplied_draws(cut_at(on_step=on_step)):
        pretrain.main(argv)
    assert steps == saved


def test_the_agreement_schedule():
    """Under several processes they agree every AGREE_EVERY_S seconds at the pace measured since the last
    agreement; right after a start (no pace yet) or when steps are slow, at the next step."""
    assert preemption.next_agreement(10, 123.0, None) == 11
    assert preemption.next_agreement(10, 1.0, 10) == 10 + int(preemption.AGREE_EVERY_S * 10)
    assert preemption.next_agreement(10, 60.0, 3) == 11


def test_stop_signals_come_from_the_environment(monkeypatch, capsys):
    assert preemption.stop_signals() == [signal.SIGUSR2]
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preemption.stop_signals() == [signal.SIGUSR1]
    monkeypatch.setenv("STOP_SIGNALS", "usr2, SIGTERM")
    assert preemption.stop_signals() == [signal.SIGUSR2, signal.SIGTERM]
    monkeypatch.setenv("STOP_SIGNALS", "KILL")
    with pytest.raises(utils.UserError, match="STOP_SIGNALS: 'KILL' is not a signal a run can catch"):
        preemption.stop_signals()


def test_two_processes_stop_at_the_same_step_when_one_is_signalled(data_dir, tmp_path, monkeypatch):
    """Only process 0 gets the signal (at step 2); both stop after the same step (rank 1 alone would wait for
    rank 0 in the next collective for ever: the timeout fails the test), the state is saved once, and the same
    command then finishes the run like one uninterrupted process."""
    common = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--steps", 8, "--batch_size", 8,
              "--output_dir", tmp_path / "two"]
    # AGREE_EVERY_S 0: agree after every step
    proc = torchrun(2, STOP_DRIVER, ["pretrain.py", 0, 2, 0.0, *common], tmp_path)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    # each process says where it stopped (two lines may interleave, and torchrun may end one before it says so)
    stopped_at = re.findall(r"error: stopped after step (\d+) of 8", output)
    assert stopped_at and set(stopped_at) == {"3"}, output[-3000:]
    assert torch.load(tmp_path / "two" / training.STATE_FILE, weights_only=True)["step"] == 3
    proc = torchrun(2, STOP_DRIVER, ["pretrain.py", 0, -1, 0.0, *common], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = _record(tmp_path / "two")
    assert [(h["start_step"], h["world_size"]) for h in record["history"]] == [(0, 2), (3, 2)]
    one = tmp_path / "one"
    pretrain.main(pretrain.get_args_parser().parse_args(list(map(str, [*common[:-1], one]))))
    a = ViTMAEForPreTraining.from_pretrained(str(one)).state_dict()
    b = ViTMAEForPreTraining.from_pretrained(str(tmp_path / "two")).state_dict()
    for k in a:  # as in test_resume_and_processes.py: the key bias's true gradient is 0, its rounding noise differs
        if not k.endswith("k_proj.bias"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- the job in the record

def test_each_start_records_its_slurm_job(stage_args, tmp_path, monkeypatch):
    argv = pretrain.get_args_parser().parse_args(stage_args("--output_dir", tmp_path / "run", steps=2))
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    pretrain.main(argv)
    job = _record(tmp_path / "run")["history"][0]["job"]
    assert job == {"scheduler": "slurm", "job_id": "1200", "array_task": 3, "restart_count": 2}


def test_a_local_submitit_job_and_no_job(monkeypatch):
    assert scheduler.job_identity() is None
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "777")
    monkeypatch.setenv("JOB_RESTART_COUNT", "1")
    assert scheduler.job_identity() == {"scheduler": "submitit-local", "job_id": "777", "array_task": None,
                                        "restart_count": 1}
    monkeypatch.setenv("SLURM_JOB_ID", "55")  # submitit on SLURM: SLURM's own numbers
    assert scheduler.job_identity() == {"scheduler": "slurm", "job_id": "55", "array_task": None, "restart_count": 0}


# ----------------------------------------------------------------------------- the lock on shared filesystems

def _hold_lock(path, seconds):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, training.run_dir as d; d.lock_run_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(float(sys.argv[2]))", str(path), str(seconds)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_under_slurm_a_held_lock_is_waited_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(scheduler, "LOCK_POLL_S", 0.1)
    holder = _hold_lock(tmp_path / "run", 1.5)
    try:
        started = time.monotonic()
        with pytest.raises(utils.RunFailed, match="in use by another run"):
            run_dir.lock_run_dir(str(tmp_path / "run"))  # outside SLURM: at once
        assert time.monotonic() - started < 1.0
        monkeypatch.setenv("SLURM_JOB_ID", "1")
        lock = run_dir.lock_run_dir(str(tmp_path / "run"))  # waits until the holder ends
        assert holder.poll() is not None
        assert "is locked by pid" in capsys.readouterr().out
        run_dir.unlock_run_dir(lock)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setattr(scheduler, "LOCK_WAIT_S", 0.5)
    holder = _hold_lock(tmp_path / "run", 30)
    try:
        with pytest.raises(utils.RunFailed, match=r"in use by another run \(pid .*\) \(waited 0.5 s\)"):
            run_dir.lock_run_dir(str(tmp_path / "run"))
    finally:
        holder.kill()
        holder.wait()


def test_a_filesystem_without_locking_is_named(stage_args, tmp_path, monkeypatch, capsys):
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(run_dir.fcntl, "flock", flock)
    code, _, err = cli_output(pretrain, stage_args("--output_dir", tmp_path / "run"), monkeypatch, capsys)
    assert code == 2
    kind = scheduler.filesystem_type(str(tmp_path))
    assert kind not in ("", "unknown")
    assert_one_line(err, "cannot lock the run directory", f"on a {kind} filesystem", "-o flock")
