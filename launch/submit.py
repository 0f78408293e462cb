"""The paper's table on a cluster: run_all.sh's runs as SLURM jobs through submitit, requeued when their time is up
and resumed where they stopped; `--status` says where each run is.

    bash run_all.sh slurm cub dtd                      # the launchers' cluster form: python -m launch.submit ...
    PARTITION=gpu GPUS_PER_JOB=4 TIME_LIMIT=240 bash run_all.sh slurm cub
    bash run_all.sh slurm digits --cluster local --model_name vit-mae-tiny   # the same jobs on this machine
    python -m launch.submit --status                    # every run of the table: done, running, failed, pending
    PROBES=1 bash run_all.sh slurm cub                  # the table with the probes as routes (probe.py)

The job graph, per dataset: further pre-training; self-distillation once it succeeded; fine-tuning from θ₀ at once,
from the teacher once further pre-training succeeded, from the student once self-distillation did -- each route one
job that runs its seeds ($SEEDS) through run_finetune.sh's pool inside the allocation ($JOBS per GPU); report.py
once every other job has ended, however it ended, so the table shows what finished. With --probes (PROBES=1, or
among linear knn), each route also has a job per probe, after the same job as its fine-tuning, that runs
run_probe.sh (the linear probe over the seeds, k-NN once). A job that fails cancels what
depends on it (SLURM: --kill-on-invalid-dep=yes; here: said in one line), so nothing waits for ever. Independent
jobs of the same shape go as one array (the datasets' further pre-training, their fine-tuning from θ₀).

A further pre-training or self-distillation job is one DistributedDataParallel run over its processes (one per GPU,
$GPUS_PER_JOB, on $NODES nodes; torch's env:// variables from submitit's TorchDistributedEnvironment). Every task
runs its command through launch/job.py, which forwards the scheduler's stop signal: the run saves at the next step
boundary and the job is requeued with the same command (never --overwrite). Bad input (exit 2) and a run that
cannot go on (exit 1) are not requeued. --cluster slurm submits and returns; local and debug run the same graph on
this machine and wait for it (local: submitit's LocalExecutor, with its time limit, signal and requeue; debug: one
job after another in this process, pdb on an exception).

Flags that are not this tool's go to the stages as run_all.sh passes them (the MAE stages all but --results_dir and
--save_model) and are checked by the stages' own parsers before anything is submitted."""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import threading
import time

import utils
from outputs import write_json
from launch import graph
from mae_common import further_pretrain_dir, self_distill_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_DATASETS = graph.PAPER_DATASETS
GRAPH_FILE = "graph-{stage}.json"  # the jobs submitted last for the table (or for one stage), with their ids
SAVE_EVERY_STEPS, SAVE_EVERY_MINUTES = graph.SAVE_EVERY_STEPS, 5  # a killed node loses at most ~5 minutes
POLL_S = 2.0
# how a job that ended without success is named to what needed it
ENDED_BADLY = {"failed": "failed", "cancelled": "was cancelled", "stopped": "stopped without being requeued"}
# flag -> the environment variable it defaults to, in the launchers' style (a flag given wins)
FROM_ENVIRONMENT = {"mae_steps": "STEPS", "finetune_steps": "FINETUNE_STEPS", "seeds": "SEEDS",
                    "jobs_per_gpu": "JOBS", "partition": "PARTITION", "gpus_per_job": "GPUS_PER_JOB",
                    "nodes": "NODES", "processes_per_node": "PROCESSES_PER_NODE", "cpus_per_gpu": "CPUS_PER_GPU",
                    "time_limit_min": "TIME_LIMIT", "sbatch_args": "SBATCH_ARGS", "probes": "PROBES",
                    "probe_steps": "PROBE_STEPS"}
# the stage flags the graph sets for every run itself (graph.SET_PER_RUN), and what to do instead; and --overwrite,
# which would move a run aside at every requeue
HOW_INSTEAD = {"--dataset": "give the datasets as --datasets (the launchers: positional arguments)",
               "--seed": "give the seeds as --seeds or SEEDS=\"1 2 3\"",
               "--scratch": "the graph runs every route (--stage finetune --init NAME for one)",
               "--ckpt_name": "the graph runs every route (--stage finetune --init NAME for one)",
               "--output_dir": "each run has its own directory"}
REFUSED = {**{flag: HOW_INSTEAD[flag] for flag in graph.SET_PER_RUN},
           "--overwrite": "a requeued job would move its own run aside at every start; move old runs aside "
                          "yourself, or pass another --checkpoint_dir / --results_dir"}


# the launchers' positional arguments after GPU=slurm, as their usage lines say
LAUNCHER_FORMS = {"run_all.sh": "[DATASET ...]", "run_pretrain.sh": "DATASET [STEPS]",
                  "run_selftrain.sh": "DATASET [STEPS]", "run_finetune.sh": "DATASET [SCRATCH] [CKPT] [CKPT_DIR]",
                  "run_probe.sh": "DATASET [SCRATCH] [CKPT] [CKPT_DIR]"}


