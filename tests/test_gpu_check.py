"""lab.gpu_check on CPU: the GPU self-check's correctness part runs on vit-mae-tiny through the real entry point,
writes its report, fails when the --cuda_graph runs depart on purpose, and reports a part past its time cap as
TIMEOUT; its rules (lab/gpu_check_rules.py) pass what is within bf16 noise and fail what is not."""
import json
import math
import os
import subprocess

import torch

import training
from lab import gpu_check
from lab import gpu_check_rules as rules

from helpers import REPO, assert_one_line, metrics, tool_output

CORRECTNESS = ["setup", "further-pretrain/data_cache_off", "further-pretrain/cuda_graph",
               "self-distill/teacher_features", "self-distill/data_cache_off", "self-distill/cuda_graph",
               "finetune/data_cache_off", "finetune/cuda_graph", "finetune/dropout_in_graph"]


def _check(tmp_path, monkeypatch, capsys, *argv):
    """The CPU part, asked for as a user would; -> (exit code, stderr, report.json, report.md)."""
    out = tmp_path / "check"
    code, _, err = tool_output(gpu_check, ["--out", out, "--device", "cpu", *argv], monkeypatch, capsys)
    with open(out / "report.json") as f:
        report = json.load(f)
    with open(out / "report.md") as f:
        markdown = f.read()
    return code, err, report, markdown


def _statuses(report):
    return {c["id"]: c["status"] for c in report["checks"]}


