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
    ("errors", "logs", "mlflow_plugin", "compat", "background", "checksums"),
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
    ("demo", "demo_summary"),
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


def _resolved(name: str, level: int, module: str, is_package: bool) -> str:
    """`name` imported `level` dots up from `module` (0: absolute; a package's own name
    is its `__init__`)."""
    if level == 0:
        return name
    parts = ["mnistops", *module.split(".")] if module else ["mnistops"]
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


DYNAMIC = {"import_module", "__import__", "run_module", "resolve_name", "find_spec"}
"""functions that import a module named by a string"""

UNREADABLE = "?"
"""what a dynamic import whose module the rule cannot read counts as: a failure"""


def _dynamic_names(tree: ast.Module) -> set[str]:
    """DYNAMIC, and any name they are imported as (`import_module as im`)."""
    names = set(DYNAMIC)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname for a in node.names if a.name in DYNAMIC and a.asname}
    return names


def _literal(node: ast.expr, module: str, is_package: bool) -> str | None:
    """The text of a module name written as a string, `__package__` or an f-string
    whose fixed start names a package (`f"mnistops.stack.{name}"`: mnistops.stack)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in ("__package__", "__name__"):
        return ".".join(["mnistops", *module.split(".")][: None if is_package else -1])
    if isinstance(node, ast.JoinedStr) and isinstance(node.values[0], ast.Constant):
        start = str(node.values[0].value)
        if start.count(".") >= 2 or not start.startswith("mnistops"):
            return start.rsplit(".", 1)[0]
    return None


def _dynamic(node: ast.Call, names: set[str], module: str, is_package: bool) -> set[str]:
    """The modules a call of an importing function names: `mnistops.*` ones, none for
    another library's, UNREADABLE when the name cannot be read."""
    called = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
    if called not in names:
        return set()
    text = _literal(node.args[0], module, is_package) if node.args else None
    if text is None:
        return {UNREADABLE}
    if text.startswith("."):
        package = _literal(node.args[1], module, is_package) if len(node.args) > 1 else None
        if package is None:
            return {UNREADABLE}
        level = len(text) - len(text.lstrip("."))
        base = package.split(".")[: len(package.split(".")) - (level - 1)]
        text = ".".join([*base, text.lstrip(".")])
    level = _argument(node, 4, "level")
    if called == "__import__" and level is not None:
        if not (isinstance(level, ast.Constant) and isinstance(level.value, int)):
            return {UNREADABLE}
        text = _resolved(text, level.value, module, is_package)
    fromlist = _argument(node, 3, "fromlist") if called == "__import__" else None
    if isinstance(fromlist, (ast.List, ast.Tuple)):
        return {f"{text}.{_literal(e, module, is_package) or UNREADABLE}" for e in fromlist.elts}
    return {text}


def _argument(node: ast.Call, position: int, keyword: str) -> ast.expr | None:
    """A call's argument, given by position or by keyword."""
    if len(node.args) > position:
        return node.args[position]
    return next((k.value for k in node.keywords if k.arg == keyword), None)


EVALUATING = {"exec", "eval", "compile"}
"""builtins that run code from text: an import in them cannot be read"""


def _escapes(tree: ast.Module, names: set[str]) -> bool:
    """An importing function used other than by a direct call (`f = import_module`,
    `getattr(importlib, "import_module")`, passed as an argument), or code run from
    text: imports the rule cannot follow."""
    called = {
        id(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
    }
    for node in ast.walk(tree):
        is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        if is_call and node.func.id in EVALUATING:
            return True
        named = getattr(node, "attr", None) if isinstance(node, ast.Attribute) else None
        named = node.id if isinstance(node, ast.Name) else named
        if named in names and id(node) not in called:
            return True
        if isinstance(node, ast.Constant) and node.value in names:
            return True
    return False


def imported(tree: ast.Module, module: str = "", is_package: bool = False) -> set[str]:
    """Every `mnistops.*` module a module imports, at the top or inside a function:
    absolute, relative, or by name through `importlib` (UNREADABLE: a name it cannot
    read)."""
    names: set[str] = set()
    importing = _dynamic_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolved(node.module or "", node.level, module, is_package)
            names |= {f"{source}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.Call):
            names |= _dynamic(node, importing, module, is_package)
    if _escapes(tree, importing):
        names.add(UNREADABLE)
    return {
        n if n == UNREADABLE else n.removeprefix("mnistops.")
        for n in names
        if n == UNREADABLE or n.startswith("mnistops.")
    }


def test_imports_run_one_way() -> None:
    upward = []
    for module, tree in modules().items():
        is_package = (PACKAGE / module.replace(".", "/")).is_dir()
        for target in imported(tree, module, is_package):
            if target == UNREADABLE:
                upward.append(f"mnistops.{module} imports a module by a name the rule cannot read")
            elif layer_of(target) > layer_of(module):
                upward.append(f"mnistops.{module} imports mnistops.{target}")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("data.remote", "from ..serving import app"),
        ("data", "from ..serving.app import create_app"),
        ("data.remote", "from . import reader\nfrom .. import demo"),
        ("data.remote", "importlib.import_module('mnistops.serving.app')"),
        ("data.remote", "importlib.import_module('.serving.app', 'mnistops')"),
        ("data.remote", "importlib.import_module('..serving.app', __package__)"),
        ("data.remote", "__import__('mnistops', fromlist=['serving']).serving"),
        ("data.remote", "from importlib import import_module as im\nim('mnistops.demo')"),
        ("data.remote", "runpy.run_module('mnistops.cli')"),
        ("data.remote", "pkgutil.resolve_name('mnistops.serving.app:create_app')"),
        ("data.remote", "__import__(f'mnistops.cli.{name}')"),
        ("data.remote", "importlib.import_module(name)"),
        ("data.remote", "importlib.import_module(f'mnistops.{name}')"),
        ("data.remote", "__import__('mnistops', globals(), locals(), ['cli'])"),
        ("data.remote", "__import__('cli', globals(), None, ['main'], 2)"),
        ("data.remote", "__import__('cli', globals(), level=2)"),
        ("data.remote", "im = importlib.import_module\nim('mnistops.cli')"),
        ("data.remote", "getattr(importlib, 'import_module')('mnistops.cli')"),
        ("data.remote", "importlib.__dict__['import_module']('mnistops.cli')"),
        ("data.remote", "(lambda f: f('mnistops.cli'))(importlib.import_module)"),
        ("data.remote", "exec('import mnistops.cli')"),
    ],
)
def test_an_upward_import_is_seen_however_written(module: str, line: str) -> None:
    """The rule holds for relative imports and imports by name too, not only for
    `from mnistops.x import y`: a name it cannot read fails it."""
    is_package = (PACKAGE / module.replace(".", "/")).is_dir()
    found = imported(ast.parse(line), module, is_package)
    assert UNREADABLE in found or any(
        layer_of(target.split(":")[0]) > layer_of(module) for target in found
    ), found


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
