"""A run is also how it preprocesses its images: the size, resample filter, mean and std it applied are kept in each
start's record, and a resume or an "already complete" after they changed (the start checkpoint's or θ₀'s
preprocessor_config.json edited between a kill and the resume) is refused with one line naming the value, nothing
overwritten. What is compared is the preprocessing as resolved (defaults and fallbacks applied), not the file's
bytes; a record that holds no preprocessing (or no size) is not compared on it."""
import json
import os

import pytest

import finetune
import pretrain
import selftrain
import training
from models import TINY_NAME, Preprocessing, load_mae, save_model
from models.hub import PROCESSOR_FILE
from training.record import VERSION_KEY

from helpers import Cut, assert_one_line, cut_at, read_json, tool_output


def cli(module, argv, monkeypatch, capsys):
    """(exit code, stdout, stderr) of the entry point run as the shell runs it (0: it returned)."""
    return tool_output(module, argv, monkeypatch, capsys)


def _edit(path, **values):
    """Rewrites the image-processor file `path` with `values` replaced (or removed, for None)."""
    config = read_json(path)
    config.update(values)
    config = {k: v for k, v in config.items() if v is not None}
    with open(path, "w") as f:
        json.dump(config, f)


def _contents(folder):
    """{name: bytes} of the files in `folder` (what a refused run must leave as it was)."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if os.path.isfile(os.path.join(folder, name)) and name != training.LOCK_FILE:
            with open(os.path.join(folder, name), "rb") as f:
                found[name] = f.read()
    return found


EDITS = [({"image_mean": [0.5, 0.5, 0.5]}, "image_mean changed from [0.485, 0.456, 0.406] to [0.5, 0.5, 0.5]"),
         ({"image_std": [0.25, 0.25, 0.25]}, "image_std changed from [0.229, 0.224, 0.225] to [0.25, 0.25, 0.25]"),
         ({"resample": 3}, "resample changed from 2 (BILINEAR) to 3 (BICUBIC)")]


@pytest.fixture
def checkpoint(stage_args, tmp_path):
    """A further pre-trained checkpoint (ckpt/further-pretrain-2/digits) and its preprocessor_config.json."""
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=2)))
    return tmp_path / "ckpt" / "further-pretrain-2" / "digits"


def _finetune_argv(stage_args, tmp_path, *extra):
    return stage_args("--ckpt_name", "further-pretrain-2", "--results_dir", tmp_path / "res", *extra, steps=4)


def test_a_resumed_fine_tuning_run_refuses_an_edited_preprocessing(checkpoint, stage_args, tmp_path, monkeypatch,
                                                                    capsys):
    """The issue's case: killed, the checkpoint's image_mean / image_std / resample edited, resumed: the run would
    continue with the new normalisation; now one line naming the value, exit 2, nothing written."""
    argv = _finetune_argv(stage_args, tmp_path, "--save_every", 1)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        finetune.main(finetune.get_args_parser().parse_args(argv))
    run_dir = tmp_path / "res" / "digits" / "further-pretrain-2" / "seed0"
    processor = checkpoint / PROCESSOR_FILE
    original, before = read_json(processor), _contents(run_dir)
    for values, change in EDITS:
        _edit(processor, **values)
        code, out, err = cli(finetune, argv, monkeypatch, capsys)
        assert code == 2, out + err
        assert_one_line(err, "unfinished run", change, "since this run started", str(processor), "--overwrite")
        assert _contents(run_dir) == before  # nothing overwritten: the state, the record, the metrics
        assert not os.path.exists(str(run_dir) + ".json")
        with open(processor, "w") as f:
            json.dump(original, f)
    code, out, err = cli(finetune, argv, monkeypatch, capsys)  # unchanged: it resumes
    assert code == 0, err
    assert "resuming from step 2" in out
    history = read_json(str(run_dir) + ".json")["history"]
    assert [h["start_step"] for h in history] == [0, 2]
    assert history[0]["preprocessing"] == history[1]["preprocessing"]
    assert (history[1]["preprocessing"]["size"], history[1]["preprocessing"]["resample"]) == (32, 2)
    code, out, err = cli(finetune, [*argv, "--overwrite"], monkeypatch, capsys)  # the way on after an edit
    assert code == 0, err


def test_a_finished_fine_tuning_run_is_not_already_complete_after_its_preprocessing_changed(
        checkpoint, stage_args, tmp_path, monkeypatch, capsys):
    argv = _finetune_argv(stage_args, tmp_path)
    assert cli(finetune, argv, monkeypatch, capsys)[0] == 0
    result = tmp_path / "res" / "digits" / "further-pretrain-2" / "seed0.json"
    code, out, err = cli(finetune, argv, monkeypatch, capsys)
    assert code == 0 and "already complete" in out, err  # unchanged
    finished = result.read_bytes()
    processor = checkpoint / PROCESSOR_FILE
    original = read_json(processor)
    for values, change in EDITS:
        _edit(processor, **values)
        code, out, err = cli(finetune, argv, monkeypatch, capsys)
        assert code == 2 and "already complete" not in out, out + err
        assert_one_line(err, f"{result} is a finished run", change, "--overwrite")
        assert result.read_bytes() == finished
        with open(processor, "w") as f:
            json.dump(original, f)


def test_the_preprocessing_is_compared_as_applied_not_as_the_files_bytes(checkpoint, stage_args, tmp_path,
                                                                          monkeypatch, capsys):
    """The same values written otherwise (no size: the model's; no resample: bilinear; other key order and
    spacing), or the file deleted where its fallback (θ₀'s, here the defaults) applies the same: it resumes."""
    argv = _finetune_argv(stage_args, tmp_path, "--save_every", 1)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        finetune.main(finetune.get_args_parser().parse_args(argv))
    processor = checkpoint / PROCESSOR_FILE
    config = read_json(processor)
    with open(processor, "w") as f:
        json.dump({k: config[k] for k in sorted(config, reverse=True) if k not in ("size", "resample")}, f, indent=7)
    code, out, err = cli(finetune, argv, monkeypatch, capsys)
    assert code == 0 and "resuming from step 2" in out, err
    applied = read_json(tmp_path / "res" / "digits" / "further-pretrain-2" / "seed0.json")["history"][-1]["preprocessing"]
    assert (applied["size"], applied["resample"]) == (32, 2)  # as applied: the model's size, the default filter
    os.remove(processor)
    argv = _finetune_argv(stage_args, tmp_path, "--save_every", 1, "--seed", 1)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        finetune.main(finetune.get_args_parser().parse_args(argv))
    with open(processor, "w") as f:
        json.dump(config, f)
    code, out, err = cli(finetune, argv, monkeypatch, capsys)
    assert code == 0 and "resuming from step 2" in out, err


def _strip(record, *keys):
    """`record` as an older main wrote it: without the preprocessing (keys None), or with its `keys` unresolved;
    without a schema version (training.record: version 1)."""
    record.pop(VERSION_KEY)
    for entry in (record, *record.get("history", [])):
        if keys:
            entry["preprocessing"].update({k: None for k in keys})
        else:
            entry.pop("preprocessing", None)
    return record


@pytest.mark.parametrize("keys", [(), ("size",)], ids=["no preprocessing", "no size"])
def test_a_record_from_before_the_preprocessing_was_compared_resumes_and_stays_complete(
        keys, checkpoint, stage_args, tmp_path, monkeypatch, capsys):
    """Records that hold no preprocessing (or, as written before the size was resolved, size null) are accepted:
    what they applied is not known, and deriving it from the files now would take the edited value for the old."""
    argv = _finetune_argv(stage_args, tmp_path, "--save_every", 1)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        finetune.main(finetune.get_args_parser().parse_args(argv))
    run_dir = tmp_path / "res" / "digits" / "further-pretrain-2" / "seed0"
    record = run_dir / training.RECORD_FILE
    record.write_text(json.dumps(_strip(read_json(record), *keys)))
    if keys:  # the size left to the model: its file's size edited to the model's is the same preprocessing
        _edit(checkpoint / PROCESSOR_FILE, size={"height": 32, "width": 32})
    code, out, err = cli(finetune, argv, monkeypatch, capsys)
    assert code == 0 and "resuming from step 2" in out, err
    result = tmp_path / "res" / "digits" / "further-pretrain-2" / "seed0.json"
    result.write_text(json.dumps(_strip(read_json(result), *keys)))
    code, out, err = cli(finetune, argv, monkeypatch, capsys)
    assert code == 0 and "already complete" in out, err


@pytest.mark.parametrize("stage", [pretrain, selftrain], ids=["further-pretrain", "self-distill"])
def test_pre_training_stages_refuse_a_resume_after_theta0s_preprocessing_changed(stage, stage_args, tmp_path,
                                                                                 monkeypatch, capsys):
    """Stages 1 and 2 preprocess with θ₀'s file: edited between a kill and the resume, refused the same way."""
    theta0 = tmp_path / "theta0"
    save_model(load_mae(TINY_NAME), str(theta0), Preprocessing())
    extra = ["--model_name", theta0, "--save_every", 1, "--output_dir", tmp_path / "run"]
    if stage is selftrain:
        pretrain.main(pretrain.get_args_parser().parse_args(stage_args("--model_name", theta0, steps=2)))
        extra += ["--teacher", tmp_path / "ckpt" / "further-pretrain-2" / "digits"]
    argv = stage_args(*extra, steps=4)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        stage.main(stage.get_args_parser().parse_args(argv))
    before = _contents(tmp_path / "run")
    _edit(theta0 / PROCESSOR_FILE, image_std=[0.25, 0.25, 0.25])
    code, out, err = cli(stage, argv, monkeypatch, capsys)
    assert code == 2, out + err
    assert_one_line(err, "image_std changed from [0.229, 0.224, 0.225] to [0.25, 0.25, 0.25]", "--overwrite")
    assert _contents(tmp_path / "run") == before
