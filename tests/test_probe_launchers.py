"""The probes as launcher routes: run_probe.sh (the linear probe once per seed, k-NN once, from θ₀ or a checkpoint,
its results where probe.py's docstring says), its cluster form, and the probes as routes of the table (PROBES=1:
run_all.sh's pool, launch.submit's graph), with report.py's probe tables after them; bad input as one line."""
import json
import os
import stat

from helpers import REPO, launch
from launch import graph, launchers, submit

TINY_FLAGS = "--model_name vit-mae-tiny --batch_size 8 --workers 0 --log_every 1"


def _fake_python(tmp_path):
    """A $PYTHON that records each call's arguments instead of running it; -> (its path, the calls file)."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake_python"
    script.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), calls


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _submit_args(*argv):
    args = submit.get_args_parser().parse_args(list(map(str, argv)))
    submit.resolve(args)
    return args


# ----------------------------------------------------------------------------- run_probe.sh

def test_run_probe_writes_a_linear_probe_per_seed_and_knn_once(data_dir, tmp_path):
    """From θ₀: SEEDS="1 2" gives probe-linear-seed1.json and -seed2.json under results/digits/initial, each its
    own seed's run; --probe knn one probe-knn.json, whatever SEEDS says."""
    flags = f"{TINY_FLAGS} --data_dir {data_dir} --steps 2"
    proc = launch(f"bash {REPO}/run_probe.sh cpu digits True {flags}", tmp_path, {"SEEDS": "1 2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "results" / "digits" / "initial"
    for seed in (1, 2):
        result = json.loads((out / f"probe-linear-seed{seed}.json").read_text())
        assert (result["probe"], result["seed"], result["init"]) == ("linear", seed, "initial")
        assert result["args"]["steps"] == 2 and result["args"]["scratch"] is True
        assert (out / f"probe-linear-seed{seed}" / "metrics.jsonl").exists()
        assert f"[probe-linear] digits from initial: test accuracy {100 * result['test_acc']:.2f}%" in proc.stdout
    assert not list(out.glob("seed*.json"))  # nothing the fine-tuning table would read

    proc = launch(f"bash {REPO}/run_probe.sh cpu digits True {flags} --probe knn --knn_k 5", tmp_path,
                  {"SEEDS": "1 2 3"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "probe-knn.json").read_text())
    assert result["probe"] == "knn" and result["knn_k"] == 5
    assert proc.stdout.count("[probe-knn] digits from initial: test accuracy") == 1  # one run, no seed
    assert sorted(p.name for p in out.glob("probe-*.json")) == [
        "probe-knn.json", "probe-linear-seed1.json", "probe-linear-seed2.json"]


def test_run_probe_from_a_checkpoint_passes_ckpt_and_ckpt_dir(tmp_path):
    """SCRATCH False CKPT CKPT_DIR reach probe.py as --scratch False --ckpt_name CKPT --checkpoint_dir CKPT_DIR,
    one run per seed (linear) or one (knn); side by side, each run's log lies beside its result."""
    python, calls = _fake_python(tmp_path)
    proc = launch(f"bash {REPO}/run_probe.sh cpu cub False further-pretrain-7 ck --results_dir res", tmp_path,
                  {"PYTHON": python, "SEEDS": "3 4", "JOBS": "2"})
    assert proc.returncode == 0, proc.stderr
    runs = [line.split() for line in calls.read_text().splitlines()]
    assert sorted(_flag(argv, "--seed") for argv in runs) == ["3", "4"]
    for argv in runs:
        assert os.path.basename(argv[0]) == "probe.py"
        assert [_flag(argv, f) for f in ("--dataset", "--scratch", "--ckpt_name", "--checkpoint_dir", "--probe")] \
            == ["cub", "False", "further-pretrain-7", "ck", "linear"]
    for seed in (3, 4):
        assert (tmp_path / "res" / "cub" / "further-pretrain-7" / f"probe-linear-seed{seed}.log").exists()
    calls.unlink()
    proc = launch(f"bash {REPO}/run_probe.sh cpu cub True --probe knn", tmp_path, {"PYTHON": python, "SEEDS": "3 4"})
    assert proc.returncode == 0, proc.stderr
    (argv,) = [line.split() for line in calls.read_text().splitlines()]
    assert _flag(argv, "--seed") is None and _flag(argv, "--scratch") == "True" and _flag(argv, "--probe") == "knn"


def test_run_probe_bad_input_is_one_line_before_anything_runs(tmp_path):
    python, calls = _fake_python(tmp_path)
    for words, env, expected in (
            ("cpu digits maybe", {}, "SCRATCH must be True or False, not 'maybe'"),
            ("cpu digits True --seed 3", {}, "run_probe.sh takes no --seed"),
            ("cpu digits True --output_dir x", {}, "run_probe.sh takes no --output_dir"),
            ("cpu", {}, "GPU and DATASET are required"),
            ("gpu0 digits True", {}, "GPU must be a CUDA device index")):
        proc = launch(f"bash {REPO}/run_probe.sh {words}", tmp_path, {"PYTHON": python, **env})
        assert proc.returncode == 2, (words, proc.stderr)
        assert proc.stderr.startswith(f"error: {expected}") and "Traceback" not in proc.stderr, proc.stderr
    assert not calls.exists()


def test_run_probe_slurm_form_runs_the_probe_as_one_job(data_dir, tmp_path):
    """bash run_probe.sh slurm DATASET True ... --cluster debug: one job, run_probe.sh inside it, the result where
    the local form writes it."""
    proc = launch(f"bash {REPO}/run_probe.sh slurm digits True {TINY_FLAGS} --data_dir {data_dir} --probe knn "
                  f"--cluster debug", tmp_path, {"SEEDS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[digits probe knn initial] done" in proc.stdout
    assert json.loads((tmp_path / "results" / "digits" / "initial" / "probe-knn.json").read_text())["probe"] == "knn"


# ----------------------------------------------------------------------------- the probes as routes of the table

def test_the_table_has_probe_nodes_only_when_asked():
    plain = graph.table(["cub"], 50)
    assert not [n for n in plain if n.stage == "probe"]
    nodes = {n.name: n for n in graph.table(["cub"], 50, graph.PROBES)}
    assert [n for n in nodes if n not in {p.name for p in plain}] == [
        f"cub probe {protocol} {init}" for init in graph.routes(50) for protocol in ("linear", "knn")]
    for init in graph.routes(50):  # after the same run as the route's fine-tuning
        for protocol in graph.PROBES:
            probe = nodes[f"cub probe {protocol} {init}"]
            assert (probe.init, probe.probe, probe.after_ok) == (init, protocol, nodes[f"cub finetune {init}"].after_ok)
    assert set(nodes["report"].after_any) == set(nodes) - {"report"}
    assert graph.probe_protocols("") == graph.probe_protocols("0") == ()
    assert graph.probe_protocols("1") == graph.PROBES and graph.probe_protocols("knn") == ("knn",)


def test_run_all_pool_has_probe_jobs_only_when_asked():
    args = ["--save_every", 1000, "--results_dir", "res"]
    plain = launchers.table_jobs(["cub"], "50", ["1", "2"], [], args, "res", ddp=False)
    assert not [j for j in plain if " probe " in j.name]
    jobs = {j.name: j for j in launchers.table_jobs(["cub"], "50", ["1", "2"], [], args, "res", ddp=False,
                                                     probes=graph.PROBES, probe_args=args)}
    probes = [name for name in jobs if " probe " in name]
    assert probes == [f"cub {init} probe {p}" for init in graph.routes(50)
                      for p in ("linear seed 1", "linear seed 2", "knn")]
    assert jobs["cub initial probe knn"].after == ()
    assert jobs["cub self-further-pretrain-50 probe linear seed 2"].after == ("cub MAE stages",)
    assert jobs["cub further-pretrain-50 probe knn"].log == os.path.join("res", "cub", "further-pretrain-50",
                                                                        "probe-knn.log")
    ((argv, _),) = jobs["cub further-pretrain-50 probe linear seed 2"].commands("cpu")
    assert os.path.basename(argv[1]) == "probe.py"
    assert argv[4:] == ["--dataset", "cub", "--scratch", "False", "--ckpt_name", "further-pretrain-50", "--probe",
                        "linear", "--seed", "2", "--save_every", "1000", "--results_dir", "res"]


def test_run_all_with_probes_runs_them_after_the_checkpoints(tmp_path):
    """PROBES=1: per route the linear probe per seed and k-NN once, from that route's checkpoint, after the MAE
    stages that make it; PROBE_STEPS and PROBE_FLAGS reach the probes only; without PROBES, no probe."""
    python, calls = _fake_python(tmp_path)
    env = {"PYTHON": python, "SEEDS": "1 2", "STEPS": "5", "FINETUNE_STEPS": "3"}
    proc = launch(f"bash {REPO}/run_all.sh cpu digits --batch_size 8 --save_model", tmp_path,
                  {**env, "PROBES": "1", "PROBE_STEPS": "7", "PROBE_FLAGS": "--knn_k 3", "FINETUNE_FLAGS": "--lr 2"})
    assert proc.returncode == 0, proc.stderr
    runs = [line.split() for line in calls.read_text().splitlines()]
    scripts = [os.path.basename(argv[0]) for argv in runs]
    probes = [argv for argv in runs if os.path.basename(argv[0]) == "probe.py"]
    assert len(probes) == 3 * (2 + 1)
    assert scripts.index("selftrain.py") < max(i for i, s in enumerate(scripts) if s == "probe.py")
    got = sorted((_flag(a, "--ckpt_name"), _flag(a, "--scratch"), _flag(a, "--probe"), _flag(a, "--seed"))
                 for a in probes)
    assert got == sorted((init, str(init == "initial"), p, s) for init in graph.routes(5)
                         for p, s in (("linear", "1"), ("linear", "2"), ("knn", None)))
    for argv in probes:
        assert _flag(argv, "--steps") == "7" and _flag(argv, "--knn_k") == "3" and _flag(argv, "--batch_size") == "8"
        assert "--save_model" not in argv and "--lr" not in argv and _flag(argv, "--results_dir") == "results"
    assert all("--knn_k" not in argv for argv in runs if os.path.basename(argv[0]) != "probe.py")
    assert "probes: linear knn (7 steps)" in proc.stdout

    calls.unlink()
    proc = launch(f"bash {REPO}/run_all.sh cpu digits", tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "probe.py" not in calls.read_text()


def test_run_all_with_probes_end_to_end_and_the_report_shows_the_probe_table(data_dir, tmp_path):
    """The demo's three checkpoints probed by k-NN in the table's run; report.md has the k-NN table beside the
    fine-tuning one, a row per checkpoint."""
    env = {"SEEDS": "1", "STEPS": "2", "FINETUNE_STEPS": "2", "PROBES": "knn", "JOBS": "2"}
    proc = launch(f"bash {REPO}/run_all.sh cpu digits {TINY_FLAGS} --data_dir {data_dir}", tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for init in graph.routes(2):
        result = json.loads((tmp_path / "results" / "digits" / init / "probe-knn.json").read_text())
        assert result["init"] == init and result["probe"] == "knn"
    report = (tmp_path / "results" / "report.md").read_text()
    assert "## Test accuracy (%)" in report and "## k-NN: test accuracy (%)" in report
    knn = report.split("## k-NN")[1]
    for row in ("Initial model (θ₀)", "Further pre-training (2)", "Self-distillation (2)"):
        assert f"| {row}" in knn
    assert "probe.csv" in os.listdir(tmp_path / "results")


def test_run_all_probe_settings_bad_input_is_one_line(tmp_path):
    python, calls = _fake_python(tmp_path)
    for env, expected in (({"PROBES": "lin"}, "PROBES must be 1 (every probe), 0 (none) or probes among"),
                          ({"PROBES": "1", "PROBE_STEPS": "0"}, "PROBE_STEPS must be a whole number >= 1"),
                          ({"PROBES": "1", "PROBE_FLAGS": "--probe knn"}, "PROBE_FLAGS takes no --probe"),
                          ({"PROBES": "1", "PROBE_FLAGS": "--seed 1"}, "PROBE_FLAGS takes no --seed")):
        proc = launch(f"bash {REPO}/run_all.sh cpu digits", tmp_path, {"PYTHON": python, **env})
        assert proc.returncode == 2, (env, proc.stderr)
        assert proc.stderr.startswith("error: ") and expected in proc.stderr.splitlines()[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert not calls.exists()


def test_the_cluster_graph_has_probe_jobs_only_when_asked(monkeypatch):
    """launch.submit's table: a job per probe and route, after the job its fine-tuning waits for, running
    run_probe.sh with the flags for every stage that probe.py takes; --status lists each probe run; PROBES reads
    as --probes; none without."""
    monkeypatch.delenv("PROBES", raising=False)
    assert not [j for j in submit.build_graph(_submit_args("--datasets", "digits", "--cluster", "debug"))
                if j.kind.startswith("probe")]
    monkeypatch.setenv("PROBES", "1")
    monkeypatch.setenv("PROBE_FLAGS", "--knn_k 3")
    jobs = {j.name: j for j in submit.build_graph(_submit_args(
        "--datasets", "digits", "--cluster", "debug", "--mae_steps", "5", "--probe_steps", "4", "--seeds", "1", "2",
        "--model_name", "vit-mae-tiny", "--save_model"))}
    probes = [name for name, j in jobs.items() if j.kind.startswith("probe")]
    assert probes == [f"digits probe {p} {init}" for init in graph.routes(5) for p in ("linear", "knn")]
    for init in graph.routes(5):
        for protocol in graph.PROBES:
            job = jobs[f"digits probe {protocol} {init}"]
            assert job.after_ok == jobs[f"digits finetune {init}"].after_ok
            assert os.path.basename(job.command[1]) == "run_probe.sh"
            assert job.command[4:5] == (["True"] if init == "initial" else ["False"])
            assert _flag(job.command, "--probe") == protocol and _flag(job.command, "--steps") == "4"
            assert _flag(job.command, "--knn_k") == "3" and "--save_model" not in job.command
            assert job.env["SEEDS"] == "1 2"
    assert [r["done"] for r in jobs["digits probe linear initial"].runs] == [
        os.path.join("results", "digits", "initial", f"probe-linear-seed{s}.json") for s in (1, 2)]
    assert [r["done"] for r in jobs["digits probe knn further-pretrain-5"].runs] == [
        os.path.join("results", "digits", "further-pretrain-5", "probe-knn.json")]
    assert jobs["report"].after_any == [n for n in jobs if n != "report"]
    assert "--save_model" in jobs["digits finetune initial"].command  # fine-tuning keeps its own flags


def test_the_report_reads_a_knn_result_of_todays_record(tmp_path, capsys):
    """A k-NN result as probe.py writes it today (the current record version, no train_acc: nothing is trained)
    goes into the k-NN table beside the fine-tuning one."""
    import report
    from training.record import SCHEMA_VERSION, VERSION_KEY
    res = tmp_path / "results"
    for name, result in (("seed1.json", {"test_acc": 0.5, "test_loss": 1.0, "train_acc": 0.6, "train_loss": 0.9}),
                         ("probe-knn.json", {"test_acc": 0.25, "knn_k": 20, "knn_temperature": 0.07})):
        (res / "digits" / "initial").mkdir(parents=True, exist_ok=True)
        (res / "digits" / "initial" / name).write_text(json.dumps(
            {VERSION_KEY: SCHEMA_VERSION, **result, "args": {"seed": 1},
             "history": [{"inputs": {}, "precision": "fp32", "device_type": "cpu"}]}))
    report.main(report.get_args_parser().parse_args(["--results_dir", str(res)]))
    knn = capsys.readouterr().out.split("## k-NN: test accuracy (%)")[1]
    assert "| Initial model (θ₀)" in knn and "25.00 (n=1)" in knn
