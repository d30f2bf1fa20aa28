"""
The shape of the package, checked from its source: no import cycles between
modules (counting imports inside functions and under TYPE_CHECKING, which
only hide a cycle), no module importing another's private names, and every
subpackage's ``__init__.py`` empty, so importing one module never pulls in
its siblings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "wsgateway"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module imported, name taken from it or '') for every import of ours in ``path``, wherever it stands."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("wsgateway")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wsgateway"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # "from wsgateway.ops import logs" imports the module wsgateway.ops.logs
                found.append((sub, "") if sub in MODULES else (node.module, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {target for target, _ in _imports(path) if target in MODULES and target != name}
        # a package's __init__ runs on import of any of its modules
        graph[name] = {t for t in targets if MODULES[t].name != "__init__.py"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_package() -> None:
    graph = _graph()
    assert len(graph) > 40
    assert "wsgateway.relay.frames" in graph["wsgateway.relay.relay"]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (break each with a protocol in wsgateway/interfaces.py): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules() -> None:
    bad = [f"{_module_name(path)} imports {name} from {target}"
           for path in MODULES.values() for target, name in _imports(path)
           if name.startswith("_") and not name.startswith("__")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_package_init_is_empty(init: Path) -> None:
    assert init.read_text(encoding="utf-8").strip() == "", f"{init.relative_to(ROOT)} must stay empty"


def _readme_layout() -> set[str]:
    """Every module the README's layout block names (one per line), as a path under wsgateway/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("### Layout", 1)[1].split("```", 2)[1]
    named: set[str] = set()
    folder = ""
    for line in block.splitlines():
        top = re.match(r"^  (\w+)(/|\.py)\s", line + " ")
        if top:
            folder = top.group(1) + "/" if top.group(2) == "/" else ""
            if top.group(2) == ".py":
                named.add(top.group(1) + ".py")
            continue
        inner = re.match(r"^    (\w+\.py)\s", line + " ")
        if inner and folder:
            named.add(folder + inner.group(1))
    return named


def test_the_readme_layout_names_every_module() -> None:
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    named = _readme_layout()
    assert not modules - named, f"modules the README's layout does not list: {sorted(modules - named)}"
    assert not named - modules, f"the README's layout lists modules that do not exist: {sorted(named - modules)}"


def test_setup_cfg_installs_every_subpackage() -> None:
    """A subpackage missing from setup.cfg's list works in the tree and is gone from every install."""
    listed = set(re.search(r"^packages = (.*)$", (ROOT / "setup.cfg").read_text(), re.M)[1].replace(" ", "").split(","))
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages - listed == set()
