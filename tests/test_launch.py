"""launch/: the table's one description (graph.table, the flag rules) as run_all.sh's pool and launch/submit.py's
jobs read it, and the pool on tiny commands (python -c, sleeping or exiting): a failed run does not stop the others,
bad input (exit 2) stops new starts, a run over every device runs alone, SIGTERM stops every run tree."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO
from launch import graph, launchers
from launch.pool import Job, Pool


# ----------------------------------------------------------------------------- the table

def test_the_table_of_two_datasets():
    nodes = {n.name: n for n in graph.table(["cub", "dtd"], 50)}
    assert list(nodes) == [
        "cub pretrain", "dtd pretrain", "cub finetune initial", "dtd finetune initial",
        "cub selftrain", "cub finetune further-pretrain-50", "cub finetune self-further-pretrain-50",
        "dtd selftrain", "dtd finetune further-pretrain-50", "dtd finetune self-further-pretrain-50", "report"]
    needs = {name: n.after_ok for name, n in nodes.items()}
    assert needs["cub pretrain"] == needs["dtd finetune initial"] == ()
    assert needs["dtd selftrain"] == needs["dtd finetune further-pretrain-50"] == ("dtd pretrain",)
    assert needs["cub finetune self-further-pretrain-50"] == ("cub selftrain",)
    assert nodes["report"].after_any == tuple(list(nodes)[:-1])  # after every other run, however it ended
    assert [(n.dataset, n.init) for n in nodes.values() if n.stage == "finetune" and n.dataset == "dtd"] == [
        ("dtd", init) for init in graph.routes(50)]


def test_the_fig1_table_of_one_dataset():
    """The small reproduction's table: θ₀'s pre-training first, a route from the random init, and the table at each
    step count; every run from θ₀ waits for it, each fine-tuning for the checkpoint it starts from."""
    nodes = {n.name: n for n in graph.fig1_table("fm", [3, 2], "crops", "random-init")}
    per_steps = [f"fm {run}" for k in (3, 2) for run in (f"pretrain {k}", f"finetune further-pretrain-{k}",
                                                         f"selftrain {k}", f"finetune self-further-pretrain-{k}")]
    assert list(nodes) == ["crops pretrain", "fm finetune random-init", "fm finetune initial"] + per_steps + ["report"]
    needs = {name: n.after_ok for name, n in nodes.items()}
    assert needs["crops pretrain"] == needs["fm finetune random-init"] == ()
    assert needs["fm finetune initial"] == needs["fm pretrain 2"] == ("crops pretrain",)
    assert needs["fm selftrain 2"] == needs["fm finetune further-pretrain-2"] == ("fm pretrain 2",)
    assert needs["fm finetune self-further-pretrain-3"] == ("fm selftrain 3",)
    assert [(n.init, n.steps) for n in nodes.values() if n.stage == "finetune"] == [
        ("random-init", None), ("initial", None)] + [(init, k) for k in (3, 2) for init in graph.routes(k)[1:]]
    assert nodes["report"].after_any == tuple(list(nodes)[:-1])
    assert [n.name for n in graph.fig1_table("fm", [5])] == [  # without a source or an extra route
        "fm finetune initial", "fm pretrain 5", "fm finetune further-pretrain-5", "fm selftrain 5",
        "fm finetune self-further-pretrain-5", "report"]


def test_run_all_pool_follows_the_table():
    """run_all.sh's jobs: a dataset's MAE stages (teacher, then student) one job; each route one job per seed, the
    routes from a checkpoint after that dataset's MAE stages; the flags of each kind where they belong."""
    jobs = launchers.table_jobs(["cub", "dtd"], "50", ["1", "2"], ["--save_every", 1000, "--lr", "1e-3"],
                                ["--save_every", 1000, "--results_dir", "res"], "res", ddp=False)
    by_name = {j.name: j for j in jobs}
    assert [j.name for j in jobs] == [
        "cub MAE stages", "dtd MAE stages", "cub initial seed 1", "cub initial seed 2", "dtd initial seed 1",
        "dtd initial seed 2", "cub further-pretrain-50 seed 1", "cub further-pretrain-50 seed 2",
        "cub self-further-pretrain-50 seed 1", "cub self-further-pretrain-50 seed 2",
        "dtd further-pretrain-50 seed 1", "dtd further-pretrain-50 seed 2",
        "dtd self-further-pretrain-50 seed 1", "dtd self-further-pretrain-50 seed 2"]
    assert by_name["cub initial seed 1"].after == ()
    assert by_name["dtd self-further-pretrain-50 seed 2"].after == by_name["dtd further-pretrain-50 seed 1"].after \
        == ("dtd MAE stages",)
    assert by_name["dtd MAE stages"].log == os.path.join("res", "dtd", "mae-50.log")
    assert by_name["cub initial seed 2"].log == os.path.join("res", "cub", "initial", "seed2.log")
    (teacher, _), (student, _) = by_name["cub MAE stages"].commands("1")
    assert [os.path.basename(teacher[1]), os.path.basename(student[1])] == ["pretrain.py", "selftrain.py"]
    assert teacher[2:] == ["--device", "cuda", "--dataset", "cub", "--steps", "50", "--save_every", "1000", "--lr",
                           "1e-3"]
    ((finetune, env),) = by_name["cub self-further-pretrain-50 seed 2"].commands("1")
    assert env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert finetune[2:] == ["--device", "cuda", "--dataset", "cub", "--scratch", "False", "--ckpt_name",
                            "self-further-pretrain-50", "--seed", "2", "--save_every", "1000", "--results_dir", "res"]
    ddp = launchers.table_jobs(["cub"], "50", ["1"], [], [], "res", ddp=True)
    assert ddp[0].all_devices and not ddp[1].all_devices
    assert "--nproc_per_node=2" in ddp[0].commands("0,1")[0][0]


