"""One parser for one question: no command line accepts an abbreviated flag (argparse's default would take
`--results` for `--results_dir`), and the launchers never re-derive what a Python program decides from the
same arguments: run_finetune.sh and run_all.sh refuse the flags whose values they set themselves."""
import argparse
import importlib
import json
import os
import pkgutil
import stat

import pytest

from helpers import REPO, TINY, launch, result_file


TINY_FLAGS = "--model_name vit-mae-tiny --batch_size 8 --workers 0 --log_every 1"


def _entry_modules() -> list[str]:
    """Every module of the repository (top level, data/, models/, tools/, and packages added later) that
    defines get_args_parser(): the command lines a user types."""
    names = []
    for info in pkgutil.walk_packages([REPO]):
        if info.name.split(".")[0] in ("tests", "golden") or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        if callable(getattr(module, "get_args_parser", None)):
            names.append(info.name)
    return sorted(names)


ENTRY_MODULES = _entry_modules()


def _value_for(parser: argparse.ArgumentParser, base: list[str], action: argparse.Action) -> list[str] | None:
    """A value `action` accepts (so a refusal below is the abbreviation's, not the value's); [] for a flag
    that takes none, None when no candidate value parses."""
    if action.nargs == 0:
        return []
    candidates = [*(map(str, action.choices or [])), "1", "0.5", "x.png", "x"]
    for value in candidates:
        try:
            parser.parse_known_args([*base, action.option_strings[-1], value])
            return [value]
        except SystemExit:
            continue
    return None


def test_the_walk_finds_every_command_line():
    assert {"pretrain", "selftrain", "finetune", "report", "data.prepare", "tools.visualize", "lab.bench",
            "lab.small_reproduction"} <= set(ENTRY_MODULES)


@pytest.mark.parametrize("module_name", ENTRY_MODULES)
def test_no_parser_accepts_an_abbreviated_flag(module_name, capsys):
    parser = importlib.import_module(module_name).get_args_parser()
    base = []  # the required flags, with values they accept, and a value for each positional argument
    for action in parser._actions:
        if action.required and action.option_strings:
            base += [action.option_strings[-1], *(_value_for(parser, [], action) or ["x"])]
        elif not action.option_strings and action.nargs not in ("?", "*"):
            base.append(action.choices[0] if action.choices else "x")
    checked = 0
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--") and len(s) > 3]
        if not long or isinstance(action, argparse._HelpAction):
            continue
        value = _value_for(parser, base, action)
        if value is None:
            continue
        abbreviation = long[0][:-1]
        if any(abbreviation == s for a in parser._actions for s in a.option_strings):
            continue  # a flag of its own, not an abbreviation
        # --flag=value: an unknown flag's value cannot be taken for a positional argument (data.prepare's NAME)
        token = f"{abbreviation}={value[0]}" if value else abbreviation
        try:
            _, extras = parser.parse_known_args([*base, token])
        except SystemExit:
            extras = None  # an error that is not "unknown flag": argparse took it for long[0]
        assert extras == [token], f"{module_name} takes {abbreviation} for {long[0]}"
        checked += 1
    has_flags = any(s.startswith("--") for a in parser._actions if not isinstance(a, argparse._HelpAction)
                    for s in a.option_strings)
    assert checked >= 1 or not has_flags, module_name  # some flag was tried
    capsys.readouterr()


# ----------------------------------------------------------------------------- launchers vs finetune.py

@pytest.mark.parametrize("flag", ["--scratch True", "--scratch=true", "--ckpt_name further-pretrain-9",
                                  "--seed 7", "--output_dir elsewhere", "--dataset cub"])
def test_run_finetune_refuses_the_flags_it_sets_itself(flag, data_dir, tmp_path):
    """Passed after the positional arguments, these won in finetune.py while the summary still read the
    positional ones' result file: `--scratch True` trained from θ₀ and then printed an older run's
    accuracy of the self-distilled model, exit 0."""
    result_file(tmp_path / "results", "digits", "self-further-pretrain-20000", 1, 0.123)
    proc = launch(f"bash {REPO}/run_finetune.sh cpu digits {flag} {TINY_FLAGS} --data_dir {data_dir} --steps 2",
                   tmp_path, {"SEEDS": "1"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    name = flag.split()[0].split("=")[0]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run_finetune.sh takes no {name}"), proc.stderr
    assert "12.30" not in proc.stdout
    assert "bash run_finetune.sh GPU DATASET [SCRATCH] [CKPT] [CKPT_DIR]" in lines[0] or "SEEDS=" in lines[0]
    assert sorted(os.listdir(tmp_path / "results" / "digits")) == ["self-further-pretrain-20000"]  # nothing ran


def test_run_finetune_summary_is_the_run_that_ran(data_dir, tmp_path):
    """The positional form and --results_dir (read by the launcher as argparse reads it, last one wins) give
    the summary of the runs just made; an abbreviation is refused by finetune.py itself."""
    result_file(tmp_path / "res", "digits", "initial", 1, 0.123)  # another results folder's older run
    flags = f"{TINY_FLAGS} --data_dir {data_dir} --steps 2"
    proc = launch(f"bash {REPO}/run_finetune.sh cpu digits True {flags} --results_dir res --results_dir=res2",
                   tmp_path, {"SEEDS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.load(open(tmp_path / "res2" / "digits" / "initial" / "seed1.json"))
    assert proc.stdout.strip().splitlines()[-1] == (f"digits initial: test accuracy {100 * result['test_acc']:.2f} % "
                                                    f"over 1 seed (1)")
    proc = launch(f"bash {REPO}/run_finetune.sh cpu digits True {flags} --results res", tmp_path, {"SEEDS": "2"})
    assert proc.returncode == 2 and "unrecognized arguments: --results res" in proc.stderr
    assert "12.30" not in proc.stdout and not (tmp_path / "res" / "digits" / "initial" / "seed2.json").exists()


@pytest.mark.parametrize("flag", ["--seed 3", "--dataset=cub", "--output_dir o", "--scratch True",
                                  "--ckpt_name x"])
def test_run_all_refuses_the_flags_it_sets_itself(flag, tmp_path):
    proc = launch(f"bash {REPO}/run_all.sh cpu digits --model_name vit-mae-tiny {flag}", tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    name = flag.split()[0].split("=")[0]
    assert len(lines) == 1 and lines[0].startswith(f"error: run_all.sh takes no {name}"), proc.stderr
    assert os.listdir(tmp_path) == []  # nothing ran


def test_finetune_hint_names_the_launcher_form(data_dir, tmp_path, monkeypatch, capsys):
    """finetune.py's checkpoint-not-found hint suggested `--scratch True`, the very flag that run_finetune.sh
    could not pass through; it names both forms now."""
    import finetune
    from helpers import assert_one_line, cli
    code, err = cli(finetune, [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--checkpoint_dir",
                               tmp_path / "ckpt", "--results_dir", tmp_path / "res"], monkeypatch, capsys)
    assert code == 2
    line = assert_one_line(err, "checkpoint not found")
    assert "run_finetune.sh GPU digits True" in line and "finetune.py" in line and "--scratch True" in line
