"""TensorBoard logs for runs that have ended, written from their records (metrics.jsonl, args.json).

    python -m tools.tensorboard_logs checkpoints results      # every run directory below these
    tensorboard --logdir checkpoints                          # one TensorBoard run per run directory
    tensorboard --logdir_spec checkpoints:checkpoints,results:results   # both trees (--logdir takes one)

Each run directory (a folder holding metrics.jsonl: a stage's checkpoint directory, a fine-tuning run's
results/<dataset>/<init>/seed<k>/) gets one event file, `events.out.tfevents.from-metrics-jsonl`, holding

    train/<key>    every number of every metrics.jsonl line, at that line's step (training/tensorboard_events.py)
    result/<key>   a fine-tuning run's test_acc, test_loss (and val_acc, val_loss) from seed<k>.json, at its
                   last step
    args           the run record (args.json), as text

Wall times are the record's: each start's `started` time plus the time the logged images_per_s imply, so
TensorBoard's time axes show the run as it ran. Running the tool again rewrites that one file (written under
a temporary name, then renamed), so steps never repeat; a TensorBoard already serving it sees the new file
after a restart (or with --detect_file_replacement true). A directory that already holds other event files
(logged while the run ran) is left as it is. A run still in progress gets the steps logged so far; run the
tool again when it has ended.

TensorBoard is optional: without the `tensorboard` package this says what to install, in one line.
"""
import argparse
import datetime
import json
import os

import outputs
import training
import utils
from training.record import upgrade
from training.tensorboard_events import EventLog, is_number

EVENT_FILE = "events.out.tfevents.from-metrics-jsonl"  # TensorBoard reads any file with "tfevents" in its name


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write TensorBoard event files from the metrics.jsonl of ended runs.",
                                allow_abbrev=False)
    p.add_argument("paths", nargs="+",
                   help="run directories or folders above them (e.g. checkpoints results); every folder below "
                        "holding a metrics.jsonl is converted")
    return p


def run_dirs(paths: list[str]) -> list[str]:
    """The folders at or below `paths` that hold a metrics.jsonl, hidden folders (.saving, .cache) skipped."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise utils.UserError(f"not a directory: {path}")
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if training.METRICS_FILE in files:
                found.append(root)
    return found


def read_lines(path: str) -> list[dict]:
    """metrics.jsonl's entries; a line a kill cut short (or any unreadable line) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def read_record(path: str) -> dict | None:
    """The run record (or result file) at `path` in today's shape (training.record.upgrade); None if unreadable."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return upgrade(value, path) if isinstance(value, dict) else None


def _timestamp(text) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text).timestamp()  # the recording machine's local time
    except (TypeError, ValueError):
        return None


def wall_times(rows: list[dict], record: dict | None) -> list[float | None]:
    """When each line was logged: its start's `started` time plus (steps since the previous line) x batch /
    images_per_s, summed since that start. None where the record does not say (TensorBoard then uses now)."""
    history = record["history"] if record else []
    starts = sorted(((h["start_step"], _timestamp(h["started"])) for h in history), key=lambda start: start[0])
    batch = record["args"].get("batch_size") if record and isinstance(record["args"], dict) else None
    times, start, clock, last_step = [], -1, None, 0
    for row in rows:
        while start + 1 < len(starts) and starts[start + 1][0] < row["step"]:  # the start that logged this line
            start += 1
            last_step, clock = starts[start]
        speed = row.get("images_per_s")
        if clock is not None and is_number(speed) and speed > 0 and is_number(batch):
            clock += (row["step"] - last_step) * batch / speed
        else:
            clock = None
        last_step = row["step"]
        times.append(clock)
    return times


def foreign_event_files(run_dir: str) -> list[str]:
    """Event files in run_dir that this tool did not write (a live writer's), temporary files left out."""
    return [n for n in os.listdir(run_dir)
            if "tfevents" in n and n != EVENT_FILE and not outputs.TEMPORARY_NAME.search(n)]


def convert(run_dir: str) -> int | None:
    """Write run_dir's event file from its records; returns the number of metrics lines, None if skipped."""
    if foreign_event_files(run_dir):
        return None
    rows = read_lines(os.path.join(run_dir, training.METRICS_FILE))
    record = read_record(os.path.join(run_dir, training.RECORD_FILE))
    result = read_record(os.path.normpath(run_dir) + ".json")  # fine-tuning's seed<k>.json beside its folder
    suffix = f".tmp{os.getpid()}"
    for name in os.listdir(run_dir):  # our own leftover, should a killed conversion have had this pid
        if "tfevents" in name and name.endswith(suffix):
            os.remove(os.path.join(run_dir, name))
    log = EventLog(run_dir, filename_suffix=suffix)
    try:
        times = wall_times(rows, record)
        if record is not None:
            log.arguments(record, walltime=next((t for t in times if t is not None), None))
        for row, time in zip(rows, times):
            log.metrics(row, walltime=time)
        if result is not None and "test_acc" in result and rows:
            log.scalars("result", rows[-1]["step"], {k: result.get(k) for k in
                                                     ("test_acc", "test_loss", "val_acc", "val_loss")}, times[-1])
    finally:
        log.close()
    written = [n for n in os.listdir(run_dir) if "tfevents" in n and n.endswith(suffix)]
    assert len(written) == 1, written  # the writer's file: events.out.tfevents.<time>.<host>.<pid>.<n><suffix>
    os.replace(os.path.join(run_dir, written[0]), os.path.join(run_dir, EVENT_FILE))
    return len(rows)


def main(args):
    dirs = run_dirs(args.paths)
    if not dirs:
        raise utils.UserError(f"no metrics.jsonl found under {' '.join(args.paths)} (the three stages write one "
                              f"into each run directory)")
    written = skipped = 0
    for run_dir in dirs:
        lines = convert(run_dir)
        if lines is None:
            skipped += 1
            print(f"{run_dir}: left as it is (it has event files logged while it ran)")
        else:
            written += 1
            print(f"{run_dir}: {lines} metrics lines -> {EVENT_FILE}")
    view = f"--logdir {args.paths[0]}" if len(args.paths) == 1 else "--logdir_spec " + ",".join(
        f"{os.path.basename(os.path.normpath(p)) or p}:{p}" for p in args.paths)
    print(f"{written} run(s) written, {skipped} left as they were; view with `tensorboard {view}`")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
