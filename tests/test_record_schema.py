"""The run record's schema (training/record.py): records carry a version, every reader brings an older record to
today's shape through one upgrade, and records written before the version existed -- the ones users have on disk,
in every shape they took -- still resume, count as complete and report; a record of a newer version is refused in
one line."""
import json
import os

import pytest

import pretrain
import report
import training
from errors import UserError
from helpers import Cut, assert_one_line, cli, cut_at, tool_output
from outputs import card
from tools import tensorboard_logs
from training.record import SCHEMA_VERSION, VERSION_KEY, upgrade

RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records")  # as main wrote them (README.md)


def _json(path):
    with open(path) as f:
        return json.load(f)


def _write(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f)


def _main_wrote(name):
    """tests/records/<name>: a record written by main before records had a version."""
    return _json(os.path.join(RECORDS, name))


def _shape(record):
    """The keys of a record at every level the schema fixes: the top, each start, each start's preprocessing."""
    return (sorted(record), [sorted(h) for h in record["history"]],
            [sorted(h["preprocessing"] or {}) for h in record["history"]])


# Older shapes: what main wrote over time, made from a record as main writes it today (version 1 throughout).
def _no_history(record):
    record.pop("history")
    return record


def _no_inputs(record):
    for entry in (record, *record.get("history", [])):
        entry.pop("inputs")
    return record


def _no_numerics(record):
    for entry in (record, *record.get("history", [])):
        entry.pop("precision"), entry.pop("device_type")
    return record


def _no_preprocessing(record):
    for entry in (record, *record.get("history", [])):
        entry.pop("preprocessing")
    return record


def _no_cuda_graph(record):
    for entry in (record, *record.get("history", [])):
        entry["args"].pop("cuda_graph")
    return record


def _version_1(record):
    """A record as main wrote it before the version: today's without its version."""
    record.pop(VERSION_KEY)
    return record


OLDER = {"no history": _no_history, "no inputs": _no_inputs, "no numerics": _no_numerics,
         "no preprocessing": _no_preprocessing, "no cuda_graph": _no_cuda_graph}
NOT_RECORDED = {"no inputs": ("inputs",), "no numerics": ("precision", "device_type"),
                "no preprocessing": ("preprocessing",)}


# ----------------------------------------------------------------------------- the shape

