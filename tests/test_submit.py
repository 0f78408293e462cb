"""The table on a cluster (launch/submit.py, launch/job.py): the job graph and its dependencies (a fake executor),
the sbatch scripts submitit writes (a fake sbatch on PATH), and on this machine through submitit's LocalExecutor:
the time limit's signal, the stop and the requeue; the whole table through `run_all.sh slurm --cluster local` with
one job stopped and requeued, equal to runs made without a cluster; two processes in one job; bad input not
requeued and its dependents cancelled; --status from the run records.

A real one-node SLURM runs the table and a requeue in tests/test_real_slurm.py; not tested anywhere: several nodes,
NCCL, GPUs, job arrays of several datasets, --kill-on-invalid-dep cancelling after a failure, real preemption."""
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import ViTMAEForPreTraining

import finetune
import pretrain
import report
import selftrain
import training
from launch import job as job_module, submit
from training import preemption

from helpers import REPO, TINY, assert_one_line, cli_output, tool_output

TINY_FLAGS = ["--model_name", "vit-mae-tiny", "--batch_size", "8", "--workers", "0", "--log_every", "1"]
CLUSTER_VARIABLES = ("STEPS", "FINETUNE_STEPS", "SEEDS", "JOBS", "MAE_FLAGS", "FINETUNE_FLAGS", "PARTITION", "GPUS_PER_JOB", "NODES",
                     "PROCESSES_PER_NODE", "CPUS_PER_GPU", "TIME_LIMIT", "SBATCH_ARGS", "SLURM_JOB_ID",
                     "SUBMITIT_PREEMPT_SIGNAL", "STOP_SIGNALS")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARIABLES}
    return {**env, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _args(*argv):
    args = submit.get_args_parser().parse_args(list(map(str, argv)))
    submit.resolve(args)
    return args


def test_the_exit_code_of_a_stop_is_the_one_the_job_reads():
    assert job_module.STOPPED_EXIT_CODE == preemption.STOPPED_EXIT_CODE


# ----------------------------------------------------------------------------- the graph, from a fake executor

class FakeExecutor:
    """Records what launch.submit asks of submitit.SlurmExecutor: each submission's parameters and callables;
    job ids 1001, 1002, ... (an array's tasks <id>_<i>)."""
    submissions: list = []

    def __init__(self, folder, max_num_timeout):
        self.folder, self.max_num_timeout, self.parameters, self.pending = folder, max_num_timeout, {}, None

    def update_parameters(self, **kw):
        self.parameters.update(kw)

    @contextlib.contextmanager
    def batch(self):
        self.pending = []
        yield
        number = 1001 + len(FakeExecutor.submissions)
        FakeExecutor.submissions.append((dict(self.parameters), [h.function for h in self.pending]))
        for i, handle in enumerate(self.pending):
            handle.job_id = f"{number}_{i}" if len(self.pending) > 1 else str(number)

    def submit(self, function):
        handle = type("Handle", (), {})()
        handle.function = function
        handle.paths = type("Paths", (), {"stdout": os.path.join(self.folder, "%j_%t_log.out")})()
        self.pending.append(handle)
        return handle


def test_the_job_graph_follows_the_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    FakeExecutor.submissions = []
    args = _args("--launcher", "run_all.sh", "cub", "dtd", "--mae_steps", 50, "--seeds", 1, 2, "--partition", "gpu",
                 "--gpus_per_job", 2, "--time_limit_min", 30, "--model_name", "vit-mae-tiny", "--results_dir", "res")
    jobs = submit.build_graph(args)
    assert [j.name for j in jobs] == [
        "cub pretrain", "dtd pretrain", "cub finetune initial", "dtd finetune initial",
        "cub selftrain", "cub finetune further-pretrain-50", "cub finetune self-further-pretrain-50",
        "dtd selftrain", "dtd finetune further-pretrain-50", "dtd finetune self-further-pretrain-50", "report"]
    submitted = submit.submit_slurm(jobs, args, str(tmp_path / "jobs"), executor=FakeExecutor)
    ids = {name: job_id for name, (job_id, _) in submitted.items()}
    # independent jobs of one shape as arrays: the datasets' further pre-training, their fine-tuning from θ₀
    assert ids["cub pretrain"] == "1001_0" and ids["dtd pretrain"] == "1001_1"
    assert ids["cub finetune initial"] == "1002_0" and ids["dtd finetune initial"] == "1002_1"
    assert len(FakeExecutor.submissions) == 2 + 3 * 2 + 1
    params = {fn.name: p for p, fns in FakeExecutor.submissions for fn in fns}
    calls = {fn.name: fn for _, fns in FakeExecutor.submissions for fn in fns}

    def after(name):
        return params[name].get("dependency")
    assert after("cub pretrain") is None and after("dtd finetune initial") is None
    assert after("cub selftrain") == "afterok:1001_0" and after("dtd selftrain") == "afterok:1001_1"
    assert after("dtd finetune further-pretrain-50") == "afterok:1001_1"
    assert after("cub finetune self-further-pretrain-50") == f"afterok:{ids['cub selftrain']}"
    others = [ids[j.name] for j in jobs if j.name != "report"]
    assert after("report") == "afterany:" + ":".join(others)  # after every other job, however it ended
    for name, p in params.items():
        assert p["additional_parameters"]["kill-on-invalid-dep"] == "yes"  # a failed job cancels its dependents
        assert p["additional_parameters"]["requeue"] is True and p["time"] == 30 and p["partition"] == "gpu"
        mae = name.endswith(("pretrain", "selftrain"))
        assert p["ntasks_per_node"] == (2 if mae else 1)  # DDP over the job's GPUs; the pool is one process
        assert p.get("gpus_per_node") == (2 if name != "report" else None)
    # what each job runs: the stage with the graph's dataset and steps (never --overwrite), or the seeds' pool
    cub = calls["cub pretrain"].command
    assert cub[1:9] == [os.path.join(REPO, "pretrain.py"), "--device", "cuda", "--dataset", "cub", "--steps", "50",
                        "--save_every"]
    assert "--overwrite" not in cub and "--results_dir" not in cub and cub[-2:] == ["--model_name", "vit-mae-tiny"]
    further = calls["dtd finetune further-pretrain-50"]
    assert further.command[:6] == ["bash", os.path.join(REPO, "run_finetune.sh"), job_module.DEVICES, "dtd", "False",
                                   "further-pretrain-50"]
    assert further.command[-4:] == ["--model_name", "vit-mae-tiny", "--results_dir", "res"]
    assert further.env["SEEDS"] == "1 2" and further.gpus == 2
    assert calls["cub finetune initial"].command[3:5] == ["cub", "True"]
    assert calls["report"].command[1:] == [os.path.join(REPO, "report.py"), "--results_dir", "res", "--datasets", "cub",
                                           "dtd", "--steps", "50"]
    assert all(fn.cwd == str(tmp_path) for fn in calls.values())


def test_the_graph_passes_run_all_flags_for_one_kind_of_stage(tmp_path, monkeypatch):
    """$MAE_FLAGS reach the MAE stages only, $FINETUNE_FLAGS fine-tuning only (and --status's --results_dir),
    as run_all.sh passes them; a single stage's cluster form leaves them to run_all.sh."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAE_FLAGS", "--lr 0.001")
    monkeypatch.setenv("FINETUNE_FLAGS", "--warmup_steps 7 --results_dir ft")
    jobs = {j.name: j for j in submit.build_graph(_args("--launcher", "run_all.sh", "cub", "--mae_steps", 50))}
    for name in ("cub pretrain", "cub selftrain"):
        assert jobs[name].command[-2:] == ["--lr", "0.001"] and "--warmup_steps" not in jobs[name].command
    for name in ("cub finetune initial", "cub finetune self-further-pretrain-50"):
        assert jobs[name].command[-4:] == ["--warmup_steps", "7", "--results_dir", "ft"]
        assert "0.001" not in jobs[name].command
    assert jobs["report"].command[2:4] == ["--results_dir", "ft"]
    assert submit._results_dir(_args("--launcher", "run_all.sh", "cub")) == "ft"
    single = submit.build_graph(_args("--launcher", "run_pretrain.sh", "cub", "50"))
    assert "0.001" not in single[0].command


def test_a_refused_submission_is_one_line_and_what_was_queued_is_on_record(tmp_path, monkeypatch):
    """sbatch refusing the second group (a bad partition, say): one line naming the jobs already queued, and the
    graph written with their ids, so --status sees them and a second try can be checked against them."""
    import submitit

    class Refusing(FakeExecutor):
        def batch(self):
            if FakeExecutor.submissions:
                raise submitit.core.utils.FailedJobError("sbatch: error: invalid partition specified: nosuch")
            return super().batch()
    monkeypatch.chdir(tmp_path)
    FakeExecutor.submissions = []
    args = _args("--launcher", "run_all.sh", "cub", "dtd", "--mae_steps", 50, "--partition", "nosuch")
    graphs = []
    with pytest.raises(submit.utils.UserError) as refused:
        submit.submit_slurm(submit.build_graph(args), args, str(tmp_path / "jobs"), executor=Refusing,
                            write_graph=lambda submitted: graphs.append(dict(submitted)))
    assert "invalid partition specified: nosuch" in str(refused.value)
    assert "already queued: cub pretrain (1001_0), dtd pretrain (1001_1)" in str(refused.value)
    assert [sorted(g) for g in graphs] == [["cub pretrain", "dtd pretrain"]]
    assert "\n" not in submit.utils.one_line(refused.value)


@pytest.mark.parametrize("first,raises", [("stopped", False), ("failed", True)])
def test_on_this_machine_what_needs_a_stopped_or_crashed_job_is_cancelled(first, raises, tmp_path, monkeypatch,
                                                                          capsys):
    """A job that ended stopped (its state saved, not requeued) or whose handle re-raised its exception (--cluster
    debug) ends the jobs that need it: cancelled, said in one line; the report still runs; the graph ends."""
    jobs = [submit.Job("a", "pretrain", ["x"]), submit.Job("b", "selftrain", ["y"], after_ok=["a"]),
            submit.Job("report", "report", ["z"], after_any=["a", "b"])]

    class Handle:
        def __init__(self, name):
            self.name, self.job_id = name, f"local-{name}"
            self.paths = type("Paths", (), {"stdout": str(tmp_path / f"{name}.log")})()

        def done(self):
            if self.name == "a" and raises:
                raise RuntimeError("the job raised")
            return True

        def results(self):
            raise RuntimeError("no result")

    class Executor:
        def submit(self, wrapped):
            state = first if wrapped.name == "a" else "done"
            if state != "failed":  # a crashed job wrote no outcome
                os.makedirs(os.path.dirname(submit._outcome_path(str(tmp_path), wrapped.name)), exist_ok=True)
                submit.write_json(submit._outcome_path(str(tmp_path), wrapped.name),
                                  {"state": state, "exit_code": 75 if state == "stopped" else 0, "error": "stopped"})
            return Handle(wrapped.name)
    monkeypatch.setattr(submit, "_executor_here", lambda args, log_dir, job: Executor())
    result = []
    worker = threading.Thread(target=lambda: result.append(
        submit.run_here(jobs, None, str(tmp_path), lambda submitted: None)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "run_here did not end"
    out = capsys.readouterr().out
    assert result == [1]
    which = "stopped without being requeued" if first == "stopped" else "failed"
    assert f"[b] cancelled: it needs a, which {which}" in out
    assert f"[a] {first.upper()} (exit code" in out and "[report] done" in out
    assert json.load(open(submit._outcome_path(str(tmp_path), "b")))["state"] == "cancelled"


def test_the_stage_launchers_cluster_form_reads_no_steps_from_the_environment(tmp_path, monkeypatch):
    """As without a cluster: run_finetune.sh runs finetune.py's steps whatever $FINETUNE_STEPS says, run_pretrain.sh
    its STEPS argument whatever $STEPS says; run_all.sh reads both."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_STEPS", "50")
    monkeypatch.setenv("STEPS", "70")
    (one,) = submit.build_graph(_args("--launcher", "run_finetune.sh", "cub", "True"))
    assert "--steps" not in one.command
    (mae,) = submit.build_graph(_args("--launcher", "run_pretrain.sh", "cub"))
    assert mae.command[mae.command.index("--steps") + 1] == "20000"
    table = {j.name: j for j in submit.build_graph(_args("--launcher", "run_all.sh", "cub"))}
    assert table["cub finetune initial"].command[-2:] == ["--steps", "50"]
    assert "further-pretrain-70" in table["cub finetune further-pretrain-70"].name


