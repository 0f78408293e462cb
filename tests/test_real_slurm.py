"""The table on a real SLURM: a one-node cluster on this machine (lab/slurm_local.sh: Debian's slurmctld, slurmd
and munge, installed when missing), the jobs submitted by `bash run_all.sh slurm` through submitit's SlurmExecutor.
What tests/test_submit.py checks against submitit's local executor and a fake sbatch, here against SLURM itself:
sbatch reading submitit's scripts, the dependencies (afterok, afterany, --kill-on-invalid-dep), srun, the time
limit's --signal, `scontrol requeue`, SLURM_RESTART_COUNT in the run's record.

(a) the whole graph on digits runs to its report, equal to the same runs without a cluster (`run_all.sh cpu`);
(b) a further pre-training job stopped by its time limit's signal is requeued by SLURM and resumes from its saved
    state, ending bit for bit where one uninterrupted run ends.

Still not checked anywhere: several nodes, NCCL, GPUs (GPUS_PER_JOB=0 here: CPU jobs), real preemption.
These tests start SLURM when they can (root; apt-get when it is missing) and stop it after them if they started it.
REAL_SLURM=1 (CI) turns a skip into a failure; REAL_SLURM=0 skips them."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import ViTMAEForPreTraining

import training
from helpers import REPO

pytestmark = pytest.mark.slurm

SCRIPT = os.path.join(REPO, "lab", "slurm_local.sh")
CANNOT_INSTALL = 3  # lab/slurm_local.sh: SLURM is missing and cannot be installed here
TINY_FLAGS = ["--model_name", "vit-mae-tiny", "--batch_size", "8", "--workers", "0"]
# what the cluster forms read from the environment: the tests set their own
CLUSTER_VARIABLES = ("STEPS", "FINETUNE_STEPS", "SEEDS", "JOBS", "MAE_FLAGS", "FINETUNE_FLAGS", "PARTITION",
                     "GPUS_PER_JOB", "NODES", "PROCESSES_PER_NODE", "CPUS_PER_GPU", "TIME_LIMIT", "SBATCH_ARGS",
                     "SLURM_JOB_ID", "SUBMITIT_PREEMPT_SIGNAL", "STOP_SIGNALS")
JOBS_TIMEOUT_S = 900
# the requeue test: slurmctld checks time limits every 30 s and sends --signal's warning up to one check early, so
# with a 1-minute limit and 25 s the signal comes 5 to 35 s after the job starts (a signal due at the start could
# come before srun has started the step, and be lost); the run is sized to train for longer than that
SIGNAL_DELAY_S = 25
REQUEUE_TRAINING_S = 60  # seconds of training, at this machine's measured speed


def _not_available(why: str):
    if os.environ.get("REAL_SLURM") == "1":
        pytest.fail(f"REAL_SLURM=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def slurm():
    """A running one-node SLURM: returns env(**extra), the environment for its commands. Stopped afterwards if
    this started it."""
    if os.environ.get("REAL_SLURM") == "0":
        pytest.skip("REAL_SLURM=0")
    conf = os.path.join(os.environ.get("SLURM_LOCAL_DIR", "/var/tmp/slurm-local"), "slurm.conf")
    was_up = subprocess.run(["bash", SCRIPT, "status"], capture_output=True).returncode == 0
    started = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode == CANNOT_INSTALL:
        _not_available(f"no SLURM here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"SLURM {'was up' if was_up else f'started in {time.monotonic() - started:.0f} s'}: {proc.stdout.strip()}")

    def env(**extra):
        base = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARIABLES}
        return {**base, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "SLURM_CONF": conf, "GPUS_PER_JOB": "0", **extra}
    yield env
    if not was_up:
        subprocess.run(["bash", SCRIPT, "stop"], capture_output=True, timeout=120)


def _submit(argv, cwd, env):
    proc = subprocess.run(["bash", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _graph(log_dir, stage):
    with open(os.path.join(log_dir, f"graph-{stage}.json")) as f:
        return json.load(f)["jobs"]


def _queued(ids, env) -> dict:
    """{job id: 'STATE reason'} of those of `ids` still in SLURM's queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T %r"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    lines = (line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {job: what for job, what in lines if job in ids}


