"""Runs that never lie about themselves: a finished run is reported only for its own arguments, one run at a
time holds a directory, --overwrite keeps what it replaces, every (re)start is recorded, a kill loses nothing,
and broken files or directories are answered with one line."""
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import finetune
import models
import pretrain
import report
import selftrain
import training
import utils

from helpers import Cut, REPO, assert_one_line as _one_line, cli_output as _cli, cut_at

# ----------------------------------------------------------------------------- helpers


def _files(folder):
    """{relative path: bytes} of every file under folder."""
    found = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def pretrain_argv(stage_args, tmp_path):
    def build(*extra, steps=4):
        return stage_args("--output_dir", tmp_path / "run", *extra, steps=steps)
    return build


@pytest.fixture
def finetune_argv(stage_args, tmp_path):
    """Fine-tuning from θ₀ (no checkpoint needed); its run dir is res/digits/initial/seed0, result seed0.json."""
    def build(*extra, steps=3):
        return stage_args("--scratch", "True", "--results_dir", tmp_path / "res", "--warmup_steps", 1, *extra,
                          steps=steps)
    return build


def test_from_theta0_the_unused_checkpoint_flags_do_not_make_another_run(finetune_argv, capsys):
    """run_finetune.sh passes --ckpt_name self-further-pretrain-20000 and run_all.sh --ckpt_name initial to
    the same run from θ₀; neither is read, so neither may make the other "a run with other arguments"."""
    finetune.main(finetune.get_args_parser().parse_args(finetune_argv("--ckpt_name", "initial")))
    capsys.readouterr()
    finetune.main(finetune.get_args_parser().parse_args(finetune_argv("--ckpt_name", "further-pretrain-9",
                                                                      "--checkpoint_dir", "elsewhere")))
    assert "already complete" in capsys.readouterr().out


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(pretrain_argv, monkeypatch, tmp_path):
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):
        _pretrain(pretrain_argv("--save_every", 2, steps=4))
    metrics = tmp_path / "run" / training.METRICS_FILE
    with open(metrics, "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a write
    _pretrain(pretrain_argv("--save_every", 2, steps=4))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_finished_run_is_complete_even_if_its_input_was_deleted(finetune_argv, stage_args, tmp_path, capsys):
    """The finished check comes before the check of the checkpoint or teacher it was trained from."""
    _pretrain(stage_args(steps=2))
    teacher = tmp_path / "ckpt" / "further-pretrain-2" / "digits"
    selftrain.main(selftrain.get_args_parser().parse_args(stage_args(steps=2)))
    argv = stage_args("--ckpt_name", "further-pretrain-2", "--results_dir", tmp_path / "res", steps=2)
    finetune.main(finetune.get_args_parser().parse_args(argv))
    shutil.rmtree(teacher)
    capsys.readouterr()
    selftrain.main(selftrain.get_args_parser().parse_args(stage_args(steps=2)))
    finetune.main(finetune.get_args_parser().parse_args(argv))
    assert capsys.readouterr().out.count("already complete") == 2


def _pretrain(argv):
    pretrain.main(pretrain.get_args_parser().parse_args(argv))


def _finetune(argv):
    finetune.main(finetune.get_args_parser().parse_args(argv))


# ----------------------------------------------------------------------------- 2. finished runs and their arguments

def test_finished_finetune_run_with_other_arguments_is_refused_through_the_launcher(data_dir, tmp_path):
    """The reported case: the second command used to print the first run's accuracy as its own."""
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", SEEDS="1")
    flags = f"--model_name vit-mae-tiny --data_dir {data_dir} --batch_size 8 --workers 0 --warmup_steps 1"

    def launch(extra):
        return subprocess.run(["bash", "-c", f"bash {REPO}/run_finetune.sh cpu digits True {flags} {extra}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    first = launch("--steps 2")
    assert first.returncode == 0, first.stderr[-3000:]
    result = tmp_path / "results" / "digits" / "initial" / "seed1.json"
    before = result.read_bytes()
    second = launch("--steps 3 --lr 1e-3")
    assert second.returncode == 2
    # the run's one line, then the launcher's report of which run failed
    _one_line(second.stderr.splitlines()[0], "seed1.json is a finished run with other arguments (steps: 2 there, "
                                             "3 now; lr: 0.0001 there, 0.001 now)", "--overwrite")
    assert "digits initial seed 1: exit code 2" in second.stderr
    assert "test accuracy" not in second.stdout and "over 1 seed" not in second.stdout  # no summary printed
    assert result.read_bytes() == before


def test_finished_run_with_the_same_arguments_is_complete_and_other_arguments_are_refused(
        pretrain_argv, finetune_argv, tmp_path, capsys):
    _pretrain(pretrain_argv(steps=2))
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    capsys.readouterr()
    _pretrain(pretrain_argv("--log_every", 5, "--workers", 1, steps=2))  # how it runs may differ
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(utils.UserError, match=r"run/model.safetensors is a finished run with other arguments "
                                              r"\(lr: 0.00015 there, 0.001 now\)"):
        _pretrain(pretrain_argv("--lr", "1e-3", steps=2))
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights

    _finetune(finetune_argv(steps=2))
    result = tmp_path / "res" / "digits" / "initial" / "seed0.json"
    before = result.read_bytes()
    with pytest.raises(utils.UserError, match=r"seed0.json is a finished run with other arguments \(dropout: 0.1"):
        _finetune(finetune_argv("--dropout", 0.2, steps=2))
    # the result file holds the record too: it is enough to tell, without the run directory
    os.rename(tmp_path / "res" / "digits" / "initial" / "seed0", tmp_path / "elsewhere")
    with pytest.raises(utils.UserError, match=r"other arguments \(steps: 2 there, 3 now\)"):
        _finetune(finetune_argv(steps=3))
    capsys.readouterr()
    _finetune(finetune_argv(steps=2))
    assert "already complete" in capsys.readouterr().out
    assert result.read_bytes() == before


# ----------------------------------------------------------------------------- 3. one run per directory

def test_a_directory_in_use_is_refused_naming_the_holder_and_kill_9_frees_it(pretrain_argv, tmp_path,
                                                                             monkeypatch, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, training.run_dir as d; d.lock_run_dir(sys.argv[1]); print('locked', flush=True); "
                               "sys.stdin.read()", str(run_dir)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _cli(pretrain, pretrain_argv(), monkeypatch, capsys)
        assert code == 1  # a run that cannot go on, not bad input: the launchers' pool keeps going
        _one_line(err, f"{run_dir} is in use by another run (pid {holder.pid} on ")
        assert os.listdir(run_dir) == [training.LOCK_FILE]  # the refused run wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    _pretrain(pretrain_argv())  # no stale lock after kill -9
    assert (run_dir / "model.safetensors").exists()
    assert [json.loads(line)["step"] for line in open(run_dir / training.METRICS_FILE)] == [1, 2, 3, 4]


def test_finetune_locks_its_run_directory_and_so_its_result_file(finetune_argv, tmp_path):
    run_dir = tmp_path / "res" / "digits" / "initial" / "seed0"
    os.makedirs(run_dir)
    # another holder: a second open file description is a second lock, even in this process
    fd = os.open(run_dir / training.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 4242 on elsewhere\n")
    try:
        with pytest.raises(utils.UserError, match=r"in use by another run \(pid 4242 on elsewhere\)"):
            _finetune(finetune_argv())
        assert os.listdir(run_dir) == [training.LOCK_FILE] and not (run_dir.parent / "seed0.json").exists()
    finally:
        os.close(fd)
    _finetune(finetune_argv())
    assert _json(run_dir.parent / "seed0.json")["args"]["steps"] == 3


def test_a_run_finished_by_another_while_this_one_loaded_is_not_trained_again(pretrain_argv, tmp_path,
                                                                              monkeypatch):
    real, finished = pretrain.load_mae, []

    def load_mae(*a):  # while this run loads its model, another run of the same command finishes
        if not finished:
            finished.append(1)
            _pretrain(pretrain_argv(steps=2))
        return real(*a)
    monkeypatch.setattr(pretrain, "load_mae", load_mae)
    weights = tmp_path / "run" / "model.safetensors"
    with pytest.raises(utils.UserError, match="model.safetensors was completed by another run while this one was "
                                              "starting; nothing was written"):
        _pretrain(pretrain_argv(steps=2))
    assert finished and weights.exists()
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / training.METRICS_FILE)] == [1, 2]


# ----------------------------------------------------------------------------- 11. --overwrite

def test_overwrite_moves_the_old_run_aside_first_and_a_killed_overwrite_resumes(pretrain_argv, tmp_path,
                                                                                monkeypatch, capsys):
    _pretrain(pretrain_argv(steps=2))
    old = _files(tmp_path / "run")
    new_argv = pretrain_argv("--lr", "1e-3", "--save_every", 2, "--overwrite")
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):
        _pretrain(new_argv)
    aside = glob.glob(str(tmp_path / "run.old-*"))
    assert len(aside) == 1 and _files(aside[0]) == old  # the old run, whole, before anything new was written
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # the old command no longer finds its run; the new one, without --overwrite, resumes the new run
    with pytest.raises(utils.UserError, match=r"unfinished run with other arguments \(steps: 4 there, 2 now; lr: 0.001 "):
        _pretrain(pretrain_argv(steps=2))
    capsys.readouterr()
    _pretrain([a for a in new_argv if a != "--overwrite"])
    assert "resuming from step 2" in capsys.readouterr().out
    record = _json(tmp_path / "run" / training.RECORD_FILE)
    assert record["args"]["lr"] == 1e-3 and [h["start_step"] for h in record["history"]] == [0, 2]
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / training.METRICS_FILE)] == [1, 2, 3, 4]
    # --overwrite again moves the whole run aside again: a second old copy, nothing deleted
    _pretrain(new_argv)
    assert len(glob.glob(str(tmp_path / "run.old-*"))) == 2 and _files(aside[0]) == old


