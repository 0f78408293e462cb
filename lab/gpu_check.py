"""Does this repository run correctly, and how fast, on this machine? One command, for any CUDA machine:

    python -m lab.gpu_check                 # or: make gpu-check; writes runs/gpu-check/report.md and report.json
    python -m lab.gpu_check --negative_control stale_inputs   # the same, with a departure the check must FAIL

1. the environment: device, driver, CUDA, torch, transformers;
2. each stage's own main() for a few hundred steps (200 on CUDA) on the built-in digits dataset, with ViT-B/16's
   architecture (random weights, saved once as a model directory: no Hub), three ways: eager with the default
   paths, eager with --data_cache off, --cuda_graph; the loss curves (each run's metrics.jsonl) compared within
   bf16 noise; the teacher's features looked up against the ones computed on-line; dropout inside the replayed
   graph against the per-step seed (the rules: lab/gpu_check_rules.py, printed at the start and in the report);
3. lab.bench: the three stages eager and with --cuda_graph against the release's computation, MFU, the
   projection of the paper's whole table, the data path; lab.bench_accumulation: peak memory and speed with and
   without --accum_steps / --grad_checkpointing, side by side (informational: never fail the check);
4. one report, Markdown and JSON, whose first lines say PASS/FAIL per check; exit code 1 when a correctness check
   did not pass (FAIL, ERROR, TIMEOUT), 2 for bad input, 0 otherwise;
5. every part in a child process of its own with a time cap, inside a total budget (480 s by default), so the
   check ends within ~8 minutes on an H100/H200 even if a part hangs (a capture, say): a part that runs out of
   time is killed with its process group and its undecided checks are reported as TIMEOUT.

The children are forked from this process after the libraries are imported (once) and before anything touches
CUDA, which each child then initialises for itself. Where torch sees no CUDA device the check stops first, with
one line saying so (exit 2), so that nothing passes for a GPU's check; --device cpu asks for the CPU part: the
correctness parts on vit-mae-tiny (12 steps, batch 16), the bench skipped (--bench runs a minimal one), the
report titled "CPU part of the GPU check (no GPU checked)"; tests/test_gpu_check.py runs it.
"""
import argparse
import datetime
import importlib.util
import multiprocessing
import os
import shutil
import signal
import sys
import time
import traceback
import warnings

import torch

import outputs
import utils
from lab import gpu_check_rules as rules

PARTS = ("setup", "further-pretrain", "self-distill", "finetune", "bench", "bench-cuda-graph", "bench-data",
         "bench-accumulation")
BENCH_PARTS = ("bench", "bench-cuda-graph", "bench-data", "bench-accumulation")
STAGE_TITLES = {"further-pretrain": "further pre-training", "self-distill": "self-distillation",
                "finetune": "fine-tuning"}


def _curve_checks(stage: str) -> list[tuple[str, str]]:
    title = STAGE_TITLES[stage]
    return [(f"{stage}/data_cache_off", f"{title}: loss curves, eager default vs eager --data_cache off"),
            (f"{stage}/cuda_graph", f"{title}: loss curves, eager default vs --cuda_graph")]


# part -> the checks it decides: (id, title); the bench parts' "checks" are informational
CHECKS = {
    "setup": [("setup", "environment printed, θ₀ and the teacher saved, the dataset built")],
    "further-pretrain": _curve_checks("further-pretrain"),
    "self-distill": [("self-distill/teacher_features",
                      "self-distillation: teacher features looked up vs computed on-line"),
                     *_curve_checks("self-distill")],
    "finetune": [*_curve_checks("finetune"),
                 ("finetune/dropout_in_graph", "fine-tuning: dropout inside the replayed graph follows the per-step "
                                               "seed")],
    "bench": [("bench", "bench: the three stages, eager, against the release's computation; the projection")],
    "bench-cuda-graph": [("bench-cuda-graph", "bench: the three stages with --cuda_graph")],
    "bench-data": [("bench-data", "bench: the data path")],
    "bench-accumulation": [("bench-accumulation", "bench: peak memory and speed with and without --accum_steps 4 "
                                                  "and --grad_checkpointing")],
}
# the checks meant to notice each negative control (lab/gpu_check_parts.NEGATIVE_CONTROLS)
NOTICED_BY = {"stale_inputs": [f"{stage}/cuda_graph" for stage in STAGE_TITLES],
              "fixed_dropout": ["finetune/dropout_in_graph"]}