class _Parser(argparse.ArgumentParser):
    """This tool's flags anywhere on the line; every other argument is a stage flag (args.stage_flags)."""

    def parse_args(self, args=None, namespace=None):
        known, rest = self.parse_known_args(args, namespace)
        known.stage_flags = rest
        return known


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser(description="The paper's table as SLURM jobs (submitit), requeued and resumed; --status.",
                allow_abbrev=False)
    g = p.add_argument_group("what to run")
    g.add_argument("--datasets", nargs="+", default=None, help="default: the paper's six")
    g.add_argument("--launcher", default=None, choices=list(LAUNCHER_FORMS),
                   help="the launchers' cluster form (bash run_all.sh slurm ...): the leading words are that "
                        "launcher's positional arguments after GPU")
    g.add_argument("--stage", default="table", choices=["table", "pretrain", "selftrain", "finetune", "probe"],
                   help="table: the whole graph; or one job of one stage (the stage launchers' cluster form)")
    g.add_argument("--init", default=None,
                   help="--stage finetune / probe: initial or a checkpoint name (default "
                        "self-further-pretrain-<mae_steps>)")
    g.add_argument("--mae_steps", type=utils.int_at_least(1), default=None,
                   help="steps of further pre-training and self-distillation (default $STEPS, else 20000)")
    g.add_argument("--finetune_steps", type=utils.int_at_least(1), default=None,
                   help="steps of fine-tuning (default $FINETUNE_STEPS, else finetune.py's)")
    g.add_argument("--seeds", nargs="+", type=utils.int_at_least(0), default=None,
                   help="fine-tuning seeds (default $SEEDS, else 1 2 3 4 5)")
    g.add_argument("--probes", nargs="+", default=None,
                   help="the table: also probe each route (probe.py): 1 (every probe), 0 (none, the default) or "
                        f"among {' '.join(graph.PROBES)} (default $PROBES)")
    g.add_argument("--probe_steps", type=utils.int_at_least(1), default=None,
                   help="steps of the linear probe in the table (default $PROBE_STEPS, else probe.py's)")
    g.add_argument("--jobs_per_gpu", type=utils.int_at_least(1), default=None,
                   help="fine-tuning runs side by side per GPU (default $JOBS, else run_finetune.sh's: 3, 1 on CPU)")
    g = p.add_argument_group("where and how")
    g.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="slurm: submit and return; local: submitit's LocalExecutor on this machine (time limit, "
                        "signal, requeue), waited for; debug: in this process, one job after another")
    g.add_argument("--partition", default=None, help="SLURM partition (default $PARTITION, else the cluster's)")
    g.add_argument("--gpus_per_job", type=utils.int_at_least(0), default=None,
                   help="GPUs per node of each job (default $GPUS_PER_JOB, else 1 on slurm, 0 -- the CPU -- here)")
    g.add_argument("--nodes", type=utils.int_at_least(1), default=None,
                   help="nodes of each further pre-training / self-distillation job (default $NODES, else 1)")
    g.add_argument("--processes_per_node", type=utils.int_at_least(1), default=None,
                   help="processes of those jobs per node, one per GPU (default $PROCESSES_PER_NODE, else "
                        "--gpus_per_job, 1 on the CPU)")
    g.add_argument("--cpus_per_gpu", type=utils.int_at_least(1), default=None,
                   help="CPUs per GPU (per process on the CPU) (default $CPUS_PER_GPU, else the cluster's)")
    g.add_argument("--time_limit_min", type=utils.finite_float(0, low_open=True), default=None,
                   help="time limit of each job, in minutes; a longer stage is requeued (default $TIME_LIMIT, "
                        "else 240)")
    g.add_argument("--signal_delay_s", type=utils.int_at_least(1), default=120,
                   help="the stop signal comes this many seconds before the time limit, which must be longer (the "
                        "step in progress and a save must fit)")
    g.add_argument("--max_requeues", type=utils.int_at_least(0), default=10,
                   help="requeues after a time limit before a job counts as failed (preemptions do not count)")
    g.add_argument("--sbatch_args", default=None,
                   help="more sbatch options, long form, e.g. '--account=lab --qos=high --mem=64G' (default "
                        "$SBATCH_ARGS)")
    g.add_argument("--log_dir", default=None,
                   help="submitit's folder: job logs <log_dir>/<job id>_<task>_log.out, the graph, how "
                        "each job ended (default <results_dir>/jobs)")
    g.add_argument("--dry_run", action="store_true", help="print the jobs and what each runs; submit nothing")
    g.add_argument("--status", action="store_true",
                   help="list every run of the last submission and its state, from its graph file (found by the "
                        "same --stage and --results_dir / --log_dir; its settings are read there), the run records "
                        "and the jobs' outcomes; submits nothing")
    return p


# ----------------------------------------------------------------------------- settings

def _from_environment(args, parser) -> None:
    """Fills each unset flag of FROM_ENVIRONMENT from its variable, checked by the flag's own type."""
    actions = {a.dest: a for a in parser._actions}
    # the stage launchers take their steps as a positional argument (or finetune.py's default): as without a
    # cluster, they read neither STEPS nor FINETUNE_STEPS
    ignored = {"mae_steps", "finetune_steps"} if args.launcher not in (None, "run_all.sh") else set()
    if args.stage != "table":  # the probes are routes of the table; one probe's steps are among its flags
        ignored |= {"probes", "probe_steps"}
    for dest, variable in FROM_ENVIRONMENT.items():
        value = os.environ.get(variable, "").strip()
        if getattr(args, dest) is not None or not value or dest in ignored:
            continue
        action = actions[dest]
        words = value.split() if action.nargs == "+" else [value]
        try:
            parsed = [action.type(w) if action.type else w for w in words]
        except argparse.ArgumentTypeError as e:
            raise utils.UserError(f"{variable}={value!r}: {e}") from None
        setattr(args, dest, parsed if action.nargs == "+" else parsed[0])


def sbatch_options(text: str) -> dict:
    """'--account=lab --qos high --exclusive' -> {'account': 'lab', 'qos': 'high', 'exclusive': True}."""
    words, options = shlex.split(text or ""), {}
    while words:
        word = words.pop(0)
        if not word.startswith("--") or len(word) < 3:
            raise utils.UserError(f"--sbatch_args: give sbatch's long options (--account=NAME), not '{word}'")
        key, equals, value = word[2:].partition("=")
        if not equals:
            value = words.pop(0) if words and not words[0].startswith("-") else True
        options[key] = value
    return options


