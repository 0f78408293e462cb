"""Independent runs side by side on one machine (run_finetune.sh, run_all.sh).

One small run (a fine-tuning seed, batch 32-64) leaves most of a GPU idle; a few processes sharing it finish sooner
in total (measured: 3 fine-tuning processes on one H200 gave 2.4x the throughput of one, 6 gave less than 3). Runs
are independent processes, so the results are the same as one after another.

    pool = Pool(["0", "1"], jobs_per_device=3)   # 6 slots, alternating over the GPUs
    pool.run([Job("a", "logs/a.log", lambda device: [(argv, env)]), Job("b", ..., after=("a",))])
    code = pool.summary()                        # 0, 1, or 2 when every failed run failed on bad input

Each job starts in a free slot once the jobs it needs have succeeded (one whose needs failed never starts), in the
order given; its commands run one after another until one fails, each in a process group of its own. Its output is
appended to its log after a line naming the start; with a single slot, and for a job that needs every device (DDP
over a GPU list; it runs alone and nothing after it starts before it ended), it runs attached instead, its output
on the terminal. One line per started and finished job. A failed job never stops the others; one that exits 2 (bad
input, which the next runs share) stops new ones from starting. SIGTERM or Ctrl-C stops every running job, whole
process trees (torchrun and its workers), waits until they have ended (SIGKILL after 30 s), and raises Stopped
(exit 143 / 130). USR1 and USR2, the signals a scheduler sends to ask runs to stop at a step boundary and save
($STOP_SIGNALS, training/preemption.py), are passed on to every running job's process group as they came (a run
sits in a group of its own, which a signal to the launcher's group does not reach); no new job starts, the pool
waits for the running ones to end and raises Stopped with exit code 75 (STOPPED), the code of a stopped run, so
that a job around the launcher requeues (launch/job.py)."""
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import time
from typing import Callable

POLL_S = 0.1
KILL_AFTER_S = 30.0
STOP_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
PASSED_ON = (signal.SIGUSR1, signal.SIGUSR2)  # the runs' own stop signals: forwarded, the runs save and stop
STOPPED = 75  # the exit code of a run stopped at a step boundary with its state saved
BAD_INPUT = 2  # the exit code of a refused input (errors.UserError)


