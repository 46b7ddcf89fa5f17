"""The packages depend one way: library -> protocols -> Flower apps -> CLI, checked on the source (ast).

Layers, lowest first: ``fedprune`` (the library; no Flower, no Hydra), the protocol layer
(``fedprune.protocols`` and HideNseek's protocol modules; no Flower, no Hydra), the Flower apps
``server`` and ``clients`` (which never import each other), and ``cli`` (nothing imports it). Between
library modules and subpackages, the protocol layer and the top packages, the import graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedprune", "server", "clients", "cli")
PROTOCOL_LAYER = (
    "fedprune.protocols",
    "fedprune.hidenseek.job",
    "fedprune.hidenseek.server",
    "fedprune.hidenseek.site",
)
FORBIDDEN_BELOW_APPS = ("flwr", "hydra", "omegaconf")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth in the file (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def layer(module: str) -> int | None:
    """0 library, 1 protocols, 2 Flower apps, 3 CLI; None for third-party modules."""
    if module == "cli" or module.startswith("cli."):
        return 3
    if module.split(".")[0] in ("server", "clients"):
        return 2
    if any(module == p or module.startswith(p + ".") for p in PROTOCOL_LAYER):
        return 1
    if module == "fedprune" or module.startswith("fedprune."):
        return 0
    return None


def sources() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    return {module_name(p): imports_of(p) for p in files}


def test_no_upward_import():
    bad = []
    for module, imported in sources().items():
        for target in imported:
            own, theirs = layer(module), layer(target)
            if theirs is not None and theirs > own:
                bad.append(f"{module} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_flower_apps_do_not_import_each_other():
    bad = [
        f"{module} imports {target}"
        for module, imported in sources().items()
        for target in imported
        if layer(module) == 2 and layer(target) == 2 and module.split(".")[0] != target.split(".")[0]
    ]
    assert not bad, "\n".join(sorted(bad))


def test_library_and_protocols_know_nothing_of_flower_or_hydra():
    bad = [
        f"{module} imports {target}"
        for module, imported in sources().items()
        for target in imported
        if layer(module) in (0, 1) and target.split(".")[0] in FORBIDDEN_BELOW_APPS
    ]
    assert not bad, "\n".join(sorted(bad))


def package_of(module: str) -> str:
    """The unit of the cycle check: the protocol layer as one, a library module or subpackage
    (``fedprune.stats``, ``fedprune.secure``), or a top package (``server``)."""
    if layer(module) == 1:
        return "protocols"
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fedprune" and len(parts) > 1 else parts[0]


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    modules = sources()
    for module, imported in modules.items():
        for target in imported:
            if layer(target) is None or target not in modules and target.rpartition(".")[0] not in modules:
                continue
            a, b = package_of(module), package_of(target)
            if a != b:
                graph.setdefault(a, set()).add(b)
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif len(path) < 12:
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "cycles between packages:\n" + "\n".join(sorted(set(cycles))[:20])


@pytest.mark.parametrize(
    ("module", "target", "upward"),
    [
        ("fedprune.stats", "cli.main", True),
        ("cli.main", "fedprune.stats", False),
        ("fedprune.masks", "server.x", True),
    ],
)
def test_the_layer_rule_itself(module, target, upward):
    assert (layer(target) > layer(module)) is upward
