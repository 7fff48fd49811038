"""mypy --strict on the package (pyproject.toml [tool.mypy]): typed code is a house rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_package_type_checks_strictly() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "deid_router"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