def test_the_flag_rules():
    words = ["--lr", "1e-3", "--results_dir", "res", "--save_model", "--results_dir=r2", "--model_name", "m"]
    assert graph.mae_flags(words) == ["--lr", "1e-3", "--model_name", "m"]
    assert graph.flag_value(words, "--results_dir", "results") == "r2"  # the last one wins, as in argparse
    assert graph.flag_value(["--lr", "1"], "--results_dir", "results") == "results"
    for word in ("--seed", "--seed=3", "--dataset", "--output_dir=x", "--scratch", "--ckpt_name"):
        assert graph.refused_flag(["--lr", "1", word], graph.SET_PER_RUN) == word.split("=")[0]
    assert graph.refused_flag(["--seeds", "--datasets", "--lr"], graph.SET_PER_RUN) is None
    assert graph.flags_for_one_kind({"MAE_FLAGS": " --lr  1e-3 ", "FINETUNE_FLAGS": "--lr 3e-3"}) == (
        ["--lr", "1e-3"], ["--lr", "3e-3"])


# ----------------------------------------------------------------------------- the pool

def _job(name, code="", log_dir=None, after=(), all_devices=False):
    """A job running `python -c code`, its log under log_dir."""
    log = os.path.join(log_dir or "", f"{name}.log")
    return Job(name, log, lambda device: [([sys.executable, "-c", code], {"DEVICE": device})], after=after,
               all_devices=all_devices)


def _note(path, word):
    return f"open({str(path)!r}, 'a').write('{word}\\n'); "


def test_a_failed_run_does_not_stop_the_others(tmp_path, capsys):
    pool = Pool(["cpu"], 2)
    pool.run([_job("bad", "print('boom'); raise SystemExit(1)", tmp_path),
              _job("good", "import os; print('fine on', os.environ['DEVICE'])", tmp_path),
              _job("needs bad", "print('ran')", tmp_path, after=("bad",)),
              _job("needs good", "print('ran too')", tmp_path, after=("good",))])
    assert pool.results == {"bad": 1, "good": 0, "needs bad": None, "needs good": 0}
    assert pool.summary() == 1
    out, err = capsys.readouterr()
    assert "[good] done: fine on cpu" in out.splitlines() and "[needs good] done: ran too" in out.splitlines()
    assert f"[bad] FAILED with exit code 1; see {tmp_path}/bad.log" in err.splitlines()
    assert err.splitlines()[-2:] == ["error: 1 run(s) failed:", f"  bad: exit code 1, log {tmp_path}/bad.log"]
    header, output = (tmp_path / "bad.log").read_text().splitlines()
    assert header.startswith("==== ") and header.endswith(f"bad on cpu, launcher pid {os.getpid()}")
    assert output == "boom" and not (tmp_path / "needs bad.log").exists()


def test_the_pool_tells_a_caller_each_start_and_end(tmp_path):
    events = []
    pool = Pool(["cpu"], 2, on_start=lambda job, device: events.append(("start", job.name, device)),
                on_end=lambda job, code, seconds: events.append(("end", job.name, code, seconds)))
    pool.run([_job("slow", "import time; time.sleep(0.5)", tmp_path), _job("bad", "raise SystemExit(3)", tmp_path),
              _job("after bad", "pass", tmp_path, after=("bad",))])
    assert sorted(e[:2] for e in events if e[0] == "start") == [("start", "bad"), ("start", "slow")]
    ends = {e[1]: e[2:] for e in events if e[0] == "end"}
    assert set(ends) == {"slow", "bad"} and ends["bad"][0] == 3 and ends["slow"][0] == 0
    assert 0.5 <= ends["slow"][1] < 10  # its seconds, from its start
    assert all(e[2] == "cpu" for e in events if e[0] == "start")