# ----------------------------------------------------------------------------- sbatch scripts, a fake sbatch

def _fake_slurm(tmp_path):
    """sbatch that keeps each script it is given and answers as SLURM does; srun (submitit looks for it)."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(
        f"#!/usr/bin/env bash\nn=$(( $(ls {scripts} | wc -l) + 1001 ))\ncp \"$1\" {scripts}/$n.sh\n"
        f"echo \"Submitted batch job $n\"\n")
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir, scripts


def test_the_sbatch_scripts(tmp_path, data_dir):
    bin_dir, scripts = _fake_slurm(tmp_path)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", PARTITION="gpu", GPUS_PER_JOB="2", TIME_LIMIT="30",
               SBATCH_ARGS="--account=lab --exclusive", SEEDS="1 2", STEPS="50")
    started = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(REPO, "run_all.sh"), "slurm", "digits", "cub", *TINY_FLAGS,
                           "--data_dir", data_dir], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started < 120  # it submits and returns
    # what it prints: every job's id, where the logs are, how to see the status
    out = proc.stdout
    assert "submitted 11 jobs to SLURM" in out and "1001_0       digits pretrain" in out
    assert "1003         digits selftrain  (after 1001_0)" in out
    assert f"logs: {tmp_path}/results/jobs/<job id>_<task>_log.out" in out and "--status" in out
    text = {int(p.name[:-3]): p.read_text() for p in scripts.iterdir()}
    assert sorted(text) == list(range(1001, 1010))
    for script in text.values():
        for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --signal=USR2@120", "#SBATCH --requeue",
                     "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --account=lab", "#SBATCH --exclusive",
                     "#SBATCH --open-mode=append"):
            assert line in script.splitlines(), (line, script)
        assert "srun --unbuffered --output" in script
    pretrain_script, initial, selftrain_script, report_script = text[1001], text[1002], text[1003], text[1009]
    assert "#SBATCH --array=0-1%2" in pretrain_script and "#SBATCH --array=0-1%2" in initial
    assert "#SBATCH --ntasks-per-node=2" in pretrain_script and "#SBATCH --gpus-per-node=2" in pretrain_script
    assert "#SBATCH --ntasks-per-node=1" in initial and "#SBATCH --gpus-per-node=2" in initial
    assert "#SBATCH --dependency=afterok:1001_0" in selftrain_script and "--array" not in selftrain_script
    assert "#SBATCH --dependency=afterany:1001_0:1001_1:1002_0:1002_1:1003:" in report_script
    assert "gpus-per-node" not in report_script
    graph = json.load(open(tmp_path / "results" / "jobs" / "graph-table.json"))
    assert {j["name"]: j["job_id"] for j in graph["jobs"]}["report"] == "1009"


# ----------------------------------------------------------------------------- the local executor's time limit

CHILD = """import os, signal, sys, time
if os.environ["JOB_RESTART_COUNT"] != "0":
    sys.exit(0)  # the requeued start: finishes
