"""tools.submit and tools.job when a job is cut short, and what --status then says: a time limit too short for the
stop signal, refused when the flags are read; a job killed at its time limit, or whose submitter's terminal closed
(SIGHUP), stopped with its state saved and its outcome on record; --status telling a job that still runs from one
that is gone, a damaged graph file from a missing one, and reading the submission's own settings."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from helpers import assert_one_line, cli_output, tool_output
from tools import job as job_module, submit

CLUSTER_VARIABLES = ("STEPS", "FINETUNE_STEPS", "SEEDS", "JOBS", "MAE_FLAGS", "FINETUNE_FLAGS", "PARTITION",
                     "GPUS_PER_JOB", "NODES", "PROCESSES_PER_NODE", "CPUS_PER_GPU", "TIME_LIMIT", "SBATCH_ARGS",
                     "SLURM_JOB_ID", "SUBMITIT_PREEMPT_SIGNAL", "STOP_SIGNALS")

# A command that stops as training.Run does on SIGTERM (in $STOP_SIGNALS): it saves (a file here) and exits 75.
STOPPING = """import os, signal, sys, time
def stop(*_):
    open("saved", "w").close()
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
open("started", "w").close()
while True:
    time.sleep(0.05)
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _wait_for(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- the time limit

@pytest.mark.parametrize("argv,env", [
    (["--time_limit_min", "1"], {}),  # 60 s, the signal 120 s before it
    ([], {"TIME_LIMIT": "2"}),  # 120 s: the signal would come at the start
    (["--cluster", "local", "--time_limit_min", "0.5", "--signal_delay_s", "30"], {}),
])
def test_a_time_limit_shorter_than_the_signal_delay_is_refused(argv, env, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli_output(submit, ["--datasets", "digits", *argv], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "--signal_delay_s", "is not shorter than the time limit", "--time_limit_min")
    assert os.listdir(tmp_path) == []


def test_a_time_limit_just_longer_than_the_signal_delay_is_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = tool_output(submit, ["--datasets", "digits", "--cluster", "local", "--time_limit_min", "0.5",
                                          "--signal_delay_s", "29", "--dry_run"], monkeypatch, capsys)
    assert code == 0, err
    assert "[digits pretrain]" in out


def test_a_job_killed_at_its_time_limit_stops_its_command_and_records_it(tmp_path):
    """No stop signal before the limit (submitit's own parameters, past tools.submit's check): at the limit the
    local executor interrupts the task (SIGINT, SIGKILL a second later). The command is told to stop and save,
    and the job's outcome says it stopped; no KeyboardInterrupt traceback."""
    import submitit
    ex = submitit.LocalExecutor(folder=tmp_path / "jobs", max_num_timeout=3)
    ex.update_parameters(timeout_min=0.1, signal_delay_s=30, stderr_to_stdout=True)  # the limit after 6 s, no signal
    outcome = str(tmp_path / "outcome.json")
    handle = ex.submit(job_module.StageJob("probe", [sys.executable, "-c", STOPPING], str(tmp_path), outcome=outcome))
    with pytest.raises(Exception):
        handle.result()
    log = open(handle.paths.stdout).read()
    assert "KeyboardInterrupt" not in log, log[-2000:]
    record = json.load(open(outcome))
    assert record["state"] == "stopped" and "stopped by SIGINT" in record["error"], record
    _wait_for(tmp_path / "saved", timeout=10)


# ----------------------------------------------------------------------------- the submitter's terminal closes

DRIVER = """import argparse, sys
from tools import submit
stopping = {stopping!r}
args = argparse.Namespace(cluster="local", time_limit_min=5, signal_delay_s=60, max_requeues=3)
jobs = [submit.Job("a", "pretrain", [sys.executable, "-c", stopping]),
        submit.Job("b", "selftrain", [sys.executable, "-c", "open('b ran', 'w')"], after_ok=["a"]),
        submit.Job("report", "report", [sys.executable, "-c", "open('report ran', 'w')"], after_any=["a", "b"])]
sys.exit(submit.run_here(jobs, args, "jobs", lambda submitted: None))
"""


@pytest.mark.parametrize("to", ["group", "submitter"])
def test_a_hangup_stops_the_local_jobs_with_their_state_saved_and_says_so(to, tmp_path):
    """`--cluster local` in a terminal that closes: SIGHUP to its foreground process group (the submitter, the
    jobs' controllers and tasks), or to the submitter alone. The running job's command stops as at a time limit
    and saves; its outcome says stopped; no other job starts."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(stopping=STOPPING)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(tmp_path / "started")
        time.sleep(0.5)  # the command's handler is in place once it wrote "started"; the task's since it started it
        if to == "group":
            os.killpg(driver.pid, signal.SIGHUP)
        else:
            os.kill(driver.pid, signal.SIGHUP)
        out, _ = driver.communicate(timeout=60)
    finally:
        driver.kill()
    _wait_for(tmp_path / "saved", timeout=10)
    record = _wait_for_outcome(tmp_path / "jobs" / "outcomes" / "a.json")
    told = "SIGHUP" if to == "group" else "SIGTERM"  # from the terminal; from the submitter, as SLURM ends a job
    assert record["state"] == "stopped" and f"stopped by {told}" in record["error"], (record, out)
    if to == "submitter":
        assert driver.returncode == 1, out
    time.sleep(1)
    assert not (tmp_path / "b ran").exists() and not (tmp_path / "report ran").exists(), out


def _wait_for_outcome(path, timeout=15):
    """The outcome once it is final (the task writes one as soon as it is told to stop, the final one after)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = submit._read_json(str(path))
        if record and record.get("exit_code") is not None:
            return record
        time.sleep(0.1)
    return submit._read_json(str(path))