# seconds per part after setup. On an H200 (estimates from measured eager figures: ~1,100 / 780 / 910 img/s) a
# stage part takes about a minute and a bench part about as long; the caps leave room for a slower GPU, while the
# total budget keeps the whole check within ~8 minutes
# bench-accumulation: 8 fresh processes (2 stages x 4 configurations), each starting CUDA and building ViT-B/16
# for 4 steps; it comes last, so a tight budget cuts it, never a correctness part
CAPS = {"cuda": {"further-pretrain": 100, "self-distill": 120, "finetune": 110, "bench": 110, "bench-cuda-graph": 80,
                 "bench-data": 70, "bench-accumulation": 120},
        "cpu": dict.fromkeys(PARTS[1:], 240)}
SETUP_CAP = 120  # the device is known only once setup has run
REPORT_RESERVE_S = 5  # kept back from the budget for killing a part and writing the report
MIN_PART_S = 10  # a part is not started with less time than this left
KILL_WAIT_S = 10
CUDA_PROBE_S = 60  # initialising the driver takes seconds; a hung one is taken as no CUDA
CPU_PART = "CPU part of the GPU check (no GPU checked)"  # the report's title where no GPU was checked
MARKER = ".gpu-check"  # marks a directory this tool wrote, which it may clear
OUR_ENTRIES = ("report.md", "report.json", "logs", "parts", "runs", "setup", "data", MARKER)
REQUIRED_PACKAGES = ("numpy", "PIL", "sklearn", "lmdb", "safetensors", "transformers")
# targets for an H100/H200 (BENCHMARKS.md), shown beside the bench's figures
TARGET_RATIO, TARGET_FINETUNE_MFU, TARGET_TABLE_HOURS = 3.0, 0.35, 5.0
TARGET_IMAGES_PER_S = {"further-pretrain": 2400, "self-distill": 1300, "finetune": 2800}


def part_cap(value: str) -> tuple[str, float]:
    """An argparse type: PART=SECONDS."""
    name, _, seconds = value.partition("=")
    if name not in PARTS:
        raise argparse.ArgumentTypeError(f"expected PART=SECONDS with PART one of {', '.join(PARTS)}, got '{value}'")
    return name, utils.finite_float(0, low_open=True)(seconds)



