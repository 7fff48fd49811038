"""The deployment files agree with the code and with each other.

No Docker engine is needed: docker-compose.yml, the Dockerfile, haproxy.cfg and the example
configs are parsed and cross-checked, so a renamed command, a moved file, a typo in a config
key or a port mismatch fails here instead of at `docker compose up`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from deid_router.cli import build_parser
from deid_router.config import ENV_QUEUE_URL, Config, parse_config
from tests.conftest import missing

REPO = Path(__file__).resolve().parents[2]
ROUTERS = ("router-1", "router-2")
STORAGE = "/var/lib/deid-router"
CONFIG_IN_CONTAINER = "/etc/deid-router/router.toml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        missing("PyYAML is not installed (it belongs in the [test] extra of pyproject.toml)")
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "docker-compose.yml has no services"
    return doc


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        mounts.append((source, target))
    return mounts


def _rehome(value: Any, new_root: Path) -> Any:
    """Rewrite the container's absolute storage paths into a local directory."""
    if isinstance(value, str) and value.startswith(STORAGE):
        return str(new_root) + value[len(STORAGE):]
    if isinstance(value, dict):
        return {k: _rehome(v, new_root) for k, v in value.items()}
    if isinstance(value, list):
        return [_rehome(v, new_root) for v in value]
    return value


def _parse_example(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queue_url: str | None) -> Config:
    path = REPO / "config" / "examples" / name
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    if queue_url is None:
        monkeypatch.delenv(ENV_QUEUE_URL, raising=False)
    else:
        monkeypatch.setenv(ENV_QUEUE_URL, queue_url)
    return parse_config(_rehome(raw, tmp_path / "storage"), path)


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_has_the_documented_services(compose: dict[str, Any]) -> None:
    assert {"postgres", "orthanc", "haproxy", *ROUTERS} <= set(compose["services"])


def test_every_build_context_dockerfile_and_bind_mount_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / dockerfile).is_file(), f"{name}: {dockerfile} missing in {context}"
        for source, _ in _bind_mounts(service):
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: mounted file {source} does not exist in the repo"
            else:
                assert source in (compose.get("volumes") or {}), f"{name}: named volume {source} not declared"