def test_overwrite_of_a_finetune_run_moves_its_result_file_aside_too(finetune_argv, tmp_path, monkeypatch):
    _finetune(finetune_argv(steps=2))
    initial = tmp_path / "res" / "digits" / "initial"
    old_result = (initial / "seed0.json").read_bytes()
    with training.supplied_draws(cut_at(stop=1)), pytest.raises(Cut):
        _finetune(finetune_argv("--overwrite", "--save_every", 1))
    assert not (initial / "seed0.json").exists()  # killed: no "already complete" with the old result
    [aside_result] = glob.glob(str(initial / "seed0.old-*.json"))
    assert open(aside_result, "rb").read() == old_result
    assert os.path.isdir(aside_result[:-len(".json")])  # the run directory beside it
    assert report.find_results(str(tmp_path / "res")) == {}  # the old result is not reported as a seed
    _finetune(finetune_argv("--save_every", 1))
    results = report.find_results(str(tmp_path / "res"))
    assert list(results) == [("digits", "initial")] and results[("digits", "initial")][0]["args"]["steps"] == 3


# ----------------------------------------------------------------------------- 12. history of starts

def test_each_start_is_recorded_and_the_first_record_is_kept(finetune_argv, tmp_path, monkeypatch):
    argv = finetune_argv("--save_every", 1)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        _finetune(argv)
    run_dir = tmp_path / "res" / "digits" / "initial" / "seed0"
    first = _json(run_dir / training.RECORD_FILE)
    _finetune(argv + ["--log_every", "2", "--precision", "fp32"])  # run-control flags may change on resume
    record = _json(run_dir / training.RECORD_FILE)
    assert {k: v for k, v in record.items() if k != "history"} == {k: v for k, v in first.items() if k != "history"}
    assert [(h["start_step"], h["args"]["log_every"], h["args"]["precision"]) for h in record["history"]] == \
        [(0, 1, "auto"), (2, 2, "fp32")]
    assert all({"git_commit", "started", "device", "host", "precision", "command"} <= set(h)
               for h in record["history"])
    assert record["history"][0] == first["history"][0]
    result = _json(run_dir.parent / "seed0.json")
    assert result["history"] == record["history"] and result["args"] == record["args"]


