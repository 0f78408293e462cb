"""What runs inside one task of a scheduler job that launch/submit.py submitted: the stage (or the fine-tuning pool,
or report.py) as a child process, with the job's distributed environment, and submitit's requeue when the
scheduler asks the job to stop.

Why a child process, not the stage's main() called here: the stage must stop at a step boundary with its state
saved (training/preemption.py), not wherever submitit's signal handler interrupts it (it runs `checkpoint()` in
the middle of whatever the main thread was doing, then exits: MAE's submitit scripts requeue that way and look for
a checkpoint their training never wrote). Here submitit's handler stays in charge of requeuing (its count of
timeouts, `scontrol requeue` on SLURM, exit 144 under the local executor), but is called only once the child has
saved and exited. A child is also what a person would type (`python pretrain.py ...`, `bash run_finetune.sh
...`), the same command at every start, so its run record compares and resumes as it does outside a cluster; its
CUDA context, NCCL group and DataLoader workers end with it; the fine-tuning pool is several processes anyway.

The stop signal: submitit's (USR2 unless $SUBMITIT_PREEMPT_SIGNAL; SLURM's --signal sends it to every process of
the job, the local executor to each task) is forwarded to the child's process group, every RESEND_S seconds until
the child exits, because the child ignores it until its run is prepared (it starts with the signal ignored, so
neither it nor the pool's shell dies of it; training.Run installs the handler). The child stops after the step in
progress (every process at the same step), saves and exits 75 (the fine-tuning pool then exits 1); then this task
calls submitit's handler, which calls checkpoint() (the same command again, never --overwrite) and requeues the job.
SIGTERM (a preemption, scancel, the end of the time limit) is forwarded too, but never requeues: SLURM requeues a
preempted job itself, and a cancelled one must stay cancelled. SIGINT (the local executor's kill at its time limit,
SIGKILL a second later; a cancellation) and SIGHUP (the submitter's terminal closed) reach the child as SIGTERM; for
any of these the task records at once that the job stopped, before a kill can end it, and again once the child has
exited. Without a stop signal, exit codes 1 (a run that could not go on) and 2 (bad input) fail the job: not
requeued, and SLURM cancels what depends on it; with one, only 2 does (a run that really could not go on fails again
at its next start).

This module imports no torch (every task of every job loads it); the exit code is training.preemption's."""
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import submitit

from outputs import write_json