@pytest.mark.parametrize("slots", [1, 2])
def test_bad_input_stops_new_starts(slots, tmp_path, capsys):
    """A run that exits 2 (bad input, which the next runs share) lets those running finish and starts no more."""
    notes = tmp_path / "started"
    jobs = [_job("refused", _note(notes, "refused") + "raise SystemExit(2)", tmp_path)]
    if slots == 2:  # beside it, a run that is going already
        jobs.append(_job("going", _note(notes, "going") + "import time; time.sleep(1)", tmp_path))
    jobs += [_job(f"next {i}", _note(notes, f"next {i}"), tmp_path) for i in range(2)]
    pool = Pool(["cpu"], slots)
    pool.run(jobs)
    assert sorted(notes.read_text().split()) == sorted(["refused", "going"][:slots])  # the two start side by side
    assert pool.summary() == 2  # every failed run failed on bad input
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "  not started (after bad input): next 0 next 1"
    assert "  refused: exit code 2" + (f", log {tmp_path}/refused.log" if slots == 2 else "") in err


def test_a_run_over_every_device_runs_alone(tmp_path):
    """DDP over the GPU list: nothing starts beside it, and what comes after it waits for it."""
    notes = tmp_path / "notes"
    slow = "import time; time.sleep(0.5); "
    pool = Pool(["0", "1"], 1)
    pool.run([_job("ddp", _note(notes, "start-ddp") + slow + _note(notes, "end-ddp"), tmp_path, all_devices=True),
              _job("a", _note(notes, "start-a") + slow + _note(notes, "end-a"), tmp_path),
              _job("b", _note(notes, "start-b") + slow + _note(notes, "end-b"), tmp_path)])
    words = notes.read_text().split()
    assert words[:2] == ["start-ddp", "end-ddp"] and sorted(words[2:4]) == ["start-a", "start-b"]
    assert pool.summary() == 0 and not (tmp_path / "ddp.log").exists()  # attached: its output on the terminal


POOL_SCRIPT = """
import sys
from launch import pool
from launch.pool import Job, Pool
pool.KILL_AFTER_S = 3
tree = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)")
p = Pool(["cpu"], 3)
try:
    p.run([Job(name, sys.argv[1] + "/" + name + ".log", lambda device, code=code: [([sys.executable, "-c", code], {})])
           for name, code in (("tree 1", tree), ("tree 2", tree), ("stubborn", stubborn), ("never", "pass"))])
except pool.Stopped as e:
    sys.exit(e.code)
"""


def test_sigterm_stops_every_run_tree_and_exits_143(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ("ready" in _read(tmp_path / "stubborn.log")
                                               and [name for _, name in _below(proc.pid)].count("sleep") == 2):
        time.sleep(0.1)
    pids = [pid for pid, _ in _below(proc.pid)]
    assert len(pids) >= 5, pids  # three runs, two with a child
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert 2.5 < time.monotonic() - sent < 15  # the stubborn run was killed after KILL_AFTER_S
    assert not [p for p in pids if _alive(p)], "a run outlived its launcher"
    assert err.splitlines()[-1].startswith("interrupted: the runs were stopped")
    assert "[never]" not in out and not (tmp_path / "never.log").exists()


SAVING_RUN = ("import signal, sys, time\n"
              "def stop(signum, frame):\n"
              "    time.sleep(0.5)  # saving its state\n"
              "    print('saved on', signal.Signals(signum).name, flush=True)\n"
              "    sys.exit(75)\n"
              "signal.signal(signal.SIGUSR2, stop)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
PASS_ON_SCRIPT = """
import sys
from launch import pool
from launch.pool import Job, Pool
p = Pool(["cpu"], 2)
try:
    p.run([Job(name, sys.argv[1] + "/" + name + ".log", lambda device, code=code: [([sys.executable, "-c", code], {})])
           for name, code in (("run 1", sys.argv[2]), ("run 2", sys.argv[2]), ("never", "pass"))])
except pool.Stopped as e:
    sys.exit(e.code)
"""


def test_a_stop_signal_reaches_every_run_which_saves_and_the_pool_exits_75(tmp_path):
    """USR2 (a scheduler asking the runs to stop at a step boundary, e.g. submitit before a time limit) reaches each
    run, in its own process group, as it came: they save and exit 75, nothing new starts, and the launcher exits 75
    (what launch/job.py requeues on)."""
    proc = subprocess.Popen([sys.executable, "-c", PASS_ON_SCRIPT, str(tmp_path), SAVING_RUN], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all("ready" in _read(tmp_path / f"run {k}.log") for k in (1, 2)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    for k in (1, 2):
        assert "saved on SIGUSR2" in _read(tmp_path / f"run {k}.log")
        assert f"[run {k}] stopped with its state saved (exit code 75)" in err
    assert "[never]" not in out and not (tmp_path / "never.log").exists()
    assert err.splitlines()[-1].startswith("stopped: the runs saved their state")


def _read(path):
    return path.read_text() if path.exists() else ""


def _all_processes():
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, rest = f.read().rsplit(")", 1)
                out.append((int(entry), int(rest.split()[1]), head.split("(", 1)[1]))
            except (OSError, IndexError):
                continue
    return out


def _below(pid):
    """(pid, name) of every process below `pid`."""
    processes, found, todo = _all_processes(), [], [pid]
    while todo:
        parent = todo.pop()
        children = [(p, name) for p, ppid, name in processes if ppid == parent]
        found += children
        todo += [p for p, _ in children]
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
