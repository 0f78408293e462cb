"""No import circle: a module that imports another, at its top or lazily inside a function, is not imported back by
it, directly or through others, so each module can be read, loaded and tested on its own (STYLE.md "Where things
live"). The graph is read from the source with `ast`, nothing is imported."""
import ast
import os

from helpers import REPO


def _module_names(root: str, package: str) -> dict[str, str]:
    """{dotted module name: file} of the .py files under root/package (its __init__.py is the package itself), or
    of the one module root/package when package names a .py file."""
    if package.endswith(".py"):
        return {package[:-len(".py")]: os.path.join(root, package)}
    names = {}
    for folder, dirs, files in os.walk(os.path.join(root, package)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for file in sorted(f for f in files if f.endswith(".py")):
            parts = os.path.relpath(os.path.join(folder, file), root)[:-len(".py")].split(os.sep)
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, file)
    return names


def _imported(node, module: str, is_package: bool, modules) -> list[str]:
    """The modules of `modules` an import statement names: `from p import m` names p.m when m is a module, else p."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: counted from the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph(packages: list[str], root: str = REPO) -> dict[str, dict[str, str]]:
    """{module: {module it imports: 'file:line' of that import}} over the modules of `packages` (folders under
    `root`), function-level imports included; imports of anything outside `packages` are left out."""
    files = {name: path for package in packages for name, path in _module_names(root, package).items()}
    graph = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        graph[module] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(node, module, path.endswith("__init__.py"), files):
                    if name in files and name != module:
                        graph[module].setdefault(name, f"{os.path.relpath(path, root)}:{node.lineno}")
    return graph


def find_circle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None when it has none."""
    done, path = set(), []

    def visit(module):
        path.append(module)
        for target in sorted(graph.get(module, {})):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done:
                circle = visit(target)
                if circle:
                    return circle
        done.add(path.pop())
        return None

    for module in sorted(graph):
        if module not in done:
            circle = visit(module)
            if circle:
                return circle
    return None


def assert_no_import_circle(packages: list[str], root: str = REPO) -> None:
    graph = import_graph(packages, root)
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(
        f"{a} ({graph[a][b]})" for a, b in zip(circle, circle[1:])) + f" -> {circle[-1]}"


# Folders by audience (STYLE.md "Where things live"): the product -- the stages and what a run needs, including
# what it writes (outputs/) -- imports none of launch/ (running the table), tools/ (utilities on saved runs) or
# lab/ (checks, benchmarks, experiments about the project); launch/ and tools/ do not import lab/.
PRODUCT = ["pretrain.py", "selftrain.py", "finetune.py", "probe.py", "report.py", "utils.py", "errors.py",
           "mae_common.py", "text_common.py", "paper.py", "data", "models", "training", "outputs"]


def _top_level_modules(root: str = REPO) -> list[str]:
    return sorted(f for f in os.listdir(root) if f.endswith(".py"))


def test_data_has_no_import_circle():
    assert_no_import_circle(["data"])


def test_the_repository_has_no_import_circle():
    assert_no_import_circle(_top_level_modules() + ["data", "models", "training", "outputs", "launch", "tools", "lab"])


def test_every_top_level_module_has_an_audience():
    """A new module at the top must be placed: in PRODUCT (checked below) or in a folder."""
    assert set(_top_level_modules()) <= set(PRODUCT), "a top-level module outside PRODUCT: put it in a folder"


def _imports_into(packages: list[str], folders: list[str]) -> list[str]:
    graph = import_graph(packages + folders)
    inside = set(import_graph(folders))
    own = set(import_graph(packages))
    return sorted(f"{module} imports {target} ({where})" for module in own for target, where in graph[module].items()
                  if target in inside)


def test_the_product_imports_no_launcher_tool_or_lab_equipment():
    assert _imports_into(PRODUCT, ["launch", "tools", "lab"]) == []


def test_the_launchers_and_tools_import_no_lab_equipment():
    assert _imports_into(["launch", "tools"], ["lab"]) == []
    assert _imports_into(["launch"], ["tools"]) == [] and _imports_into(["tools"], ["launch"]) == []


def test_a_lazy_import_back_is_a_circle(tmp_path):
    """The check sees imports inside functions, `from pkg import module` and relative imports: a circle made of
    any of them is found, and the same modules without the import back pass."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "cli.py").write_text("from pkg import worker\n")
    (tmp_path / "pkg" / "helpers.py").write_text("import os\n")
    (tmp_path / "pkg" / "worker.py").write_text("from .helpers import os\n\n\ndef run():\n    pass\n")
    assert find_circle(import_graph(["pkg"], str(tmp_path))) is None
    assert import_graph(["pkg"], str(tmp_path))["pkg.cli"] == {"pkg.worker": "pkg/cli.py:1"}

    (tmp_path / "pkg" / "worker.py").write_text("from .helpers import os\n\n\ndef run():\n    from pkg import cli\n")
    assert find_circle(import_graph(["pkg"], str(tmp_path))) == ["pkg.cli", "pkg.worker", "pkg.cli"]
    (tmp_path / "pkg" / "helpers.py").write_text("def help():\n    from . import cli\n")
    (tmp_path / "pkg" / "worker.py").write_text("from .helpers import os\n")
    assert find_circle(import_graph(["pkg"], str(tmp_path))) == ["pkg.cli", "pkg.worker", "pkg.helpers", "pkg.cli"]
