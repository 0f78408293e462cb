"""TensorBoard event files of a run: the numbers of its metrics.jsonl as scalars, and its arguments once.

    log = EventLog(run_dir, purge_step=start_step)   # one writer per start of a run
    log.arguments(record)                            # the run record (args.json), as text, once
    log.metrics(entry)                               # one metrics.jsonl line {"step": 50, "loss": ..., ...}
    log.scalars("test", step, {"acc": 0.95})         # anything else, as <prefix>/<name>
    log.close()

Used by a live `--report_to tensorboard` (training/report_to.py: each line as it is appended to metrics.jsonl)
and by `python -m tools.tensorboard_logs` (finished runs, from their files).

Tags are `train/<key>` for every number of a metrics line (train/loss, train/lr, train/mae_loss, ...) at the
line's own step, so TensorBoard's steps are metrics.jsonl's. Event files hold 32-bit floats (TensorBoard's
scalar format): a value read back is its metrics.jsonl value rounded to float32. `purge_step`: TensorBoard
drops the events an earlier writer of this directory logged at that step or later, so a run resumed from
step k (a killed run may have logged past its last saved state) shows each step once.

TensorBoard is an optional dependency: without the `tensorboard` package EventLog raises a UserError that
says what to install.
"""
import json
import math
import os
import re
import time

from errors import UserError

INSTALL_HINT = "TensorBoard is not installed here: pip install tensorboard (optional; see requirements.txt)"
ARGS_TAG = "args"


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module refuses to import without the tensorboard package
        raise UserError(INSTALL_HINT) from None
    return SummaryWriter


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_FILE_SECOND = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def _wait_for_a_later_second(log_dir: str) -> None:
    """TensorBoard reads a directory's event files in the order of their names, which begin with the second
    their writer was made (then host, process id and a counter, which do not sort by time: ...9 > ...10). A
    purge applies to the files read before it, so a writer made in the same second as an earlier file of
    log_dir could be read first and its purge lost: wait (under a second) until the clock has passed them."""
    seconds = [int(m.group(1)) for m in map(_FILE_SECOND.match, os.listdir(log_dir) if os.path.isdir(log_dir) else [])
               if m]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(max(0.01, max(seconds) + 1 - time.time()))


class EventLog:
    """One TensorBoard writer for `log_dir` (a run directory). filename_suffix is appended to the event
    file's name (tools.tensorboard_logs writes under a temporary name, then renames)."""

    def __init__(self, log_dir: str, purge_step: int | None = None, filename_suffix: str = ""):
        _wait_for_a_later_second(log_dir)
        self._writer = _summary_writer()(log_dir=log_dir, purge_step=purge_step, filename_suffix=filename_suffix)

    def scalars(self, prefix: str, step: int, values: dict, walltime: float | None = None) -> None:
        """<prefix>/<name> = value at `step` for each finite number among `values` (others are skipped)."""
        for name, value in values.items():
            if is_number(value):
                self._writer.add_scalar(f"{prefix}/{name}", value, step, walltime=walltime)

    def metrics(self, entry: dict, walltime: float | None = None) -> None:
        """One metrics.jsonl line: every number but the step, as train/<key> at entry["step"]."""
        self.scalars("train", entry["step"], {k: v for k, v in entry.items() if k != "step"}, walltime)

    def arguments(self, record: dict, step: int = 0, walltime: float | None = None) -> None:
        """The run record as indented JSON (markdown renders 4-space indented lines verbatim)."""
        text = json.dumps(record, indent=2, sort_keys=True, default=str)
        self._writer.add_text(ARGS_TAG, "\n".join("    " + line for line in text.splitlines()), step,
                              walltime=walltime)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, value, wall_time), ...]} of every scalar in log_dir's event files, as TensorBoard's own
    loader reads them (purges applied, every event kept: no sampling)."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_text(log_dir: str, tag: str = ARGS_TAG) -> list[str]:
    """The text summaries under `tag`, in order (the run's arguments)."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
        from tensorboard.util import tensor_util
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    tag = f"{tag}/text_summary" if f"{tag}/text_summary" in acc.Tags()["tensors"] else tag
    return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(tag)]