def _refuse(flags: list[str], refused: dict, who: str) -> None:
    name = graph.refused_flag(flags, refused)
    if name:
        raise utils.UserError(f"{who} takes no {name}: {refused[name]}")


def _stage_args(module_name: str, base: list, flags: list[str]):
    """The stage's own parser on the flags it would get (usage and one line, exit 2, when it refuses them)."""
    module = __import__(module_name)
    parser = module.get_args_parser()
    parser.prog = f"{module_name}.py"
    return parser.parse_args([*map(str, base), *flags])


def _flags_for_one_kind(args) -> tuple[list[str], list[str]]:
    """run_all.sh's $MAE_FLAGS and $FINETUNE_FLAGS (the table only)."""
    return graph.flags_for_one_kind(os.environ) if args.stage == "table" else ([], [])


def _probe_only_flags(args) -> list[str]:
    """run_all.sh's $PROBE_FLAGS (the table with probes only)."""
    return graph.probe_only_flags(os.environ) if args.stage == "table" and args.probes else []


# ----------------------------------------------------------------------------- the graph

class Job:
    """One job of the graph: `command` run by each of nodes x processes tasks (launch/job.py); after_ok: jobs that
    must have succeeded first; after_any: jobs that must have ended; runs: the run directories it produces
    ({name, dir, done, log}) for --status."""

    def __init__(self, name, kind, command, *, processes=1, nodes=1, gpus=0, after_ok=(), after_any=(), env=None,
                 runs=()):
        self.name, self.kind, self.command = name, kind, command
        self.processes, self.nodes, self.gpus = processes, nodes, gpus
        self.after_ok, self.after_any, self.env, self.runs = list(after_ok), list(after_any), env or {}, list(runs)

    def shape(self) -> tuple:
        return self.kind, self.processes, self.nodes, self.gpus


def build_graph(args) -> list["Job"]:
    """The jobs of args.stage, in an order where every job comes after those it waits for. Checks the stage
    flags with the stages' parsers first."""
    from launch.job import DEVICES
    flags = args.stage_flags
    who = f"bash {args.launcher} slurm" if args.launcher else "launch.submit"
    _refuse(flags, REFUSED, who)
    if args.launcher in ("run_pretrain.sh", "run_selftrain.sh"):
        _refuse(flags, {"--steps": f"give the steps as STEPS ({LAUNCHER_FORMS[args.launcher]})"}, who)
    elif args.stage not in ("finetune", "probe"):
        _refuse(flags, {"--steps": f"give the MAE stages' steps as STEPS=N (--mae_steps; now {args.mae_steps})"
                                   + (" and fine-tuning's as FINETUNE_STEPS=N (--finetune_steps)"
                                      if args.stage == "table" else "")}, who)
    mae_only, finetune_only = _flags_for_one_kind(args)
    _refuse(mae_only + finetune_only, {**REFUSED, "--steps": "use STEPS=N / FINETUNE_STEPS=N"},
            "MAE_FLAGS / FINETUNE_FLAGS")
    probe_only = _probe_only_flags(args)
    _refuse(probe_only, {**REFUSED, **graph.PROBE_SET_PER_RUN}, "PROBE_FLAGS")
    mae_flags = graph.mae_flags(flags) + mae_only
    # the table's probes: the flags for every stage as probe.py takes them, then $PROBE_FLAGS
    probe_flags = graph.probe_flags(flags) + probe_only if args.stage == "table" else flags
    flags = flags + finetune_only  # fine-tuning's (the MAE stages' when one stage is submitted, where both are empty)
    first = args.datasets[0]
    mae_base = ["--dataset", first, "--steps", args.mae_steps]
    if args.stage in ("table", "pretrain"):
        mae_args = _stage_args("pretrain", mae_base, mae_flags if args.stage == "table" else flags)
    if args.stage in ("table", "selftrain"):
        mae_args = _stage_args("selftrain", mae_base, mae_flags if args.stage == "table" else flags)
    finetune_args = None
    if args.stage in ("table", "finetune"):
        finetune_args = _stage_args("finetune", ["--dataset", first], flags)
    probe_args = None
    if args.stage == "probe" or args.stage == "table" and args.probes:
        probe_args = _stage_args("probe", ["--dataset", first], probe_flags)
    checkpoint_dir = (finetune_args or probe_args or mae_args).checkpoint_dir
    results_dir = (finetune_args or probe_args).results_dir if finetune_args or probe_args else "results"
    if args.stage == "table" and args.probes:  # the probes write where the report reads
        probe_flags += ["--results_dir", results_dir]

    device = "cuda" if args.gpus_per_job else "cpu"
    python = sys.executable
    save = ["--save_every", SAVE_EVERY_STEPS, "--save_every_minutes", SAVE_EVERY_MINUTES]
    steps = args.mae_steps

    def mae_job(stage, dataset, after=()):
        script = f"{stage}.py"
        out = (further_pretrain_dir if stage == "pretrain" else self_distill_dir)(checkpoint_dir, steps, dataset)
        command = [python, os.path.join(REPO, script), "--device", device, "--dataset", dataset, "--steps", steps,
                   *save, *(mae_flags if args.stage == "table" else flags)]
        run = {"name": f"{dataset} {os.path.basename(os.path.dirname(out))}", "dir": out,
               "done": os.path.join(out, "model.safetensors")}
        return Job(f"{dataset} {stage}", stage, command, processes=args.processes_per_node, nodes=args.nodes,
                   gpus=args.gpus_per_job, after_ok=after, runs=[run])

    def finetune_job(dataset, init, after=()):
        scratch = ["True"] if init == "initial" else ["False", init]
        length = ["--steps", args.finetune_steps] if args.finetune_steps else []
        command = ["bash", os.path.join(REPO, "run_finetune.sh"), DEVICES, dataset, *scratch, *save, *length, *flags]
        env = {"SEEDS": " ".join(map(str, args.seeds)), "PYTHON": python}
        if args.jobs_per_gpu:
            env["JOBS"] = str(args.jobs_per_gpu)
        base = os.path.join(results_dir, dataset, init)
        runs = [{"name": f"{dataset} {init} seed {seed}", "dir": os.path.join(base, f"seed{seed}"),
                 "done": os.path.join(base, f"seed{seed}.json"), "log": os.path.join(base, f"seed{seed}.log")}
                for seed in args.seeds]
        return Job(f"{dataset} finetune {init}", f"finetune-{'initial' if init == 'initial' else 'checkpoint'}",
                   command, gpus=args.gpus_per_job, after_ok=after, env=env, runs=runs)

    def probe_job(dataset, init, protocol, after=()):
        scratch = ["True"] if init == "initial" else ["False", init]
        length = ["--steps", args.probe_steps] if args.probe_steps and args.stage == "table" else []
        protocol_flag = ["--probe", protocol] if args.stage == "table" else []  # else among the user's flags
        command = ["bash", os.path.join(REPO, "run_probe.sh"), DEVICES, dataset, *scratch, *save, *length,
                   *probe_flags, *protocol_flag]
        env = {"SEEDS": " ".join(map(str, args.seeds)), "PYTHON": python}
        if args.jobs_per_gpu:
            env["JOBS"] = str(args.jobs_per_gpu)
        base = os.path.join(results_dir, dataset, init)
        names = [f"probe-linear-seed{seed}" for seed in args.seeds] if protocol == "linear" else ["probe-knn"]
        runs = [{"name": f"{dataset} {init} {name}", "dir": os.path.join(base, name),
                 "done": os.path.join(base, f"{name}.json"), "log": os.path.join(base, f"{name}.log")}
                for name in names]
        return Job(f"{dataset} probe {protocol} {init}", f"probe-{'initial' if init == 'initial' else 'checkpoint'}",
                   command, gpus=args.gpus_per_job, after_ok=after, env=env, runs=runs)

    if args.stage == "pretrain":
        jobs = [mae_job("pretrain", d) for d in args.datasets]
    elif args.stage == "selftrain":
        jobs = [mae_job("selftrain", d) for d in args.datasets]
    elif args.stage == "finetune":
        jobs = [finetune_job(d, args.init) for d in args.datasets]
    elif args.stage == "probe":
        jobs = [probe_job(d, args.init, probe_args.probe) for d in args.datasets]
    else:
        report = [python, os.path.join(REPO, "report.py"), "--results_dir", results_dir, "--datasets",
                  *args.datasets, "--steps", steps]
        jobs = []
        # the names, order and dependencies of the table's runs
        for node in graph.table(args.datasets, steps, args.probes):
            if node.stage == "finetune":
                jobs.append(finetune_job(node.dataset, node.init, node.after_ok))
            elif node.stage == "probe":
                jobs.append(probe_job(node.dataset, node.init, node.probe, node.after_ok))
            elif node.stage == "report":
                jobs.append(Job(node.name, "report", report, after_any=node.after_any))
            else:
                jobs.append(mae_job(node.stage, node.dataset, node.after_ok))
    for job in jobs:
        job.command = [str(word) for word in job.command]
    return jobs