# ----------------------------------------------------------------------------- 13. a kill loses nothing

def test_finetune_writes_its_result_before_dropping_the_state(finetune_argv, tmp_path, monkeypatch, capsys):
    argv = finetune_argv("--save_every", 1)
    with monkeypatch.context() as m:  # killed right after the result was written
        m.setattr(training.Run, "finish", lambda self: (_ for _ in ()).throw(Cut()))
        with pytest.raises(Cut):
            _finetune(argv)
    result = _json(tmp_path / "res" / "digits" / "initial" / "seed0.json")
    assert 0 <= result["test_acc"] <= 1 and result["args"]["steps"] == 3
    capsys.readouterr()
    _finetune(argv)
    assert "already complete" in capsys.readouterr().out


def test_a_killed_runs_temporary_files_are_removed_when_a_run_starts(finetune_argv, tmp_path):
    initial = tmp_path / "res" / "digits" / "initial"
    run_dir = initial / "seed0"
    os.makedirs(run_dir)
    leftovers = [run_dir / "args.json.tmp12345", run_dir / "train_state.pt.tmp999", initial / "seed0.json.tmp4242"]
    others = [initial / "seed1.json.tmp77", initial / "seed0.json.tmpx"]  # another seed's, and not ours
    for path in leftovers + others:
        path.write_text("partial")
    _finetune(finetune_argv())
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in others)


