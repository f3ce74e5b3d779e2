"""The package's layers, checked from every import statement in probes/ (function-level ones too).

The wire contract (probes.model: schema, reasons, tiers, signing, codecs) is what agent and mesh
share; neither imports the other, the mesh never imports the check runners, protocol cores import
no I/O layer above them, and the wire imports nothing of the project but itself."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import probes

ROOT = Path(probes.__file__).parent

# (importing package, imported package): never
FORBIDDEN = [
    ("probes.agent", "probes.mesh"),
    ("probes.mesh", "probes.agent"),
    ("probes.mesh", "probes.checks"),
    ("probes.mesh", "probes.cli"),
    ("probes.agent", "probes.cli"),
    ("probes.checks", "probes.agent"),
    ("probes.checks", "probes.mesh"),
    ("probes.checks", "probes.cli"),
    ("probes.checks", "probes.lab"),
    ("probes.protocols", "probes.checks"),
    ("probes.protocols", "probes.agent"),
    ("probes.protocols", "probes.mesh"),
    ("probes.protocols", "probes.config"),
    ("probes.model", "probes.checks"),
    ("probes.model", "probes.agent"),
    ("probes.model", "probes.mesh"),
    ("probes.model", "probes.config"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> Iterator[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import in probes/."""
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, alias.name, node.lineno
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                yield module, base, node.lineno
                for alias in node.names:  # "from probes import mesh" imports probes.mesh
                    yield module, f"{base}.{alias.name}", node.lineno


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_imports() -> None:
    seen = {(a, b) for a, b, _ in imports()}
    assert ("probes.agent.reporter", "probes.model.signing") in seen
    assert ("probes.mesh.ingest", "probes.model.signing") in seen


def test_no_import_crosses_a_forbidden_layer() -> None:
    crossings = [
        f"{importer}:{line} imports {imported}"
        for importer, imported, line in imports()
        for src, dst in FORBIDDEN
        if _within(importer, src) and _within(imported, dst)
    ]
    assert crossings == []