def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="A self-check of this repository on this machine: the stages' speed "
                                            "paths against the eager step, then the bench; one report.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--out", default=os.path.join("runs", "gpu-check"),
                   help="the report (report.md, report.json), the runs, logs and models; a directory this tool "
                        "wrote before is cleared first, any other non-empty one refused")
    p.add_argument("--device", type=utils.device_spec, default="cuda",
                   help="cuda or cuda:N: where torch sees no CUDA device the check stops and says so; cpu: the CPU "
                        "part alone (no GPU checked); auto: cuda if torch sees one, else the CPU part")
    g = p.add_argument_group("the stages' runs")
    g.add_argument("--model", default=None, choices=["vit-b16", "vit-mae-tiny"],
                   help="θ₀'s architecture (random weights): default vit-b16 on CUDA, vit-mae-tiny on CPU")
    g.add_argument("--steps", type=utils.int_at_least(6), default=None,
                   help="steps per run (default 200 on CUDA, 12 on CPU); at least 6, so that --cuda_graph's "
                        "3 warm-up steps and the captured step are followed by replays")
    g.add_argument("--batch_size", type=utils.int_at_least(1), default=None,
                   help="one global batch for every stage (default: the paper's 64 / 64 / 32 on CUDA, 16 on CPU)")
    g.add_argument("--workers", type=utils.int_at_least(0), default=None,
                   help="DataLoader workers of the runs (default: min(8, CPUs) on CUDA, 0 on CPU)")
    g.add_argument("--negative_control", nargs="+", default=None, choices=["stale_inputs", "fixed_dropout"],
                   help="make the --cuda_graph runs depart on purpose, to see the check FAIL: stale_inputs feeds "
                        "step 0's batch, masks and flips at every step (the loss-curve checks must fail), "
                        "fixed_dropout seeds every step's dropout like step 0 (the dropout check must fail)")
    g = p.add_argument_group("the bench (informational)")
    g.add_argument("--bench", action=argparse.BooleanOptionalAction, default=None,
                   help="run lab.bench after the checks (default: on CUDA only; on a CPU a minimal one)")
    g.add_argument("--side_by_side", type=utils.finite_float(0, low_open=True), default=2.4,
                   help="the eager bench's projection: fine-tuning runs side by side multiply their img/s by this "
                        "(2.4: measured for 3 eager runs on an H200); the --cuda_graph bench uses 1")
    g = p.add_argument_group("time")
    g.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="which parts to run (setup always runs: the others need it)")
    g.add_argument("--time_budget", type=utils.finite_float(0, low_open=True), default=480.0,
                   help="seconds for the whole check; a part gets at most what is left")
    g.add_argument("--cap", type=part_cap, action="append", default=[], metavar="PART=SECONDS",
                   help=f"another time cap for a part (repeatable); defaults on CUDA: "
                        f"setup {SETUP_CAP}, {', '.join(f'{k} {v:g}' for k, v in CAPS['cuda'].items())} s")
    return p


# ----------------------------------------------------------------------------- running the parts

class PartResult:
    """How a part ended: DONE (its process exited normally), ERROR (it exited otherwise), TIMEOUT (killed at its
    cap), NOT RUN, SKIP; and what it reported."""

    def __init__(self, name, outcome, seconds=0.0, cap=None, exit_code=None, events=(), log=None, reason=""):
        self.name, self.outcome, self.seconds, self.cap, self.exit_code = name, outcome, seconds, cap, exit_code
        self.events, self.log, self.reason = list(events), log, reason

    def info(self, key):
        return next((e["value"] for e in self.events if e["kind"] == "info" and e["key"] == key), None)

    def check(self, check_id):
        return next((e for e in self.events if e["kind"] == "check" and e["id"] == check_id), None)

    def error(self):
        return next((e for e in reversed(self.events) if e["kind"] == "error"), None)

    def last_progress(self):
        return next((e["what"] for e in reversed(self.events) if e["kind"] == "progress"), None)

    def as_dict(self):
        return {"name": self.name, "outcome": self.outcome, "seconds": round(self.seconds, 1), "cap": self.cap,
                "exit_code": self.exit_code, "log": self.log, "reason": self.reason}


def _child(fn, log_path: str, events_path: str, fn_args: tuple) -> None:
    """The body of a part's process: its own process group (killed whole at the cap, DataLoader workers too), its
    output in its log, one error event if it fails."""
    from lab.gpu_check_parts import Events
    os.setpgid(0, 0)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
    events = Events(events_path)
    try:
        fn(events, *fn_args)
    except utils.UserError as e:
        print(f"error: {utils.one_line(e)}", flush=True)
        events.emit("error", message=utils.one_line(e), user_error=True)
        sys.exit(2)
    except BaseException as e:
        traceback.print_exc()
        events.emit("error", message=f"{type(e).__name__}: {utils.one_line(e)}")
        sys.exit(1)


