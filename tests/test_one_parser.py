"""One parser for one question: no command line accepts an abbreviated flag (argparse's default would take
`--results` for `--results_dir`), and the launchers never re-derive what a Python program decides from the
same arguments: run_finetune.sh and run_all.sh refuse the flags whose values they set themselves."""
import argparse
import importlib
import json
import os
import pkgutil
import stat
import subprocess
import sys

import pytest

from conftest import REPO, TINY

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
    assert {"pretrain", "selftrain", "finetune", "report", "data.prepare", "tools.visualize", "tools.bench",
            "tools.small_reproduction"} <= set(ENTRY_MODULES)


@pytest.mark.parametrize("module_name", ENTRY_MODULES)
def test_no_parser_accepts_an_abbreviated_flag(module_name, capsys):
    parser = importlib.import_module(module_name).get_args_parser()
    base = []  # the required flags, with values they accept
    for action in parser._actions:
        if action.required and action.option_strings:
            base += [action.option_strings[-1], *(_value_for(parser, [], action) or ["x"])]
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
    assert checked >= 3, module_name
    capsys.readouterr()
