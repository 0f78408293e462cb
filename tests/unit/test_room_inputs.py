"""The rooms of training/ take what they act on as typed parameters, not the whole argparse namespace: `args` is
read by Run (run.py), the facade that builds them, so a room's inputs are in its signature. Read with `ast`,
nothing is imported. mae_recipe.py's resolve_recipe alone takes the namespace: it fills in flags, like the entry
scripts' own resolution, before anything is recorded."""
import ast
import os

import pytest

from helpers import REPO

ROOMS = sorted(f for f in os.listdir(os.path.join(REPO, "training"))
               if f.endswith(".py") and f not in ("__init__.py", "run.py"))


FILLS_IN_FLAGS = {"mae_recipe.py": ("resolve_recipe",)}  # functions that take the namespace to fill it in


def args_uses(path: str, allowed: tuple = ()) -> list[str]:
    """'line: what' for each parameter named args and each read of a name args in the file, outside the functions
    named in `allowed`."""
    with open(path) as f:
        tree = ast.parse(f.read())
    skipped = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name in allowed
               for n in ast.walk(fn)}
    nodes = [node for node in ast.walk(tree) if id(node) not in skipped]
    found = [f"{node.lineno}: parameter args of {node.name}" for node in nodes
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs) if a.arg == "args"]
    return found + [f"{node.lineno}: reads args" for node in nodes if isinstance(node, ast.Name) and node.id == "args"]


@pytest.mark.parametrize("room", ROOMS)
def test_a_room_does_not_take_the_whole_args(room):
    assert args_uses(os.path.join(REPO, "training", room), FILLS_IN_FLAGS.get(room, ())) == []


def test_the_check_sees_a_room_that_reads_args(tmp_path):
    (tmp_path / "room.py").write_text("def schedule(optimizer, args):\n    return args.steps\n")
    assert args_uses(str(tmp_path / "room.py")) == ["1: parameter args of schedule", "2: reads args"]
    assert args_uses(str(tmp_path / "room.py"), ("schedule",)) == []
