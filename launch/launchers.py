"""The launchers' Python side: run_pretrain.sh, run_selftrain.sh, run_finetune.sh, run_probe.sh and run_all.sh call
`python -m launch LAUNCHER ARGS...` with their positional arguments and flags as the user typed them; the settings
from the environment (STEPS, FINETUNE_STEPS, SEEDS, JOBS, MAE_FLAGS, FINETUNE_FLAGS, PROBES, PROBE_STEPS,
PROBE_FLAGS) are read here. What each one runs is in its usage comment at the top of the .sh file.

Each run is `$PYTHON SCRIPT --device DEVICE ARGS` (stage_command); the launcher itself needs only the standard
library (Python 3.11+) and errors.py, so it starts at once and runs on whichever python3 launch/launch.sh finds."""
import os
import re
import subprocess
import sys

from errors import UserError
from launch import graph
from launch.pool import Job, Pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE = {"run_pretrain.sh": "bash run_pretrain.sh GPU DATASET [STEPS] [pretrain.py flags...]",
         "run_selftrain.sh": "bash run_selftrain.sh GPU DATASET [STEPS] [selftrain.py flags...]",
         "run_finetune.sh": "bash run_finetune.sh GPU DATASET [SCRATCH] [CKPT] [CKPT_DIR] [finetune.py flags...]",
         "run_probe.sh": "bash run_probe.sh GPU DATASET [SCRATCH] [CKPT] [CKPT_DIR] [probe.py flags...]",
         "run_all.sh": "bash run_all.sh GPU [DATASET ...] [flags for every stage...]"}
SCRATCH = {"True": True, "true": True, "TRUE": True, "1": True,
           "False": False, "false": False, "FALSE": False, "0": False}


def usage_error(launcher: str, message: str) -> UserError:
    return UserError(f"{message}\nusage: {USAGE[launcher]}")


def python() -> str:
    """The runs' interpreter: $PYTHON (launch/launch.sh sets it)."""
    return os.environ.get("PYTHON") or sys.executable


def stage_command(device: str, script: str, args) -> tuple[list[str], dict]:
    """How a stage runs on `device`: cpu -> python SCRIPT --device cpu ARGS; 3 -> CUDA_VISIBLE_DEVICES=3 python
    SCRIPT --device cuda ARGS; 0,1,2,3 -> CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --nproc_per_node=4 SCRIPT --device
    cuda ARGS. --device comes first, so a --device among ARGS (the user's flags) still wins."""
    path = os.path.join(REPO, script)
    if device == "cpu":
        return [python(), path, "--device", "cpu", *map(str, args)], {}
    n = len(device.split(","))
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
    return [python(), *runner, path, "--device", "cuda", *map(str, args)], {"CUDA_VISIBLE_DEVICES": device}


def devices(launcher: str, gpu: str) -> list[str]:
    if gpu == "cpu":
        return ["cpu"]
    if not re.fullmatch(r"[0-9]+(,[0-9]+)*", gpu):
        raise usage_error(launcher, f"GPU must be a CUDA device index (0), a list (0,1,2,3) or cpu, not '{gpu}'")
    return gpu.split(",")


def jobs_per_device(launcher: str, gpus: list[str]) -> int:
    """$JOBS, default 1 on cpu, 3 per GPU."""
    jobs = os.environ.get("JOBS") or ("1" if gpus == ["cpu"] else "3")
    if not re.fullmatch(r"[1-9][0-9]*", jobs):
        raise usage_error(launcher, f"JOBS must be a whole number >= 1 (runs per device), not '{jobs}'")
    return int(jobs)


def steps_from(launcher: str, variable: str, default: str | None) -> str | None:
    value = os.environ.get(variable) or default
    if value is not None and not re.fullmatch(r"[1-9][0-9]*", value):
        raise usage_error(launcher, f"{variable} must be a whole number >= 1, not '{value}'")
    return value


def positional(words: list[str]) -> tuple[list[str], list[str]]:
    """(the leading words, the flags from the first word that starts with -)."""
    n = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
    return words[:n], words[n:]