# ----------------------------------------------------------------------------- 14. dropout on N processes

def test_dropout_masks_are_drawn_for_the_global_batch():
    x = torch.randn(8, 5, 6)
    torch.manual_seed(3)
    whole = training.GlobalBatchDropout(0.3, rank=0, world=1)(x)
    parts = []
    for rank in range(2):  # each process seeds the same (seed, step) and keeps its rows of the global mask
        torch.manual_seed(3)
        parts.append(training.GlobalBatchDropout(0.3, rank=rank, world=2)(x[rank * 4:(rank + 1) * 4]))
    assert torch.equal(torch.cat(parts), whole)
    kept = whole != 0
    torch.testing.assert_close(whole[kept], x[kept] / 0.7)  # inverted dropout, as nn.Dropout
    assert 0.5 < kept.float().mean() < 0.9
    assert torch.equal(training.GlobalBatchDropout(0.3, 0, 2).eval()(x), x)
    # the classifier's dropout modules are the ones replaced; the state dict is unchanged
    initial = models.load_mae("vit-mae-tiny")
    model = finetune.build_classifier(initial.config, initial.vit.state_dict(), 10, 0.1)
    keys = set(model.state_dict())
    training.draws.use_global_batch_dropout(model, rank=1, world=2)
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert sum(isinstance(m, training.GlobalBatchDropout) for m in model.modules()) > 0
    assert set(model.state_dict()) == keys


# ----------------------------------------------------------------------------- 15. the teacher's device

def test_device_resolution_uses_each_processes_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert training.resolve_device("cuda", 2) == torch.device("cuda", 2)
    assert training.resolve_device("auto", 3) == torch.device("cuda", 3)
    assert training.resolve_device("cuda:1", 2) == torch.device("cuda", 1)  # an explicit index is kept
    with pytest.raises(utils.UserError, match="only 4 CUDA device"):
        training.resolve_device("cuda", 4)