def run_part(name: str, fn, fn_args: tuple, cap: float, out: str) -> PartResult:
    from lab.gpu_check_parts import read_events
    log, events_path = os.path.join(out, "logs", f"{name}.log"), os.path.join(out, "parts", f"{name}.jsonl")
    assert not torch.cuda.is_initialized(), "CUDA was initialised before forking: a forked child could not use it"
    sys.stdout.flush()
    sys.stderr.flush()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(fn, log, events_path, fn_args),
                                                          name=f"gpu-check {name}")
    start = time.monotonic()
    process.start()
    try:
        process.join(cap)
    except KeyboardInterrupt:
        _kill(process)
        raise
    timed_out = process.is_alive()
    if timed_out:
        _kill(process)
    seconds = time.monotonic() - start
    outcome = "TIMEOUT" if timed_out else "DONE" if process.exitcode == 0 else "ERROR"
    return PartResult(name, outcome, seconds, cap, process.exitcode, read_events(events_path),
                      os.path.relpath(log, out))


def _kill(process) -> None:
    """SIGKILL to the part's process group (a process stuck in a CUDA call may not heed anything else)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not yet its own group leader
        process.kill()
    process.join(KILL_WAIT_S)


def check_status(part: PartResult | None, check_id: str) -> tuple[str, str, dict]:
    """(status, summary, measured) of one check: what its part reported, else what became of the part."""
    event = part.check(check_id) if part is not None else None
    if event is not None:
        return event["status"], event["summary"], event.get("measured", {})
    if part is None:
        return "PENDING", "not run yet", {}
    if part.outcome == "TIMEOUT":
        doing = part.last_progress()
        return "TIMEOUT", (part.reason or f"its part ran out of its {part.cap:.0f} s cap" +
                           (f" during: {doing}" if doing else "")), {}
    if part.outcome in ("NOT RUN", "SKIP"):
        return part.outcome, part.reason, {}
    error = part.error()
    message = error["message"] if error else f"exit code {part.exit_code}"
    return "ERROR", f"its part ended without deciding it: {message} (see {part.log})", {}


# ----------------------------------------------------------------------------- main

def require_packages() -> None:
    missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise utils.UserError(f"missing Python packages: {', '.join(missing)} (pip install -r requirements.txt; on a "
                              f"machine without network, bring their wheels and put them on PYTHONPATH)")


def cuda_devices() -> tuple[int, str]:
    """(how many CUDA devices torch sees, why none when 0), asked in a forked child: torch.cuda.is_available()
    initialises the CUDA driver, after which the parts, forked from this process, could not use CUDA."""
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    probe = multiprocessing.get_context("fork").Process(target=_count_cuda_devices, args=(send,),
                                                        name="gpu-check cuda probe")
    probe.start()
    send.close()
    try:
        count, warned = receive.recv() if receive.poll(CUDA_PROBE_S) else (0, "torch's CUDA probe did not answer")
    except EOFError:  # the probe died (a broken driver can take the process down)
        count, warned = 0, "torch's CUDA probe crashed"
    probe.join(KILL_WAIT_S)
    if probe.is_alive():
        probe.kill()
        probe.join()
    if count:
        return count, ""
    reasons = [f"this torch ({torch.__version__}) was built without CUDA"] if torch.version.cuda is None else []
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        reasons.append(f"CUDA_VISIBLE_DEVICES is {os.environ['CUDA_VISIBLE_DEVICES']!r}")
    reasons += [warned] if warned else []
    return 0, "; ".join(reasons) or (f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, finds no "
                                     f"driver or device")


def _count_cuda_devices(send) -> None:
    with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA is unusable in a warning
        warnings.simplefilter("always")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    send.send((count, utils.one_line(caught[-1].message) if caught else ""))


def prepare_out(out: str) -> str:
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
        raise utils.UserError(f"--out {out} holds files this tool did not write; choose another directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise utils.UserError(f"--out {out} is a file; give a directory")
    try:
        for entry in OUR_ENTRIES:
            path = os.path.join(out, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        for sub in ("logs", "parts"):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        open(os.path.join(out, MARKER), "w").close()
    except OSError as e:
        raise utils.UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return out


def main(args) -> dict:
    require_packages()
    if args.device.startswith("cuda"):  # before anything is written or printed: the first line says it
        count, why_none = cuda_devices()
        if count == 0:
            raise utils.UserError(f"no CUDA device visible to torch ({why_none}); nothing was checked on a GPU. "
                                  f"Run it where torch sees the GPU, or pass --device cpu to run the CPU part alone")
    out = prepare_out(args.out)
    # imported here, after the check above: it imports the stages and with them lmdb, transformers, ...; the
    # children are forked after this import and inherit it
    from lab import gpu_check_parts as parts
    selected = [p for p in PARTS if p == "setup" or p in args.parts]
    state = {"args": args, "selected": selected, "results": {}, "plan": None,
             "started": datetime.datetime.now().astimezone(), "clock": time.monotonic()}
    print(f"[gpu-check] report: {os.path.join(out, 'report.md')}; rules:", flush=True)
    for name, rule in rules.RULES.items():
        print(f"  {name}: {rule}", flush=True)
    if args.negative_control:
        print(f"[gpu-check] negative control, the checks must FAIL: "
              f"{'; '.join(parts.NEGATIVE_CONTROLS[c] for c in args.negative_control)}", flush=True)

    for name in selected:
        result = _run_or_skip(name, state, parts, out)
        state["results"][name] = result
        if name == "setup":
            error = result.error()
            if error and error.get("user_error"):  # e.g. --device cuda where there is none
                raise utils.UserError(error["message"])
            plan, env = result.info("plan"), result.info("environment")
            state["plan"] = parts.Plan(**plan) if plan else None
            if env:
                print("[gpu-check] " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
        report = write_report(state, out)
        decided = [c for c in report["checks"] if c["part"] == name]
        print(f"[gpu-check] {name}: {result.outcome} in {result.seconds:.1f} s; "
              + "; ".join(f"{c['status']} {c['id']}" for c in decided), flush=True)

    print("", flush=True)
    print("\n".join(report["first_lines"]), flush=True)
    print(f"[gpu-check] {os.path.join(out, 'report.md')} and report.json", flush=True)
    if report["verdict"] != rules.PASS:
        failed = [c["id"] for c in report["checks"] if c["correctness"] and c["status"] != rules.PASS]
        raise utils.RunFailed(f"the check did not pass: {', '.join(failed)} (see {os.path.join(out, 'report.md')})")
    return report


def _run_or_skip(name: str, state: dict, parts, out: str) -> PartResult:
    """Runs part `name` under its cap (at most what the budget has left), or says why it does not run."""
    args, plan = state["args"], state["plan"]
    left = args.time_budget - (time.monotonic() - state["clock"]) - REPORT_RESERVE_S
    if name == "setup":
        wanted = dict(args.cap).get(name, SETUP_CAP)
    elif plan is None:
        return PartResult(name, "NOT RUN", reason="setup did not finish")
    elif name in BENCH_PARTS and name not in plan.bench_argv:
        return PartResult(name, "SKIP", reason="no GPU here: the bench is for GPUs (--bench runs a minimal one; "
                                               "python -m lab.bench the real one)")
    else:
        wanted = dict(args.cap).get(name, CAPS["cuda" if plan.device_type == "cuda" else "cpu"][name])
    cap = min(wanted, left)
    if cap < min(MIN_PART_S, wanted):  # too little time left for it (a cap asked for below that is kept)
        return PartResult(name, "TIMEOUT", cap=0, reason=f"not started: {max(left, 0):.0f} s of the "
                                                         f"{args.time_budget:g} s budget were left")
    if name == "setup":
        fn, fn_args = parts.setup, (args,)
    elif name in BENCH_PARTS:
        fn, fn_args = parts.bench_part, (plan, name)
    else:
        fn, fn_args = parts.stage_part, (plan, name)
    print(f"[gpu-check] {name} (cap {cap:.0f} s) ...", flush=True)
    return run_part(name, fn, fn_args, cap, out)


# ----------------------------------------------------------------------------- the report

def write_report(state: dict, out: str) -> dict:
    """report.json and report.md from the parts so far (rewritten after each part, so that a check stopped from
    outside still leaves one)."""
    args, results, plan = state["args"], state["results"], state["plan"]
    checks = []
    for part in state["selected"]:
        for check_id, title in CHECKS[part]:
            status, summary, measured = check_status(results.get(part), check_id)
            checks.append({"id": check_id, "title": title, "part": part, "status": status, "summary": summary,
                           "measured": measured, "correctness": part not in BENCH_PARTS})
    correctness = [c for c in checks if c["correctness"]]
    passed = sum(c["status"] == rules.PASS for c in correctness)
    verdict = rules.PASS if passed == len(correctness) else rules.FAIL
    controls = ", ".join(f"{c} ({_noticed(c, checks)})" for c in args.negative_control or [])
    setup = results.get("setup")
    env = setup.info("environment") if setup else None
    first = [f"# {report_title(env, args.device)}: {verdict} ({passed} of {len(correctness)} correctness checks "
             f"passed{'; NEGATIVE CONTROL: ' + controls if controls else ''})"]
    first += [f"{c['status']:<8} {c['id']}: {c['summary']}" for c in checks]
    runs = [e for r in results.values() for e in r.events if e["kind"] == "run"]
    bench = {name: results[name].info(name) for name in BENCH_PARTS if name in results and results[name].info(name)}
    command = " ".join(["python -m lab.gpu_check", *sys.argv[1:]])
    report = {"verdict": verdict, "first_lines": first, "command": command,
              "started": state["started"].isoformat(timespec="seconds"),
              "seconds": round(time.monotonic() - state["clock"], 1), "time_budget": args.time_budget,
              "negative_control": args.negative_control or [], "environment": env,
              "plan": None if plan is None else {k: v for k, v in vars(plan).items()}, "rules": rules.RULES,
              "checks": checks, "parts": [r.as_dict() for r in results.values()], "runs": runs, "bench": bench}
    outputs.write_json(os.path.join(out, "report.json"), report)
    with outputs.atomic_file(os.path.join(out, "report.md")) as f:
        f.write("\n".join(first) + "\n\n" + markdown_body(report) + "\n")
    return report


def report_title(env: dict | None, device: str) -> str:
    """What was checked: the GPU by name, or the CPU part alone (so that a PASS on a CPU is never read as a GPU's)."""
    if env is None:  # setup did not finish
        return CPU_PART if device == "cpu" else "GPU check"
    return f"GPU check on {env['device']}" if env["device_type"] == "cuda" else CPU_PART


def _noticed(control: str, checks: list[dict]) -> str:
    """Whether a check meant to notice a negative control failed: a check that cannot fail proves nothing."""
    meant = [c for c in checks if c["id"] in NOTICED_BY[control]]
    if not meant:
        return "no check of it selected"
    return "noticed" if any(c["status"] == rules.FAIL for c in meant) else "NOT NOTICED"


def _cell(value, fmt="{:.4g}") -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown_body(report: dict) -> str:
    from lab.gpu_check_parts import MODES, NEGATIVE_CONTROLS
    lines = [f"`{report['command']}`, started {report['started']}, {report['seconds']:.0f} s of the "
             f"{report['time_budget']:g} s budget."]
    if report["negative_control"]:
        lines += ["", "**Negative control** (the checks meant to notice it must FAIL): "
                  + "; ".join(NEGATIVE_CONTROLS[c] for c in report["negative_control"]) + "."]
    env = report["environment"]
    if env:
        lines += ["", "## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    plan = report["plan"]
    if plan:
        lines += ["", f"Runs: θ₀ {plan['model']} (random weights), digits, {plan['steps']} steps, batches "
                      + ", ".join(f"{k} {v}" for k, v in plan["batch"].items())
                      + f", {plan['workers']} workers, one metrics line per step (each syncs the device: the "
                        f"img/s below are not the bench's)."]
        if plan["device_type"] != "cuda":
            lines += ["On a CPU --cuda_graph runs the same static-buffer step without capture."]
    lines += ["", "## Rules", ""] + [f"- **{name}**: {rule}" for name, rule in report["rules"].items()]

    lines += ["", "## Checks", "", "| check | status | what | result |", "|---|---|---|---|"]
    lines += [f"| {c['id']} | {c['status']} | {c['title']} | {c['summary']} |" for c in report["checks"]]

    if report["runs"]:
        what = {name: w for name, _, w in MODES}
        lines += ["", "## Runs", "", "| stage | run | steps | seconds | img/s (median) | peak MiB | final loss | "
                  "test acc |", "|---|---|---|---|---|---|---|---|"]
        for r in report["runs"]:
            lines.append(f"| {r['stage']} | {r['name']}: {what.get(r['mode'], r['mode'])} | {r['steps']} | "
                         f"{r['seconds']:.1f} | {r['images_per_s']:.1f} | {r['peak_mem_mb']:.0f} | "
                         f"{r['final_loss']:.4f} | {_cell(r.get('test_acc'), '{:.3f}')} |")
    curves = [c for c in report["checks"] if c["measured"].get("early")]
    if curves:
        lines += ["", "## Loss curves", "", "| check | steps | identical | steps 1-8, max rel. diff (key, step) | "
                  "windows, max rel. diff (key) | another batch moves a step by | final (reference / run) |",
                  "|---|---|---|---|---|---|---|"]
        for c in curves:
            m = c["measured"]
            key, early = max(m["early"].items(), key=lambda kv: kv[1]["max_rel"])
            windows = sorted(((v["max_rel"], k) for k, v in m["windows"].items()), reverse=True)
            window = f"{windows[0][0]:.2%} ({windows[0][1]})" if windows else "n/a"
            final = ", ".join(f"{k} {a:.4f} / {b:.4f}" for k, (a, b) in m["final"].items())
            early = f"{early['max_rel']:.2g} ({key}, {early['at_step']})" if early["max_rel"] else "0"
            lines.append(f"| {c['id']} | {m['steps']} | {'yes' if m['identical'] else 'no'} | {early} | {window} | "
                         f"{_cell(m['step_to_step_median_rel'], '{:.2%}')} | {final} |")
    lines += _bench_sections(report)
    lines += ["", "## Parts", "", "| part | outcome | seconds | cap | log |", "|---|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['outcome']}{' (' + p['reason'] + ')' if p['reason'] else ''} | {p['seconds']} | "
              f"{_cell(p['cap'], '{:.0f}')} | {p['log'] or ''} |" for p in report["parts"]]
    return "\n".join(lines)


def _bench_sections(report: dict) -> list[str]:
    bench, lines = report["bench"], []
    cuda = report["plan"] is not None and report["plan"]["device_type"] == "cuda"
    for name in ("bench", "bench-cuda-graph"):
        if name not in bench:
            continue
        result = bench[name]
        lines += ["", f"## {'Bench' if name == 'bench' else 'Bench with --cuda_graph'}",
                  "", f"`python -m lab.bench {' '.join(result['argv'])}`", "",
                  "| stage | batch | ours img/s | release img/s | ratio | ours MiB | release MiB | ours MFU | "
                  "release MFU |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            cells = [r["stage"], r["batch"], f"{r['ours_images_per_s']:.4g}", f"{r['reference_images_per_s']:.4g}",
                     f"{r['ratio']:.2f}", _cell(r["ours_peak_mib"], "{:.0f}"), _cell(r["reference_peak_mib"], "{:.0f}"),
                     _cell(r["ours_mfu"], "{:.1%}"), _cell(r["reference_mfu"], "{:.1%}")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        projection = result.get("projection")
        if projection:
            lines += ["", f"The paper's whole table at these rates ({projection['table_flops'] / 1e18:.3g} EFLOP as "
                          f"the release computes it): ours {projection['ours_gpu_hours']:.3g} GPU-hours (fine-tuning "
                          f"side by side x{projection['side_by_side']:g}, MFU {_cell(projection['ours_mfu'], '{:.1%}')}"
                          f"), the release's {projection['reference_gpu_hours']:.3g} (MFU "
                          f"{_cell(projection['reference_mfu'], '{:.1%}')}): "
                          f"{projection['reference_gpu_hours'] / projection['ours_gpu_hours']:.2f}x."]
        if cuda:
            lines += ["", "Targets (H100/H200): " + "; ".join(_targets(result))]
    if "bench-accumulation" in bench:
        result = bench["bench-accumulation"]
        memory = ("torch.cuda.max_memory_allocated over the steps (weights included)" if cuda else
                  "what the steps added to the process's peak RSS")
        lines += ["", "## Bench: gradient accumulation and activation checkpointing", "",
                  f"`python -m lab.bench_accumulation {' '.join(result['argv'])}`: each configuration in a fresh "
                  f"process; peak MiB: {memory}; the ratios against --accum_steps 1 without checkpointing.", "",
                  "| stage | --accum_steps | --grad_checkpointing | img/s | peak MiB | img/s ratio | memory ratio |",
                  "|---|---|---|---|---|---|---|"]
        from lab.bench_accumulation import ratios
        for r, speed, memory_ratio in ratios(result["rows"]):
            lines.append(f"| {r['stage']} | {r['accum_steps']} | {'on' if r['grad_checkpointing'] else 'off'} | "
                         f"{r['images_per_s']:.4g} | {r['peak_mib']:.0f} | {_cell(speed, '{:.2f}')} | "
                         f"{_cell(memory_ratio, '{:.2f}')} |")
    if "bench-data" in bench:
        result = bench["bench-data"]
        lines += ["", "## Bench: the data path", "", f"`python -m lab.bench {' '.join(result['argv'])}`", "",
                  "| workers | ours, streamed img/s | ours, decoded once img/s | release img/s | ratio |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['workers']} | {r['ours_images_per_s']:.4g} | {r['decoded_images_per_s']:.4g} | "
                  f"{r['reference_images_per_s']:.4g} | {r['ratio']:.2f} |" for r in result["rows"]]
        steps = bench.get("bench")
        four = next((r for r in result["rows"] if r["workers"] == 4), None)
        if cuda and steps and four:
            fastest = max(r["ours_images_per_s"] for r in steps["rows"])
            met = "met" if four["ours_images_per_s"] >= 2 * fastest else "not met"
            lines += ["", f"Target: the loader at 4 workers >= 2x the fastest step ({fastest:.0f} img/s): "
                          f"{four['ours_images_per_s']:.0f} img/s, {met}."]
    return lines


def _targets(result: dict) -> list[str]:
    rows = {r["stage"]: r for r in result["rows"]}
    side = result.get("projection", {}).get("side_by_side", 1.0)
    met = lambda ok: "met" if ok else "not met"
    out = [f"{stage} {r['ratio']:.2f}x the release's (>= {TARGET_RATIO:g}x: {met(r['ratio'] >= TARGET_RATIO)})"
           for stage, r in rows.items()]
    for stage, target in TARGET_IMAGES_PER_S.items():
        if stage in rows:
            rate = rows[stage]["ours_images_per_s"] * (side if stage == "finetune" else 1.0)
            out.append(f"{stage} {rate:.0f} img/s{' in total' if stage == 'finetune' else ''} (>= {target}: "
                       f"{met(rate >= target)})")
    if "finetune" in rows and rows["finetune"]["ours_mfu"] is not None:
        mfu = rows["finetune"]["ours_mfu"]
        out.append(f"fine-tuning MFU {mfu:.1%} (>= {TARGET_FINETUNE_MFU:.0%}: {met(mfu >= TARGET_FINETUNE_MFU)})")
    if "self-distill" in rows and rows["self-distill"]["memory_ratio"] is not None:
        ratio = rows["self-distill"]["memory_ratio"]
        out.append(f"self-distillation peak memory {ratio:.2f}x the release's (<= 1: {met(ratio <= 1)})")
    if "projection" in result:
        hours = result["projection"]["ours_gpu_hours"]
        out.append(f"the whole table {hours:.3g} GPU-hours (<= {TARGET_TABLE_HOURS:g}: "
                   f"{met(hours <= TARGET_TABLE_HOURS)})")
    return out


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
