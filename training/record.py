"""The run record's schema: args.json, and a fine-tuning result file (seed<k>.json), which is the result plus the
record. Writers write SCHEMA_VERSION; every reader calls upgrade(), the one path by which a record an older version
of this repository wrote is read in today's shape, so no reader asks which fields a record happens to hold.

The shape (version 3):
    schema_version   SCHEMA_VERSION
    <START_FIELDS>   the first start's entry (training.run_dir.RunDirectory.start_entry), without its start_step
    history          one entry per (re)start: START_FIELDS and start_step, the step it started from
    wandb_run_id     only with --report_to wandb
    a result file also: test_acc, test_loss, train_acc, train_loss, dataset, init, seed, checkpoint, num_test,
    num_train (and val_acc, val_loss, num_val with --val_split; model with --save_model)
A field an older record did not hold is None after upgrade(): "not recorded", which readers treat as unknown (not
compared), never as a value.

Version 1: every record written before the version was (no schema_version key), in the shapes it took over time:
no history (one start), no inputs, no precision / device_type, no preprocessing (or its size null), no optimizer,
no job, no --cuda_graph in the arguments, a result without train_acc / train_loss.
Version 2: no --max_length in the arguments (the text half's flag; every run before it was an image run). Version 3
adds it; a text run's start records no preprocessing (None: its tokenizer comes with the model it reads).

A change of shape (a new field, a new flag) raises SCHEMA_VERSION and adds one step to _UPGRADES that brings a
record of the version before to it; tests/test_record_schema.py fails on a start entry whose fields differ from
START_FIELDS, so a new field cannot slip in without it."""
import copy

from errors import UserError

SCHEMA_VERSION = 3
VERSION_KEY = "schema_version"

# What each start records (RunDirectory.start_entry writes exactly these, and start_step).
START_FIELDS = ("stage", "args", "command", "git_commit", "versions", "device", "device_type", "host", "world_size",
                "precision", "threads", "preprocessing", "optimizer", "inputs", "started", "job")
PREPROCESSING_FIELDS = ("size", "resample", "mean", "std", "source")  # dataclasses.asdict(models.Preprocessing)


def upgrade(record: dict, path: str) -> dict:
    """`record` (read from `path`) in today's shape, as a new dict: each upgrade step from its version on applied.
    A record of a newer version than this code knows is refused in one line: its fields may mean something else."""
    version = record.get(VERSION_KEY, 1)
    if version is True or not isinstance(version, int) or version < 1:
        raise UserError(f"{path} has {VERSION_KEY} {version!r}, which no version of this repository writes; nothing "
                        f"was changed; --overwrite moves the run aside and starts again")
    if version > SCHEMA_VERSION:
        raise UserError(f"{path} was written by a newer version of this repository (run record version {version}; "
                        f"this one reads up to {SCHEMA_VERSION}); update it (git pull) to read this run")
    history = record.get("history")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise UserError(f"{path} is not a run record (its history is not a list of starts); nothing was changed; "
                        f"--overwrite moves the run aside and starts again")
    record = copy.deepcopy(record)
    for step in _UPGRADES[version - 1:]:
        record = step(record)
    return {VERSION_KEY: SCHEMA_VERSION, **{k: v for k, v in record.items() if k != VERSION_KEY}}


# Flags added while version 1 was written (every stage's, then fine-tuning's own): a record without one ran as its
# default does.
_FLAGS_ADDED_IN_VERSION_1 = {"cuda_graph": False, "accum_steps": 1, "grad_checkpointing": False}
_FINETUNE_FLAGS_ADDED_IN_VERSION_1 = {"recipe": "release", "layer_decay": 1.0, "drop_path": 0.0, "mixup": 0.0,
                                      "cutmix": 0.0, "label_smoothing": 0.0, "reprob": 0.0, "randaug": "none",
                                      "schedule": "linear"}


def _filled_start(entry: dict) -> dict:
    """One start's entry with every START_FIELDS key: None where version 1 did not record it."""
    entry = {**dict.fromkeys(START_FIELDS), **entry}
    if isinstance(entry["args"], dict):
        own = _FINETUNE_FLAGS_ADDED_IN_VERSION_1 if entry["stage"] == "finetune" else {}
        entry["args"] = {**_FLAGS_ADDED_IN_VERSION_1, **own, **entry["args"]}
    if isinstance(entry["preprocessing"], dict):
        entry["preprocessing"] = {**dict.fromkeys(PREPROCESSING_FIELDS), **entry["preprocessing"]}
    return entry


def _from_version_1(record: dict) -> dict:
    """Version 1 -> 2: a record without history is one start from step 0 (its top level); every start's missing
    fields, a preprocessing's missing values and a result's training accuracy are None, not recorded."""
    history = record.get("history") or [{**{k: record[k] for k in START_FIELDS if k in record}, "start_step": 0}]
    record = {**_filled_start(record), "history": [_filled_start(entry) for entry in history]}
    if "test_acc" in record:  # a fine-tuning result
        record = {"train_acc": None, "train_loss": None, **record}
    return record


def _from_version_2(record: dict) -> dict:
    """Version 2 -> 3: every start ran with --max_length's default (image runs, which do not read it)."""
    def filled(entry: dict) -> dict:
        if isinstance(entry.get("args"), dict):
            entry = {**entry, "args": {"max_length": 512, **entry["args"]}}
        return entry
    return {**filled(record), "history": [filled(entry) for entry in record["history"]]}


_UPGRADES = [_from_version_1, _from_version_2]  # _UPGRADES[v - 1] brings a record of version v to v + 1