def test_the_cpu_check_passes_and_writes_its_report(tmp_path, monkeypatch, capsys):
    code, err, report, markdown = _check(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert report["verdict"] == "PASS"
    # the first lines say PASS/FAIL per check, in this order; the bench is skipped on a CPU, and says why
    lines = markdown.splitlines()
    assert lines[0] == (f"# CPU part of the GPU check (no GPU checked): PASS ({len(CORRECTNESS)} of "
                        f"{len(CORRECTNESS)} correctness checks passed)")
    assert [line.split()[:2] for line in lines[1:len(CORRECTNESS) + 4]] == (
        [["PASS", f"{c}:"] for c in CORRECTNESS] + [["SKIP", f"{b}:"] for b in gpu_check.BENCH_PARTS])
    assert lines[:len(report["first_lines"])] == report["first_lines"]
    assert "no GPU here" in lines[len(CORRECTNESS) + 1]
    env = report["environment"]
    assert {"device", "driver", "cuda", "torch", "transformers"} <= set(env) and env["device_type"] == "cpu"
    assert [(p["name"], p["outcome"]) for p in report["parts"]] == (
        [(p, "DONE") for p in gpu_check.PARTS[:4]] + [(p, "SKIP") for p in gpu_check.BENCH_PARTS])
    for rule in rules.RULES.values():  # the rules are printed in the report
        assert rule in markdown

    # three ways per stage, each its own run directory with its own record; on a CPU (fp32) all three give the
    # same numbers, and the report's comparison is of these files
    checks = {c["id"]: c for c in report["checks"]}
    out = tmp_path / "check" / "runs"
    for stage in gpu_check.STAGE_TITLES:
        records = {mode: json.load(open(out / stage / mode / training.RECORD_FILE))["args"]
                   for mode in ("default", "data_cache_off", "cuda_graph")}
        assert [(r["data_cache"], r["cuda_graph"], r["steps"], r["model_name"]) for r in records.values()] == [
            ("auto", False, 12, str(tmp_path / "check" / "setup" / "theta0")),
            ("off", False, 12, str(tmp_path / "check" / "setup" / "theta0")),
            ("auto", True, 12, str(tmp_path / "check" / "setup" / "theta0"))]
        lines = {mode: metrics(out / stage / mode) for mode in records}
        drop = lambda ms: [{k: v for k, v in m.items() if k not in ("images_per_s", "peak_mem_mb")} for m in ms]
        assert drop(lines["default"]) == drop(lines["data_cache_off"]) == drop(lines["cuda_graph"])
        for mode in ("data_cache_off", "cuda_graph"):
            measured = checks[f"{stage}/{mode}"]["measured"]
            assert measured["identical"] and measured["steps"] == 12
            assert measured["final"]["loss"] == [lines["default"][-1]["loss"], lines[mode][-1]["loss"]]
    teacher = checks["self-distill/teacher_features"]["measured"]
    assert teacher["rows"] == 4 * 16 and teacher["bit_equal_rows"] == teacher["rows"]
    dropout = checks["finetune/dropout_in_graph"]["measured"]
    assert dropout["steps"] == 6 and dropout["mismatches"] == 0
    assert dropout["positions"] > 6 * 16 * 65 * 64  # 9 dropout calls a step in vit-mae-tiny, all recorded
    assert all(abs(c - 0.18) < 0.02 for c in dropout["changes"])


def test_negative_controls_fail_the_checks_meant_for_them(tmp_path, monkeypatch, capsys):
    """stale_inputs (step 0's batch, masks and flips every step) fails the loss curves of the --cuda_graph runs;
    fixed_dropout (step 0's dropout seed every step) fails the dropout check; the eager runs stay as they were."""
    code, err, report, markdown = _check(tmp_path, monkeypatch, capsys, "--parts", "further-pretrain", "finetune",
                                         "--negative_control", "stale_inputs", "fixed_dropout")
    assert code == 1
    assert_one_line(err, "the check did not pass", "further-pretrain/cuda_graph", "finetune/dropout_in_graph")
    assert markdown.startswith(f"# {gpu_check.CPU_PART}: FAIL (3 of 6 correctness checks passed; NEGATIVE CONTROL: "
                               "stale_inputs (noticed), fixed_dropout (noticed))")
    assert "**Negative control**" in markdown
    checks = {c["id"]: c for c in report["checks"]}
    assert _statuses(report) == {"setup": "PASS", "further-pretrain/data_cache_off": "PASS",
                                 "further-pretrain/cuda_graph": "FAIL", "finetune/data_cache_off": "PASS",
                                 "finetune/cuda_graph": "FAIL", "finetune/dropout_in_graph": "FAIL"}
    # the stale batch shows in the early steps, where only rounding is allowed
    summary = checks["further-pretrain/cuda_graph"]["summary"]
    assert "loss at step" in summary and "(> 0.005)" in summary, summary
    dropout = checks["finetune/dropout_in_graph"]
    assert "differ from the eager draws of the step's seed (first at step 2)" in dropout["summary"]
    assert dropout["measured"]["changes"] == [0.0] * 5  # the same mask at every step
    # a control that its checks let through is named in the first line
    assert gpu_check._noticed("fixed_dropout", [{"id": "finetune/dropout_in_graph", "status": "PASS"}]) \
        == "NOT NOTICED"


def test_a_part_past_its_cap_is_reported_as_timeout(tmp_path, monkeypatch, capsys):
    """The part is killed (with its process group) at its cap and its checks are TIMEOUT, naming what it was doing;
    the next part still runs (here the minimal CPU bench, informational). A part that the budget leaves too little
    time for is not started, and TIMEOUT too."""
    code, err, report, markdown = _check(tmp_path, monkeypatch, capsys, "--parts", "finetune", "bench-data",
                                         "--bench", "--cap", "finetune=1")
    assert code == 1
    assert_one_line(err, "the check did not pass", "finetune/data_cache_off", "finetune/dropout_in_graph")
    statuses = _statuses(report)
    assert [statuses[c] for c in ("finetune/data_cache_off", "finetune/cuda_graph", "finetune/dropout_in_graph")] \
        == ["TIMEOUT"] * 3
    summary = {c["id"]: c["summary"] for c in report["checks"]}["finetune/cuda_graph"]
    assert summary.startswith("its part ran out of its 1 s cap during: finetune: 12 steps"), summary
    part = {p["name"]: p for p in report["parts"]}["finetune"]
    assert part["outcome"] == "TIMEOUT" and part["seconds"] < 1 + gpu_check.KILL_WAIT_S
    assert markdown.splitlines()[4].startswith("TIMEOUT  finetune/dropout_in_graph: its part ran out")
    assert statuses["bench-data"] == "INFO" and "## Bench: the data path" in markdown

    # 14 s: setup gets its 8 s; then less than the 10 s a part needs is left (14 - 5 kept back - setup's time)
    code, err, report, _ = _check(tmp_path, monkeypatch, capsys, "--parts", "finetune", "--time_budget", "14",
                                  "--cap", "setup=8")
    assert code == 1
    part = {p["name"]: p for p in report["parts"]}
    assert part["setup"]["outcome"] == "DONE"
    assert part["finetune"]["outcome"] == "TIMEOUT" and part["finetune"]["reason"].startswith("not started: ")
    assert _statuses(report)["finetune/cuda_graph"] == "TIMEOUT"


# ----------------------------------------------------------------------------- the command line

def test_bad_input_is_one_line_and_numbers_are_checked(tmp_path, monkeypatch, capsys):
    parser = gpu_check.get_args_parser()
    assert not parser.allow_abbrev
    assert [a.option_strings for a in parser._actions if a.type in (int, float)] == []
    for flag, value, message in (("--steps", "5", "must be at least 6, got 5"),
                                 ("--time_budget", "nan", "finite number"),
                                 ("--cap", "finetune=0", "must be greater than 0"),
                                 ("--cap", "train=30", "expected PART=SECONDS with PART one of setup"),
                                 ("--side_by_side", "0", "greater than 0"), ("--workers", "-1", "at least 0"),
                                 ("--batch_size", "0", "at least 1")):
        code, _, err = tool_output(gpu_check, [flag, value], monkeypatch, capsys)
        assert code == 2 and f"error: argument {flag}: " in err and message in err, (flag, err)
    # a directory it did not write is never cleared
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = tool_output(gpu_check, ["--out", mine, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, f"--out {mine} holds files this tool did not write")
    assert os.listdir(mine) == ["notes.txt"]


NO_GPU = ("error: no CUDA device visible to torch (", "); nothing was checked on a GPU. Run it where torch sees "
          "the GPU, or pass --device cpu to run the CPU part alone")


def test_without_a_gpu_it_says_so_first_and_checks_nothing(tmp_path, monkeypatch, capsys):
    """Where torch sees no CUDA device, the check is not passed off as a GPU's: one line says so and how to run the
    CPU part, exit 2, and --out is left as it was; with --device cpu the report's title says what was checked."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for torch, on any machine
    for argv in ([], ["--device", "cuda:1"]):
        code, out, err = tool_output(gpu_check, ["--out", tmp_path / "check", *argv], monkeypatch, capsys)
        assert code == 2 and out == ""
        line = assert_one_line(err, *NO_GPU, "CUDA_VISIBLE_DEVICES is ''")
        assert line.startswith(NO_GPU[0]), line
        assert not (tmp_path / "check").exists()
    assert gpu_check.report_title({"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda"}, "cuda") == \
        "GPU check on NVIDIA H100 80GB HBM3"
    assert gpu_check.report_title({"device": "x86_64", "device_type": "cpu"}, "auto") == gpu_check.CPU_PART
    assert gpu_check.report_title(None, "cpu") == gpu_check.CPU_PART


def test_make_gpu_check_runs_the_command(tmp_path):
    """make gpu-check is the GPU check: without a GPU it stops, and its first line says why."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(["make", "gpu-check", f"GPU_CHECK_FLAGS=--out {tmp_path / 'check'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stdout.splitlines()[-1].endswith(f"-m lab.gpu_check --out {tmp_path}/check")
    assert out.stderr.splitlines()[0].startswith(NO_GPU[0]) and NO_GPU[1] in out.stderr, out.stderr
    assert not (tmp_path / "check").exists()


# ----------------------------------------------------------------------------- the rules

def _lines(losses, grad_norms=None, lr=1e-4, **terms):
    return [{"step": i + 1, "lr": lr, "loss": loss, "grad_norm": 1.0 if grad_norms is None else grad_norms[i],
             **{k: v[i] for k, v in terms.items()}} for i, loss in enumerate(losses)]


def test_curves_within_bf16_noise_pass_and_departures_fail():
    reference = [2.0 - 0.01 * i + 0.02 * math.sin(i) for i in range(60)]  # noisy, slowly falling
    same = rules.compare_curves(_lines(reference), _lines(reference), [])
    assert same.status == rules.PASS and same.summary == "bit-identical over 60 steps"
    # rounding early, a chaotic ±2 % per step later: within the rules
    noisy = [x * (1 + 1e-4 * (-1) ** i) if i < 8 else x * (1 + 0.02 * (-1) ** i) for i, x in enumerate(reference)]
    verdict = rules.compare_curves(_lines(reference), _lines(noisy), [])
    assert verdict.status == rules.PASS and not verdict.measured["identical"], verdict.summary
    # another batch at step 2 (1 %), beyond the early bound
    other = list(reference)
    other[1] *= 1.01
    verdict = rules.compare_curves(_lines(reference), _lines(other), [])
    assert verdict.status == rules.FAIL and "loss at step 2 differs by 0.01" in verdict.summary
    # a gradient norm off early, a loss term drifting later, another learning rate, other steps
    assert "grad_norm at step 5" in rules.compare_curves(
        _lines(reference), _lines(reference, grad_norms=[1.0] * 4 + [1.01] + [1.0] * 55), []).summary
    drift = [x * (1.06 if i >= 30 else 1.0) for i, x in enumerate(reference)]
    verdict = rules.compare_curves(_lines(reference, mae_loss=reference), _lines(reference, mae_loss=drift),
                                   ["mae_loss"])
    assert verdict.status == rules.FAIL
    assert "mae_loss over steps" in verdict.summary and "by 6.0% (> 4%)" in verdict.summary
    assert "learning rates differ from step 1" in rules.compare_curves(
        _lines(reference), _lines(reference, lr=1.001e-4), []).summary
    float32_rate = float(torch.tensor(1e-4, dtype=torch.float32))  # what the --cuda_graph run logs on CUDA
    assert rules.compare_curves(_lines(reference), _lines(reference, lr=float32_rate), []).status == rules.PASS
    assert rules.compare_curves(_lines(reference), _lines(reference[:-1]), []).summary.startswith(
        "logged steps differ: 60 vs 59")
    # a loss falling towards 0 is held to half its first window's level, not to a relative bound on ~0
    falling = [2.0 * 0.9 ** i for i in range(60)]
    off = [x + 0.005 if i >= 8 else x for i, x in enumerate(falling)]  # 0.005 on values down to 0.004
    verdict = rules.compare_curves(_lines(falling), _lines(off), [])
    assert verdict.status == rules.PASS, verdict.summary
    assert max(verdict.measured["windows"]["loss"]["other"][-1] / verdict.measured["windows"]["loss"]["reference"][-1]
               - 1, 0) > rules.CURVE_RTOL  # relative to the value itself it would be far off


def test_teacher_rule_notices_a_row_of_another_image():
    g = torch.Generator().manual_seed(0)
    # features of different images only 1 % apart (a random teacher's CLS features can be this close)
    online = torch.ones(8, 16) + 0.01 * torch.randn(8, 16, generator=g)
    exact = rules.TeacherComparison()
    exact.add(online.clone(), online)
    assert exact.verdict().status == rules.PASS and exact.bit_equal == 8
    rounded = rules.TeacherComparison()
    rounded.add(online.bfloat16().float(), online)  # bf16 rounding of every element
    assert rounded.verdict().status == rules.PASS, rounded.verdict().summary
    shifted = rules.TeacherComparison()
    shifted.add(online.roll(1, dims=0), online)  # each row looked up for the neighbouring image
    verdict = shifted.verdict()
    assert shifted.max_rel < rules.TEACHER_RTOL  # the norm bound alone would not notice
    assert verdict.status == rules.FAIL and "closer to its own image's" in verdict.summary
    # the same image twice in a batch (a batch across two epochs) is not "another image", even when rounded
    twice = rules.TeacherComparison()
    twice.add(online[[0, 0, 1]].bfloat16().float(), online[[0, 0, 1]])
    assert twice.verdict().status == rules.PASS, twice.verdict().summary


def test_dropout_rule_wants_the_step_seeds_masks():
    p, shape = 0.1, (4, 50, 64)
    draw = lambda seed: torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p
    known = [torch.ones(shape, dtype=torch.bool)]

    def compare(recorded_seeds):
        comparison, previous = rules.DropoutComparison(p), None
        for step, seed in enumerate(recorded_seeds):
            dropped = [draw(seed)]
            comparison.add(step, dropped, known, [draw(100 + step)], previous)
            previous = (dropped[0], known[0])
        return comparison.verdict()
    assert compare([100, 101, 102, 103]).status == rules.PASS
    frozen = compare([100, 100, 100, 100])  # the first mask replayed at every step
    assert frozen.status == rules.FAIL and "first at step 2" in frozen.summary
    assert "consecutive steps' masks differ at 0" in frozen.summary
    assert "differ from the eager draws" in compare([100, 101, 7, 103]).summary
