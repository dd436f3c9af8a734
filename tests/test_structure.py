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


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module an `from X import` names, a relative one (`from ..serving`) resolved
    from `module` (a package's own name is its `__init__`)."""
    if node.level == 0:
        return node.module or ""
    parts = ["mnistops", *module.split(".")] if module else ["mnistops"]
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _dynamic(node: ast.Call) -> str | None:
    """The module of `import_module("mnistops...")` / `__import__(...)`: its text, or
    the literal start of an f-string."""
    name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")
    return None


def imported(tree: ast.Module, module: str = "", is_package: bool = False) -> set[str]:
    """Every `mnistops.*` module a module imports, at the top or inside a function:
    absolute, relative, or by name through `importlib`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, is_package)
            if source == "mnistops" or source.startswith("mnistops."):
                names |= {
                    f"{source}.{alias.name}".removeprefix("mnistops.") for alias in node.names
                }
        elif isinstance(node, ast.Import):
            names |= {
                a.name.removeprefix("mnistops.")
                for a in node.names
                if a.name.startswith("mnistops.")
            }
        elif isinstance(node, ast.Call):
            target = _dynamic(node)
            if target and target.startswith("mnistops."):
                names.add(target.removeprefix("mnistops."))
    return {n for n in names if not n.startswith(("typing", "__future__"))}


def test_imports_run_one_way() -> None:
    upward = []
    for module, tree in modules().items():
        is_package = (PACKAGE / module.replace(".", "/")).is_dir()
        for target in imported(tree, module, is_package):
            if layer_of(target) > layer_of(module):
                upward.append(f"mnistops.{module} imports mnistops.{target}")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("data.remote", "from ..serving import app"),
        ("data", "from ..serving.app import create_app"),
        ("data.remote", "from . import reader\nfrom .. import demo"),
        ("data.remote", "importlib.import_module('mnistops.serving.app')"),
        ("data.remote", "__import__(f'mnistops.cli.{name}')"),
    ],
)
def test_an_upward_import_is_seen_however_written(module: str, line: str) -> None:
    """The rule holds for relative imports and imports by name too, not only for
    `from mnistops.x import y`."""
    is_package = (PACKAGE / module.replace(".", "/")).is_dir()
    found = imported(ast.parse(line), module, is_package)
    assert any(layer_of(target) > layer_of(module) for target in found), found


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