def _slug(name: str) -> str:
    return name.replace(" ", ".").replace("/", "_")


def arrays(jobs: list[Job]) -> list[list[Job]]:
    """Groups to submit together: jobs that wait for nothing and have the same shape form one array job;
    every other job goes alone. In the order of the jobs' first appearance."""
    groups, by_shape = [], {}
    for job in jobs:
        if job.after_ok or job.after_any:
            groups.append([job])
        elif job.shape() in by_shape:
            by_shape[job.shape()].append(job)
        else:
            by_shape[job.shape()] = [job]
            groups.append(by_shape[job.shape()])
    return groups


# ----------------------------------------------------------------------------- submitting

def _wrapped(job: Job, log_dir: str):
    from launch.job import StageJob
    return StageJob(job.name, job.command, os.getcwd(), job.env, job.gpus, _outcome_path(log_dir, job.name))


def _outcome_path(log_dir: str, name: str) -> str:
    return os.path.join(log_dir, "outcomes", _slug(name) + ".json")


def time_limit_s(args) -> int:
    """The time limit each job gets, in seconds: SLURM's whole minutes, the local executor's whole seconds."""
    return 60 * _slurm_minutes(args) if args.cluster == "slurm" else int(60 * args.time_limit_min)


def _slurm_minutes(args) -> int:
    return max(1, round(args.time_limit_min))


