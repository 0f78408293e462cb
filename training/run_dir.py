"""A run's directory: one writer at a time (an OS lock), its record (args.json, with one history entry per start;
its schema and upgrade: record.py), whether it already finished or can resume (the same arguments, else refused
naming them), --overwrite (what is there moves aside, nothing is deleted), the resumable training state, and
leftovers of a killed run."""
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import platform
import sys
import time

import torch
from PIL import Image

from errors import RunFailed, UserError
from outputs import TEMPORARY_NAME, atomic_file, reported, write_json
from training import scheduler
from training.record import SCHEMA_VERSION, VERSION_KEY, upgrade
from utils import RESULT_NEUTRAL_FLAGS, git_commit, library_versions, one_line

STATE_FILE = "train_state.pt"
RECORD_FILE = "args.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
RUN_FILES = (STATE_FILE, RECORD_FILE, METRICS_FILE, LOCK_FILE)

_held_locks: dict[str, int] = {}  # lock file -> descriptor, for the run directories this process holds


def lock_run_dir(path: str) -> str:
    """Create run directory `path` if needed and hold an exclusive lock on it (its LOCK_FILE) until
    unlock_run_dir or the end of the process. An flock dies with its process, so a killed run (even kill -9)
    leaves no stale lock. A process that already holds the lock keeps it (main() called again in one
    process after an exception, as tests do). In a SLURM job a lock held by another process is waited for (up to
    training.scheduler.LOCK_WAIT_S): on Lustre or NFS the lock of a requeued job's crashed node is released late.
    Returns the lock file's path."""
    lock_path = os.path.abspath(os.path.join(path, LOCK_FILE))
    fd = _held_locks.get(lock_path)
    if fd is not None:
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return lock_path
        except OSError:
            pass
        unlock_run_dir(lock_path)  # the directory was removed or replaced under us
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write to the run directory {path}: {e.strerror or e}") from None
    wait_s = scheduler.lock_wait_seconds()
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                kind = scheduler.filesystem_type(path)
                raise UserError(f"cannot lock the run directory {path}: {e.strerror or e}, on a {kind} filesystem, "
                                f"which does not support flock here (Lustre: mount with -o flock; NFS: without "
                                f"nolock); or put the runs on another filesystem (--checkpoint_dir, "
                                f"--results_dir)") from None
            if time.monotonic() >= deadline:
                os.close(fd)
                waited = f" (waited {wait_s:g} s)" if wait_s else ""
                raise RunFailed(f"{path} is in use by another run ({holder or 'pid unknown'}){waited}; wait for it to "
                                f"end or stop it, or pass --output_dir for a separate run") from None
            if not said:
                said = True
                print(f"{path} is locked by {holder or 'another process'}; waiting up to {wait_s:g} s (in a SLURM "
                      f"job a shared filesystem may hold the lock of a previous node for a while)", flush=True)
            time.sleep(scheduler.LOCK_POLL_S)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
    _held_locks[lock_path] = fd
    return lock_path


def unlock_run_dir(lock_path: str) -> None:
    fd = _held_locks.pop(lock_path, None)
    if fd is not None:
        os.close(fd)  # releases the flock


def read_record(path: str) -> dict:
    """A run record (args.json, or a result file that holds the record too), in today's shape (record.upgrade)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the run record {path} ({type(e).__name__}: {e}); nothing was changed; "
                        f"--overwrite moves this run aside and starts again") from None
    if isinstance(record, dict):
        record = upgrade(record, path)
    if not isinstance(record, dict) or not isinstance(record["args"], dict):
        raise UserError(f"{path} is not a run record (no 'args'); nothing was changed; --overwrite moves this run "
                        f"aside and starts again")
    return record


def fingerprints(reads: dict, strict: bool = True) -> dict:
    """{label: content fingerprint} of what a stage reads ({label: data.identity.SplitInput or
    models.identity.WeightsInput}); strict=False: None for what cannot be read (yet: a teacher not trained; or any
    more: an input deleted since a run finished)."""
    found = {}
    for label, source in reads.items():
        try:
            found[label] = source.fingerprint()
        except UserError:
            if strict:
                raise
            found[label] = None
    return found


def recorded_inputs(record: dict) -> dict:
    """{label: fingerprint} of what the record's last start read ({} where it is not recorded)."""
    return record["history"][-1]["inputs"] or {}


