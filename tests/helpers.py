"""Helpers shared by the test files: an entry point run as the shell runs it, the one-line error check,
and a kill between saves."""
import sys

import pytest

import utils


def cli_output(module, argv, monkeypatch, capsys):
    """Run a script's entry point as the shell would; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__name__.split(".")[-1] + ".py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(module.get_args_parser, module.main)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def tool_output(module, argv, monkeypatch, capsys):
    """Like cli_output, for a command that may succeed (run_cli returns): exit code 0 when it does."""
    monkeypatch.setattr(sys, "argv", [module.__name__.split(".")[-1] + ".py", *map(str, argv)])
    try:
        utils.run_cli(module.get_args_parser, module.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(module, argv, monkeypatch, capsys):
    """Run a script's entry point as the shell would; returns (exit code, stderr)."""
    code, _, err = cli_output(module, argv, monkeypatch, capsys)
    return code, err


def assert_one_line(err: str, *words: str) -> str:
    """stderr is exactly one `error: ...` line, no traceback, containing every one of `words`; returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


class Killed(Exception):
    pass


def kill_at(monkeypatch, kill_step):
    """Make Run.step die before optimizer step `kill_step` (0-based), like a kill -9 between saves."""
    real = utils.Run.step

    def step(self, step, loss, **terms):
        if step == kill_step:
            raise Killed
        return real(self, step, loss, **terms)
    monkeypatch.setattr(utils.Run, "step", step)