def slurm_parameters(job: Job, args, ids: dict, name: str) -> dict:
    """submitit SlurmExecutor parameters of `job`; `ids`: the job ids of those submitted before it."""
    params = {"job_name": name, "time": _slurm_minutes(args), "nodes": job.nodes,
              "ntasks_per_node": job.processes, "signal_delay_s": args.signal_delay_s, "stderr_to_stdout": True,
              "additional_parameters": {"requeue": True, "kill-on-invalid-dep": "yes",
                                        **sbatch_options(args.sbatch_args)}}
    if args.partition:
        params["partition"] = args.partition
    if job.gpus:
        params["gpus_per_node"] = job.gpus
    if args.cpus_per_gpu:
        params["cpus_per_task"] = args.cpus_per_gpu * max(1, job.gpus // job.processes)
    after = [f"afterok:{':'.join(ids[n] for n in job.after_ok)}"] if job.after_ok else []
    after += [f"afterany:{':'.join(ids[n] for n in job.after_any)}"] if job.after_any else []
    if after:
        params["dependency"] = ",".join(after)
    return params


def submit_slurm(jobs: list[Job], args, log_dir: str, executor=None, write_graph=None) -> dict:
    """Submits every job (arrays where they can be) with its dependencies; returns {name: (job id, log path)}.
    `executor`: a factory (folder, max_num_timeout) -> an executor like submitit.SlurmExecutor (tests: a fake);
    `write_graph(submitted)` after every group, so that what was submitted is on record even if a later group is
    refused (which is one line naming the jobs already queued, to cancel or to leave)."""
    import submitit
    make = executor or submitit.SlurmExecutor
    submitted = {}
    for group in arrays(jobs):
        try:
            ex = make(folder=log_dir, max_num_timeout=args.max_requeues)
            name = _slug(group[0].name if len(group) == 1 else group[0].kind)
            ex.update_parameters(**slurm_parameters(group[0], args, {n: i for n, (i, _) in submitted.items()}, name))
            with ex.batch():
                handles = [ex.submit(_wrapped(job, log_dir)) for job in group]
        except (OSError, submitit.core.utils.FailedJobError) as e:
            queued = ", ".join(f"{n} ({i})" for n, (i, _) in submitted.items()) or "none"
            raise utils.UserError(f"sbatch refused {', '.join(j.name for j in group)}: {utils.one_line(e)}; already "
                                  f"queued: {queued}") from None
        for job, handle in zip(group, handles):
            submitted[job.name] = (str(handle.job_id), str(handle.paths.stdout).replace("%t", "0"))
        if write_graph is not None:
            write_graph(submitted)
    return submitted


def _executor_here(args, log_dir: str, job: Job):
    import submitit
    if args.cluster == "debug":
        return submitit.DebugExecutor(folder=os.path.join(log_dir, "debug", _slug(job.name)))
    ex = submitit.LocalExecutor(folder=log_dir, max_num_timeout=args.max_requeues)
    ex.update_parameters(timeout_min=args.time_limit_min, tasks_per_node=job.processes, gpus_per_node=job.gpus,
                         signal_delay_s=args.signal_delay_s, stderr_to_stdout=True)
    return ex


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ended(handle, outcome_path: str) -> tuple[str, int | None, str]:
    """(state, exit code, line) of a job that has ended: its task 0's outcome file, else submitit's result."""
    from launch.job import error_line
    outcome = _read_json(outcome_path)
    if outcome and outcome.get("state") in ("done", "failed", "stopped"):
        return outcome["state"], outcome.get("exit_code"), outcome.get("error") or ""
    try:
        handle.results()
        return "done", 0, ""
    except Exception as e:  # the task died before it could say: killed, the time limit without a signal, ...
        lines = str(e).splitlines()
        rules = [i for i, line in enumerate(lines) if line.strip() and set(line.strip()) == {"-"}]
        return "failed", None, error_line(lines[:rules[-1]] if len(rules) >= 2 else lines)  # the trace's last line


def run_here(jobs: list[Job], args, log_dir: str, write_graph) -> int:
    """Runs the graph on this machine, each job once those it waits for have ended, as SLURM would; says what
    starts and ends. Returns the exit code: 0 all done; 2 when every failed job failed on bad input; else 1."""
    state, handles, submitted = {}, {}, {}
    stopping, told = [], set()
    previous = _on_hangup(stopping)
    try:
        while (len(state) < len(jobs) and not stopping) or handles:
            for name in set(handles) - told if stopping else ():  # as SLURM ends a job: SIGTERM, the run saves
                told.add(name)
                if args.cluster == "local":  # the job's controller, which forwards it to each task
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(handles[name].job_id), signal.SIGTERM)
            for job in jobs if not stopping else ():
                if job.name in state:
                    continue
                blocked = next((n for n in job.after_ok if state.get(n, ("",))[0] in ENDED_BADLY), None)
                if blocked:
                    line = f"needs {blocked}, which {ENDED_BADLY[state[blocked][0]]}"
                    state[job.name] = ("cancelled", None, line)
                    _write_outcome(log_dir, job, "cancelled", line)
                    print(f"[{job.name}] cancelled: it {line}", flush=True)
                    continue
                ready = (all(state.get(n, ("",))[0] == "done" for n in job.after_ok)
                         and all(n in state and n not in handles for n in job.after_any))
                if not ready:
                    continue
                handle = _executor_here(args, log_dir, job).submit(_wrapped(job, log_dir))
                handles[job.name], state[job.name] = handle, ("running", None, "")
                log = str(handle.paths.stdout).replace("%t", "0")
                submitted[job.name] = (str(handle.job_id), log)
                write_graph(submitted)
                print(f"[{job.name}] job {handle.job_id} started, log {log}", flush=True)
            for name, handle in list(handles.items()):
                try:
                    ended = handle.done()
                except Exception:  # --cluster debug: done() re-raises the job's exception (after pdb)
                    ended = True
                if ended:
                    del handles[name]
                    state[name] = _ended(handle, _outcome_path(log_dir, name))
                    what, code, line = state[name]
                    print(f"[{name}] {'done' if what == 'done' else f'{what.upper()} (exit code {code}): {line}'}",
                          flush=True)
                    if what != "done" and not stopping:
                        dependents = [j.name for j in jobs if name in j.after_ok]
                        if dependents:
                            print(f"[{name}] what depends on it is cancelled: {', '.join(dependents)}", flush=True)
            if handles:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        for handle in handles.values():
            handle.cancel()
        print("interrupted: the running jobs were stopped; the same command continues them from their last saved "
              "state", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        print(f"stopped by {stopping[0].name}: the running jobs stopped at a step boundary with their state saved, "
              f"no other job started; the same command continues them", file=sys.stderr)
        return 1
    failed = [s for s in state.values() if s[0] in ("failed", "stopped")]
    if not failed and all(s[0] == "done" for s in state.values()):
        return 0
    return 2 if failed and all(s[1] == 2 for s in failed) else 1


def _on_hangup(stopping: list) -> dict:
    """SIGHUP (the terminal closed) and SIGTERM to this process: noted in `stopping`; the running jobs are then
    stopped as a scheduler stops them (they save), and none starts. Returns the handlers to put back."""
    def note(signum, frame):
        if signum == signal.SIGHUP:  # the terminal is gone: what would be printed to it has nowhere to go
            sys.stdout = sys.stderr = open(os.devnull, "w")
        stopping.append(signal.Signals(signum))
    if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
        return {}
    # a SIGHUP ignored already (nohup) stays ignored: the jobs are meant to outlive the terminal
    return {sig: signal.signal(sig, note) for sig in (signal.SIGHUP, signal.SIGTERM)
            if signal.getsignal(sig) != signal.SIG_IGN}


def _write_outcome(log_dir: str, job: Job, what: str, line: str) -> None:
    os.makedirs(os.path.dirname(_outcome_path(log_dir, job.name)), exist_ok=True)
    write_json(_outcome_path(log_dir, job.name), {"job": job.name, "job_id": None, "state": what,
                                                        "exit_code": None, "error": line})


# ----------------------------------------------------------------------------- status

def _last_logged_step(run_dir: str) -> int | None:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _holder_alive(run_dir: str) -> bool | None:
    """Whether the process holding the run directory's lock is alive: its pid where it ran on this host; else an
    flock probe (on another host only: a probe here could refuse a run that starts at that instant)."""
    import errno
    import fcntl
    path = os.path.join(run_dir, ".lock")
    try:
        with open(path, "rb") as f:
            holder = f.read(200).decode(errors="replace").split()
    except OSError:
        return False
    if len(holder) >= 4 and holder[0] == "pid" and holder[3] == platform.node():
        try:
            os.kill(int(holder[1]), 0)
            return True
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError):
            return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    finally:
        os.close(fd)