stop = []
signal.signal(signal.SIGUSR2, lambda *a: stop.append(1))  # as training.Run does
print("training", flush=True)
while not stop:
    time.sleep(0.05)
print("error: stopped after step 1 of 2 (SIGUSR2)", file=sys.stderr)
sys.exit(75)
"""


@pytest.mark.parametrize("requeues", [3, 0])
def test_the_time_limit_signals_the_command_which_stops_and_is_requeued(requeues, tmp_path):
    """submitit's LocalExecutor sends the stop signal `signal_delay_s` before its time limit; the task forwards it to
    its command, which stops (75); submitit requeues the same job, whose next start finishes. With no requeue left
    the job fails."""
    import submitit
    ex = submitit.LocalExecutor(folder=tmp_path / "jobs", max_num_timeout=requeues)
    ex.update_parameters(timeout_min=0.25, signal_delay_s=11, stderr_to_stdout=True)  # the signal after 4 s
    outcome = str(tmp_path / "outcome.json")
    work = job_module.StageJob("probe", [sys.executable, "-c", CHILD], str(tmp_path), outcome=outcome)
    handle = ex.submit(work)
    if requeues:
        assert handle.result() == {"job": "probe", "exit_code": 0}
    else:
        with pytest.raises(Exception, match="timed-out too many times"):
            handle.result()
    log = open(handle.paths.stdout).read()
    assert "[probe] stopped on SIGUSR2 with its state saved (exit code 75); requeueing" in log
    record = json.load(open(outcome))
    if requeues:
        assert "start 2:" in log and record["state"] == "done" and record["restarts"] == 1
    else:
        assert "start 2:" not in log and record["state"] == "failed" and "timed-out too many times" in record["error"]


def test_a_debug_job_runs_here_and_leaves_the_signal_handlers_as_they_were(tmp_path):
    """--cluster debug runs each job in this process: its command's exit code is the job's, and the signals the
    task forwards to its command are this process's own again afterwards."""
    import submitit
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    ex = submitit.DebugExecutor(folder=tmp_path / "jobs")
    work = job_module.StageJob("probe", [sys.executable, "-c", "print('ran')"], str(tmp_path))
    assert ex.submit(work).result() == {"job": "probe", "exit_code": 0}
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)) == before


