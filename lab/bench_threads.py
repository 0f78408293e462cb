"""CPU threads, measured side by side: a stage with --threads 1 against --threads 2, on a quiet machine and with
busy processes beside it; and, with --demo, `make demo` quiet against `make demo` beside the same busy processes.

    python -m lab.bench_threads                  # further pre-training of vit-mae-tiny on digits, 4 runs
    python -m lab.bench_threads --demo           # also make demo, quiet and loaded (about 5 + 10 minutes)

Each measurement is `python pretrain.py --device cpu --threads T ...` as a user runs it (vit-mae-tiny on digits,
batch 64, --steps steps, a metrics line every --log_every steps); its speed is the median images/s of its
metrics.jsonl lines after the first (the first holds the warm-up). "Loaded" starts --busy processes that spin
(`yes > /dev/null`, one core each) before the measurement and stops them after. The demo is `make demo` with its
own DEMO_DIR in a temporary folder, timed from start to end (the venv must exist). The ratios printed are what
BENCHMARKS.md ("Threads on the CPU") reports: they compare measurements of one run of this tool, never a time
with a number written down elsewhere.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from utils import int_at_least

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="--threads 1 vs 2, quiet vs loaded (and make demo, with --demo).",
                                allow_abbrev=False)
    p.add_argument("--steps", type=int_at_least(2), default=120, help="steps of each further pre-training run (120)")
    p.add_argument("--log_every", type=int_at_least(1), default=20, help="steps per metrics line (20)")
    p.add_argument("--busy", type=int_at_least(0), default=2, help="busy processes beside a loaded measurement (2)")
    p.add_argument("--threads", type=int_at_least(1), nargs="+", default=[1, 2], help="thread counts to compare (1 2)")
    p.add_argument("--demo", action="store_true", help="also time make demo, quiet and loaded")
    p.add_argument("--data_dir", default=os.path.join(REPO, "data"), help="where digits is (built on first use)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    return p


@contextlib.contextmanager
def busy(n: int):
    """n processes spinning on a core each (`yes > /dev/null`), stopped at the end."""
    procs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(n)]
    try:
        time.sleep(1.0 if n else 0.0)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def pretrain_speed(threads: int, args, work: str) -> float:
    """Median images/s of one further pre-training run (its metrics lines after the first)."""
    out = os.path.join(work, f"pretrain-t{threads}-{time.monotonic_ns()}")
    command = [sys.executable, os.path.join(REPO, "pretrain.py"), "--device", "cpu", "--threads", str(threads),
               "--dataset", "digits", "--data_dir", args.data_dir, "--model_name", "vit-mae-tiny",
               "--batch_size", "64", "--workers", "0", "--steps", str(args.steps), "--log_every",
               str(args.log_every), "--output_dir", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "args.json")) as f:
        ran_with = json.load(f)["threads"]
    if ran_with != threads:  # the run's record says what it ran with: never report one count under another's name
        raise RuntimeError(f"asked for --threads {threads}, the run recorded {ran_with}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        speeds = [json.loads(line)["images_per_s"] for line in f if line.strip()]
    return statistics.median(speeds[1:] or speeds)


def demo_seconds(work: str) -> float:
    demo_dir = os.path.join(work, f"demo-{time.monotonic_ns()}")
    start = time.monotonic()
    subprocess.run(["make", "--no-print-directory", "demo", f"DEMO_DIR={demo_dir}"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def machine() -> str:
    name = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the first measurement"


def main(args) -> dict:
    print(f"device: {machine()}", flush=True)
    figures = {"machine": machine(), "busy": args.busy, "steps": args.steps, "pretrain": {}, "demo": {}}
    with tempfile.TemporaryDirectory() as work:
        for load, n in (("quiet", 0), ("loaded", args.busy)):
            with busy(n):
                for threads in args.threads:
                    speed = pretrain_speed(threads, args, work)
                    figures["pretrain"][f"{load} {threads}"] = speed
                    print(f"pretrain vit-mae-tiny, {load:6} ({n} busy), --threads {threads}: {speed:7.1f} img/s",
                          flush=True)
        if args.demo:
            for load, n in (("quiet", 0), ("loaded", args.busy)):
                with busy(n):
                    seconds = demo_seconds(work)
                figures["demo"][load] = seconds
                print(f"make demo, {load:6} ({n} busy): {seconds / 60:.2f} min", flush=True)
    p = figures["pretrain"]
    print("ratios:")
    for load in ("quiet", "loaded"):
        for threads in args.threads[1:]:
            print(f"  {load}: --threads {threads} / --threads {args.threads[0]} = "
                  f"{p[f'{load} {threads}'] / p[f'{load} {args.threads[0]}']:.2f}")
    for threads in args.threads:
        print(f"  --threads {threads}: loaded / quiet = {p[f'loaded {threads}'] / p[f'quiet {threads}']:.2f}")
    if args.demo:
        print(f"  make demo: loaded time / quiet time = {figures['demo']['loaded'] / figures['demo']['quiet']:.2f} "
              f"(target at most 2.5; quiet target at most 5 min)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