def test_routers_run_serve_on_the_mounted_config_and_share_storage_and_queue(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ROUTERS:
        router = services[name]
        command = router["command"]
        args = build_parser().parse_args(command)  # a real subcommand with valid options
        assert args.command == "serve" and args.config == CONFIG_IN_CONTAINER, name
        mounts = dict((target, source) for source, target in _bind_mounts(router))
        assert mounts.get(CONFIG_IN_CONTAINER) == "./config/examples/compose.toml", name
        assert STORAGE in mounts and not mounts[STORAGE].startswith((".", "/")), f"{name}: storage must be a named volume"
        assert router["environment"][ENV_QUEUE_URL].startswith("postgresql+psycopg://"), name
        assert router["depends_on"]["postgres"]["condition"] == "service_healthy", name
    first, second = (services[n] for n in ROUTERS)
    assert dict(_bind_mounts(first)) == dict(_bind_mounts(second)), "both routers must share one volume and config"
    assert first["environment"][ENV_QUEUE_URL] == second["environment"][ENV_QUEUE_URL]
    url = first["environment"][ENV_QUEUE_URL]
    assert url.split("@", 1)[1].startswith("postgres:5432/"), "the queue must be the compose postgres service"
    assert url.rsplit("/", 1)[1] == services["postgres"]["environment"]["POSTGRES_DB"]
    assert "healthcheck" in services["postgres"]


def test_orthanc_service_matches_the_router_destination(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orthanc = compose["services"]["orthanc"]
    mounts = dict((target, source) for source, target in _bind_mounts(orthanc))
    orthanc_cfg = json.loads((REPO / mounts["/etc/orthanc/orthanc.json"]).read_text(encoding="utf-8"))
    cfg = _parse_example("compose.toml", tmp_path, monkeypatch, None)
    (dest,) = cfg.destinations
    assert (dest.type, dest.host, dest.port, dest.ae_title) == ("dicom", "orthanc", orthanc_cfg["DicomPort"], orthanc_cfg["DicomAet"])
    assert orthanc_cfg["DicomAlwaysAllowStore"] is True  # the router is not declared as a modality


# --------------------------------------------------------------------------- example configs


def test_compose_config_is_valid_and_shares_storage_and_secret(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_url = compose["services"]["router-1"]["environment"][ENV_QUEUE_URL]
    cfg = _parse_example("compose.toml", tmp_path, monkeypatch, queue_url)
    assert cfg.queue.url == queue_url
    assert cfg.listener.port == 11112
    assert cfg.storage.root == tmp_path / "storage"
    assert cfg.deid.secret_file.is_relative_to(cfg.storage.root), "the secret must be in the shared volume"
    assert [r.destinations for r in cfg.routes] == [("orthanc",)]


def test_image_default_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _parse_example("docker.toml", tmp_path, monkeypatch, None)
    assert cfg.listener.port == 11112
    assert cfg.queue.url.startswith("sqlite:///") and cfg.queue.url.endswith("queue.sqlite3")
    assert all(d.path is None or d.path.is_relative_to(tmp_path / "storage") for d in cfg.destinations)


def test_haproxy_balances_tcp_over_both_routers(compose: dict[str, Any]) -> None:
    text = (REPO / "config" / "examples" / "haproxy.cfg").read_text(encoding="utf-8")
    assert re.search(r"^\s*mode\s+tcp\s*$", text, re.M), "haproxy must balance raw TCP (DICOM)"
    assert re.search(r"^\s*bind\s+\S*:11112\b", text, re.M)
    servers = dict(re.findall(r"^\s*server\s+(\S+)\s+(\S+)", text, re.M))
    assert set(servers) == set(ROUTERS)
    for name, address in servers.items():
        host, port = address.rsplit(":", 1)
        assert host in compose["services"] and port == "11112", f"{name} -> {address}"
    mounts = dict((t, s) for s, t in _bind_mounts(compose["services"]["haproxy"]))
    assert mounts["/usr/local/etc/haproxy/haproxy.cfg"] == "./config/examples/haproxy.cfg"
    assert "11112:11112" in [str(p) for p in compose["services"]["haproxy"]["ports"]]


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_runs_the_console_script_as_non_root() -> None:
    instructions = _dockerfile_instructions(REPO / "Dockerfile")
    by_name: dict[str, list[str]] = {}
    for word, rest in instructions:
        by_name.setdefault(word, []).append(rest)
    assert by_name["FROM"][0].startswith("python:3.11-slim")
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["deid-router"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert "deid-router" in scripts
    cmd = json.loads(by_name["CMD"][-1])
    assert build_parser().parse_args(cmd).command == "serve" and cmd[-1] == CONFIG_IN_CONTAINER
    assert "11112" in by_name["EXPOSE"][-1].split()
    user = by_name["USER"][-1]
    assert user not in ("root", "0"), "the router must not run as root"
    assert any("pip install" in run for run in by_name["RUN"])
    for args in by_name.get("COPY", []):
        sources = [s for s in shlex.split(args)[:-1] if not s.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile COPY source {source} missing"


# --------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", ["scripts/run-tests", "scripts/run-router", ".ci/run"])
def test_entry_scripts_are_executable_bash(script: str) -> None:
    path = REPO / script
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    assert path.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "set -euo pipefail" in path.read_text(encoding="utf-8")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^exec scripts/run-tests\s*$", ci, re.M)
    assert "scripts/run-tests" in (REPO / "README.md").read_text(encoding="utf-8")


def test_shared_venv_helper_parses(tmp_path: Path) -> None:
    helper = REPO / "scripts" / "_venv.sh"
    check = subprocess.run(
        ["bash", "-c", 'source "$1" && native_tool bash && ! native_tool no-such-tool-xyz && echo "$REPO_ROOT"', "_", str(helper)],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": os.environ.get("PATH", "")},
    )
    assert check.returncode == 0, check.stderr
    assert Path(check.stdout.strip()) == REPO


# --------------------------------------------------------------------------- operations (issue 13)

UNIT = REPO / "deploy" / "deid-router.service"
READYZ = ["curl", "-fsS", "http://127.0.0.1:8080/readyz"]


def _unit() -> dict[str, dict[str, list[str]]]:
    """The unit's sections, each key with every value it is given (systemd allows repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"stray line in the unit: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_runs_serve_with_readiness_restart_and_hardening() -> None:
    service = _unit()["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["Type"] == "notify"  # the node sends READY=1 (tests/e2e/test_cli_safety.py)
    assert one["Restart"] == "on-failure" and "2" in one["RestartPreventExitStatus"].split()
    assert int(one["TimeoutStopSec"]) > 30  # the node exits within 30 s of SIGTERM
    argv = shlex.split(one["ExecStart"])
    assert argv[0].endswith("/deid-router")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.config == CONFIG_IN_CONTAINER
    assert (one["ProtectSystem"], one["NoNewPrivileges"], one["PrivateTmp"]) == ("strict", "yes", "yes")
    assert STORAGE in one["ReadWritePaths"].split()
    assert one["User"] not in ("root", "0")
    assert _unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    import shutil
    import sys

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing("systemd-analyze is not installed (Debian package systemd; scripts/run-tests installs it)")
    script = Path(sys.executable).with_name("deid-router")
    assert script.is_file(), "the console script of this virtualenv"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/opt/deid-router/bin/deid-router", str(script)))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # unknown keys and bad values are only warnings for systemd: any output is a failure here
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr


def test_health_checks_ask_readyz(compose: dict[str, Any]) -> None:
    for name in ROUTERS:
        check = compose["services"][name]["healthcheck"]
        assert check["test"] == ["CMD", *READYZ], name
    assert compose["services"]["haproxy"]["depends_on"][ROUTERS[0]]["condition"] == "service_healthy"
    by_name: dict[str, list[str]] = {}
    for word, rest in _dockerfile_instructions(REPO / "Dockerfile"):
        by_name.setdefault(word, []).append(rest)
    (healthcheck,) = by_name["HEALTHCHECK"]
    assert json.loads(healthcheck.split(" CMD ", 1)[1]) == READYZ
    assert any("install" in run and " curl" in run for run in by_name["RUN"]), "the image needs curl"


def test_dockerignore_keeps_holding_area_and_virtualenv_out_but_not_the_sources() -> None:
    from fnmatch import fnmatch

    patterns = [
        line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {"var", ".venv", ".git"} <= set(patterns)

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/")) for p in prefixes for pat in patterns)

    for word, rest in _dockerfile_instructions(REPO / "Dockerfile"):
        if word == "COPY":
            for source in [s for s in shlex.split(rest)[:-1] if not s.startswith("--")]:
                assert not ignored(source), f"{source} is copied but .dockerignore excludes it"
    assert ignored("var/raw/00/x.dcm") and ignored(".venv/bin/python") and ignored("config/var/secret.key")


def test_operations_doc_commands_parse() -> None:
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    for topic in ("## What to back up", "## Restore", "## Upgrades", "secret", "migrations"):
        assert topic in text, topic
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.startswith("deid-router ")]
    assert len(commands) >= 5
    for line in commands:
        build_parser().parse_args(shlex.split(line)[1:])  # exits 2 on a wrong option
    assert UNIT.relative_to(REPO).as_posix() in text