def _kept(old, new) -> bool:
    """Every value of `old` is in `new` (dicts: key by key, lists: item by item); `new` may hold more keys."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _kept(v, new[k]) for k, v in old.items())
    if isinstance(old, list):
        return isinstance(new, list) and len(old) == len(new) and all(map(_kept, old, new))
    return old == new


def test_a_record_main_wrote_before_versions_upgrades_to_the_shape_written_now(stage_args, tmp_path):
    """The real files main wrote (tests/records) against a record written now: the same keys at every level,
    every value kept; a record written now has the version, and upgrading it changes nothing."""
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=1)))
    now = _json(tmp_path / "ckpt" / "further-pretrain-1" / "digits" / training.RECORD_FILE)
    assert now[VERSION_KEY] == SCHEMA_VERSION == 3
    assert upgrade(now, "args.json") == now

    old = _main_wrote("pretrain-args.json")
    new = upgrade(old, "pretrain-args.json")
    assert _shape(new)[0] == _shape(now)[0] and {tuple(s) for s in _shape(new)[1]} == {tuple(_shape(now)[1][0])}
    assert _kept(old, new) and new[VERSION_KEY] == SCHEMA_VERSION
    assert [h["start_step"] for h in new["history"]] == [0, 2]

    result = _main_wrote("finetune-seed0.json")
    upgraded = upgrade(result, "seed0.json")
    assert sorted(upgraded) == sorted([VERSION_KEY, *result]) and _kept(result, upgraded)
    assert {tuple(s) for s in _shape(upgraded)[1]} == {tuple(_shape(now)[1][0])}


@pytest.mark.parametrize("older", list(OLDER), ids=list(OLDER))
def test_each_older_shape_upgrades_to_todays_with_what_it_lacks_not_recorded(older):
    """A field an older record lacks is None after upgrade (unknown, which readers do not compare); a flag added
    since ran as its default; a record without history is one start from step 0 (its top level)."""
    today = upgrade(_main_wrote("pretrain-args.json"), "today")
    record = upgrade(OLDER[older](_main_wrote("pretrain-args.json")), "older")
    if older == "no history":
        assert [h["start_step"] for h in record["history"]] == [0]
        assert record["history"][0] == today["history"][0]
    else:
        assert _shape(record)[:2] == _shape(today)[:2]
    for field in NOT_RECORDED.get(older, ()):
        assert record[field] is None and all(h[field] is None for h in record["history"])
    assert all(h["args"]["cuda_graph"] is False for h in record["history"]) and record["args"]["cuda_graph"] is False
    changed = {k for k in today if record[k] != today[k]} - {"history"}
    assert changed == set(NOT_RECORDED.get(older, ()))


def test_an_older_result_without_training_accuracy_has_none(tmp_path):
    result = _main_wrote("finetune-seed0.json")
    del result["train_acc"], result["train_loss"]
    path = tmp_path / "cub" / "initial" / "seed0.json"
    _write(path, result)
    read = report.read_result(str(path))
    assert read["train_acc"] is None and read["train_loss"] is None and read["test_acc"] == result["test_acc"]


# ----------------------------------------------------------------------------- older records resume and complete

@pytest.mark.parametrize("older", ["as main writes it", *OLDER], ids=["as main writes it", *OLDER])
def test_a_run_recorded_in_an_older_shape_resumes_and_then_counts_as_complete(older, stage_args, tmp_path,
                                                                               monkeypatch, capsys):
    argv = stage_args("--save_every", 1, "--output_dir", tmp_path / "run", steps=3)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    path = tmp_path / "run" / training.RECORD_FILE
    make_older = OLDER.get(older, lambda record: record)
    _write(path, make_older(_version_1(_json(path))))
    first_start = upgrade(_json(path), "older")["history"][0]

    code, out, err = tool_output(pretrain, argv, monkeypatch, capsys)
    assert code == 0 and "resuming from step 2" in out, err
    record = _json(path)
    assert record[VERSION_KEY] == SCHEMA_VERSION
    assert [h["start_step"] for h in record["history"]] == [0, 2] and record["history"][0] == first_start
    assert record["history"][1]["inputs"] and record["history"][1]["precision"] == "fp32"  # this start: all of it

    _write(path, make_older(_version_1(record)))
    code, out, err = tool_output(pretrain, argv, monkeypatch, capsys)
    assert code == 0 and "already complete" in out, err


# ----------------------------------------------------------------------------- older results report

def test_results_recorded_in_older_shapes_are_averaged_with_todays_on_their_arguments(tmp_path, capsys):
    """Seeds of one setting written as main wrote them, without inputs and numerics, and with today's version:
    one mean over all (compared on the arguments they all hold), not `mixed settings`."""
    results = tmp_path / "results"
    folder = results / "digits" / "further-pretrain-4"
    shapes = {0: lambda r: r, 1: lambda r: _no_numerics(_no_inputs(_no_history(r))),
              2: lambda r: upgrade(r, "today")}
    for seed, shape in shapes.items():
        result = _main_wrote("finetune-seed0.json")
        result["seed"] = seed
        for entry in (result, *result["history"]):
            entry["args"]["seed"] = seed
        _write(folder / f"seed{seed}.json", shape(result))
    report.main(report.get_args_parser().parse_args(["--results_dir", str(results), "--init", "further-pretrain-4"]))
    assert capsys.readouterr().out.startswith("digits further-pretrain-4: test accuracy 10.00 ± 0.00 % over 3 seeds")

    other = _main_wrote("finetune-seed0.json")  # another --lr is another setting, whatever the record's shape
    other["seed"] = 3
    for entry in (other, *other["history"]):
        entry["args"].update(seed=3, lr=1.0)
    _write(folder / "seed3.json", _no_numerics(_no_inputs(other)))
    report.main(report.get_args_parser().parse_args(["--results_dir", str(results)]))
    assert "mixed settings [1]" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a newer record

@pytest.mark.parametrize("version", [99, "2"], ids=["newer", "not a number"])
def test_a_record_of_a_newer_or_unknown_version_is_refused_in_one_line_by_every_reader(
        version, stage_args, tmp_path, monkeypatch, capsys):
    words = ("newer version of this repository", "update it") if version == 99 else (f"{VERSION_KEY} '2'",)
    argv = stage_args("--save_every", 1, "--output_dir", tmp_path / "run", steps=3)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    path = tmp_path / "run" / training.RECORD_FILE
    _write(path, {**_json(path), VERSION_KEY: version})
    before = {n: (tmp_path / "run" / n).read_bytes() for n in os.listdir(tmp_path / "run")}

    code, err = cli(pretrain, argv, monkeypatch, capsys)  # resume
    assert code == 2
    assert_one_line(err, str(path), *words)
    assert before == {n: (tmp_path / "run" / n).read_bytes() for n in os.listdir(tmp_path / "run")}
    code, err = cli(tensorboard_logs, [tmp_path / "run"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, str(path), *words)
    with pytest.raises(UserError, match=words[0]):
        card.run_of(str(tmp_path / "run"))

    result = _main_wrote("finetune-seed0.json") | {VERSION_KEY: version}
    _write(tmp_path / "results" / "digits" / "initial" / "seed0.json", result)
    code, err = cli(report, ["--results_dir", tmp_path / "results"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "seed0.json", *words)


def test_a_version_2_record_upgrades_with_the_max_length_its_image_run_ignored():
    """A record main wrote at version 2 (before the text half's --max_length): every start gets the default, and
    nothing else changes."""
    old = _main_wrote("pretrain-args-v2.json")
    new = upgrade(old, "pretrain-args-v2.json")
    assert old[VERSION_KEY] == 2 and new[VERSION_KEY] == SCHEMA_VERSION
    assert new["args"]["max_length"] == 512 and all(h["args"]["max_length"] == 512 for h in new["history"])
    for entry in (new, *new["history"]):
        del entry["args"]["max_length"]
    assert {k: v for k, v in new.items() if k != VERSION_KEY} == {k: v for k, v in old.items() if k != VERSION_KEY}