STOPPED_EXIT_CODE = 75  # training.preemption.STOPPED_EXIT_CODE (a test checks they agree; importing it loads torch)
DEVICES = "{devices}"  # in a command: the job's devices, "cpu" or its GPUs' indices ("0,1"), as the launchers take
RESEND_S = 5.0
DISTRIBUTED_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class JobFailed(Exception):
    """The job's command failed (or stopped without being asked by the scheduler): the job ends failed."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when this task dies (Linux prctl PR_SET_PDEATHSIG), so that a killed task
    leaves no training process behind (the child has a session of its own); the stop signal ignored until the run
    installs its handler."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    signal.signal(_stop_signal(), signal.SIG_IGN)


def _stop_signal() -> signal.Signals:
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def error_line(lines: list[str]) -> str:
    """The line that says why a command failed: its last `error: ...` line, else its last line."""
    lines = [line.strip() for line in lines if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]


class StageJob(submitit.helpers.Checkpointable):
    """One job of the graph: `command` (its DEVICES placeholder filled in) run in `cwd` with `env` added, one per
    task; `outcome`: where task 0 writes how it ended (for --status). `gpus`: per node, for DEVICES."""

    def __init__(self, name: str, command: list[str], cwd: str, env: dict | None = None, gpus: int = 0,
                 outcome: str | None = None):
        self.name, self.command, self.cwd, self.env = name, command, cwd, env or {}
        self.gpus, self.outcome = gpus, outcome
        self.restarts = 0  # requeues by checkpoint(); the pickled copy that the next start loads carries it

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit's requeue: this same job again (the same command: it resumes from the saved state)."""
        self.restarts += 1
        return super().checkpoint(*args, **kwargs)

    # -- the child
    def _devices(self) -> str:
        if not self.gpus:
            return "cpu"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        devices = visible.split(",") if visible else [str(i) for i in range(self.gpus)]
        if not all(d.isdigit() for d in devices):
            raise JobFailed(f"{self.name}: CUDA_VISIBLE_DEVICES={visible} names devices by UUID; the launchers take "
                            f"device indices")
        return ",".join(devices)

    def _child_env(self, job) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
        env.update(self.env, PYTHONUNBUFFERED="1", JOB_RESTART_COUNT=str(self.restarts),
                   STOP_SIGNALS=f"{submitit.JobEnvironment.USR_SIG},TERM")
        if job.num_tasks > 1:  # one process of a DistributedDataParallel run: torch's env:// variables
            dist = submitit.helpers.TorchDistributedEnvironment()
            # one node: the loopback address, which needs no name resolution (a local job's host name may have none)
            master = dist.master_addr if job.num_nodes > 1 else "127.0.0.1"
            env.update(MASTER_ADDR=master, MASTER_PORT=str(dist.master_port), RANK=str(dist.rank),
                       WORLD_SIZE=str(dist.world_size), LOCAL_RANK=str(dist.local_rank),
                       LOCAL_WORLD_SIZE=str(dist.local_world_size))
        return env

    def _record(self, job, state: str, exit_code: int | None, line: str = "") -> None:
        if self.outcome and job.global_rank == 0:
            os.makedirs(os.path.dirname(self.outcome), exist_ok=True)
            write_json(self.outcome, {"job": self.name, "job_id": job.job_id, "state": state, "exit_code": exit_code,
                                       "error": line, "restarts": self.restarts,
                                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _stopped_line(self, asked: list, code: int | None) -> str:
        why = ", ".join(s.name for s in dict.fromkeys(asked)) or "a signal sent to it directly"
        if code is None:  # said while the command is still stopping: a kill may end this task before it exits
            return (f"{self.name}: stopped by {why}; its command was told to stop at a step boundary and save; not "
                    f"requeued: the same command continues it from its last saved state")
        return (f"{self.name}: stopped by {why} with its state saved (exit code {code}); not requeued here: the same "
                f"command continues it")

    def __call__(self) -> dict:
        job = submitit.JobEnvironment()
        command = [self._devices() if arg == DEVICES else arg for arg in self.command]
        print(f"[{self.name}] job {job.job_id}, task {job.global_rank} of {job.num_tasks}, start {self.restarts + 1}: "
              f"{shlex.join(command)}", flush=True)
        child = subprocess.Popen(command, cwd=self.cwd, env=self._child_env(job), stderr=subprocess.PIPE,
                                 start_new_session=True, preexec_fn=_die_with_parent)
        tail: list[str] = []

        def copy_stderr():  # through to the job's log, keeping the last lines for the error line
            for raw in iter(child.stderr.readline, b""):
                sys.stderr.buffer.write(raw)
                sys.stderr.flush()
                tail[:] = [*tail[-19:], raw.decode(errors="replace")]
        copier = threading.Thread(target=copy_stderr, daemon=True)
        copier.start()

        asked: list[signal.Signals] = []  # the signals that came, first one first
        sent = [0.0]

        def forward(signum, frame):  # only flags and a kill: no print in a handler (it may interrupt a print)
            asked.append(signal.Signals(signum))
            sent[0] = time.monotonic()
            with_group(child.pid, _for_child(signum))
        stop_signal = _stop_signal()
        submitit_handler = signal.getsignal(stop_signal)  # submitit's checkpoint_and_try_requeue, in a job
        # SIGINT: the local executor's kill at its time limit (SIGKILL a second later) or a cancellation; SIGHUP:
        # the submitter's terminal closed. Both stop the command as SIGTERM does. Under --cluster debug the job runs
        # in the submitter's process, whose Ctrl-C stays its own.
        ended = [signal.SIGTERM, signal.SIGHUP, stop_signal] + ([] if job.cluster == "debug" else [signal.SIGINT])
        if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:  # nohup: the job is meant to outlive the terminal
            ended.remove(signal.SIGHUP)
        previous = {sig: signal.signal(sig, forward) for sig in ended}
        on_record = False
        try:
            while child.poll() is None:
                time.sleep(0.2)
                if any(s != stop_signal for s in asked) and not on_record:  # a kill may follow: say it now
                    on_record = True
                    self._record(job, "stopped", None, self._stopped_line(asked, None))
                if asked and time.monotonic() - sent[0] >= RESEND_S:  # the child may not have had its handler yet
                    sent[0] = time.monotonic()
                    with_group(child.pid, _for_child(asked[-1]))
        finally:  # --cluster debug runs jobs in the caller's process: leave its handlers as they were
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        copier.join(timeout=5)
        code = child.returncode
        line = error_line(tail)
        # not 2 (bad input, which the next start would meet again); 1 is what the pool says when a run of it stopped
        # (75), so it requeues too: a run that really could not go on fails again at the next start, not stopped
        requeue = stop_signal in asked and code not in (0, 2)
        if code == 0:
            self._record(job, "done", 0)
            return {"job": self.name, "exit_code": 0}
        if requeue and callable(submitit_handler):
            print(f"[{self.name}] stopped on {stop_signal.name} with its state saved (exit code {code}); requeueing",
                  flush=True)
            self._record(job, "requeued", code)
            if job.global_rank == 0:
                try:
                    submitit_handler(stop_signal, None)  # checkpoint() and requeue; it exits
                except Exception as e:  # e.g. timed out too many times: the job fails
                    self._record(job, "failed", code, f"not requeued: {e}")
                    raise
            # The other tasks: task 0 requeues the whole job. Exit 0, with no result written: a non-zero exit could
            # make srun kill task 0 before it requeues (KillOnBadExit); the local executor requeues on task 0's 144.
            sys.exit(0)
        if code == STOPPED_EXIT_CODE or asked:
            message = self._stopped_line(asked, code)
            self._record(job, "stopped", code, message)
            raise JobFailed(message)
        reason = {2: "bad input", 1: "a run that could not go on"}.get(code, "failed")
        self._record(job, "failed", code, line)
        raise JobFailed(f"{self.name}: {reason} (exit code {code}), not requeued: {line}")


def _for_child(signum) -> signal.Signals:
    """The signal the child gets for `signum`: the stop signal as it came; any other as SIGTERM, which the child
    reads as "stop at a step boundary and save" ($STOP_SIGNALS)."""
    return signal.Signals(signum) if signum == _stop_signal() else signal.SIGTERM


def with_group(pid: int, signum) -> None:
    """signum to the child's process group (the child and, for the pool, every run it started)."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
