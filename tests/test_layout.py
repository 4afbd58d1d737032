"""The house of ../shared/DESIGN.md: every module imports only from floors above it or beside it,
never from below, with no circles; only config and kaggle read environment variables; no module
or function outgrows its room."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cmc_kit"

# Top to bottom, as DESIGN.md draws the data flow. Floor 0 holds what every floor uses.
FLOORS = [
    {"errors", "fileio", "config", "palette", "layout", "progress", "startup"},
    {"kaggle", "synth"},
    {"data", "decode", "views", "cache"},
    {"layers", "models", "objectives", "training", "runs"},
    {"features", "embed", "explore", "probes", "evaluate", "finetune", "export"},
    {"notebook", "demo", "arguments", "cli", "__main__"},
]
ENVIRONMENT_READERS = {"config", "kaggle"}
MAX_MODULE_LINES = 520
MAX_FUNCTION_LINES = 80  # lines of code, docstring not counted


def _modules() -> dict[str, Path]:
    """Dotted name below cmc_kit -> file, e.g. 'training.step', 'explore' (a package face)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name or "__init__"] = path
    return found


def _room(name: str) -> str:
    """The box of DESIGN.md a module lives in: its top-level module or package."""
    return name.split(".")[0]


def _imports(name: str, path: Path) -> set[str]:
    """cmc_kit modules (dotted, below cmc_kit) that a file imports, at any depth of the file."""
    package_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = ".".join(package_parts[:len(package_parts) - node.level + 1]
                                + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("cmc_kit"):
                base = node.module[len("cmc_kit."):] if node.module != "cmc_kit" else ""
            else:
                continue
            for alias in node.names:
                out.add(f"{base}.{alias.name}".strip("."))
                out.add(base)
        elif isinstance(node, ast.Import):
            out.update(a.name[len("cmc_kit."):] for a in node.names
                       if a.name.startswith("cmc_kit."))
    modules = _modules()
    return {target for target in out if target in modules and target}


def _floor(room: str) -> int:
    for index, floor in enumerate(FLOORS):
        if room in floor:
            return index
    raise AssertionError(f"cmc_kit/{room} is on no floor of DESIGN.md's picture: add it to "
                         "FLOORS in tests/test_layout.py where it belongs.")


def test_every_module_imports_only_from_above_or_beside_it():
    wrong = []
    for name, path in _modules().items():
        if name == "__init__":
            continue
        room = _room(name)
        for target in _imports(name, path):
            other = _room(target)
            if other != room and _floor(other) > _floor(room):
                wrong.append(f"{name} (floor {_floor(room)}) imports {target} "
                             f"(floor {_floor(other)})")
    assert not wrong, "imports from a floor below:\n" + "\n".join(sorted(wrong))


def test_no_import_circles_between_modules():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = _imports(name, path)
        # A package face re-exporting its own modules is not a circle of design.
        graph[name] = {t for t in targets if t != name and not t.startswith(name + ".")
                       and not name.startswith(t + ".")}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_shared_cycle_checker_agrees():
    checker = PACKAGE.parent.parent / "shared" / "tools" / "import_cycles.py"
    if not checker.is_file():
        pytest.skip(f"{checker} is not beside this checkout")
    done = subprocess.run([sys.executable, str(checker), str(PACKAGE)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_only_config_and_kaggle_read_the_environment():
    readers = []
    for name, path in _modules().items():
        if _room(name) in ENVIRONMENT_READERS:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.append(f"{name}:{node.lineno}")
    assert not readers, f"environment read outside config/kaggle: {readers}"


def test_no_module_or_function_outgrows_its_room():
    too_long = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"cmc_kit/{path.relative_to(PACKAGE)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # Code lines: a long docstring documents, it does not make a room crowded.
                length = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    length -= first.end_lineno - first.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