def refuse(words, flags, who: str, how: str) -> None:
    flag = graph.refused_flag(words, flags)
    if flag:
        raise UserError(f"{who} takes no {flag}: it sets it for each run itself; {how}")


def report(*args) -> int:
    return subprocess.run([python(), os.path.join(REPO, "report.py"), *map(str, args)]).returncode


# ----------------------------------------------------------------------------- the launchers

def mae_stage(launcher: str, words: list[str]) -> None:
    """run_pretrain.sh / run_selftrain.sh: the stage replaces this process (same pid), so that a signal to the
    launcher (SIGTERM from a scheduler, `kill`) reaches the run itself."""
    if len(words) < 2:
        raise usage_error(launcher, "GPU and DATASET are required")
    gpu, dataset, rest = words[0], words[1], words[2:]
    steps = graph.MAE_STEPS
    if rest and not rest[0].startswith("-"):
        steps, rest = rest[0], rest[1:]
    device = ",".join(devices(launcher, gpu))
    script = {"run_pretrain.sh": "pretrain.py", "run_selftrain.sh": "selftrain.py"}[launcher]
    argv, env = stage_command(device, script, ["--dataset", dataset, "--steps", steps, *rest])
    try:
        os.execvpe(argv[0], argv, {**os.environ, **env})
    except OSError as e:
        raise UserError(f"cannot run {argv[0]} ($PYTHON): {e.strerror}") from None


def route_words(launcher: str, words: list[str]) -> tuple:
    """run_finetune.sh's and run_probe.sh's arguments: GPU DATASET [SCRATCH] [CKPT] [CKPT_DIR] [flags...] ->
    (GPU, DATASET, SCRATCH, CKPT, CKPT_DIR, the init's name, the flags), the flags that it sets refused."""
    if len(words) < 2:
        raise usage_error(launcher, "GPU and DATASET are required")
    gpu, dataset = words[:2]
    given, flags = positional(words[2:])
    scratch, ckpt, ckpt_dir = given[:3] + ["False", graph.student(graph.MAE_STEPS), "checkpoints"][len(given):]
    flags = given[3:] + flags  # a fourth word is the user's, as the stage gets it
    if scratch not in SCRATCH:
        raise usage_error(launcher, f"SCRATCH must be True or False, not '{scratch}'")
    script = {"run_finetune.sh": "finetune.py", "run_probe.sh": "probe.py"}[launcher]
    refuse(flags, graph.SET_PER_RUN, launcher, f"give the dataset and the init as positional arguments "
           f"({USAGE[launcher]}) and the seeds as SEEDS=\"1 2 3\"; for a single run with its own --output_dir call "
           f"{script} itself")
    return gpu, dataset, scratch, ckpt, ckpt_dir, "initial" if SCRATCH[scratch] else ckpt, flags


def probe_job(dataset: str, scratch: str, init: str, protocol: str, seed: str | None, args, results_dir: str,
              after=()) -> Job:
    """One probe.py run as the pool's job: the linear probe of one seed, or k-NN (no seed); its log beside the
    result probe.py writes (results/DATASET/INIT/probe-linear-seed<k>.json, probe-knn.json)."""
    name = f"probe-linear-seed{seed}" if protocol == "linear" else "probe-knn"
    args = ["--dataset", dataset, "--scratch", scratch, "--ckpt_name", init, "--probe", protocol,
            *(["--seed", seed] if protocol == "linear" else []), *args]
    return Job(f"{dataset} {init} probe {protocol}" + (f" seed {seed}" if protocol == "linear" else ""),
               os.path.join(results_dir, dataset, init, f"{name}.log"),
               lambda device: [stage_command(device, "probe.py", args)], after=after)