def changed_inputs(record: dict, now: dict, reads: dict) -> str:
    """'label: what changed' for each input the record names whose content differs now ('' if none). An input
    that cannot be read now (None: deleted since) or that the record does not name is not compared."""
    before = recorded_inputs(record)
    changes = []
    for label, fingerprint in now.items():
        if fingerprint is not None and before.get(label) is not None:
            change = reads[label].change(before[label], fingerprint)
            if change:
                changes.append(f"{label}: {change}")
    return "; ".join(changes)


# What a start records of its preprocessing and compares: the record's field -> the processor file's name for it.
# The file it came from ("source") is not compared: a path is no content (and a fallback may give the same values).
COMPARED_PREPROCESSING = {"size": "size", "resample": "resample", "mean": "image_mean", "std": "image_std"}


def _shown(field: str, value) -> str:
    if field == "resample" and value in range(len(Image.Resampling)):
        return f"{value} ({Image.Resampling(value).name})"
    return str(value)


def changed_preprocessing(record: dict, preprocessing) -> str:
    """'image_mean changed from [...] to [...]' for each value of `preprocessing` (models.Preprocessing, as
    resolved: defaults and fallbacks applied) that differs from what the record's last start applied ('' if
    none). A value the record does not hold (None) is not compared: a preprocessing not recorded, or a size left
    to the model (its image_size, which the model's config.json, fingerprinted, fixes). Deriving those from the
    files now would take an edited value for the one the run applied."""
    before = record["history"][-1]["preprocessing"] or dict.fromkeys(COMPARED_PREPROCESSING)
    now = json.loads(json.dumps(dataclasses.asdict(preprocessing)))  # tuples as the record's lists
    return "; ".join(f"{name} changed from {_shown(field, before[field])} to {_shown(field, now[field])}"
                     for field, name in COMPARED_PREPROCESSING.items()
                     if before[field] is not None and now[field] is not None and before[field] != now[field])


def changed_numerics(record: dict, process, args) -> str:
    """What a resumed run would compute differently from the start it continues: the precision, the device type,
    --compile ('' if none; one the record does not hold, None, is unknown, not changed)."""
    last = record["history"][-1]
    now = {"precision": process.precision, "device_type": process.device.type, "compile": bool(args.compile)}
    there = {"precision": last["precision"], "device_type": last["device_type"], "compile": last["args"].get("compile")}
    return "; ".join(f"{k}: {there[k]!r} there, {now[k]!r} now" for k in now
                     if there[k] is not None and there[k] != now[k])


def differences(before: dict, args) -> str:
    """'flag: value there, value now' for each argument that changes what the run computes ('' if none); `before`:
    the record's arguments (read_record: flags added since a record's version hold the default they ran as)."""
    now = json.loads(json.dumps(vars(args), default=str))
    return "; ".join(f"{k}: {before.get(k, '(not recorded)')!r} there, {now[k]!r} now" for k in now
                     if k not in RESULT_NEUTRAL_FLAGS and before.get(k, "(not recorded)") != now[k])