def run_state(run: dict, job_state: tuple[str, str], steps: int | None) -> str:
    """One run's state from its directory (and its job's, for a failure)."""
    from launch.job import error_line
    if os.path.exists(run["done"]):
        result = _read_json(run["done"]) if run["done"].endswith(".json") else None
        return f"done, test accuracy {100 * result['test_acc']:.2f} %" if result and "test_acc" in result else "done"
    step = _last_logged_step(run["dir"])
    at = f", step {step}" + (f" of {steps}" if steps else "") if step is not None else ""
    if _holder_alive(run["dir"]):
        return f"running{at}"
    what, line = job_state
    if what in ("failed", "cancelled", "stopped"):
        if run.get("log") and os.path.exists(run["log"]) and what == "failed":
            with open(run["log"], errors="replace") as f:
                line = error_line(f.read().splitlines()[-40:]) or line
        return f"{what}{at}: {line}" if line else f"{what}{at}"
    if os.path.exists(os.path.join(run["dir"], "train_state.pt")):
        return f"stopped{at} with its state saved; " + ("its job continues it" if what in ("submitted", "running")
                                                        else "the same command continues it")
    return "pending" if step is None else f"interrupted{at}, before a state was saved"


# the settings a graph file records, each as --status compares it with the one given
SETTINGS = {"datasets": "--datasets", "mae_steps": "--mae_steps (STEPS)", "finetune_steps": "--finetune_steps "
            "(FINETUNE_STEPS)", "seeds": "--seeds (SEEDS)", "init": "--init", "stage_flags": "the stage flags",
            "probes": "--probes (PROBES)", "probe_steps": "--probe_steps (PROBE_STEPS)"}


def settings(args) -> dict:
    return {"stage": args.stage, **{key: getattr(args, key) for key in SETTINGS}}


def read_graph(graph_file: str) -> dict | None:
    """The graph file of a submission; None when there is none. A damaged one is refused, not taken for none: on
    SLURM, submitting again because of it would start a second copy of every job on the same run directories."""
    try:
        with open(graph_file) as f:
            graph = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        graph = utils.one_line(e)
    if not isinstance(graph, dict) or not isinstance(graph.get("jobs"), list):
        why = graph if isinstance(graph, str) else "not a graph of jobs"
        raise utils.UserError(f"{graph_file} is unreadable ({why}); it is the record of which jobs were submitted, "
                              f"so --status will not guess: see the queue (squeue -u $USER; --cluster local: ps) and "
                              f"move the file aside once none of its jobs is queued or running")
    return graph


def _process_alive(pid, host) -> bool | None:
    """Whether submitit's local controller `pid` (a job's id under --cluster local) still runs; None when it ran
    on another host."""
    if host != platform.node():
        return None
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return b"submitit" in f.read()  # a pid alone could name another process by now
    except (OSError, ValueError):
        return False


def _job_state(record: dict, outcome: dict | None, graph: dict) -> tuple[str, str]:
    """(state, line) of one job of a submission: its outcome once it said how it ended; else whether it runs,
    where that can be seen (the local executor's controller, by its pid)."""
    if outcome and outcome.get("state") != "requeued":
        return outcome["state"], outcome.get("error") or ""
    job_id = record.get("job_id")
    if graph.get("cluster") != "local":
        return ("submitted" if job_id else "not submitted"), ""
    if job_id:
        alive = _process_alive(job_id, graph.get("host"))
        if alive is False:
            return "gone", (f"its process {job_id} ended without saying how (killed?); nothing continues its "
                            f"runs: the same command does, from their last saved state")
        return ("running" if alive else "submitted"), ""
    if _process_alive(graph.get("pid"), graph.get("host")) is False:  # the submitter, which starts the others
        return "not started", "its submitter is gone; the same command starts it"
    return "not submitted", ""