class Stopped(Exception):
    """The launcher was signalled; every run has been stopped. `code`: the launcher's exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclasses.dataclass
class Job:
    """commands(device) -> [(argv, environment to add), ...], run one after another; device: "cpu", one GPU index,
    or, with all_devices, every GPU of the pool ("0,1")."""
    name: str
    log: str
    commands: Callable[[str], list]
    after: tuple = ()
    all_devices: bool = False


@dataclasses.dataclass
class _Running:
    job: Job
    device: str
    commands: list
    log: object  # the open log file, None when attached
    process: subprocess.Popen | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)


def where(device: str) -> str:
    return device if device == "cpu" else f"GPU {device}"


class Pool:
    def __init__(self, devices: list[str], jobs_per_device: int, on_start: Callable[[Job, str], None] | None = None,
                 on_end: Callable[[Job, int, float], None] | None = None):
        """on_start(job, device) once a job has started; on_end(job, exit code, seconds) once it has ended: for a
        caller's own progress lines and records, after the pool's."""
        self.devices = devices
        self.on_start, self.on_end = on_start, on_end
        self.slots = [d for _ in range(jobs_per_device) for d in devices]  # round-robin over the devices
        self.results: dict[str, int | None] = {}  # job -> exit code; None: never started
        self.failures: list[str] = []
        self.skipped: list[str] = []  # not started after bad input
        self.bad_input = False  # a run exited 2: start nothing more
        self.all_bad_input = True
        self.stop_code = None
        self.passed_on: list[int] = []  # PASSED_ON signals that came, not yet forwarded
        self.stopping = False  # a PASSED_ON signal came: the running jobs are stopping
        self._running: dict[object, _Running] = {}  # slot index (or "all") -> its job
        for sig in STOP_CODES:
            signal.signal(sig, self._signalled)
        for sig in PASSED_ON:
            signal.signal(sig, lambda signum, frame: self.passed_on.append(signum))

    def _signalled(self, signum, frame):
        # only noted: the loop stops the runs, between two of its steps (never halfway through starting one)
        if self.stop_code is None:
            self.stop_code = STOP_CODES[signum]

    def check_stop(self) -> None:
        """Raises Stopped, after stopping every run, once the launcher has been signalled. A signal of PASSED_ON goes
        to every running job; once they have all ended (having saved), Stopped(STOPPED)."""
        if self.stop_code is not None:
            self._stop()
            raise Stopped(self.stop_code)
        if self.passed_on:
            self._pass_on()
            raise Stopped(STOPPED)

    def _pass_on(self) -> None:
        self.stopping = True
        while self._running and self.stop_code is None:
            while self.passed_on:
                signum = self.passed_on.pop(0)
                for running in self._running.values():
                    if isinstance(running.process, subprocess.Popen):
                        _signal_group(running.process.pid, signum)
            time.sleep(POLL_S)
            self._reap(start_next=False)
        if self.stop_code is not None:  # SIGTERM or Ctrl-C while the runs were saving
            self._stop()
            raise Stopped(self.stop_code)
        print("stopped: the runs saved their state; the same command continues them", file=sys.stderr, flush=True)

    def failed(self, name: str) -> bool:
        """True when the job `name` failed or never started."""
        return self.results.get(name) != 0

    # ------------------------------------------------------------------------- running

    def run(self, jobs: list[Job]) -> None:
        pending = list(jobs)
        while pending or self._running:
            self.check_stop()
            self._reap()
            pending = self._start_ready(pending)
            if self._running:
                time.sleep(POLL_S)
        self.check_stop()

    def _start_ready(self, pending: list[Job]) -> list[Job]:
        left, blocked = [], "all" in self._running  # a job over every device runs alone
        for job in pending:
            needs = [self.results.get(name, "pending") for name in job.after]
            if any(code != 0 and code != "pending" for code in needs):
                self.results[job.name] = None  # what it starts from failed
                continue
            if self.bad_input:
                self.results[job.name] = None
                self.skipped.append(job.name)
                continue
            if blocked or "pending" in needs:
                left.append(job)
                continue
            if job.all_devices:
                if self._running:
                    blocked = True  # it runs alone, and what comes after it waits for it
                    left.append(job)
                else:
                    self._start(job, "all", ",".join(self.devices), attached=True)
                    blocked = True
                continue
            slot = next((i for i in range(len(self.slots)) if i not in self._running), None)
            if slot is None:
                blocked = True
                left.append(job)
            else:
                self._start(job, slot, self.slots[slot], attached=len(self.slots) == 1)
        return left

    def _start(self, job: Job, slot, device: str, attached: bool) -> None:
        log = None
        if not attached:
            os.makedirs(os.path.dirname(job.log) or ".", exist_ok=True)
            print(f"[{job.name}] started on {where(device)}, output in {job.log}", flush=True)
            # appended, after a line naming this start: another launcher may be writing the same log (its run of
            # the same seed is then refused, but truncating would cut the first run's output)
            log = open(job.log, "ab", buffering=0)
            stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== {stamp} {job.name} on {where(device)}, launcher pid {os.getpid()}\n".encode())
        running = _Running(job, device, list(job.commands(device)), log)
        self._running[slot] = running
        self._next_command(running)
        if self.on_start:
            self.on_start(job, device)

    def _next_command(self, running: _Running) -> None:
        argv, env = running.commands.pop(0)
        out = running.log if running.log is not None else None
        try:
            # a process group of its own: a signal to the launcher stops the whole run tree, and the terminal's
            # Ctrl-C reaches the launcher alone, which stops the runs itself
            running.process = subprocess.Popen([str(w) for w in argv], env={**os.environ, **env},
                                               stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT if out else None, process_group=0)
        except OSError as e:  # as a shell says it: not found (127) or not runnable (126)
            line = f"{argv[0]}: {e.strerror}\n"
            if out:
                out.write(line.encode())
            else:
                print(line, end="", file=sys.stderr, flush=True)
            running.process = _Ended(127 if isinstance(e, FileNotFoundError) else 126)

    def _reap(self, start_next: bool = True) -> None:
        """Records the jobs that ended; a job whose command succeeded goes on with its next one (start_next)."""
        for slot, running in list(self._running.items()):
            code = running.process.poll()
            if code is None:
                continue
            if code == 0 and running.commands:
                if start_next:
                    self._next_command(running)
                    continue
                code = STOPPED  # stopping: the job's next command does not start
            del self._running[slot]
            self._finished(running, 128 - code if code < 0 else code)  # killed by signal N: 128 + N, as bash

    def _finished(self, running: _Running, code: int) -> None:
        job, log = running.job, running.log
        if log is not None:
            log.close()
        self.results[job.name] = code
        self._report(running, code)
        if self.on_end:
            self.on_end(job, code, time.perf_counter() - running.started)

    def _report(self, running: _Running, code: int) -> None:
        job, log = running.job, running.log
        if code == 0:
            last = last_line(job.log) if log is not None else ""
            print(f"[{job.name}] done{': ' + last if last else ''}", flush=True)
            return
        if code == STOPPED and self.stopping:
            print(f"[{job.name}] stopped with its state saved (exit code {code})", file=sys.stderr, flush=True)
            return
        self.failures.append(f"{job.name}: exit code {code}" + (f", log {job.log}" if log is not None else ""))
        print(f"[{job.name}] FAILED with exit code {code}" + (f"; see {job.log}" if log is not None else ""),
              file=sys.stderr, flush=True)
        if code == BAD_INPUT:
            self.bad_input = True
        else:
            self.all_bad_input = False

    def summary(self) -> int:
        """Lists the failed runs; -> 0 if none failed, 2 if each failed with exit code 2 (bad input), else 1."""
        if not self.failures:
            return 0
        print(f"error: {len(self.failures)} run(s) failed:", file=sys.stderr)
        for failure in self.failures:
            print(f"  {failure}", file=sys.stderr)
        if self.skipped:
            print(f"  not started (after bad input): {' '.join(self.skipped)}", file=sys.stderr)
        return BAD_INPUT if self.all_bad_input else 1

    # ------------------------------------------------------------------------- stopping

    def _stop(self) -> None:
        for sig in STOP_CODES:  # a second Ctrl-C must not cut the stopping short
            signal.signal(sig, signal.SIG_IGN)
        processes = [r.process for r in self._running.values() if isinstance(r.process, subprocess.Popen)]
        others = []
        for process in processes:
            # each process before its children (a parent stopped first cannot start new ones); the group catches
            # what the tree no longer shows (a child whose parent has just ended)
            tree = _descendants(process.pid)
            _signal_group(process.pid, signal.SIGTERM)
            for pid in tree:
                _signal(pid, signal.SIGTERM)
            others += tree
        # until every process of every run has ended, so that the line below is true
        deadline = time.monotonic() + KILL_AFTER_S
        while time.monotonic() < deadline and (any(p.poll() is None for p in processes) or any(map(_alive, others))):
            time.sleep(POLL_S)
        for process in processes:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        for pid in filter(_alive, others):
            _signal(pid, signal.SIGKILL)
        self._running.clear()
        print("interrupted: the runs were stopped; the same command continues them from their last saved state",
              file=sys.stderr, flush=True)


class _Ended:
    """A command that could not start: ended at once with `code`."""

    def __init__(self, code: int):
        self.code = code

    def poll(self) -> int:
        return self.code


def last_line(path: str) -> str:
    """The log's last line that is not blank (a progress bar's \\r starts a line too)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 65536))
        text = f.read().decode(errors="replace").replace("\r", "\n")
    return next((line for line in reversed(text.splitlines()) if line.strip()), "")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children (from /proc; none where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo += children.get(child, [])
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaps has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # already ended
        pass


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass
