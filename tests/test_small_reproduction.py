"""small_reproduction.py end to end with tiny step counts, on a folder of images and tiny idx files (no download):
the two datasets it builds, the hand-over between the stages (θ₀ -> teacher -> student -> classifiers), the table,
Fig. 1 and the diagnostics against the result files and independent recomputations, the same numbers with runs
side by side in worker processes, resuming without recomputing, refusing a changed protocol; and the reading
rules (gates, then claims) and the schedule on made-up numbers."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTMAEForPreTraining

from lab import small_reproduction as sr
from data import LMDBReader
from models import load_mae
from errors import UserError

from helpers import REPO, fake_fashion, save_image, striped

SEED, FIG1_STEPS, TARGET = 1, (2, 3), sr.TARGET_DATASET
INITS = [sr.RANDOM_INIT, "initial"] + [f"{prefix}further-pretrain-{k}" for k in FIG1_STEPS for prefix in ("", "self-")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(a folder of 12 images, a folder of Fashion-MNIST idx files: 3 training images per class, 20 test images)."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for i in range(12):
        colour = tuple(int(v) for v in rng.integers(40, 220, 3))
        save_image(str(root / "images" / f"img{i}.png"), striped(colour, (64, 56), angle=0.5 * i, seed=i))
    fake_fashion(str(root / "idx"), per_class=3, num_test=20)
    return root / "images", root / "idx"


def tiny_run(inputs, *extra):
    images, idx = inputs
    return ["--source_src", images, "--target_src", idx, "--source_crops", 40, "--source_steps", 4,
            "--source_warmup_steps", 1, "--shots", 2, "--further_steps", 2, "--fig1_steps", *FIG1_STEPS,
            "--finetune_steps", 3, "--finetune_warmup_steps", 1, "--seeds", SEED, "--log_every", 1000, *extra]


def run(argv, out_dir):
    sr.main(sr.get_args_parser().parse_args([str(a) for a in argv] + ["--out_dir", str(out_dir)]))


def _read(path):
    with open(path) as f:
        return f.read()


def _json(path):
    return json.loads(_read(path))


def _result(out, init):
    return _json(out / "results" / TARGET / init / f"seed{SEED}.json")


@pytest.fixture(scope="module")
def out(tmp_path_factory, inputs):
    out_dir = tmp_path_factory.mktemp("small_reproduction")
    threads = torch.get_num_threads()
    run(tiny_run(inputs, "--jobs", 1), out_dir)
    assert torch.get_num_threads() == threads  # the thread setting does not leak out of main
    return out_dir


def test_datasets_natural_crops_and_a_low_data_fashion_mnist(out):
    crops = LMDBReader(str(out / "data" / "natural_crops" / "train.lmdb"))
    assert len(crops) == 40
    for i in range(len(crops)):
        with Image.open(io.BytesIO(crops[i][0])) as img:
            assert img.format == "PNG" and img.size == (32, 32)
    counts = _json(out / "data" / TARGET / "counts.json")
    assert counts["shots"] == 2 and counts["splits"]["train"]["total"] == 20
    assert counts["splits"]["test"]["total"] == 20  # the whole test split


def test_every_stage_starts_from_the_right_model(out):
    initial = str(out / "initial_model")
    theta0 = ViTMAEForPreTraining.from_pretrained(initial).state_dict()  # an ordinary model directory
    random_init = load_mae("vit-mae-tiny").state_dict()
    assert not torch.equal(theta0["vit.layers.0.mlp.fc1.weight"], random_init["vit.layers.0.mlp.fc1.weight"])
    args = _json(out / "initial_model" / "args.json")["args"]
    assert args["dataset"] == "natural_crops" and args["model_name"] == "vit-mae-tiny"
    for k in FIG1_STEPS:
        teacher = out / "checkpoints" / f"further-pretrain-{k}" / TARGET
        student = out / "checkpoints" / f"self-further-pretrain-{k}" / TARGET
        for run_dir in (teacher, student):
            args = _json(run_dir / "args.json")["args"]
            assert args["model_name"] == initial and args["steps"] == k and args["dataset"] == TARGET
            assert args["threads"] == 1  # --threads reaches every run
        assert os.path.samefile(_json(student / "args.json")["args"]["teacher"], teacher)  # same step count
    for init in INITS:
        result = _result(out, init)
        assert result["num_test"] == 20 and result["num_train"] == 20 and 0 <= result["train_acc"] <= 1
        expected = {sr.RANDOM_INIT: "vit-mae-tiny", "initial": initial}.get(init, str(out / "checkpoints" / init / TARGET))
        assert result["checkpoint"] == expected
        assert result["args"]["model_name"] == ("vit-mae-tiny" if init == sr.RANDOM_INIT else initial)


def test_table_fig1_and_the_gates_show_the_fine_tuning_results(out):
    acc = {init: 100 * _result(out, init)["test_acc"] for init in INITS}
    table = _read(out / "report.md")
    for row, init in (("Fine-tuning (initial model)", "initial"), ("Further pre-training (2)", "further-pretrain-2"),
                      ("Self-distillation (2)", "self-further-pretrain-2"), (sr.RANDOM_INIT, sr.RANDOM_INIT)):
        line = next(line for line in table.splitlines() if line.startswith(f"| {row}"))
        assert f"{acc[init]:.2f} (n=1)" in line
    assert "(3)" not in table and "## Training accuracy (%)" in table  # at --further_steps; with report.py --train

    lines = _read(out / "fig1.csv").splitlines()
    assert lines[0] == "steps,route,n,mean_acc,std_acc"
    rows = {(int(s), route): float(mean) for s, route, _, mean, _ in (line.split(",") for line in lines[1:])}
    expected = {(0, "further"): acc["initial"], (0, "self"): acc["initial"]}
    expected.update({(k, "further"): acc[f"further-pretrain-{k}"] for k in FIG1_STEPS})
    expected.update({(k, "self"): acc[f"self-further-pretrain-{k}"] for k in FIG1_STEPS})
    assert rows == pytest.approx(expected, abs=1e-4)
    with Image.open(out / "fig1.png") as img:
        assert img.format == "PNG"

    outcome = _json(out / "outcome.json")  # 3 fine-tuning steps fit nothing: the fit gate fails
    fit = next(g for g in outcome["gates"] if g["name"] == "fit")
    lowest = min(100 * _result(out, init)["train_acc"] for init in INITS)
    assert not fit["passed"] and f"lowest training accuracy over the 6 fine-tuning runs: {lowest:.2f} %" in fit["text"]
    assert outcome["outcome"].startswith("regime not reached") and all(c["holds"] is None for c in outcome["claims"])
    summary = _read(out / "summary.md")
    assert table in summary and f"**Outcome: {outcome['outcome']}.**" in summary and "machine:" in summary


def test_diagnostics_against_independent_recomputation(out):
    from sklearn.linear_model import LogisticRegression

    diag = _json(out / "diagnostics.json")

    def split(name):
        reader = LMDBReader(str(out / "data" / TARGET / f"{name}.lmdb"))
        return [reader[i] for i in range(len(reader))]
    train, test = split("train"), split("test")

    def pixels(records):
        return np.stack([np.asarray(Image.open(io.BytesIO(b)), dtype=np.float64).ravel() / 255 for b, _ in records])
    classifier = LogisticRegression(max_iter=5000).fit(pixels(train), [y for _, y in train])
    assert diag["pixel_logistic_regression"] == pytest.approx(
        100 * np.mean(classifier.predict(pixels(test)) == [y for _, y in test]))

    # the MAE loss of the further pre-trained model on the held-out images, with the same masks, from the files alone
    held_out = diag["held_out_test_indices"]
    assert len(held_out) == len(set(held_out)) == 20
    mae = ViTMAEForPreTraining.from_pretrained(str(out / "checkpoints" / "further-pretrain-3" / TARGET)).eval()
    with open(out / "checkpoints" / "further-pretrain-3" / TARGET / "preprocessor_config.json") as f:
        pre = json.load(f)
    images = torch.stack([torch.from_numpy(np.asarray(
        Image.open(io.BytesIO(test[i][0])).convert("RGB").resize((32, 32), pre["resample"]), dtype=np.float32))
        for i in held_out]).permute(0, 3, 1, 2) / 255
    images = (images - torch.tensor(pre["image_mean"])[:, None, None]) / torch.tensor(pre["image_std"])[:, None, None]
    noise = torch.rand(20, 64, generator=torch.Generator().manual_seed(sr.MEMORISATION_MASK_SEED))
    with torch.no_grad():
        loss = mae(images, noise=noise).loss.item()
    assert diag["memorisation"]["further-pretrain-3"]["held_out"] == pytest.approx(loss, rel=1e-5)
    assert set(diag["memorisation"]) == set(INITS) - {sr.RANDOM_INIT} and set(diag["probe"]) == set(INITS)
    assert "### Memorisation" in _read(out / "summary.md")


def test_runs_side_by_side_give_the_same_numbers(out, inputs, tmp_path):
    run(tiny_run(inputs, "--jobs", 2), tmp_path)
    for init in INITS:
        one, two = _result(out, init), _result(tmp_path, init)
        for key in ("test_acc", "test_loss", "train_acc", "train_loss"):
            assert one[key] == two[key], (init, key)
    for model in ["initial_model"] + [f"checkpoints/{p}further-pretrain-{k}/{TARGET}" for k in FIG1_STEPS
                                      for p in ("", "self-")]:
        assert _read_bytes(out / model / "model.safetensors") == _read_bytes(tmp_path / model / "model.safetensors")
    logs = sorted(os.listdir(tmp_path / "logs"))
    assert len(logs) == 1 + 4 + len(INITS) and "[finetune]" in _read(tmp_path / "logs" / f"finetune-initial-seed{SEED}.log")
    assert _json(tmp_path / "diagnostics.json") == _json(out / "diagnostics.json")


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_rerun_skips_finished_runs_and_a_changed_protocol_is_refused(out, inputs, capsys):
    timings = _read(out / "timings.jsonl")
    assert len(timings.splitlines()) == 2 + 1 + 4 + 6 + 1  # 2 builds, θ₀, 2 x (teacher, student), 6 fine-tunings, diag
    result = out / "results" / TARGET / "initial" / f"seed{SEED}.json"
    before = result.stat().st_mtime_ns
    capsys.readouterr()
    run(tiny_run(inputs, "--jobs", 2, "--workers", 1), out)  # run-control flags may differ
    assert "11 runs, 11 already complete" in capsys.readouterr().out
    assert _read(out / "timings.jsonl") == timings and result.stat().st_mtime_ns == before

    with pytest.raises(UserError, match="finetune_lr"):
        run(tiny_run(inputs, "--finetune_lr", 5e-4), out)
    with pytest.raises(UserError, match="must be one of --fig1_steps"):
        run(tiny_run(inputs, "--further_steps", 5), out)


class ReachedTheRuns(Exception):
    pass


def test_a_mistyped_data_folder_does_not_lock_the_out_dir(inputs, tmp_path, monkeypatch, capsys):
    """A --target_src or --source_src without the data fails in one line, and the corrected command goes on in the
    same folder; before any run, only the settings a built dataset was made from are held to."""
    def reach_the_runs(stages, args, out, record):  # the runs are not what this is about: stop where they start
        raise ReachedTheRuns
    monkeypatch.setattr(sr, "execute", reach_the_runs)
    empty = tmp_path / "empty"
    empty.mkdir()
    for flag, out in (("--target_src", tmp_path / "typo_target"), ("--source_src", tmp_path / "typo_source")):
        mistyped = tiny_run(inputs)
        mistyped[mistyped.index(flag) + 1] = empty
        with pytest.raises(UserError, match=rf"\(here: {flag} DIR\)$"):
            run(mistyped, out)
        with pytest.raises(ReachedTheRuns):
            run(tiny_run(inputs), out)
        assert _json(out / "protocol.json")[flag.removeprefix("--")] == str(dict(zip(["--source_src", "--target_src"],
                                                                                       inputs))[flag])
    out = tmp_path / "typo_target"  # both datasets built, no run yet
    with pytest.raises(ReachedTheRuns):  # a setting of the runs only may still change ...
        run(tiny_run(inputs, "--finetune_lr", 5e-4), out)
    assert _json(out / "protocol.json")["finetune_lr"] == 5e-4
    assert "no run yet" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"typo_target holds a reproduction with other settings \(source_crops: 40 "
                                        r"there, 41 now; data/natural_crops was built with them\)"):
        run(tiny_run(inputs, "--source_crops", 41), out)  # ... one the built crops were made from may not
    assert _json(out / "protocol.json")["source_crops"] == 40


def test_without_apt_get_the_error_names_the_flag_to_pass(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither apt-get nor dpkg-deb
    argv = tiny_run(inputs)
    del argv[:2]  # no --source_src: the Debian packages
    with pytest.raises(UserError, match=r"apt-get and dpkg-deb are not on PATH .*or pass --src DIR.*"
                                        r"\(here: --source_src DIR\)$"):
        run(argv, tmp_path / "out")
    assert not (tmp_path / "out" / "data" / "natural_crops").exists()


FAKE_STAGE = """
import argparse
import os
import time

import utils
from errors import UserError


def get_args_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--fail", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--wait_for", help="end a second after this file exists")
    return p


def main(args):
    print("fake stage ran")
    if args.fail:
        open(args.out + ".failing", "w").close()
        raise UserError("this run was told to fail")
    while args.wait_for and not os.path.exists(args.wait_for):
        time.sleep(0.05)
    time.sleep(1 if args.wait_for else 0)
    with open(args.out, "w") as f:
        f.write("done")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
"""


def test_a_failed_run_is_named_with_its_log_and_starts_no_more(tmp_path, monkeypatch):
    (tmp_path / "fake_stage.py").write_text(FAKE_STAGE)
    monkeypatch.setenv("PYTHONPATH", REPO)  # its imports, as the stages' own folder gives them theirs

    def stage(key, *flags):
        done = tmp_path / f"{key}.done"
        return sr.Stage(key, "finetune", f"run {key}", 1, str(done), str(tmp_path / "fake_stage.py"),
                        ["--out", str(done), *map(str, flags)])
    # the run beside it ends after the failure: its slot would be free for the next
    stages = [stage("bad", "--fail"), stage("good", "--wait_for", tmp_path / "bad.done.failing"), stage("later")]
    args = sr.get_args_parser().parse_args(["--jobs", "2"])
    with pytest.raises(UserError, match=r"run bad failed: this run was told to fail \(its log: .*bad\.log\)"):
        sr.execute(stages, args, str(tmp_path), record=lambda entry: None)
    assert (tmp_path / "good.done").exists()  # the run going on beside it finished ...
    assert not (tmp_path / "later.done").exists()  # ... but none started after the failure
    header, *output = _read(tmp_path / "logs" / "bad.log").splitlines()  # the pool's line naming the start
    assert header.startswith("==== ") and output == ["fake stage ran", "error: this run was told to fail"]


STOP_DRIVER = """
import sys
from lab import small_reproduction as sr
stage = sr.Stage("slow", "finetune", "run slow", 1, sys.argv[1] + "/slow.done", sys.argv[1] + "/fake_stage.py",
                 ["--out", sys.argv[1] + "/slow.done", "--wait_for", sys.argv[1] + "/never"])
