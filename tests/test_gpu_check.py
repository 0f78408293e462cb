"""lab.gpu_check on CPU: the GPU self-check's correctness part runs on vit-mae-tiny through the real entry point,
writes its report, fails when the --cuda_graph runs depart on purpose, and reports a part past its time cap as
TIMEOUT. (Its rules, lab/gpu_check_rules.py: tests/unit/test_gpu_check_rules.py.)"""
import json
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
    assert [line.split()[:2] for line in lines[1:len(CORRECTNESS) + 1 + len(gpu_check.BENCH_PARTS)]] == (
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


def test_the_accumulation_bench_is_a_part_of_the_report(tmp_path, monkeypatch, capsys):
    """bench-accumulation runs lab.bench_accumulation on the check's device (on a CPU, asked for with --bench: its
    fewest steps at 32 px, fine-tuning only) and reports each configuration with its ratios to --accum_steps 1
    without checkpointing; informational, it never fails the check."""
    code, err, report, markdown = _check(tmp_path, monkeypatch, capsys, "--parts", "bench-accumulation", "--bench")
    assert code == 0, err
    assert _statuses(report) == {"setup": "PASS", "bench-accumulation": "INFO"}
    result = report["bench"]["bench-accumulation"]
    assert result["argv"][:2] == ["--device", "cpu"]
    rows = result["rows"]
    assert [(r["stage"], r["accum_steps"], r["grad_checkpointing"]) for r in rows] == [
        ("finetune", 1, False), ("finetune", 4, False), ("finetune", 1, True), ("finetune", 4, True)]
    assert all(r["images_per_s"] > 0 for r in rows)
    section = markdown.split("## Bench: gradient accumulation and activation checkpointing")[1].split("\n## ")[0]
    assert "`python -m lab.bench_accumulation --device cpu " in section
    table = [line for line in section.splitlines() if line.startswith("| finetune |")]
    assert len(table) == 4 and table[0].split("|")[6].strip() == "1.00"  # the baseline's img/s ratio
    base = rows[0]
    assert table[3].split("|")[6].strip() == f"{rows[3]['images_per_s'] / base['images_per_s']:.2f}"
    summary = {c["id"]: c["summary"] for c in report["checks"]}["bench-accumulation"]
    assert summary.startswith(f"finetune K=4 {rows[1]['images_per_s'] / base['images_per_s']:.2f}x img/s"), summary


def test_on_cuda_the_accumulation_bench_is_vit_b16_at_the_papers_batch():
    """What the part runs on a GPU (planned here without one): ViT-B/16 at batch 64, both stages, every
    configuration, on the check's device; a command lab.bench_accumulation's own parser takes."""
    from lab import bench_accumulation, gpu_check_parts
    plan = gpu_check_parts.make_plan(gpu_check.get_args_parser().parse_args([]), torch.device("cuda:1"))
    argv = plan.bench_argv["bench-accumulation"]
    args = bench_accumulation.get_args_parser().parse_args(argv)
    assert (args.device, args.model, args.batch_size, args.image_size) == ("cuda:1", "vit-b16", 64, 224)
    assert args.stages == list(bench_accumulation.STAGES) and args.steps >= 2
    assert gpu_check.CAPS["cuda"]["bench-accumulation"] and gpu_check.PARTS[-1] == "bench-accumulation"
    # the ratios the report shows
    rows = [{"stage": "finetune", "accum_steps": k, "grad_checkpointing": c, "images_per_s": ips, "peak_mib": mib}
            for k, c, ips, mib in ((4, False, 50.0, 300.0), (1, False, 100.0, 600.0), (1, True, 80.0, 0.0))]
    assert [(speed, memory) for _, speed, memory in bench_accumulation.ratios(rows)] == [
        (0.5, 0.5), (1.0, 1.0), (0.8, 0.0)]
    assert bench_accumulation.ratios(rows[:1]) == [(rows[0], None, None)]  # no baseline: no ratio


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
    # as a user types it: not a sub-make of `make test` (which would print its "Entering directory" lines)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_CHECK_FLAGS=--out {tmp_path / 'check'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stdout.splitlines()[-1].endswith(f"-m lab.gpu_check --out {tmp_path}/check")
    assert out.stderr.splitlines()[0].startswith(NO_GPU[0]) and NO_GPU[1] in out.stderr, out.stderr
    assert not (tmp_path / "check").exists()
