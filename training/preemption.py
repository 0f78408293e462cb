"""Stopping at a step boundary: a signal (a scheduler's "your time is up", SLURM's --signal, submitit's USR2, a
preemption's SIGTERM) asks the run to stop; the run finishes the step it is in, saves its resumable state and
exits with STOPPED_EXIT_CODE, which a job wrapper reads as "run the same command again" (launch/job.py requeues
the job). Beside it, the time-based save (--save_every_minutes), so a node that dies without a signal loses at
most that much.

Under several processes every one must stop (and save) at the same step, or the others would wait in the next
collective for ever. The processes agree on it with one all-reduce of (stop asked, save due, seconds since the
last agreement) at chosen steps: reading it back waits for the device, so not every step, but every
AGREE_EVERY_S seconds of training, as estimated from the step times between agreements (a function of values
every process holds after the same all-reduce, so all choose the same next step). One process agrees with
nobody: it looks at its flag and its clock after every step, which costs nothing."""
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from errors import UserError

STOPPED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: "a temporary failure; run it again"
AGREE_EVERY_S = 2.0  # under several processes: seconds of training between agreements on stopping (and saving)


class Stopped(UserError):
    """The run stopped at a step boundary because a stop signal came; its state is saved and the same command
    continues from it. Exit code STOPPED_EXIT_CODE (not 1 or 2: nothing failed, the job should run again)."""
    exit_code = STOPPED_EXIT_CODE


def stop_signals() -> list[signal.Signals]:
    """The signals that ask a run to stop: $STOP_SIGNALS (comma-separated names, e.g. USR2,TERM), else submitit's
    preemption signal ($SUBMITIT_PREEMPT_SIGNAL, default USR2), whose default action would kill the run unsaved."""
    names = os.environ.get("STOP_SIGNALS") or os.environ.get("SUBMITIT_PREEMPT_SIGNAL") or "USR2"
    found = []
    for name in (n.strip().upper() for n in names.split(",") if n.strip()):
        sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UserError(f"STOP_SIGNALS: '{name}' is not a signal a run can catch (e.g. USR2,TERM)")
        found.append(sig)
    return found


def next_agreement(done: int, elapsed_s: float, steps: int | None) -> int:
    """The step after which the processes agree next: AGREE_EVERY_S ahead at the pace of the last `steps` steps,
    which took `elapsed_s` (None: no pace yet, so the very next step)."""
    if not steps:
        return done + 1
    return done + max(1, int(AGREE_EVERY_S * steps / max(elapsed_s, 1e-9)))


class StepControl:
    """after_step(done) -> (stop, save): whether the run should stop after step `done` (1-based), and whether a
    time-based save is due; the same answer in every process. Installed by Run.prepare; close() puts the signal
    handlers back."""

    def __init__(self, process, save_every_minutes: float):
        self.process = process
        self.save_interval_s = save_every_minutes * 60 if save_every_minutes else None
        self.requested: signal.Signals | None = None  # the signal that came to this process
        self.last_save = time.monotonic()
        self._next, self._since = None, (time.monotonic(), None)  # next agreement step; (time, step) of the last
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for left in reversed(list(_installed)):  # a run of this process that ended by an exception, unclosed
                left.close()
            for sig in stop_signals():
                self._previous[sig] = signal.signal(sig, self._request)
            _installed.append(self)

    def _request(self, signum, frame) -> None:
        # Only a flag: the step in progress finishes, the loop looks at it after the step (printing here could
        # re-enter a print the signal interrupted).
        self.requested = self.requested or signal.Signals(signum)

    def _save_due(self, now: float) -> bool:
        return self.save_interval_s is not None and now - self.last_save >= self.save_interval_s

    def after_step(self, done: int) -> tuple[bool, bool]:
        now = time.monotonic()
        if self.process.world == 1:
            return self.requested is not None, self._save_due(now)
        if self._next is not None and done < self._next:
            return False, False
        last_time, last_step = self._since
        values = torch.tensor([float(self.requested is not None), float(self._save_due(now)), now - last_time],
                              dtype=torch.float64, device=self.process.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        stop, due, elapsed = values.tolist()  # the same three numbers in every process
        self._next = next_agreement(done, elapsed, None if last_step is None else done - last_step)
        self._since = (now, done)
        return stop > 0, due > 0

    def saved(self) -> None:
        """A state was written: the time-based cadence counts from now."""
        self.last_save = time.monotonic()

    def reason(self) -> str:
        return self.requested.name if self.requested is not None else "a stop signal to another process"

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self in _installed:
            _installed.remove(self)


_installed: list[StepControl] = []  # the controls whose handlers are in place, oldest first