def _logs(jobs) -> str:
    text = []
    for job in jobs:
        if job["log"] and os.path.exists(job["log"]):
            with open(job["log"], errors="replace") as f:
                text.append(f"--- {job['name']} ({job['log']}):\n" + "".join(f.readlines()[-15:]))
    return "\n".join(text)


def _wait_until_gone(jobs, env, timeout=JOBS_TIMEOUT_S, while_waiting=None):
    """Until none of `jobs` (graph entries) is in SLURM's queue; `while_waiting(queued)` on every poll."""
    ids = {job["job_id"] for job in jobs}
    deadline = time.monotonic() + timeout
    while queued := _queued(ids, env):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *ids], env=env)
            pytest.fail(f"jobs still queued after {timeout} s: {queued}\n{_logs(jobs)}")
        if while_waiting:
            while_waiting(queued)
        time.sleep(2)


def _outcomes(log_dir, jobs) -> dict:
    states = {}
    for job in jobs:
        path = os.path.join(log_dir, "outcomes", job["name"].replace(" ", ".").replace("/", "_") + ".json")
        with open(path) as f:
            states[job["name"]] = json.load(f)
    return states


def _weights(path):
    return ViTMAEForPreTraining.from_pretrained(str(path)).state_dict()


def _history(path):
    with open(os.path.join(path, training.RECORD_FILE)) as f:
        return json.load(f)["history"]


def test_the_table_on_slurm_equals_runs_without_a_cluster(slurm, data_dir, tmp_path):
    """`GPUS_PER_JOB=0 bash run_all.sh slurm digits`: six jobs on SLURM (further pre-training, self-distillation,
    fine-tuning from the three inits, report.py after all), each through sbatch, srun and its dependencies; the
    report, the teacher and every result equal those of `bash run_all.sh cpu digits` with the same settings."""
    cluster, plain = tmp_path / "cluster", tmp_path / "plain"
    cluster.mkdir()
    plain.mkdir()
    settings = {"STEPS": "20", "FINETUNE_STEPS": "20", "SEEDS": "1"}
    flags = [*TINY_FLAGS, "--data_dir", data_dir]
    started = time.monotonic()
    out = _submit([os.path.join(REPO, "run_all.sh"), "slurm", "digits", *flags], cluster, slurm(**settings))
    assert "submitted 6 jobs to SLURM" in out, out
    log_dir = str(cluster / "results" / "jobs")
    jobs = _graph(log_dir, "table")
    # the same runs without a cluster, while SLURM runs its jobs
    proc = subprocess.run(["bash", os.path.join(REPO, "run_all.sh"), "cpu", "digits", *flags], cwd=plain,
                          env=slurm(**settings), capture_output=True, text=True, timeout=JOBS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _wait_until_gone(jobs, slurm())
    print(f"the table on SLURM: {time.monotonic() - started:.0f} s")
    outcomes = _outcomes(log_dir, jobs)
    assert {name: o["state"] for name, o in outcomes.items()} == {job["name"]: "done" for job in jobs}, _logs(jobs)
    assert len({o["job_id"] for o in outcomes.values()}) == 6  # six SLURM jobs

    assert (cluster / "results" / "report.md").read_text() == (plain / "results" / "report.md").read_text()
    for route in ("further-pretrain-20", "self-further-pretrain-20"):
        a, b = (_weights(root / "checkpoints" / route / "digits") for root in (cluster, plain))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), route
        (record,) = _history(cluster / "checkpoints" / route / "digits")
        assert record["job"]["scheduler"] == "slurm" and record["job"]["restart_count"] == 0
    for init in ("initial", "further-pretrain-20", "self-further-pretrain-20"):
        x, y = (json.load(open(root / "results" / "digits" / init / "seed1.json")) for root in (cluster, plain))
        assert (x["test_acc"], x["test_loss"]) == (y["test_acc"], y["test_loss"]), init


def _steps_per_second(data_dir, tmp_path) -> float:
    """This machine's speed for the requeue test's run, from a short run of the same settings."""
    import pretrain
    out = tmp_path / "speed"
    pretrain.main(pretrain.get_args_parser().parse_args(
        [*TINY_FLAGS, "--device", "cpu", "--dataset", "digits", "--data_dir", data_dir, "--steps", "60",
         "--log_every", "20", "--output_dir", str(out)]))
    with open(out / training.METRICS_FILE) as f:
        speeds = [json.loads(line)["images_per_s"] for line in f]
    return max(speeds[1:]) / 8  # the fastest, past the first steps: the run must not end before the signal


def test_a_job_stopped_by_its_time_limit_is_requeued_by_slurm_and_resumes_bit_for_bit(slurm, data_dir, tmp_path):
    """`TIME_LIMIT=1 bash run_pretrain.sh slurm digits STEPS --signal_delay_s 25`: SLURM's USR2 comes mid-run, the
    run saves and exits 75, submitit's handler runs `scontrol requeue`; the job's next start (SLURM_RESTART_COUNT 1)
    continues from the saved step, and the weights equal those of one uninterrupted run. SLURM holds a requeued job
    for two minutes and would signal every start alike: once it is requeued, the test lets it start now with 5
    minutes, so the second start finishes."""
    steps = max(200, round(_steps_per_second(data_dir, tmp_path) * REQUEUE_TRAINING_S))
    flags = [*TINY_FLAGS, "--log_every", "50", "--data_dir", data_dir]
    started = time.monotonic()
    _submit([os.path.join(REPO, "run_pretrain.sh"), "slurm", "digits", str(steps), *flags,
             "--signal_delay_s", str(SIGNAL_DELAY_S)], tmp_path, slurm(TIME_LIMIT="1"))
    log_dir = str(tmp_path / "results" / "jobs")
    (job,) = _graph(log_dir, "pretrain")
    # the uninterrupted run, while SLURM runs the job
    reference = tmp_path / "reference"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain.py"), *flags, "--device", "cpu",
                             "--dataset", "digits", "--steps", str(steps), "--save_every", "1000",
                             "--output_dir", str(reference)],
                            cwd=tmp_path, env=slurm(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    released = []

    def release_when_requeued(queued):
        if not released and queued.get(job["job_id"]) == "PENDING BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job['job_id']}", "StartTime=now", "TimeLimit=5"],
                           env=slurm(), check=True, timeout=60)
            released.append(round(time.monotonic() - started))
    try:
        _wait_until_gone([job], slurm(), while_waiting=release_when_requeued)
        out, _ = proc.communicate(timeout=JOBS_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    print(f"{steps} steps on SLURM, requeued after {released[0] if released else '-'} s: "
          f"{time.monotonic() - started:.0f} s")
    with open(job["log"]) as f:
        log = f.read()
    outcome = _outcomes(log_dir, [job])[job["name"]]
    assert outcome["state"] == "done", log[-5000:]
    run = tmp_path / "checkpoints" / f"further-pretrain-{steps}" / "digits"
    history = _history(run)
    assert len(history) >= 2, log[-5000:]
    assert "requeueing" in log and "start 2:" in log
    assert 0 < history[1]["start_step"] < steps  # stopped mid-run, resumed from its saved state
    assert [h["job"]["restart_count"] for h in history] == list(range(len(history)))
    assert {(h["job"]["scheduler"], h["job"]["job_id"]) for h in history} == {("slurm", job["job_id"])}
    assert "--overwrite" not in history[1]["command"] and history[0]["command"] == history[1]["command"]
    assert not [p for p in run.parent.iterdir() if ".old-" in p.name]  # nothing moved aside
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
