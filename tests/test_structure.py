"""The house rules: imports run one way, from the CLI down to the settings; every package
says what lives in it; only `clients.py` configures a client (and `logs.py` the
libraries' verbosity): no other module changes the process's environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "mnistops"
LAYERS = [
    ("errors", "logs", "mlflow_plugin", "compat"),
    ("settings",),
    ("credentials",),
    ("clients",),
    ("stack",),
    ("data",),
    ("train",),
    ("tracking",),
    ("pipeline",),
    ("loop",),
    ("flows", "predict"),
    ("serving",),
    ("demo",),
    ("cli", "__main__"),
]


def layer_of(module: str) -> int:
    """The layer of `mnistops.<module>`: the longest matching prefix wins."""
    best = (-1, -1)
    for number, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                best = max(best, (len(name), number))
    assert best[1] >= 0, f"mnistops.{module} is in no layer of {LAYERS}"
    return best[1]


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text())
    return found


def imported(tree: ast.Module) -> set[str]:
    """Every `mnistops.*` module a module imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnistops"):
            for alias in node.names:
                names.add(f"{node.module}.{alias.name}".removeprefix("mnistops."))
        elif isinstance(node, ast.Import):
            names |= {
                a.name.removeprefix("mnistops.")
                for a in node.names
                if a.name.startswith("mnistops.")
            }
    return {n for n in names if not n.startswith(("typing", "__future__"))}


def test_imports_run_one_way() -> None:
    upward = []
    for module, tree in modules().items():
        for target in imported(tree):
            if layer_of(target) > layer_of(module):
                upward.append(f"mnistops.{module} imports mnistops.{target}")
    assert not upward, "\n".join(upward)


def test_every_package_says_what_lives_in_it() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and len(docstring) > 40, init


ENVIRON_WRITES = ("update", "setdefault", "pop", "popitem", "clear", "__setitem__")


def changes_environ(tree: ast.Module) -> bool:
    """`os.environ[...] = `, `del os.environ[...]`, `os.environ.update(...)` and the like,
    or `os.putenv` / `os.unsetenv`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            if _is_environ(node.value):
                return True
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name in ("putenv", "unsetenv") or (
                name in ENVIRON_WRITES and _is_environ(node.func.value)
            ):
                return True
    return False


def _is_environ(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def test_only_the_clients_and_logs_modules_touch_the_environment() -> None:
    writers = [m for m, tree in modules().items() if changes_environ(tree)]
    assert sorted(writers) == ["clients", "logs"], writers


def test_the_environment_check_sees_every_kind_of_write() -> None:
    for code in (
        "os.environ['A'] = '1'",
        "del os.environ['A']",
        "os.environ.update(A='1')",
        "os.environ.setdefault('A', '1')",
        "os.putenv('A', '1')",
    ):
        assert changes_environ(ast.parse(code)), code
    assert not changes_environ(ast.parse("x = os.environ.get('A')"))
