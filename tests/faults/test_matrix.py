"""The fault matrix (docs/faults.md) names tests that exist: a renamed or deleted test breaks this, not the doc."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
MATRIX = ROOT / "docs" / "faults.md"
REFERENCE = re.compile(r"`((?:tests|fuzz|mediator)/[\w/.]+)(?:::(\w+))?`")


def test_every_test_the_fault_matrix_names_exists() -> None:
    references = REFERENCE.findall(MATRIX.read_text(encoding="utf-8"))
    assert len(references) > 20
    missing = []
    for path, name in references:
        source = ROOT / path
        if not source.exists():
            missing.append(path)
        elif name and not re.search(rf"^(async )?def {name}\(", source.read_text(encoding="utf-8"), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/faults.md names what does not exist: {missing}"


def test_every_fault_test_is_in_the_matrix() -> None:
    matrix = MATRIX.read_text(encoding="utf-8")
    tests = re.findall(r"^def (test_\w+)\(", (ROOT / "tests" / "faults" / "test_faults.py").read_text(), re.M)
    assert tests
    assert [t for t in tests if f"test_faults.py::{t}" not in matrix] == []
