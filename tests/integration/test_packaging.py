"""The installed package, not the source tree: ``pip install .`` then ``serve`` migrates itself.

The Alembic scripts live in the top-level ``migrations/`` folder and install as the package
``deid_router.migrations`` (pyproject.toml ``package-dir``). Here a real wheel is built from a
copy of exactly what the Dockerfile copies, installed into a folder of its own, and a
``deid-router serve`` run from that folder (PYTHONPATH first) brings a fresh SQLite database
to the scripts' head.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.router import RouterProcess

REPO = Path(__file__).resolve().parents[2]
# What a wheel is built from (the Dockerfile copies the same before its `pip install`).
SOURCES = ("pyproject.toml", "README.md", "deid_router", "migrations")


def _script_head() -> str:
    """The head revision of the repository's migrations/, read by Alembic itself."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(REPO / "migrations"))
    (head,) = ScriptDirectory.from_config(cfg).get_heads()
    return str(head)


def _packages_on_disk() -> set[str]:
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "deid_router").rglob("__init__.py")}
    found |= {
        ".".join(("deid_router", *p.parent.relative_to(REPO).parts))
        for p in (REPO / "migrations").rglob("__init__.py")
    }
    return found


def test_the_package_list_names_every_package_folder() -> None:
    """pyproject.toml lists the packages by hand (find cannot rename migrations/): a new
    subpackage that is not listed would be missing from every wheel."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _packages_on_disk()
    assert setuptools["package-dir"] == {"deid_router.migrations": "migrations"}
    assert not (REPO / "deid_router" / "migrations").exists(), "the migrations moved to the top-level migrations/"


def test_the_dockerfile_copies_what_the_wheel_is_built_from() -> None:
    copied = {
        source.rstrip("/")
        for line in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    }
    assert set(SOURCES) <= copied


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install .`` (a real wheel, not editable) into a target folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=junk)
        else:
            shutil.copy2(REPO / name, src / name)
    target = root / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return target


def _env(target: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(target)}


def test_the_wheel_holds_the_migrations_as_deid_router_migrations(installed: Path) -> None:
    assert not (installed / "migrations").exists(), "a top-level 'migrations' package would pollute site-packages"
    (dist_info,) = installed.glob("deid_router-*.dist-info")
    top_level = dist_info / "top_level.txt"
    if top_level.exists():
        assert top_level.read_text(encoding="utf-8").split() == ["deid_router"]
    recorded = {line.split(",")[0] for line in (dist_info / "RECORD").read_text(encoding="utf-8").splitlines()}
    assert not any(path.startswith("migrations/") for path in recorded)
    packaged = installed / "deid_router" / "migrations"
    shipped = sorted(p.name for p in (REPO / "migrations" / "versions").glob("*.py"))
    assert sorted(p.name for p in (packaged / "versions").glob("*.py")) == shipped
    assert (packaged / "env.py").is_file() and (packaged / "script.py.mako").is_file()
    # The installed code finds them through the import system, from the target, not the source tree.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import deid_router; from deid_router.db.engine import migrations_dir; "
         "print(deid_router.__file__); print(migrations_dir())"],
        capture_output=True, text=True, env=_env(installed), cwd=installed.parent, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    package_file, migrations = probe.stdout.split()
    assert Path(package_file).is_relative_to(installed), package_file
    assert Path(migrations) == packaged


def test_serve_from_the_wheel_migrates_a_fresh_database_to_head(installed: Path, tmp_path: Path) -> None:
    node = RouterProcess(
        tmp_path / "node", destinations=[{"name": "outbox", "type": "folder", "path": "var/outbox"}],
        env={"PYTHONPATH": str(installed)},
    )
    database = node.workdir / "var" / "queue.sqlite3"
    assert not database.exists()
    node.start(timeout=60)  # listening: the migrations ran before the listener opened
    try:
        with sqlite3.connect(database) as conn:
            versions = [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        assert node.terminate() == 0, node.log_text()[-3000:]
    assert versions == [_script_head()]
    assert {"instances", "jobs", "quarantine"} <= tables