# ----------------------------------------------------------------------------- real stages, --cluster local

def _ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _controller(pid):
    """The submitit local controller above process `pid` (the run's task, or the pool's shell and then the task)."""
    while pid > 1:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"submitit.local._local" in f.read():
                return pid
        pid = _ppid(pid)
    raise AssertionError("no submitit controller above the run")


def _interrupt_when_running(run_dir, timeout=600):
    """Once the run in run_dir holds its lock (its stop handler is installed by then): SIGUSR2 to every task of its
    job, as submitit's local controller sends it at the time limit. Returns the signalled task pids."""
    lock, deadline = os.path.join(run_dir, training.LOCK_FILE), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            words = open(lock).read().split()
        except OSError:
            words = []
        if len(words) > 1 and words[0] == "pid":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"{run_dir} was never locked")
    controller = _controller(int(words[1]))
    tasks = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if _ppid(int(entry)) == controller:
                    tasks.append(int(entry))
    for task in tasks:
        os.kill(task, signal.SIGUSR2)
    return tasks


def _weights(path):
    return ViTMAEForPreTraining.from_pretrained(str(path)).state_dict()


def _history(path):
    with open(os.path.join(path, training.RECORD_FILE)) as f:
        return json.load(f)["history"]


def _submit_in_background(argv, cwd, **env):
    return subprocess.Popen(argv, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_the_table_on_this_machine_through_submitit_equals_runs_without_a_cluster(data_dir, tmp_path):
    """`bash run_all.sh slurm digits --cluster local`: every job of the graph through submitit's LocalExecutor; the
    further pre-training job and the fine-tuning job from θ₀ (a run inside run_finetune.sh's pool) each stopped by
    the scheduler's signal once and requeued. The report, the teacher and every result equal those of the same stage
    runs made without a cluster (the arguments run_all.sh cpu passes; the graph adds only --save_every_minutes, a
    run-control flag)."""
    cluster, plain = tmp_path / "cluster", tmp_path / "plain"
    cluster.mkdir()
    flags = [*TINY_FLAGS, "--data_dir", data_dir]
    proc = _submit_in_background(["bash", os.path.join(REPO, "run_all.sh"), "slurm", "digits", "--cluster", "local",
                                  *flags], cluster, STEPS="20", FINETUNE_STEPS="20", SEEDS="1")
    teacher = cluster / "checkpoints" / "further-pretrain-20" / "digits"
    seed = cluster / "results" / "digits" / "initial" / "seed1"
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two jobs start together
            tasks = list(pool.map(_interrupt_when_running, [teacher, seed]))
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-5000:]
    assert [len(t) for t in tasks] == [1, 1]
    for name in ("digits pretrain", "digits selftrain", "digits finetune initial", "report",
                 "digits finetune further-pretrain-20", "digits finetune self-further-pretrain-20"):
        assert f"[{name}] done" in out, out[-3000:]

    # the same runs, without a cluster
    common = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--batch_size", "8",
              "--checkpoint_dir", str(plain / "checkpoints")]
    for module in (pretrain, selftrain):
        module.main(module.get_args_parser().parse_args([*common, "--steps", "20", "--save_every", "1000"]))
    for init in ("initial", "further-pretrain-20", "self-further-pretrain-20"):
        route = ["--scratch", "True"] if init == "initial" else ["--scratch", "False", "--ckpt_name", init]
        finetune.main(finetune.get_args_parser().parse_args(
            [*common, *route, "--seed", "1", "--steps", "20", "--save_every", "1000",
             "--results_dir", str(plain / "results")]))
    report.main(report.get_args_parser().parse_args(["--results_dir", str(plain / "results"), "--datasets", "digits",
                                                     "--steps", "20"]))

    assert (cluster / "results" / "report.md").read_text() == (plain / "results" / "report.md").read_text()
    a, b = _weights(teacher), _weights(plain / "checkpoints" / "further-pretrain-20" / "digits")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # stopped, requeued: bit for bit
    for init in ("initial", "further-pretrain-20", "self-further-pretrain-20"):
        x, y = (json.load(open(root / "results" / "digits" / init / "seed1.json")) for root in (cluster, plain))
        assert (x["test_acc"], x["test_loss"]) == (y["test_acc"], y["test_loss"])
    # one run directory, resumed: two starts of one job, the second its first restart
    for run, history in ((teacher, _history(teacher)),
                         (seed, json.load(open(f"{seed}.json"))["history"])):
        # stopped at the step boundary after the signal came: after step 1, or 2 when step 1 ended first
        starts = [h["start_step"] for h in history]
        assert len(starts) == 2 and starts[0] == 0 and 1 <= starts[1] < 20, (run, starts)
        assert len({h["job"]["job_id"] for h in history}) == 1
        assert [h["job"]["restart_count"] for h in history] == [0, 1]
        assert history[0]["job"]["scheduler"] == "submitit-local"
        assert not [p for p in run.parent.iterdir() if ".old-" in p.name]
        assert "--overwrite" not in history[1]["command"] and history[0]["command"] == history[1]["command"]