sr.execute([stage], sr.get_args_parser().parse_args(["--jobs", "2"]), sys.argv[1], record=print)
"""


def test_sigterm_stops_the_runs_and_exits_143(tmp_path):
    (tmp_path / "fake_stage.py").write_text(FAKE_STAGE)
    proc = subprocess.Popen([sys.executable, "-c", STOP_DRIVER, str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": REPO})
    log = tmp_path / "logs" / "slow.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "fake stage ran" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        (run_pid,) = map(int, f.read().split())  # the run, going
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 143 and "interrupted: the runs were stopped" in err
    assert not os.path.exists(f"/proc/{run_pid}"), "the run outlived its launcher"


# ---------------------------------------------------------------- the reading rules, on made-up numbers

def summary(mean, std, min_train=99.0, n=5):
    return {"n": n, "mean_acc": mean, "std_acc": std, "n_train": n, "min_train_acc": min_train, "groups": []}


def made_up(theta0=(67.0, 1.0), random_init=(62.0, 1.5), further=None, self_=None, min_train=99.0):
    """Summaries by init at steps 250, 1000, 4000: further/self map steps -> (mean, std)."""
    further = further or {250: (69.0, 1.0), 1000: (68.0, 1.0), 4000: (64.0, 1.0)}
    self_ = self_ or {250: (70.0, 1.0), 1000: (71.0, 1.0), 4000: (70.5, 1.0)}
    by_init = {sr.INITIAL: summary(*theta0), sr.RANDOM_INIT: summary(*random_init, min_train=min_train)}
    by_init.update({f"further-pretrain-{k}": summary(*v) for k, v in further.items()})
    by_init.update({f"self-further-pretrain-{k}": summary(*v) for k, v in self_.items()})
    return by_init


ARGS = sr.get_args_parser().parse_args([])  # the protocol's defaults: table at 1000, Fig. 1 at 250, 1000, 4000


def verdicts(outcome):
    return ([g["passed"] for g in outcome["gates"]], [c["holds"] for c in outcome["claims"]])


def test_both_claims_hold_when_the_paper_is_right():
    outcome = sr.read_outcome(made_up(), ARGS)
    assert verdicts(outcome) == ([True, True], [True, True])
    assert outcome["outcome"] == "claim 1 holds; claim 2 holds"


def test_a_failed_gate_means_regime_not_reached_whatever_the_claims_say():
    for by_init, failed in ((made_up(random_init=(66.0, 1.5)), "transfer"),  # +1.0 is within the larger std 1.5
                            (made_up(min_train=94.9), "fit")):
        outcome = sr.read_outcome(by_init, ARGS)
        assert outcome["outcome"] == f"regime not reached ({failed} gate failed): no verdict on the claims"
        assert verdicts(outcome)[1] == [None, None]


def test_claim_rules_use_the_larger_std():
    # claim 1: self-distillation only 0.9 above further pre-training (std 1.0): not above
    assert verdicts(sr.read_outcome(made_up(self_={250: (70.0, 1.0), 1000: (68.9, 1.0), 4000: (70.5, 1.0)}),
                                    ARGS))[1] == [False, True]
    # claim 1: further pre-training below θ₀ by more than the larger std
    further = {250: (69.0, 1.0), 1000: (65.5, 1.0), 4000: (64.0, 1.0)}
    assert verdicts(sr.read_outcome(made_up(further=further, self_={250: (70.0, 1.0), 1000: (71.0, 1.0),
                                                                     4000: (70.5, 1.0)}), ARGS))[1] == [False, True]
    # claim 1: +3.0 is within the larger of the two stds (3.5, not 1.0)
    assert verdicts(sr.read_outcome(made_up(self_={250: (70.0, 1.0), 1000: (71.0, 3.5), 4000: (70.5, 1.0)}),
                                    ARGS))[1] == [False, True]
    # claim 1: further pre-training below θ₀ but within the larger std is "not below"
    further = {250: (69.0, 1.0), 1000: (66.5, 1.0), 4000: (64.0, 1.0)}
    assert verdicts(sr.read_outcome(made_up(further=further), ARGS))[1] == [True, True]
    # claim 2: the decline is from the best step count, wherever it is (here 1000; 250 is as low as 4000)
    further = {250: (64.0, 1.0), 1000: (69.0, 1.0), 4000: (64.5, 1.0)}
    assert verdicts(sr.read_outcome(made_up(further=further), ARGS))[1] == [True, True]
    # claim 2: no decline of further pre-training beyond the larger std (69.0 -> 68.1, std 1.0)
    further = {250: (69.0, 1.0), 1000: (68.0, 1.0), 4000: (68.1, 1.0)}
    assert verdicts(sr.read_outcome(made_up(further=further), ARGS))[1] == [True, False]
    # claim 2: self-distillation declines as well
    self_ = {250: (73.0, 1.0), 1000: (71.0, 1.0), 4000: (70.5, 1.0)}
    assert verdicts(sr.read_outcome(made_up(self_=self_), ARGS))[1] == [True, False]


# ---------------------------------------------------------------- the schedule

def test_the_plan_is_the_graph_s_fig1_table(tmp_path):
    """Each node of launch.graph.fig1_table one run (fine-tuning: one per seed), waiting for what it reads."""
    args = sr.get_args_parser().parse_args(["--further_steps", "4", "--fig1_steps", "8", "4", "--seeds", "1", "2"])
    paths = {name: str(tmp_path / name) for name in ("data", "initial", "checkpoints", "results")}
    stages = sr.plan(args, paths, eval_images=10)
    needs = {s.key: s.needs for s in stages}
    finetunes = [f"finetune-{init}-seed{seed}" for init in sr.inits(args) for seed in (1, 2)]
    assert sorted(needs) == sorted(["source", "further-pretrain-4", "self-further-pretrain-4", "further-pretrain-8",
                                    "self-further-pretrain-8"] + finetunes)
    assert [s.key for s in stages][:7] == ["source", "finetune-random-init-seed1", "finetune-random-init-seed2",
                                           "finetune-initial-seed1", "finetune-initial-seed2", "further-pretrain-4",
                                           "finetune-further-pretrain-4-seed1"]  # the table's step count first
    assert needs["source"] == needs["finetune-random-init-seed2"] == []
    assert needs["finetune-initial-seed1"] == needs["further-pretrain-8"] == ["source"]
    assert needs["self-further-pretrain-8"] == needs["finetune-further-pretrain-8-seed2"] == ["further-pretrain-8"]
    assert needs["finetune-self-further-pretrain-4-seed1"] == ["self-further-pretrain-4"]
    student = next(s for s in stages if s.key == "self-further-pretrain-8")
    assert student.script == "selftrain.py"
    assert student.argv[student.argv.index("--teacher") + 1].endswith(os.path.join("further-pretrain-8", TARGET))



def test_the_schedule_starts_long_chains_first_and_waits_for_what_runs_read():
    def stage(key, steps, needs=()):
        return sr.Stage(key, "further", key, steps, "/nonexistent", "pretrain", [], list(needs))
    stages = [stage("short", 10), stage("a", 100), stage("b", 100, ["a"]), stage("c", 50)]
    priority = sr.priorities(stages)
    seconds = {s.key: s.estimated_seconds() for s in stages}
    assert priority["a"] == seconds["a"] + seconds["b"]
    assert sr.simulate(stages, set(), 1, priority) == pytest.approx(sum(seconds.values()))
    # two at a time: a then b on one worker; c then short on the other, slower side by side
    two = sr.simulate(stages, set(), 2, priority)
    assert two == pytest.approx(sr.run_seconds(stages[1], 2) + sr.run_seconds(stages[2], 2))
    assert sr.run_seconds(stages[1], 2) > seconds["a"]
    assert sr.next_ready(stages, set(), priority).key == "a"
    assert sr.next_ready(stages[2:], set(), priority).key == "c"  # b waits for a