def print_status(jobs: list[Job], args, log_dir: str) -> None:
    graph_file = os.path.join(log_dir, GRAPH_FILE.format(stage=args.stage))
    graph = read_graph(graph_file) or {}
    recorded = graph.get("settings")  # none in a graph file written before they were: the settings given
    records = graph["jobs"] if recorded else [{"name": j.name, "kind": j.kind, "after_ok": j.after_ok,
                                               "runs": j.runs} for j in jobs]
    recorded, cwd = recorded or settings(args), graph.get("cwd") or os.getcwd()
    if not graph:
        print(f"{len(records)} jobs; none submitted from here yet ({graph_file} not found)")
    else:
        print(f"{len(records)} jobs; submitted {graph.get('submitted')} to {graph.get('cluster')} ({graph_file})")
        given = settings(args)
        differ = [f"{SETTINGS[k]} {_shown(given[k])} here, {_shown(recorded.get(k))} there"
                  for k in SETTINGS if k in args.given and given[k] != recorded.get(k)]
        if differ:
            print(f"note: the settings given differ from the submission's ({'; '.join(differ)}): listed as "
                  f"submitted")
    ids = {j["name"]: j.get("job_id") for j in graph.get("jobs", [])}
    states = {}
    for record in records:
        name = record["name"]
        path = _outcome_path(log_dir, name)
        outcome = _read_json(path) if graph else None
        what, line = _job_state({**record, "job_id": ids.get(name)}, outcome, graph)
        if graph and outcome is None and os.path.exists(path):  # written by the job as it ended, then damaged
            what, line = "unknown", f"its outcome {path} is unreadable; its log says how it ended"
        blocked = next((n for n in record.get("after_ok", []) if states.get(n, ("",))[0] in ENDED_BADLY), None)
        if blocked and what in ("submitted", "not submitted", "not started"):
            what, line = "cancelled", f"needs {blocked}, which did not succeed"
        states[name] = (what, line)
        print(f"{name:<40} {ids.get(name) or '-':<12} {what}" + (f": {line}" if line and what != "done" else ""))
        kind = record.get("kind") or ""
        steps = recorded.get("mae_steps") if kind in ("pretrain", "selftrain") \
            else recorded.get("probe_steps") if kind.startswith("probe") else recorded.get("finetune_steps")
        for run in record.get("runs", []):
            run = {**run, **{k: os.path.join(cwd, run[k]) for k in ("dir", "done", "log") if run.get(k)}}
            print(f"    {run['name']:<36} {run_state(run, states[name], steps)}")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def launcher_form(args) -> None:
    """The launchers' cluster form: their positional arguments (the words before the first flag) as this tool's
    flags; run_finetune.sh's CKPT_DIR as --checkpoint_dir, before the user's flags, as that launcher passes it."""
    words = args.stage_flags
    n = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
    positional, args.stage_flags = words[:n], words[n:]
    if args.launcher is None:
        if positional:
            raise utils.UserError(f"unexpected argument '{positional[0]}' (datasets go after --datasets)")
        return
    usage = f"bash {args.launcher} slurm {LAUNCHER_FORMS[args.launcher]} [flags...]"
    if args.launcher == "run_all.sh":
        args.datasets = positional or args.datasets
        return
    most = 2 if args.launcher in ("run_pretrain.sh", "run_selftrain.sh") else 4
    if not positional or len(positional) > most:
        raise utils.UserError(f"{'DATASET is required' if not positional else f'unexpected {positional[most]}'}; "
                              f"usage: {usage}")
    args.datasets = positional[:1]
    if args.launcher in ("run_pretrain.sh", "run_selftrain.sh"):
        args.stage = args.launcher[4:-3]
        try:  # the launcher's STEPS (default 20000), not $STEPS
            args.mae_steps = utils.int_at_least(1)(positional[1]) if len(positional) > 1 else 20000
        except argparse.ArgumentTypeError as e:
            raise utils.UserError(f"STEPS: {e}; usage: {usage}") from None
        return
    # run_finetune.sh's (and run_probe.sh's) SCRATCH, CKPT, CKPT_DIR
    defaults = ["False", "self-further-pretrain-20000", "checkpoints"]
    scratch, ckpt, ckpt_dir = positional[1:] + defaults[len(positional) - 1:]
    if scratch not in ("True", "true", "TRUE", "1", "False", "false", "FALSE", "0"):
        raise utils.UserError(f"SCRATCH must be True or False, not '{scratch}'; usage: {usage}")
    args.stage = "finetune" if args.launcher == "run_finetune.sh" else "probe"
    args.init = "initial" if scratch in ("True", "true", "TRUE", "1") else ckpt
    args.stage_flags = ["--checkpoint_dir", ckpt_dir, *args.stage_flags]


# ----------------------------------------------------------------------------- main

