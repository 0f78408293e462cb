"""launch.submit and launch.job when a job is cut short, and what --status then says: a time limit too short for the
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

from helpers import REPO
from helpers import assert_one_line, cli_output, tool_output
from launch import job as job_module, submit

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
    """No stop signal before the limit (submitit's own parameters, past launch.submit's check): at the limit the
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
from launch import submit
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


def test_under_nohup_a_hangup_leaves_the_local_jobs_running(tmp_path):
    """Started with SIGHUP ignored (nohup), the submission outlives its terminal: the hangup stops nothing."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(stopping=STOPPING)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        _wait_for(tmp_path / "started")
        time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGHUP)
        time.sleep(2)
        assert driver.poll() is None and not (tmp_path / "saved").exists()
        assert not (tmp_path / "jobs" / "outcomes" / "a.json").exists()
        driver.terminate()  # SIGTERM to the submitter: it stops its jobs, which save
        out, _ = driver.communicate(timeout=60)
    finally:
        driver.kill()
    _wait_for(tmp_path / "saved", timeout=10)
    assert driver.returncode == 1, out


def _wait_for_outcome(path, timeout=15):
    """The outcome once it is final (the task writes one as soon as it is told to stop, the final one after)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = submit._read_json(str(path))
        if record and record.get("exit_code") is not None:
            return record
        time.sleep(0.1)
    return submit._read_json(str(path))


# ----------------------------------------------------------------------------- --status

def _submitted(tmp_path, *argv, ids=None):
    """The graph file of a submission of `argv` made here, as launch.submit writes it; ids: {job name: id}."""
    args = submit.get_args_parser().parse_args(list(map(str, argv)))
    submit.resolve(args)
    jobs = submit.build_graph(args)
    graph = submit.graph_record(jobs, args, "2026-12-01T10:00:00", {n: (i, None) for n, i in (ids or {}).items()})
    path = tmp_path / "results" / "jobs" / "graph-table.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(graph))
    return graph, path


def _status(argv, monkeypatch, capsys):
    code, out, err = tool_output(submit, ["--status", *map(str, argv)], monkeypatch, capsys)
    return code, [" ".join(line.split()) for line in out.splitlines()], err


def test_status_refuses_a_damaged_graph_file(tmp_path, monkeypatch, capsys):
    """A graph file that cannot be read is not taken for no submission (on SLURM that would invite a second copy
    of every job on the same run directories): one line naming it and what to do, non-zero exit."""
    monkeypatch.chdir(tmp_path)
    _, path = _submitted(tmp_path, "--datasets", "digits", "--mae_steps", 4, "--model_name", "vit-mae-tiny",
                         ids={"digits pretrain": "1001"})
    path.write_text(path.read_text()[:100])  # cut short, as by a full disk
    code, _, err = cli_output(submit, ["--status", "--datasets", "digits", "--model_name", "vit-mae-tiny"],
                              monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, str(path), "is unreadable", "will not guess", "squeue", "move the file aside")
    path.write_text("[]")
    code, _, err = cli_output(submit, ["--status", "--datasets", "digits"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "is unreadable (not a graph of jobs)")


def test_status_tells_a_local_job_that_runs_from_one_that_is_gone(tmp_path, monkeypatch, capsys):
    """--cluster local: a job whose controller process runs is running; one whose process is gone without an
    outcome (killed with its terminal) is said to be gone, its saved run continued by the same command, not by
    its job; jobs that never started, once the submitter is gone, will not start by themselves."""
    monkeypatch.chdir(tmp_path)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "submitit.local._local"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # as if its pid were reused
    try:
        graph, path = _submitted(tmp_path, "--cluster", "local", "--datasets", "digits", "--mae_steps", 4,
                                 "--seeds", 1, "--finetune_steps", 10, "--model_name", "vit-mae-tiny",
                                 ids={"digits pretrain": str(controller.pid), "digits finetune initial": str(ended.pid),
                                      "digits finetune further-pretrain-4": str(other.pid)})
        graph["pid"] = ended.pid  # the submitter, gone too
        path.write_text(json.dumps(graph))
        seed = tmp_path / "results" / "digits" / "initial" / "seed1"
        seed.mkdir(parents=True)
        (seed / "train_state.pt").write_bytes(b"")
        (seed / "metrics.jsonl").write_text('{"step": 3}\n')
        code, lines, err = _status([], monkeypatch, capsys)
    finally:
        for process in (controller, other):
            process.kill()
            process.wait()
    assert code == 0, err
    assert f"digits pretrain {controller.pid} running" in lines, lines
    gone = [line for line in lines if line.startswith(f"digits finetune initial {ended.pid} gone: its process")]
    assert gone and "the same command does" in gone[0], lines
    assert any(line.startswith(f"digits finetune further-pretrain-4 {other.pid} gone") for line in lines), lines
    assert "digits initial seed 1 stopped, step 3 of 10 with its state saved; the same command continues it" in lines
    assert "digits selftrain - not started: its submitter is gone; the same command starts it" in lines


def test_status_reads_the_submissions_settings_or_says_they_differ(tmp_path, monkeypatch, capsys):
    """Asked without the submission's STEPS, --status lists the submission's runs (not those of the default
    steps, 'pending' beside a job 'done'); asked with other settings, it says which differ and how."""
    monkeypatch.chdir(tmp_path)
    _submitted(tmp_path, "--datasets", "digits", "--mae_steps", 4, "--seeds", 1, 2, "--finetune_steps", 10,
               "--model_name", "vit-mae-tiny", ids={"digits pretrain": "1001"})
    teacher = tmp_path / "checkpoints" / "further-pretrain-4" / "digits"
    teacher.mkdir(parents=True)
    (teacher / "model.safetensors").write_bytes(b"")
    outcomes = tmp_path / "results" / "jobs" / "outcomes"
    outcomes.mkdir()
    (outcomes / "digits.pretrain.json").write_text(json.dumps({"state": "done", "exit_code": 0}))
    code, lines, err = _status([], monkeypatch, capsys)
    assert code == 0, err
    assert "digits pretrain 1001 done" in lines and "digits further-pretrain-4 done" in lines, lines
    assert "digits further-pretrain-4 seed 2 pending" in lines and not any("20000" in line for line in lines)
    assert not any(line.startswith("note:") for line in lines)
    (outcomes / "digits.pretrain.json").write_text('{"state": "do')  # a damaged outcome is not taken for none
    code, lines, err = _status([], monkeypatch, capsys)
    assert code == 0, err
    assert any(line.startswith("digits pretrain 1001 unknown: its outcome") and "is unreadable" in line
               for line in lines), lines
    (outcomes / "digits.pretrain.json").write_text(json.dumps({"state": "done", "exit_code": 0}))
    monkeypatch.setenv("STEPS", "50")
    code, lines, err = _status(["--seeds", 1, 2, 3, "--model_name", "vit-mae-tiny"], monkeypatch, capsys)
    assert code == 0, err
    assert ("note: the settings given differ from the submission's (--mae_steps (STEPS) 50 here, 4 there; "
            "--seeds (SEEDS) 1 2 3 here, 1 2 there): listed as submitted") in lines, lines
    assert "digits further-pretrain-4 done" in lines
