"""The direction of imports DESIGN.md asks for, checked on the source so it stays true."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vidscale"


def imports_of(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "vidscale." if node.level else ""
            found.add(base + (node.module or ""))
    return found


@pytest.mark.parametrize("module, forbidden", [
    ("media", {"openvino", "torch", "vidscale.engine", "vidscale.pipeline"}),
    ("engine", {"av", "vidscale.media", "vidscale.pipeline", "vidscale.cli"}),
    ("tiling", {"vidscale.", "openvino", "av", "torch"}),
    ("segments", {"openvino", "torch", "vidscale.engine", "vidscale.pipeline", "vidscale.jobs", "vidscale.cli"}),
    ("pipeline", {"vidscale.cli", "vidscale.jobs"}),
    ("jobs", {"vidscale.cli"}),
])
def test_layers_do_not_import_upwards_or_sideways(module, forbidden):
    imported = imports_of(module)
    assert imported, f"{module} parsed to no imports at all"
    bad = {name for name in imported for prefix in forbidden if name == prefix or name.startswith(prefix)}
    assert not bad, f"{module} imports {bad}"