def run_finetune(launcher: str, words: list[str]) -> int:
    """Fine-tuning, one run per seed in $SEEDS, side by side; then mean ± std (report.py)."""
    gpu, dataset, scratch, ckpt, ckpt_dir, init, flags = route_words(launcher, words)
    gpus = devices(launcher, gpu)
    pool = Pool(gpus, jobs_per_device(launcher, gpus))
    results_dir = graph.flag_value(flags, "--results_dir", "results")  # the summary reads what the runs wrote
    seeds = (os.environ.get("SEEDS") or " ".join(graph.SEEDS)).split()

    def seed_run(seed):
        args = ["--dataset", dataset, "--scratch", scratch, "--ckpt_name", ckpt, "--checkpoint_dir", ckpt_dir,
                "--seed", seed, *flags]
        return Job(f"{dataset} {init} seed {seed}", os.path.join(results_dir, dataset, init, f"seed{seed}.log"),
                   lambda device: [stage_command(device, "finetune.py", args)])

    pool.run([seed_run(seed) for seed in seeds])
    status = pool.summary()
    if status:
        return status
    code = report("--results_dir", results_dir, "--datasets", dataset, "--init", init, "--seeds", *seeds)
    pool.check_stop()
    return code


def run_probe(launcher: str, words: list[str]) -> int:
    """A probe (probe.py's --probe, linear by default) of one init: the linear probe once per seed in $SEEDS,
    side by side; k-NN once (it trains nothing). Each run prints its test accuracy; report.py tabulates them."""
    gpu, dataset, scratch, _, ckpt_dir, init, flags = route_words(launcher, words)
    gpus = devices(launcher, gpu)
    pool = Pool(gpus, jobs_per_device(launcher, gpus))
    results_dir = graph.flag_value(flags, "--results_dir", "results")
    protocol = graph.flag_value(flags, "--probe", "linear")  # probe.py's parser refuses any other
    seeds = (os.environ.get("SEEDS") or " ".join(graph.SEEDS)).split() if protocol == "linear" else [None]
    args = ["--checkpoint_dir", ckpt_dir, *flags]
    pool.run([probe_job(dataset, scratch, init, protocol, seed, args, results_dir) for seed in seeds])
    status = pool.summary()
    pool.check_stop()
    return status


def table_jobs(datasets, steps, seeds, mae_args, finetune_args, results_dir: str, ddp: bool, probes=(),
               probe_args=()) -> list[Job]:
    """graph.table's runs as the pool's jobs: a dataset's two MAE stages one job, one after the other in one slot
    (ddp: each over every GPU, one dataset at a time); each route one job per seed, after its dataset's MAE stages
    where it starts from one of their checkpoints; so each probe of `probes` (the linear one per seed, k-NN once)."""
    def mae_stages(dataset, stages):
        return lambda device: [stage_command(device, f"{stage}.py", ["--dataset", dataset, "--steps", steps,
                                                                        *mae_args]) for stage in stages]

    jobs, mae_job, stages = [], {}, {}
    for node in graph.table(datasets, steps, probes):
        d = node.dataset
        scratch = "True" if node.init == "initial" else "False"
        if node.stage in ("pretrain", "selftrain"):
            if d not in stages:
                stages[d] = []
                mae_job[d] = Job(f"{d} MAE stages", os.path.join(results_dir, d, f"mae-{steps}.log"),
                                 mae_stages(d, stages[d]), all_devices=ddp)
                jobs.append(mae_job[d])
            stages[d].append(node.stage)  # in the table's order: the teacher first
        elif node.stage == "finetune":
            after = (mae_job[d].name,) if node.after_ok else ()
            for seed in seeds:
                args = ["--dataset", d, "--scratch", scratch, "--ckpt_name", node.init, "--seed", seed,
                        *finetune_args]
                jobs.append(Job(f"{d} {node.init} seed {seed}",
                                os.path.join(results_dir, d, node.init, f"seed{seed}.log"),
                                lambda device, args=args: [stage_command(device, "finetune.py", args)], after=after))
        elif node.stage == "probe":
            after = (mae_job[d].name,) if node.after_ok else ()
            jobs += [probe_job(d, scratch, node.init, node.probe, seed, probe_args, results_dir, after)
                     for seed in (seeds if node.probe == "linear" else [None])]
    return jobs