def test_selftrain_puts_the_teacher_on_this_processes_device(stage_args, monkeypatch):
    _pretrain(stage_args(steps=2))
    real, calls = training.resolve_device, []

    def resolve(requested, local_rank):  # no GPU here: record what was asked, run on the CPU
        calls.append((requested, local_rank))
        return real("cpu", local_rank)
    monkeypatch.setattr(training, "resolve_device", resolve)
    monkeypatch.setenv("LOCAL_RANK", "1")  # as torchrun sets it for the second process of a node
    selftrain.main(selftrain.get_args_parser().parse_args(stage_args("--teacher_device", "cuda", steps=2)))
    assert ("cuda", 1) in calls


# ----------------------------------------------------------------------------- 9. broken files and directories

@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_unreadable_train_state_is_one_line_and_nothing_is_changed(content, pretrain_argv, tmp_path,
                                                                   monkeypatch, capsys):
    argv = pretrain_argv("--save_every", 2)
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):
        _pretrain(argv)
    (tmp_path / "run" / training.STATE_FILE).write_bytes(content)
    before = _files(tmp_path / "run")
    code, _, err = _cli(pretrain, argv, monkeypatch, capsys)
    assert code == 2
    _one_line(err, f"cannot resume: {tmp_path / 'run' / training.STATE_FILE} is unreadable", "--overwrite")
    assert _files(tmp_path / "run") == before


def test_garbage_record_of_a_finished_run_is_one_line(pretrain_argv, tmp_path, monkeypatch, capsys):
    _pretrain(pretrain_argv(steps=2))
    (tmp_path / "run" / training.RECORD_FILE).write_text("{not json")
    code, _, err = _cli(pretrain, pretrain_argv(steps=2), monkeypatch, capsys)
    assert code == 2
    _one_line(err, f"cannot read the run record {tmp_path / 'run' / training.RECORD_FILE}", "--overwrite")


def test_an_output_directory_that_cannot_be_written_is_one_line(stage_args, tmp_path, monkeypatch, capsys):
    # Tests run as root, which ignores permission bits; a path below a regular file fails for root too.
    (tmp_path / "a_file").write_text("")
    code, _, err = _cli(pretrain, stage_args("--output_dir", tmp_path / "a_file" / "run"), monkeypatch, capsys)
    assert code == 2
    _one_line(err, f"cannot write to the run directory {tmp_path / 'a_file' / 'run'}: Not a directory")
    # a read-only parent, as a non-root user sees it
    real = os.makedirs

    def makedirs(path, *a, **kw):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "makedirs", makedirs)
    code, _, err = _cli(pretrain, stage_args("--output_dir", tmp_path / "ro" / "run"), monkeypatch, capsys)
    assert code == 2
    _one_line(err, f"cannot write to the run directory {tmp_path / 'ro' / 'run'}: Permission denied")


def test_threads_are_set_and_recorded_and_may_change_on_resume(pretrain_argv, tmp_path, monkeypatch, capsys):
    """--threads auto is one thread on the CPU; a number is that many; each start records what it ran with, and a
    run resumes with another value (a run-control flag)."""
    before = torch.get_num_threads()
    try:
        with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
            _pretrain(pretrain_argv("--save_every", 1, "--threads", "2", steps=4))
        assert torch.get_num_threads() == 2
        _pretrain(pretrain_argv("--save_every", 1, steps=4))  # auto
        assert torch.get_num_threads() == 1
        record = _json(tmp_path / "run" / training.RECORD_FILE)
        assert [(h["args"]["threads"], h["threads"]) for h in record["history"]] == [(2, 2), ("auto", 1)]
    finally:
        torch.set_num_threads(before)
    code, err = _cli(pretrain, pretrain_argv("--threads", "0"), monkeypatch, capsys)[::2]
    assert code == 2 and "argument --threads: must be at least 1, got 0" in err
