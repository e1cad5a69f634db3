"""Imports only run down the layers of docs/architecture.md.

Each package below may import only the packages under it (and itself); a
function-level import counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOST = Path(__file__).resolve().parents[1] / "roost"

# package -> the roost packages it may import (itself included)
ALLOWED = {
    "protocol": {"protocol"},
    "core": {"core", "protocol"},
    "e2ee": {"e2ee"},  # the sans-I/O Signal protocol stands alone
    "store": {"store", "core", "protocol"},
    "registry": {"registry", "store", "core", "protocol"},
    # Blob stores: I/O beside the store (they read its BlobRecord), under the service.
    "media": {"media", "store", "core", "protocol"},
    "service": {"service", "media", "registry", "store", "core", "protocol"},
    # roost app sits on the SDK like the CLI, and is used by the CLI only.
    "app": {"app", "client", "core", "protocol"},
}


def roost_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level roost package) for every import of ``roost.*`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "roost" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(package: str) -> None:
    upward = [
        f"{path.relative_to(ROOST.parent)}:{line} imports roost.{target}"
        for path in sorted((ROOST / package).rglob("*.py"))
        for line, target in roost_imports(path)
        if target not in ALLOWED[package]
    ]
    assert upward == []