def run_all(launcher: str, words: list[str]) -> int:
    """The paper's table (graph.table) on this machine; then report.py, per route and the table."""
    if not words:
        raise usage_error(launcher, "GPU is required")
    gpu = words[0]
    datasets, flags = positional(words[1:])
    datasets = datasets or list(graph.PAPER_DATASETS)
    steps = os.environ.get("STEPS") or str(graph.MAE_STEPS)
    finetune_steps = os.environ.get("FINETUNE_STEPS") or None
    refuse(flags, ("--steps",), launcher, f"use STEPS=N for the MAE stages (now {steps}) and FINETUNE_STEPS=N for "
           f"fine-tuning (now {finetune_steps or 10000})")
    refuse(flags, graph.SET_PER_RUN, launcher, f"give the datasets as positional arguments ({USAGE[launcher]}) and "
           f"the seeds as SEEDS=\"1 2 3\"; it runs every init; for single runs use run_pretrain.sh, run_selftrain.sh, "
           f"run_finetune.sh")
    steps = steps_from(launcher, "STEPS", steps)
    finetune_steps = steps_from(launcher, "FINETUNE_STEPS", finetune_steps)
    probe_steps = steps_from(launcher, "PROBE_STEPS", None)
    try:
        probes = graph.probe_protocols(os.environ.get("PROBES", ""))
    except ValueError as e:
        raise usage_error(launcher, str(e)) from None
    seeds = (os.environ.get("SEEDS") or " ".join(graph.SEEDS)).split()
    gpus = devices(launcher, gpu)
    pool = Pool(gpus, jobs_per_device(launcher, gpus))
    mae_only, finetune_only = graph.flags_for_one_kind(os.environ)
    who = f"{launcher}'s MAE_FLAGS / FINETUNE_FLAGS"
    refuse(mae_only + finetune_only, ("--steps",), who, "use STEPS=N / FINETUNE_STEPS=N")
    refuse(mae_only + finetune_only, graph.SET_PER_RUN, who, f"{launcher} sets them for each run")
    probe_only = graph.probe_only_flags(os.environ)
    refuse(probe_only, graph.SET_PER_RUN, f"{launcher}'s PROBE_FLAGS", f"{launcher} sets them for each run")
    flag = graph.refused_flag(probe_only, graph.PROBE_SET_PER_RUN)
    if flag:
        raise UserError(f"{launcher}'s PROBE_FLAGS takes no {flag}: {graph.PROBE_SET_PER_RUN[flag]}")
    results_dir = graph.flag_value(flags + finetune_only, "--results_dir", "results")
    save = ["--save_every", graph.SAVE_EVERY_STEPS]
    mae_args = [*save, *graph.mae_flags(flags), *mae_only]
    finetune_args = [*save, *(["--steps", finetune_steps] if finetune_steps else []), *flags, *finetune_only]
    # the probes write where the report reads, whatever fine-tuning's own --results_dir
    probe_args = [*save, *(["--steps", probe_steps] if probe_steps else []), *graph.probe_flags(flags), *probe_only,
                  "--results_dir", results_dir]

    ddp = len(gpus) > 1 and len(datasets) < len(gpus)
    jobs = table_jobs(datasets, steps, seeds, mae_args, finetune_args, results_dir, ddp, probes, probe_args)
    with_probes = f"; probes: {' '.join(probes)} ({probe_steps or 2000} steps)" if probes else ""
    print(f"=== {' '.join(datasets)}: further pre-training and self-distillation ({steps} steps), fine-tuning "
          f"({finetune_steps or 10000} steps; seeds {' '.join(seeds)}){with_probes}; {len(pool.slots)} run(s) at a "
          f"time", flush=True)
    pool.run(jobs)
    status = pool.summary()
    if status == 2:
        return 2  # bad input: the runs that started failed alike, the rest did not start
    for d in datasets:
        for init in graph.routes(steps):
            route_done = (init == "initial" or not pool.failed(f"{d} MAE stages")) and not any(
                pool.failed(f"{d} {init} seed {seed}") for seed in seeds)
            if route_done and report("--results_dir", results_dir, "--datasets", d, "--init", init, "--seeds",
                                     *seeds):
                status = 1
            pool.check_stop()
    if report("--results_dir", results_dir, "--datasets", *datasets, "--steps", steps):
        status = 1
    pool.check_stop()
    return status


LAUNCHERS = {"run_pretrain.sh": mae_stage, "run_selftrain.sh": mae_stage, "run_finetune.sh": run_finetune,
             "run_probe.sh": run_probe, "run_all.sh": run_all}
