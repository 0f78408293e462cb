"""--report_to: the lines of metrics.jsonl, live, in TensorBoard event files (read back with TensorBoard's own
loader) or a W&B run (a stand-in `wandb` module records what it is sent), also across a kill and resume; a
missing package is one line."""
import json
import sys
import types

import pytest

import pretrain
import training
from training.tensorboard_events import read_scalars

from helpers import Cut, assert_one_line, cli, cut_at, metrics


def _argv(stage_args, tmp_path, *extra):
    return pretrain.get_args_parser().parse_args(stage_args("--save_every", 2, "--output_dir", tmp_path / "run",
                                                            *extra, steps=6))


def _killed_and_resumed(stage_args, tmp_path, *extra):
    """A run logging every step, killed before step 5 (its state saved after step 4, steps 1-4 logged), then
    resumed by the same command."""
    with training.supplied_draws(cut_at(stop=5)), pytest.raises(Cut):
        pretrain.main(_argv(stage_args, tmp_path, *extra))
    pretrain.main(_argv(stage_args, tmp_path, *extra))
    return tmp_path / "run"


def test_tensorboard_events_equal_metrics_jsonl_after_a_kill_and_resume(stage_args, tmp_path):
    run_dir = _killed_and_resumed(stage_args, tmp_path, "--report_to", "tensorboard")
    lines = metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    scalars = read_scalars(str(run_dir))
    for key in ("loss", "mae_loss", "lr", "grad_norm"):
        events = scalars[f"train/{key}"]
        assert [step for step, _, _ in events] == [1, 2, 3, 4, 5, 6], f"train/{key}: steps {events}"
        assert [value for _, value, _ in events] == pytest.approx([m[key] for m in lines], rel=1e-6)  # float32


class _FakeWandB:
    """Records what the project sends to W&B."""

    def __init__(self):
        self.inits, self.logged, self.finished, self.ids = [], [], 0, iter(["run-a", "run-b"])

    def module(self):
        wandb = types.ModuleType("wandb")
        util = types.ModuleType("wandb.util")
        util.generate_id = lambda: next(self.ids)
        wandb.util = util

        def init(**kw):
            self.inits.append(kw)
            return types.SimpleNamespace(log=lambda values, step: self.logged.append((kw["id"], step, values)),
                                         finish=self._finish)
        wandb.init = init
        return wandb, util

    def _finish(self):
        self.finished += 1


def test_wandb_gets_every_line_and_a_resumed_run_continues_the_same_wandb_run(stage_args, tmp_path, monkeypatch):
    fake = _FakeWandB()
    wandb, util = fake.module()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "wandb.util", util)
    run_dir = _killed_and_resumed(stage_args, tmp_path, "--report_to", "wandb")
    record = json.load(open(run_dir / training.RECORD_FILE))
    assert record["wandb_run_id"] == "run-a"
    assert [(kw["id"], kw["resume"], kw["dir"]) for kw in fake.inits] == [("run-a", "allow", str(run_dir))] * 2
    assert fake.inits[0]["config"] == record["args"]
    # the killed start sent steps 1-5 (5 was logged before the cut), the resumed one 5 and 6, the same values
    assert [step for _, step, _ in fake.logged] == [1, 2, 3, 4, 5, 5, 6]
    by_step = {step: values for _, step, values in fake.logged}
    assert [{"step": s, **by_step[s]} for s in range(1, 7)] == metrics(run_dir)
    speed = ("images_per_s", "peak_mem_mb")
    again = [{k: v for k, v in fake.logged[i][2].items() if k not in speed} for i in (4, 5)]
    assert again[0] == again[1]  # step 5 again: the same numbers (a resumed run is bit-identical)
    assert fake.finished == 1  # the resumed run ended; the killed one never finished


def test_a_missing_package_is_one_line(stage_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code, err = cli(pretrain, stage_args("--report_to", "wandb", "--output_dir", tmp_path / "a"), monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "pip install wandb")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, err = cli(pretrain, stage_args("--report_to", "tensorboard", "--output_dir", tmp_path / "b"), monkeypatch,
                    capsys)
    assert code == 2
    assert_one_line(err, "pip install tensorboard")
