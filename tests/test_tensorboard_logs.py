"""TensorBoard logs from the run records (python -m tools.tensorboard_logs): the scalars equal metrics.jsonl,
re-running and resuming never repeat a step, logs written while a run ran are left alone, and a missing
tensorboard package is one line."""
import datetime
import json
import os
import re
import sys
import time

import numpy as np
import pytest

import finetune
import training
import pretrain
from tools import tensorboard_logs
from training.tensorboard_events import EventLog, read_scalars, read_text

from helpers import Cut, assert_one_line, cut_at, metrics, tool_output


def _expected(rows) -> dict:
    """{tag: [(step, value as float32)]}: what the event files must hold for these metrics lines."""
    tags = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                tags.setdefault(f"train/{key}", []).append((row["step"], float(np.float32(value))))
    return tags


def _scalars(run_dir) -> dict:
    return {tag: [(step, value) for step, value, _ in events] for tag, events in read_scalars(str(run_dir)).items()}


def test_event_files_hold_metrics_jsonl_and_the_result_and_a_rerun_repeats_nothing(stage_args, tmp_path,
                                                                                    monkeypatch, capsys):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args()))
    finetune.main(finetune.get_args_parser().parse_args(
        stage_args("--scratch", "True", "--results_dir", tmp_path / "results", "--seed", 1, steps=3)))
    mae_dir = tmp_path / "ckpt" / "further-pretrain-4" / "digits"
    clf_dir = tmp_path / "results" / "digits" / "initial" / "seed1"
    for attempt in range(2):  # the second run rewrites the same file
        code, out, err = tool_output(tensorboard_logs, [tmp_path / "ckpt", tmp_path / "results"], monkeypatch, capsys)
        assert code == 0, err
        assert f"{mae_dir}: 4 metrics lines" in out and f"{clf_dir}: 3 metrics lines" in out
        for run_dir in (mae_dir, clf_dir):
            assert [n for n in os.listdir(run_dir) if "tfevents" in n] == [tensorboard_logs.EVENT_FILE]
        assert _scalars(mae_dir) == _expected(metrics(mae_dir))
        result = json.load(open(str(clf_dir) + ".json"))
        expected = _expected(metrics(clf_dir))
        expected.update({f"result/{k}": [(3, float(np.float32(result[k])))] for k in ("test_acc", "test_loss")})
        assert _scalars(clf_dir) == expected
    assert set(expected) >= {"train/loss", "train/cls_loss", "train/lr", "train/grad_norm", "train/images_per_s"}
    record = json.load(open(mae_dir / "args.json"))
    assert [json.loads(text) for text in read_text(str(mae_dir))] == [record]


def test_a_killed_and_resumed_run_has_each_step_once_with_the_times_it_ran(stage_args, tmp_path, monkeypatch,
                                                                           capsys):
    argv = stage_args("--save_every", 2, steps=5)
    run_dir = tmp_path / "ckpt" / "further-pretrain-5" / "digits"
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):  # steps 1-3 logged, the state saved after step 2
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    assert tool_output(tensorboard_logs, [run_dir], monkeypatch, capsys)[0] == 0  # converted while stopped
    assert [s for s, _ in _scalars(run_dir)["train/loss"]] == [1, 2, 3]
    pretrain.main(pretrain.get_args_parser().parse_args(argv))  # resumes from step 2
    assert tool_output(tensorboard_logs, [tmp_path / "ckpt"], monkeypatch, capsys)[0] == 0
    assert _scalars(run_dir) == _expected(metrics(run_dir))
    assert [s for s, _ in _scalars(run_dir)["train/loss"]] == [1, 2, 3, 4, 5]
    # wall times: each start's `started` plus the time images_per_s implies
    record, rows = json.load(open(run_dir / "args.json")), metrics(run_dir)
    started = [datetime.datetime.fromisoformat(h["started"]).timestamp() for h in record["history"]]
    assert [h["start_step"] for h in record["history"]] == [0, 2]
    times = [t for _, _, t in read_scalars(str(run_dir))["train/loss"]]
    assert times[0] == pytest.approx(started[0] + 8 / rows[0]["images_per_s"], abs=1e-3)
    assert times[2] == pytest.approx(started[1] + 8 / rows[2]["images_per_s"], abs=1e-3)  # in the second start
    assert times[4] == pytest.approx(times[3] + 8 / rows[4]["images_per_s"], abs=1e-3)


def test_a_run_with_its_own_event_files_is_left_as_it_is(stage_args, tmp_path, monkeypatch, capsys):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=2)))
    run_dir = tmp_path / "ckpt" / "further-pretrain-2" / "digits"
    live = EventLog(str(run_dir))
    live.scalars("train", 1, {"loss": 9.0})
    live.close()
    before = {n: (run_dir / n).read_bytes() for n in os.listdir(run_dir) if "tfevents" in n}
    code, out, _ = tool_output(tensorboard_logs, [tmp_path / "ckpt"], monkeypatch, capsys)
    assert code == 0 and f"{run_dir}: left as it is" in out
    assert before == {n: (run_dir / n).read_bytes() for n in os.listdir(run_dir) if "tfevents" in n}


def test_a_resumed_writer_purges_what_an_earlier_one_logged_from_its_start(tmp_path):
    """What a live --report_to tensorboard relies on: EventLog(purge_step=k) hides the old steps >= k."""
    first = EventLog(str(tmp_path))
    for step in (1, 2, 3, 4):
        first.metrics({"step": step, "loss": float(step)})
    first.close()
    # as if made in the same second as the next writer, with a counter that sorts after it (...9 > ...10):
    # TensorBoard reads files in name order, so the purge must come in a file named after this one
    (name,) = os.listdir(tmp_path)
    head, _, host_pid, _ = re.fullmatch(r"(events\.out\.tfevents\.)(\d+)(\..+\.)(\d+)", name).groups()
    os.rename(tmp_path / name, tmp_path / f"{head}{int(time.time()) + 1}{host_pid}99")
    again = EventLog(str(tmp_path), purge_step=3)
    for step in (3, 4, 5):
        again.metrics({"step": step, "loss": 10.0 + step})
    again.close()
    assert _scalars(tmp_path) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]}


def test_bad_input_and_a_missing_tensorboard_are_one_line(stage_args, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    for argv, words in (([tmp_path / "nowhere"], ["not a directory"]), ([tmp_path / "empty"], ["no metrics.jsonl"])):
        code, _, err = tool_output(tensorboard_logs, argv, monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, *words)
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=1)))
    for module in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    code, _, err = tool_output(tensorboard_logs, [tmp_path / "ckpt"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "pip install tensorboard")
