"""The layering the architecture promises, read from the source's import statements.

Data flows one way (``Disk -> blk-mq -> virtqueue -> transport`` and ``transport ->
virtqueue -> request -> backend``), so each package may import only what lies below it.
Every ``import`` counts, including those inside functions: a lazy import is still a
dependency. The one exception is named below.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

FLOOR = frozenset({"virtblk.spec", "virtblk.errors", "virtblk.util", "virtblk.unixsock"})
"""The bottom row: the spec and the helpers every layer may use. They import nothing of ours
but the spec."""

FORBIDDEN: dict[str, frozenset[str]] = {
    # The spec is the floor's floor: constants and wire structs only.
    "virtblk.spec": frozenset({"*"}),
    # A virtqueue knows memory and the spec, no block layer, backend or transport.
    "virtblk.virtio": frozenset({"virtblk.driver", "virtblk.device", "virtblk.vhost_user",
                                 "virtblk.aio", "virtblk.embedded", "virtblk.tools"}),
    # The transport carries messages; it never knows which end of virtio-blk it serves.
    "virtblk.vhost_user": frozenset({"virtblk.driver", "virtblk.device", "virtblk.aio",
                                     "virtblk.embedded", "virtblk.tools"}),
    # The device never knows who drives it, nor over what: the server hands it rings.
    "virtblk.device": frozenset({"virtblk.driver", "virtblk.vhost_user", "virtblk.aio",
                                 "virtblk.embedded", "virtblk.tools"}),
    # The driver drives any device: ours is only reachable through the composition root.
    # The driver is below its asyncio face.
    "virtblk.driver": frozenset({"virtblk.device", "virtblk.aio", "virtblk.tools"}),
    "virtblk.aio": frozenset({"virtblk.device", "virtblk.tools"}),
    "virtblk.embedded": frozenset({"virtblk.tools"}),
    # NBD is a second wire protocol beside vhost-user: sans-IO, it knows neither virtio nor
    # either end of virtio-blk (the server in tools and the device's backend build on it).
    "virtblk.nbd": frozenset({"virtblk.virtio", "virtblk.vhost_user", "virtblk.driver",
                              "virtblk.device", "virtblk.aio", "virtblk.embedded",
                              "virtblk.tools"}),
}
"""Package -> packages it must not import (besides ``virtblk.cli``, which only
``virtblk.__main__`` may import)."""

LAZY_ONLY = {("virtblk.driver", "virtblk.embedded")}
"""``Disk.embedded`` stays the public spelling of "start our own device" (``AsyncDisk.embedded``
goes through it): it delegates to the composition root, importing it inside the method so
that loading the driver never loads the device."""


@dataclasses.dataclass(frozen=True)
class Edge:
    """One import statement: who imports what, where, and whether at module level."""

    source: str
    target: str
    file: str
    line: int
    top_level: bool


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_submodule(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _typing_only(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``, exactly."""
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _load_time(node: ast.AST) -> list[ast.AST]:
    """``node`` and what under it runs with it: not the bodies of functions (nor lambdas)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return [node]
    return [node, *(n for child in ast.iter_child_nodes(node) for n in _load_time(child))]


def _edges(path: pathlib.Path) -> list[Edge]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _edges_in(path.read_text(), module, package, str(path.relative_to(SRC)))


def _edges_in(source: str, module: str, package: str, file: str) -> list[Edge]:
    """The imports of ``module`` (in ``package``) whose text is ``source``."""
    tree = ast.parse(source, file)
    top = {id(statement) for statement in tree.body}
    for statement in tree.body:
        # What runs when the module loads: module level, and everything under a module-level
        # if/try/with or class body (a function body runs only when called)...
        if isinstance(statement, ast.If) and _typing_only(statement.test):
            # ...except the typing-only block, which never runs; its else branch does
            top.update(id(child) for stmt in statement.orelse for child in _load_time(stmt))
            continue
        top.update(id(child) for child in _load_time(statement))
    found: list[Edge] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from virtblk import unixsock`` imports the submodule, not the package.
            targets = [f"{base}.{alias.name}" if _is_submodule(f"{base}.{alias.name}")
                       else base for alias in node.names]
        for target in targets:
            if target == "virtblk" or target.startswith("virtblk."):
                found.append(Edge(module, target, file, node.lineno,
                                  id(node) in top))
    return found


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _all_edges() -> list[Edge]:
    return [edge for path in sorted(SRC.rglob("*.py")) for edge in _edges(path)]


def _violations(edges: list[Edge]) -> list[str]:
    bad = []
    for edge in edges:
        source, target = _package(edge.source), _package(edge.target)
        if source == target:
            continue
        where = f"{edge.file}:{edge.line}: {edge.source} imports {edge.target}"
        if target == "virtblk.cli" and edge.source != "virtblk.__main__":
            bad.append(f"{where} (nothing in the library imports the command)")
            continue
        forbidden = FORBIDDEN.get(source, frozenset())
        if source in FLOOR and source != "virtblk.spec" and target != "virtblk.spec":
            bad.append(f"{where} (the floor imports nothing of ours but the spec)")
        elif "*" in forbidden or target in forbidden:
            bad.append(f"{where} (an upward or sideways import)")
        elif (source, target) in LAZY_ONLY and edge.top_level:
            bad.append(f"{where} (allowed only inside the delegating method)")
    return bad


def test_the_source_is_parsed() -> None:
    """The graph is read from the real tree (an empty walk would pass every rule)."""
    edges = _all_edges()
    pairs = {(_package(e.source), _package(e.target)) for e in edges}
    assert ("virtblk.device", "virtblk.virtio") in pairs
    assert ("virtblk.driver", "virtblk.virtio") in pairs
    assert ("virtblk.__main__", "virtblk.cli") in pairs


def test_no_upward_or_sideways_import() -> None:
    assert _violations(_all_edges()) == []


@pytest.mark.parametrize(("source", "target", "top_level"), [
    ("virtblk.virtio.memory", "virtblk.driver.disk", False),
    ("virtblk.virtio.polling", "virtblk.vhost_user.frontend", True),
    ("virtblk.device.blk", "virtblk.driver.blkmq", False),
    ("virtblk.device.blk", "virtblk.vhost_user.backend", True),
    ("virtblk.vhost_user.backend", "virtblk.device.blk", True),
    ("virtblk.aio", "virtblk.device.options", False),
    ("virtblk.driver.disk", "virtblk.device.options", False),
    ("virtblk.driver.disk", "virtblk.embedded", True),
    ("virtblk.device.control", "virtblk.cli.main", False),
    ("virtblk.spec", "virtblk.errors", True),
    ("virtblk.util", "virtblk.device.blk", False),
    ("virtblk.errors", "virtblk.aio", True),
    ("virtblk.unixsock", "virtblk.util", True),
    ("virtblk.driver.disk", "virtblk.aio", False),
    ("virtblk.nbd.wire", "virtblk.device.blk", False),
    ("virtblk.nbd.wire", "virtblk.virtio.memory", True),
])
def test_each_rule_catches_its_import(source: str, target: str, top_level: bool) -> None:
    """The checker itself: each kind of forbidden import is reported."""
    edge = Edge(source, target, "x.py", 1, top_level)
    assert len(_violations([edge])) == 1


def test_the_lazy_delegate_is_allowed() -> None:
    assert _violations([Edge("virtblk.driver.disk", "virtblk.embedded", "x.py", 1, False)]) == []


@pytest.mark.parametrize("source", [
    "from virtblk.embedded import open_embedded\n",
    "if not TYPE_CHECKING:\n    from virtblk.embedded import open_embedded\n",
    "if TYPE_CHECKING:\n    pass\nelse:\n    from virtblk.embedded import open_embedded\n",
    "class Disk:\n    from virtblk.embedded import open_embedded\n",
    "try:\n    import virtblk.embedded\nexcept ImportError:\n    pass\n",
])
def test_a_load_time_import_is_not_lazy(source: str) -> None:
    """Only an import inside a function (or a typing-only block) waits for a call."""
    edges = _edges_in(source, "virtblk.driver.probe", "virtblk.driver", "probe.py")
    assert [e.top_level for e in edges] == [True]
    assert len(_violations(edges)) == 1


@pytest.mark.parametrize("source", [
    "def f() -> None:\n    from virtblk.embedded import open_embedded\n",
    "if TYPE_CHECKING:\n    from virtblk.embedded import EmbeddedDevice\n",
    "import typing\nif typing.TYPE_CHECKING:\n    from virtblk.embedded import EmbeddedDevice\n",
])
def test_a_lazy_import_is_lazy(source: str) -> None:
    edges = _edges_in(source, "virtblk.driver.probe", "virtblk.driver", "probe.py")
    assert [e.top_level for e in edges] == [False]
    assert _violations(edges) == []
