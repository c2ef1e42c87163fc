"""syncd's imports run one way: from the command line down to the errors.

Every import under ``syncd/`` is read with ``ast``: module-level ones,
function-level (lazy) ones, those under ``if TYPE_CHECKING``, and the
modules named to ``import_in_background``.  The test fails on an import
cycle between modules and on an import against the layer order below (the
map of docs/design.md, "Modules"), and on a module over 800 lines or a
function over 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "syncd"

# Top first: a module may import from its own layer and those below it, never
# from one above.  A package (delta/, verify/, push/, prewarm/, fsops/,
# agent/) sits in its layer as one.  ``syncd`` is the package's __init__.
LAYERS: list[list[str]] = [
    ["__main__"],
    ["cli"],
    ["daemon"],
    # own_release: the node's own-release check (config and manifest meet verify).
    ["runonce", "status", "own_release"],
    # prewarm/ holds the stage-only agent too (prewarm/stager.py), which
    # imports no agent: the command line hands it the agent for the hand-over.
    ["push", "prewarm"],
    ["agent"],
    ["transport", "gcm", "session"],
    # partial: the run and partial files prewarm and a push resume from
    # (on fsops); sparse: extents and holes (on errors alone); scanfeed: a
    # running scan's rows for the pushes (imports nothing of syncd).
    ["verify", "scan", "scanfeed", "plan", "basis", "fsops", "staging", "compress", "messages", "protocol", "manifest",
     "delta", "trace", "lock", "notify", "metrics", "partial", "sparse", "logs"],
    ["config"],
    # Below config, not beside plan as in the map: config compiles each
    # include/exclude rule as it loads sync.ini, so that a bad one is a
    # ConfigError naming its key.  filters imports nothing of syncd.
    ["filters"],
    ["errors", "syncd"],
]

# Imports against the order (or in a cycle) that are known, each with what
# ends it.  The test fails on any other, and on an entry that no longer
# occurs (take it out).
KNOWN: dict[tuple[str, str], str] = {}

MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``syncd``, ``syncd.cli``, ``syncd.delta.patch``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _component(module: str) -> str:
    """The unit the layers name: ``syncd.delta.patch`` is ``delta``, the package itself ``syncd``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported syncd module, line) for every import in ``path``, at any depth."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[str, int]] = []

    def add(target: str, line: int) -> None:
        if target == "syncd" or target.startswith("syncd."):
            # The longest prefix that is a module: ``syncd.errors.X`` is syncd.errors.
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            found.append((target, line))

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # ``from . import config`` imports the module syncd.config.
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno)
        elif isinstance(node, ast.Call) and _called(node) in ("import_in_background", "import_module"):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(arg.value, node.lineno)
    return found


def _called(call: ast.Call) -> str | None:
    """The name a call calls: ``f`` for ``f(...)`` and ``x.f(...)``."""
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _graph() -> dict[str, dict[str, int]]:
    """Module -> {imported module: first line}, self-imports left out."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for target, line in _imports(module, path, modules):
            if target != module:
                edges.setdefault(target, line)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer_of() -> dict[str, int]:
    layer = {}
    for i, names in enumerate(LAYERS):
        for name in names:
            assert name not in layer, f"{name} is in two layers"
            layer[name] = i
    return layer


def test_every_module_has_a_layer() -> None:
    layer = _layer_of()
    missing = sorted({_component(m) for m in _modules()} - set(layer))
    assert not missing, f"place these in LAYERS (tests/test_layers.py): {missing}"


def test_imports_follow_the_layers_and_make_no_cycle() -> None:
    graph = _graph()
    layer = _layer_of()
    problems = []
    kept: dict[str, set[str]] = {}  # the graph without the known imports
    units: dict[str, set[str]] = {}  # the same between the layers' units
    seen_known = set()
    for module, edges in sorted(graph.items()):
        a = _component(module)
        kept[module] = set()
        for target, line in sorted(edges.items()):
            b = _component(target)
            if (a, b) in KNOWN:
                seen_known.add((a, b))
                continue
            kept[module].add(target)
            if a == b:
                continue
            units.setdefault(a, set()).add(b)
            if a in layer and b in layer and layer[a] > layer[b]:
                problems.append(f"{module} (line {line}) imports {target}: {b} is above {a} in LAYERS")
    # Between modules, and between units: two units of one layer may not
    # import each other either.
    for scc in _cycles(kept) + _cycles(units):
        problems.append(f"import cycle: {' <-> '.join(scc)}")
    for a, b in sorted(set(KNOWN) - seen_known):
        problems.append(f"{a} no longer imports {b}: take ({a!r}, {b!r}) out of KNOWN")
    assert not problems, "\n".join(problems)


def _over(path: Path) -> tuple[list[str], list[tuple[str, int, str, int]]]:
    """``path`` if it is over MAX_MODULE_LINES (a line naming it), and its
    functions over MAX_FUNCTION_LINES (path, line, name, lines)."""
    text = path.read_text(encoding="utf-8")
    rel = str(path.relative_to(PACKAGE.parent))
    lines = text.count("\n")
    module = [f"{rel}: {lines} lines"] if lines > MAX_MODULE_LINES else []
    functions = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            span = node.end_lineno - node.lineno + 1
            if span > MAX_FUNCTION_LINES:
                functions.append((rel, node.lineno, node.name, span))
    return module, functions


def test_modules_and_functions_keep_to_the_sizes() -> None:
    """Every module of at most MAX_MODULE_LINES lines, every function of at
    most MAX_FUNCTION_LINES: a longer one is a place to split (issue #9)."""
    over = []
    for path in _modules().values():
        long_module, long_functions = _over(path)
        over += long_module + [f"{rel}:{line} {name}: {span} lines" for rel, line, name, span in long_functions]
    assert not over, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function:\n" + "\n".join(over)