def test_two_processes_in_one_job_stop_together_and_equal_one_process(data_dir, tmp_path):
    """`run_pretrain.sh slurm digits 20 --cluster local --processes_per_node 2`: one job of two tasks, DDP over gloo
    from the environment submitit exports; stopped by the signal (to both tasks), requeued, finished; equal to one
    uninterrupted process as the DDP tests require."""
    flags = [*TINY_FLAGS, "--data_dir", data_dir]
    proc = _submit_in_background(["bash", os.path.join(REPO, "run_pretrain.sh"), "slurm", "digits", "20", "--cluster",
                                  "local", "--processes_per_node", "2", *flags], tmp_path)
    run = tmp_path / "checkpoints" / "further-pretrain-20" / "digits"
    try:
        tasks = _interrupt_when_running(run)
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-5000:]
    assert len(tasks) == 2
    history = _history(run)
    assert len(history) == 2 and history[1]["start_step"] > 0
    assert [(h["world_size"], h["job"]["restart_count"]) for h in history] == [(2, 0), (2, 1)]
    assert len({h["job"]["job_id"] for h in history}) == 1
    one = tmp_path / "one"
    pretrain.main(pretrain.get_args_parser().parse_args(
        [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--batch_size", "8", "--steps", "20",
         "--output_dir", str(one)]))
    a, b = _weights(one), _weights(run)
    for k in a:  # as in test_runs.py: the key bias's true gradient is 0, its rounding noise differs
        if not k.endswith("k_proj.bias"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bad_input_is_not_requeued_and_cancels_what_depends_on_it(data_dir, tmp_path):
    """A dataset that does not exist: further pre-training fails with exit code 2, once (no requeue); the jobs that
    need its checkpoint are cancelled, saying so; fine-tuning from θ₀ fails alike; the report still runs."""
    proc = subprocess.run(["bash", os.path.join(REPO, "run_all.sh"), "slurm", "nosuch", "--cluster", "local",
                           *TINY_FLAGS, "--data_dir", data_dir], cwd=tmp_path, env=_env(STEPS="4", SEEDS="1"),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]  # every failure was bad input
    assert "[nosuch pretrain] FAILED (exit code 2): error: " in out and "nosuch" in out
    for name, needs in (("nosuch selftrain", "nosuch pretrain"),
                        ("nosuch finetune further-pretrain-4", "nosuch pretrain"),
                        ("nosuch finetune self-further-pretrain-4", "nosuch selftrain")):
        assert f"[{name}] cancelled: it needs {needs}, which " in out
    assert "[nosuch finetune initial] FAILED (exit code 2)" in out
    assert "[report] job " in out  # after everything, also after failures
    outcomes = tmp_path / "results" / "jobs" / "outcomes"
    record = json.load(open(outcomes / "nosuch.pretrain.json"))
    assert (record["state"], record["exit_code"], record["restarts"]) == ("failed", 2, 0)
    log = open(json.load(open(tmp_path / "results" / "jobs" / "graph-table.json"))["jobs"][0]["log"]).read()
    assert "start 1:" in log and "start 2:" not in log and "requeueing" not in log
    assert not (tmp_path / "checkpoints").exists()  # the cancelled jobs never ran


# ----------------------------------------------------------------------------- --status

def test_status_lists_every_run_of_the_table_with_its_state(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt, res, jobs_dir = tmp_path / "checkpoints", tmp_path / "results", tmp_path / "results" / "jobs"
    (ckpt / "further-pretrain-4" / "digits").mkdir(parents=True)
    (ckpt / "further-pretrain-4" / "digits" / "model.safetensors").write_bytes(b"")
    student = ckpt / "self-further-pretrain-4" / "digits"
    student.mkdir(parents=True)
    (student / training.LOCK_FILE).write_text(f"pid {os.getpid()} on {os.uname().nodename}\n")  # a live holder
    (student / training.METRICS_FILE).write_text('{"step": 6}\n{"step": 7}\n')
    initial = res / "digits" / "initial"
    (initial / "seed2").mkdir(parents=True)
    (initial / "seed1.json").write_text(json.dumps({"test_acc": 0.5}))
    (initial / "seed2" / training.STATE_FILE).write_bytes(b"")
    (initial / "seed2" / training.METRICS_FILE).write_text('{"step": 3}\n')
    (jobs_dir / "outcomes").mkdir(parents=True)
    (jobs_dir / "outcomes" / "digits.finetune.further-pretrain-4.json").write_text(
        json.dumps({"state": "failed", "exit_code": 1, "error": "error: the loss is not finite at step 3"}))
    names = ["digits pretrain", "digits finetune initial", "digits selftrain", "digits finetune further-pretrain-4",
             "digits finetune self-further-pretrain-4", "report"]
    (jobs_dir / "graph-table.json").write_text(json.dumps(
        {"submitted": "2026-12-01T10:00:00", "cluster": "slurm",
         "jobs": [{"name": n, "job_id": str(100 + i)} for i, n in enumerate(names)]}))
    code, out, err = tool_output(submit, ["--status", "--datasets", "digits", "--mae_steps", 4, "--seeds", 1, 2,
                                          "--finetune_steps", 10, "--model_name", "vit-mae-tiny"], monkeypatch, capsys)
    assert code == 0, err
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for expected in ["digits pretrain 100 submitted", "digits further-pretrain-4 done",
                     "digits selftrain 102 submitted", "digits self-further-pretrain-4 running, step 7 of 4",
                     "digits finetune initial 101 submitted", "digits initial seed 1 done, test accuracy 50.00 %",
                     "digits initial seed 2 stopped, step 3 of 10 with its state saved; its job continues it",
                     "digits finetune further-pretrain-4 103 failed: error: the loss is not finite at step 3",
                     "digits further-pretrain-4 seed 1 failed: error: the loss is not finite at step 3",
                     "digits self-further-pretrain-4 seed 2 pending", "report 105 submitted"]:
        assert expected in lines, (expected, out)


# ----------------------------------------------------------------------------- bad input, before anything is submitted

@pytest.mark.parametrize("argv,env,words", [
    (["--launcher", "run_all.sh", "digits", "--overwrite"], {}, ["takes no --overwrite", "at every start"]),
    (["--launcher", "run_all.sh", "digits", "--steps", "5"], {}, ["takes no --steps", "STEPS=N"]),
    (["--launcher", "run_all.sh", "digits", "--seed=3"], {}, ["takes no --seed", "SEEDS="]),
    (["--launcher", "run_pretrain.sh", "digits", "--steps", "5"], {}, ["takes no --steps", "give the steps as STEPS"]),
    (["--launcher", "run_pretrain.sh"], {}, ["DATASET is required", "bash run_pretrain.sh slurm DATASET [STEPS]"]),
    (["--launcher", "run_pretrain.sh", "digits", "0"], {}, ["STEPS: must be at least 1, got 0"]),
    (["--launcher", "run_finetune.sh", "digits", "maybe"], {}, ["SCRATCH must be True or False, not 'maybe'"]),
    (["--datasets", "digits"], {"GPUS_PER_JOB": "two"}, ["GPUS_PER_JOB='two': expected a whole number"]),
    (["--datasets", "digits"], {"SEEDS": "1 -2"}, ["SEEDS='1 -2': must be at least 0, got -2"]),
    (["--datasets", "digits", "--sbatch_args", "-A lab"], {}, ["give sbatch's long options", "'-A'"]),
    (["--datasets", "digits", "--gpus_per_job", "2", "--processes_per_node", "3"], {}, ["one process per GPU"]),
    (["--datasets", "digits", "--cluster", "local", "--nodes", "2"], {}, ["one node, not 2"]),
    (["digits"], {}, ["unexpected argument 'digits'", "--datasets"]),
    (["--datasets", "digits", "data/dtd"], {}, ["dataset 'data/dtd'", "--data_dir"]),
    (["--launcher", "run_all.sh", "digits"], {"MAE_FLAGS": "--steps 5"}, ["MAE_FLAGS / FINETUNE_FLAGS takes no --steps"]),
    (["--launcher", "run_all.sh", "digits"], {"FINETUNE_FLAGS": "--seed 2"}, ["takes no --seed", "SEEDS="]),
])
def test_bad_input_is_one_line_and_nothing_is_submitted(argv, env, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli_output(submit, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, *words)
    assert os.listdir(tmp_path) == []


def test_a_flag_no_stage_takes_is_refused_by_the_stages_parser(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_output(submit, ["--datasets", "digits", "--lr", "0"], monkeypatch, capsys)
    assert code == 2 and "pretrain.py: error: argument --lr: must be greater than 0, got 0" in err
    code, _, err = cli_output(submit, ["--datasets", "digits", "--teacher", "x"], monkeypatch, capsys)
    assert code == 2 and "pretrain.py: error: unrecognized arguments: --teacher x" in err
    assert os.listdir(tmp_path) == []
