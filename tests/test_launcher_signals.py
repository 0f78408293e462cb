"""Stopping a launcher stops its runs, at once: SIGTERM (a scheduler's, `kill`, `timeout`) or Ctrl-C while a run
is going, one at a time or side by side, through run_finetune.sh, run_all.sh and the single-run launchers. And
two launchers writing into one results folder keep each other's logs. The runs are a fake $PYTHON that sleeps."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from helpers import REPO


SLEEP = 60  # seconds a fake run lasts: far longer than a prompt stop may take


def _fake_python(tmp_path, body: str) -> str:
    script = tmp_path / "fake_python"
    script.write_text("#!/usr/bin/env bash\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _sleeper(tmp_path):
    """A $PYTHON that notes its pid and arguments in calls.txt, then becomes `sleep` (same pid)."""
    calls = tmp_path / "calls.txt"
    return _fake_python(tmp_path, f'echo "$$ $*" >> {calls}\nexec sleep {SLEEP}\n'), calls


def _start(cmd: str, cwd, env_extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    # a session of its own: the test can signal the launcher alone, or its whole process group as Ctrl-C does
    return subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal():
    """SIGINT and SIGTERM at their defaults in the launcher, as a terminal starts it: a suite started in the
    background (`make test &`) ignores SIGINT, which bash could then never trap."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _wait_for_calls(calls, n, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if calls.exists() and len(calls.read_text().splitlines()) >= n:
            return [int(line.split()[0]) for line in calls.read_text().splitlines()]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    pytest.fail(f"no run started: {proc.communicate()}")


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaps has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


CASES = {  # name: (command, environment, runs that start before the signal)
    "run_finetune one at a time": ("run_finetune.sh cpu digits True", {"SEEDS": "1 2"}, 1),
    "run_finetune side by side": ("run_finetune.sh cpu digits True", {"SEEDS": "1 2 3", "JOBS": "2"}, 2),
    "run_all MAE stages over a GPU list": ("run_all.sh 0,1 digits", {"SEEDS": "1", "JOBS": "1"}, 1),
    "run_pretrain": ("run_pretrain.sh cpu digits 5", {}, 1),
    "run_small_reproduction": ("run_small_reproduction.sh", {}, 1),
}


@pytest.mark.parametrize("how", ["SIGTERM to the launcher", "Ctrl-C"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_stopped_launcher_stops_its_runs_at_once(case, how, tmp_path):
    """With one run at a time the run was bash's foreground command, and bash runs a trap only once that has
    ended: SIGTERM waited for the whole run, then said the runs were stopped. The single-run launchers died at
    once and left the run going on its own."""
    command, env, started = CASES[case]
    python, calls = _sleeper(tmp_path)
    proc = _start(f"bash {REPO}/{command}", tmp_path, {"PYTHON": python, **env})
    pids = _wait_for_calls(calls, started, proc)
    time.sleep(0.3)  # the launcher is back in its wait
    sent = time.monotonic()
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the whole foreground process group
    else:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{case}: the launcher was still running 20 s after {how}")
    try:
        assert time.monotonic() - sent < 15
        assert proc.returncode != 0
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"{case}: a run outlived its launcher"
        assert len(calls.read_text().splitlines()) == started, "a new run started after the signal"
        if "run_pretrain" not in case and "small" not in case:  # the pool's launchers say so
            assert "interrupted: the runs were stopped" in err
            assert proc.returncode == (130 if how == "Ctrl-C" else 143)
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_two_launchers_on_one_results_folder_keep_each_others_logs(tmp_path):
    """The pool wrote each run's log with `>`: a second launcher (here: the same command again, whose run is
    refused because the first one holds it) truncated the log the first run was still writing."""
    python = _fake_python(tmp_path, 'echo "start $$"\nsleep 2\necho "end $$"\n')
    env = {"PYTHON": python, "SEEDS": "1", "JOBS": "2"}
    first = _start(f"bash {REPO}/run_finetune.sh cpu digits True", tmp_path, env)
    log = tmp_path / "results" / "digits" / "initial" / "seed1.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and "start" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    first_line = log.read_text().strip().splitlines()[-1]
    second = _start(f"bash {REPO}/run_finetune.sh cpu digits True", tmp_path, env)
    for proc in (first, second):
        proc.communicate(timeout=60)
        assert proc.returncode == 0
    text = log.read_text()
    assert "\0" not in text  # the first run's writes landed past the end of a truncated file
    first_pid = first_line.split()[1]
    assert first_line in text and f"end {first_pid}" in text
    assert text.count("start ") == 2 and text.count("end ") == 2
    assert text.count("==== ") == 2  # each launcher's run is headed, in the order they started
