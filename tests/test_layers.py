"""The layering rule of the README's Architecture section: model/ imports nothing from util/ or the entry scripts,
util/ imports no entry script. Checked on the source (every import statement, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULES = {"demo", "main_finetune", "scripts", "bench", "tests"}


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("model", {"util"} | ENTRY_MODULES), ("util", ENTRY_MODULES)],
)
def test_packages_import_only_downward(package: str, forbidden: set[str]) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_top_modules(path) & forbidden)
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package}/ must not import {sorted(forbidden)}: {offenders}"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from util.build import build_model\n    import demo\n")
    assert _imported_top_modules(f) == {"util", "demo"}