def resolve(args) -> None:
    """The settings: the launchers' positional form, the environment's values for unset flags, the defaults;
    checked together."""
    launcher_form(args)
    _from_environment(args, get_args_parser())
    # what was given (a flag, a variable, a launcher's word), which --status compares with the submission's
    args.given = {k for k in SETTINGS if getattr(args, k, None)}
    args.datasets = args.datasets or list(PAPER_DATASETS)
    for name in args.datasets:  # each one a name (a folder under --data_dir), as the stages check it
        try:
            utils.dataset_name(name)
        except argparse.ArgumentTypeError as e:
            raise utils.UserError(f"dataset '{name}': {e}") from None
    args.mae_steps = args.mae_steps or 20000
    args.seeds = args.seeds or [1, 2, 3, 4, 5]
    try:
        args.probes = list(graph.probe_protocols(" ".join(args.probes or [])))
    except ValueError as e:
        raise utils.UserError(f"--probes / {e}") from None
    if args.probes and args.stage != "table":
        raise utils.UserError(f"--probes / PROBES adds the probes to the table, not to --stage {args.stage} (for one "
                              f"probe: --stage probe, or bash run_probe.sh slurm ...)")
    args.init = args.init or graph.student(args.mae_steps)
    args.time_limit_min = args.time_limit_min or 240
    limit_s = time_limit_s(args)
    # the signal would never come (local) or come at the start (SLURM); debug has no time limit
    if args.cluster != "debug" and args.signal_delay_s >= limit_s:
        raise utils.UserError(f"--signal_delay_s {args.signal_delay_s} is not shorter than the time limit "
                              f"({limit_s} s, --time_limit_min / TIME_LIMIT {args.time_limit_min:g}): the stop "
                              f"signal must come before the limit, with time for a step and a save; give a longer "
                              f"time limit or a shorter --signal_delay_s")
    if args.gpus_per_job is None:
        args.gpus_per_job = 1 if args.cluster == "slurm" else 0
    args.nodes = args.nodes or 1
    args.processes_per_node = args.processes_per_node or max(1, args.gpus_per_job)
    if args.gpus_per_job and args.processes_per_node != args.gpus_per_job:
        raise utils.UserError(f"--processes_per_node {args.processes_per_node} with --gpus_per_job "
                              f"{args.gpus_per_job}: one process per GPU")
    if args.cluster != "slurm" and args.nodes > 1:
        raise utils.UserError(f"--cluster {args.cluster} runs on this machine: one node, not {args.nodes}")
    if args.cluster == "debug" and args.processes_per_node > 1:
        raise utils.UserError("--cluster debug runs one process per job; use --cluster local for several")
    sbatch_options(args.sbatch_args)  # checked before anything is submitted


def main(args):
    resolve(args)
    jobs = build_graph(args)
    log_dir = os.path.abspath(args.log_dir or os.path.join(_results_dir(args), "jobs"))
    if args.status:
        print_status(jobs, args, log_dir)
        return
    if args.dry_run:
        for job in jobs:
            after = "; ".join(filter(None, [f"after {', '.join(job.after_ok)} succeeded" if job.after_ok else "",
                                            f"after every other job ended" if job.after_any else ""]))
            tasks = f"{job.nodes} x {job.processes} processes, " if job.nodes * job.processes > 1 else ""
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in job.env.items() if k != "PYTHON")
            print(f"[{job.name}] {tasks}{job.gpus} GPU(s){'; ' + after if after else ''}\n    "
                  f"{env + ' ' if env else ''}{shlex.join(job.command)}")
        return

    os.makedirs(log_dir, exist_ok=True)
    for job in jobs:  # a job of an earlier submission of the same graph said how it ended: not this one
        path = _outcome_path(log_dir, job.name)
        if os.path.exists(path):
            os.remove(path)
    # the jobs import launch.job: the repository on their path, wherever they start
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    stamp = datetime.datetime.now().isoformat(timespec="seconds")

    def write_graph(submitted):
        write_json(os.path.join(log_dir, GRAPH_FILE.format(stage=args.stage)), graph_record(jobs, args, stamp,
                                                                                            submitted))

    if args.cluster == "slurm":
        submitted = submit_slurm(jobs, args, log_dir, write_graph=write_graph)
        print(f"submitted {len(jobs)} jobs to SLURM:")
        for job in jobs:
            after = f"  (after {', '.join(submitted[n][0] for n in job.after_ok + job.after_any)})" \
                if job.after_ok or job.after_any else ""
            print(f"  {submitted[job.name][0]:<12} {job.name}{after}")
        print(f"logs: {log_dir}/<job id>_<task>_log.out (task 0 of the first job: {submitted[jobs[0].name][1]})")
        print(f"status: python -m launch.submit --status {shlex.join(_status_flags(args))}")
        return
    code = run_here(jobs, args, log_dir, write_graph)
    if code:
        sys.exit(code)


def graph_record(jobs: list[Job], args, stamp: str, submitted: dict) -> dict:
    """What the graph file says of a submission: its settings, where and by whom it was made, and every job with
    its id ({name: (job id, log)} of those submitted so far) and the runs it produces."""
    return {"submitted": stamp, "cluster": args.cluster, "cwd": os.getcwd(), "host": platform.node(),
            "pid": os.getpid(), "settings": settings(args),
            "jobs": [{"name": j.name, "kind": j.kind, "job_id": submitted.get(j.name, (None, None))[0],
                      "log": submitted.get(j.name, (None, None))[1], "command": j.command, "env": j.env,
                      "after_ok": j.after_ok, "after_any": j.after_any, "runs": j.runs} for j in jobs]}


def _results_dir(args) -> str:
    value, words = "results", args.stage_flags + _flags_for_one_kind(args)[1]
    for i, word in enumerate(words):  # the last one wins, as in argparse
        if word == "--results_dir" and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith("--results_dir="):
            value = word.split("=", 1)[1]
    return value


def _status_flags(args) -> list[str]:
    flags = ["--datasets", *args.datasets, "--mae_steps", str(args.mae_steps), "--seeds", *map(str, args.seeds)]
    if args.stage != "table":
        flags += ["--stage", args.stage] + (["--init", args.init] if args.stage in ("finetune", "probe") else [])
    if args.finetune_steps:
        flags += ["--finetune_steps", str(args.finetune_steps)]
    if args.probes:
        flags += ["--probes", *args.probes] + (["--probe_steps", str(args.probe_steps)] if args.probe_steps else [])
    if args.log_dir:
        flags += ["--log_dir", args.log_dir]
    return flags + args.stage_flags


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
