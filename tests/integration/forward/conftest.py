"""Fixtures for forwarding tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.forward.forward_fixtures import bundled


@pytest.fixture
def one_file(tmp_path: Path) -> Callable[[str], Path]:
    """Copy a bundled pydicom file into tmp_path/in (pydicom's own files are never modified)."""

    def copy(name: str) -> Path:
        dst = tmp_path / "in" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundled(name), dst)
        return dst

    return copy
