"""The import layers hold: import-linter's contracts (pyproject.toml), and no module of the core
names a tier anywhere in its text, at any indentation (a function-level import included)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE_CORE = re.compile(r"^\s*(from|import)\s+fogsplit\.(device|gateway|cloud|export|bench|cli|demo)\b", re.M)


def test_import_linter_contracts_are_kept():
    if shutil.which("lint-imports") is None:
        pytest.fail("import-linter is not installed: pip install -e '.[dev]'")
    run = subprocess.run([str(REPO / "scripts" / "lint-imports")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("layer", ["core", "device", "gateway", "cloud", "export"])
def test_no_module_below_the_app_imports_upwards_at_any_indentation(layer):
    allowed = {"device": "device", "gateway": "gateway", "cloud": "cloud", "export": "export"}.get(layer)
    offenders = []
    for path in sorted((REPO / layer).rglob("*.py")):
        for match in ABOVE_CORE.finditer(path.read_text()):
            if match.group(2) != allowed:
                line = path.read_text()[:match.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(REPO)}:{line}: {match.group(0).strip()}")
    assert offenders == []