class RunDirectory:
    """`out_dir` of a run of `stage`, finished once `done_file` exists. `done_holds_record`: the done file is a
    result that carries the run's record (fine-tuning's seed<k>.json, beside the directory); otherwise the
    record is the directory's args.json."""

    def __init__(self, out_dir: str, stage: str, done_file: str, done_holds_record: bool, process):
        self.out_dir, self.stage, self.done_file, self.done_holds_record = out_dir, stage, done_file, done_holds_record
        self.process = process
        self.state_path = os.path.join(out_dir, STATE_FILE)
        self.record_path = os.path.join(out_dir, RECORD_FILE)
        self.metrics_path = os.path.join(out_dir, METRICS_FILE)
        self.lock_path = None

    # -- finished, resumable
    def finished(self, args, inputs: dict | None = None, reads: dict | None = None, preprocessing=None) -> bool:
        """Whether done_file exists; a finished run with other arguments, that read other contents than
        `inputs` ({label: fingerprint now, or None if unreadable}; `reads`: their training.Run reads), or that
        applied another preprocessing than `preprocessing` (models.Preprocessing) is refused (never reported as
        this one)."""
        if not os.path.exists(self.done_file):
            return False
        candidates = (self.done_file, self.record_path) if self.done_holds_record else (self.record_path,)
        path = next((p for p in candidates if os.path.exists(p)), None)
        if path is None:
            return True  # a finished directory we did not write (no record): nothing to compare
        record = read_record(path)
        changed = differences(record["args"], args)
        if changed:
            raise UserError(f"{self.done_file} is a finished run with other arguments ({changed}); pass "
                            f"--overwrite to move it aside and run again, or --output_dir for a new run")
        changed = changed_inputs(record, inputs or {}, reads or {})
        if changed:
            raise UserError(f"{self.done_file} is a finished run that read other inputs ({changed}); pass "
                            f"--overwrite to move it aside and run again, or --output_dir for a new run")
        changed = changed_preprocessing(record, preprocessing) if preprocessing is not None else ""
        if changed:
            raise UserError(f"{self.done_file} is a finished run that applied another preprocessing ({changed} "
                            f"since it ran; now read from {preprocessing.source}); pass --overwrite to move it aside "
                            f"and run again, or --output_dir for a new run")
        return True

    def resumable(self, args, inputs: dict | None = None, reads: dict | None = None,
                  preprocessing=None) -> dict | None:
        """The record of the unfinished run here (a saved state with the same arguments and, when given, the same
        inputs, preprocessing and numerics), or None."""
        if not os.path.exists(self.state_path):
            return None
        if not os.path.exists(self.record_path):
            raise UserError(f"{self.state_path} has no {RECORD_FILE} beside it, so it cannot be told whether it is "
                            f"this run; nothing was changed; --overwrite moves it aside and starts again")
        record = read_record(self.record_path)
        changed = differences(record["args"], args)
        if changed:
            raise UserError(f"{self.out_dir} holds an unfinished run with other arguments ({changed}); pass "
                            f"the same arguments to resume it, --overwrite to move it aside and start again, or "
                            f"--output_dir for a new run")
        changed = changed_inputs(record, inputs or {}, reads or {})
        if changed:
            raise UserError(f"{self.out_dir} holds an unfinished run that read other inputs ({changed}); nothing "
                            f"was changed; --overwrite moves it aside and starts again, or --output_dir for a new run")
        changed = changed_preprocessing(record, preprocessing) if preprocessing is not None else ""
        if changed:
            raise UserError(f"{self.out_dir} holds an unfinished run that applied another preprocessing ({changed} "
                            f"since this run started; now read from {preprocessing.source}); nothing was changed; "
                            f"restore it to resume, or --overwrite moves this run aside and starts again, or "
                            f"--output_dir for a new run")
        changed = changed_numerics(record, self.process, args)
        if inputs is not None and changed:
            raise UserError(f"{self.out_dir} holds an unfinished run computed with other numerics ({changed}); resume "
                            f"it with the --precision, --device and --compile it ran with, or --overwrite / "
                            f"--output_dir for a new run")
        return record

    # -- one writer: the lock, --overwrite, leftovers
    def take(self, overwrite: bool) -> None:
        """First process: lock out_dir; with --overwrite move what is there aside (a run's directory only, never
        any other folder); remove a killed run's temporary files."""
        if overwrite and os.path.isdir(self.out_dir):
            theirs = [n for n in os.listdir(self.out_dir) if n not in RUN_FILES and not TEMPORARY_NAME.search(n)]
            if theirs and RECORD_FILE not in os.listdir(self.out_dir):
                raise UserError(f"--overwrite moves only a run's directory aside, and {self.out_dir} holds no run "
                                f"record ({RECORD_FILE}) but {len(theirs)} other entr{'y' if len(theirs) == 1 else 'ies'} "
                                f"({', '.join(sorted(theirs)[:3])}); nothing was moved; choose another --output_dir")
        self.lock_path = lock_run_dir(self.out_dir)
        if overwrite:
            self._move_aside()
        leftovers = [os.path.join(self.out_dir, n) for n in os.listdir(self.out_dir) if TEMPORARY_NAME.search(n)]
        if not self._done_file_inside():
            folder, name = os.path.split(os.path.abspath(self.done_file))
            leftovers += [os.path.join(folder, n) for n in os.listdir(folder)
                          if n.startswith(name + ".tmp") and TEMPORARY_NAME.search(n)]
        for path in leftovers:  # we hold the lock: their writer is dead
            os.remove(path)
        if leftovers:
            self.process.print(f"[{self.stage}] removed {len(leftovers)} temporary file(s) of an interrupted run")

    def release(self) -> None:
        if self.lock_path:
            unlock_run_dir(self.lock_path)

    def _done_file_inside(self) -> bool:
        return os.path.dirname(os.path.abspath(self.done_file)) == os.path.abspath(self.out_dir)

    def _move_aside(self) -> None:
        """--overwrite: rename the run directory (and a done_file beside it) to <out_dir>.old-<time>[.json],
        before anything new is written; nothing is deleted."""
        base = os.path.normpath(self.out_dir)
        beside = None if self._done_file_inside() or not os.path.exists(self.done_file) else self.done_file
        suffix = os.path.normpath(beside)[len(base):] if beside else ""  # finetune: ".json"
        contents = [n for n in os.listdir(base) if n != LOCK_FILE]
        if not contents and beside is None:
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside, i = f"{base}.old-{stamp}", 2
        while os.path.exists(aside) or os.path.exists(aside + suffix):
            aside, i = f"{base}.old-{stamp}-{i}", i + 1
        moved = []
        if contents:  # the directory first: a kill between the two renames leaves the done_file, still true
            old_lock = _held_locks.pop(self.lock_path)
            os.rename(base, aside)
            try:
                self.lock_path = lock_run_dir(self.out_dir)
            finally:
                os.close(old_lock)
            moved.append(aside)
        if beside:
            os.rename(beside, aside + suffix)
            moved.append(aside + suffix)
        self.process.print(f"[{self.stage}] --overwrite: moved the previous run to {' and '.join(moved)}")

    # -- the record
    def start_entry(self, args, preprocessing, start_step: int, optimizer: dict | None = None,
                    inputs: dict | None = None) -> dict:
        """Who runs from which step, how, on what: one entry of the record's history per (re)start. `optimizer`:
        what the arguments do not say (betas, eps, the no-weight-decay rule); `inputs`: {label: fingerprint} of
        what the run reads."""
        process = self.process
        return {"stage": self.stage, "args": vars(args), "command": sys.argv, "git_commit": git_commit(),
                "versions": library_versions(), "device": process.device_name(), "device_type": process.device.type,
                "host": platform.node(), "world_size": process.world, "precision": process.precision,
                "threads": torch.get_num_threads(),
                "preprocessing": None if preprocessing is None else dataclasses.asdict(preprocessing),
                "optimizer": optimizer, "inputs": inputs or {},
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "start_step": start_step,
                "job": scheduler.job_identity()}

    def write_record(self, entry: dict, resumed: dict | None) -> dict:
        """args.json: a fresh run's record (the first start's entry at the top level, every start in "history"),
        or the resumed run's with this start appended to its history. Returns the record."""
        if entry["start_step"] > 0 and resumed is not None:
            record = {**resumed, "history": [*resumed["history"], entry]}
        else:
            record = {VERSION_KEY: SCHEMA_VERSION, **{k: v for k, v in entry.items() if k != "start_step"},
                      "history": [entry]}
        record = json.loads(json.dumps(record, default=str))
        if self.process.is_main:
            with reported("the run record", self.record_path, RunFailed):
                write_json(self.record_path, record)
        return record

    def update_record(self, record: dict, **fields) -> dict:
        """The record with `fields` added (e.g. the W&B run id of a first start with --report_to wandb), written."""
        record = {**record, **fields}
        if self.process.is_main:
            with reported("the run record", self.record_path, RunFailed):
                write_json(self.record_path, record)
        return record

    # -- the resumable state
    def save_state(self, step: int, model, optimizer, scheduler) -> None:
        """Everything needed to continue after `step` steps (randomness is recomputed from the seed)."""
        if self.process.is_main:
            kept = "the state saved before is kept" if os.path.exists(self.state_path) else "no state was saved"
            with reported("the training state", self.state_path, RunFailed, kept), \
                    atomic_file(self.state_path, "wb") as f:
                torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, f)
        self.process.barrier()

    def load_state(self, model, optimizer, scheduler) -> int:
        """Loads the saved state into the three; returns its step."""
        try:
            state = torch.load(self.state_path, map_location=self.process.device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
        except Exception as e:  # a damaged file fails in torch.load with many exception types
            reason = one_line(e) if str(e).strip() else type(e).__name__
            raise UserError(f"cannot resume: {self.state_path} is unreadable ({reason[:200]}); nothing was changed; "
                            f"--overwrite moves this run aside and starts again") from None
        self.process.print(f"[{self.stage}] resuming from step {step} ({self.state_path})")
        return step

    def drop_state(self) -> None:
        """After the run's result is written: the state is no longer needed."""
        if self.process.is_main and os.path.exists(self.state_path):
            os.remove(self.state_path)
