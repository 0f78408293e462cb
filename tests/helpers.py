"""Helpers shared by the test files: an entry point run as the shell runs it, the one-line error check, and
main() observed from outside: cut at a step (a kill between saves), what it hands to the run, what a step gets."""
import sys

import pytest

import training
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


def assert_parse_error(err: str, flag: str, *words: str) -> str:
    """stderr is argparse's refusal of `flag`: the usage, then one `error: argument FLAG: ...` line holding
    every one of `words`, no traceback; returns that line."""
    last = err.strip().splitlines()[-1]
    assert f"error: argument {flag}: " in last and "Traceback" not in err, err
    for w in words:
        assert w in last, (w, last)
    return last


# ----------------------------------------------------------------------------- observing main() from outside

class Cut(Exception):
    """Raised when a run asks for the draws of the step it is cut at (see cut_at)."""


class WatchedSteps:
    """For draws handed to training.supplied_draws: `starting(step)`, called where a step asks for its data order,
    records the step, calls `on_step(step)` the first time and raises Cut at step `stop`."""

    def __init__(self, stop=None, on_step=None):
        self.stop, self.on_step, self.started = stop, on_step, []

    def starting(self, step) -> None:
        if step not in self.started:
            self.started.append(step)
            if self.on_step is not None:
                self.on_step(step)
        if step == self.stop:
            raise Cut


class _CutDraws(WatchedSteps):
    """The run's own draws (training.Draws), with `on_step(step)` called as each step starts and Cut raised
    when step `stop` is asked for."""

    def __init__(self, draws, stop, on_step):
        super().__init__(stop, on_step)
        self.draws = draws

    def indices(self, n, step):
        self.starting(step)
        return self.draws.indices(n, step)

    def uniform(self, step, stream, *shape):
        return self.draws.uniform(step, stream, *shape)

    def dropout_seed(self, step):
        return self.draws.dropout_seed(step)


def cut_at(stop=None, on_step=None):
    """A factory for training.supplied_draws: runs keep their own randomness, are told when each step starts, and
    stop (Cut) before step `stop` -- e.g. one step of a 20,000-step recipe, its schedule unchanged."""
    def make(args, rank, world, device):
        return _CutDraws(training.Draws(args.seed, args.batch_size, args.steps, rank, world, device), stop, on_step)
    return make


def spy_prepare(monkeypatch) -> dict:
    """Fills a dict with what a stage's main() hands to Run.prepare: the model it trains (and a copy of its
    state then), its optimizer and schedule, and the Run."""
    seen = {}
    real = training.Run.prepare

    def prepare(self, model, optimizer, scheduler):
        seen.update(run=self, model=model, optimizer=optimizer, scheduler=scheduler,
                    start={k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(self, model, optimizer, scheduler)
    monkeypatch.setattr(training.Run, "prepare", prepare)
    return seen


def spy(monkeypatch, module, name, record, replace=None):
    """Wraps module.<name> (which main() looks up when it runs): record(*args, **kwargs) sees every call, then the
    real function runs -- or `replace`, for tests that only look at the inputs."""
    real = getattr(module, name)

    def wrapper(*a, **kw):
        record(*a, **kw)
        return (replace or real)(*a, **kw)
    monkeypatch.setattr(module, name, wrapper)
    return real
