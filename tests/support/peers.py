"""Real DICOM peers for end-to-end tests: dcmtk storescp and storescu, and Orthanc.

Every process gets ``TCP_NODELAY=1`` in its environment: Debian's dcmtk build leaves Nagle's
algorithm on, which turns ~800 instances/s into ~22/s on loopback. Orthanc links the same
library and needs the variable too.

The dcmtk tools are looked up on PATH *skipping Python scripts*: pynetdicom installs its own
``storescu``/``storescp`` console scripts into the virtualenv, which would otherwise shadow the
real dcmtk binaries when the venv is activated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

LOCALHOST = "127.0.0.1"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian orthanc-dicomweb
_EXTRA_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")
_APT_HINT = "install it with: apt-get install -y dcmtk orthanc dicom3tools (or run scripts/run-tests)"


class PeerError(RuntimeError):
    """A test peer could not be started, reached or stopped."""


# --------------------------------------------------------------------------- environment


def peer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for every peer process: ours plus TCP_NODELAY=1."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def _is_python_script(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.readline(200)
    except OSError:
        return False
    return head.startswith(b"#!") and b"python" in head


def find_tool(name: str) -> Path | None:
    """Absolute path of a native tool (dcmtk, Orthanc, dicom3tools), or None if absent.

    Python console scripts of the same name (pynetdicom's storescu/storescp) are skipped.
    """
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += [d for d in _EXTRA_DIRS if d not in dirs]
    for d in dirs:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK) and not _is_python_script(candidate):
            return candidate
    return None


def require_path(name: str) -> Path:
    """Like :func:`find_tool` but raise a PeerError naming the fix when the tool is missing."""
    path = find_tool(name)
    if path is None:
        raise PeerError(f"{name} not found on PATH; {_APT_HINT}")
    return path


# --------------------------------------------------------------------------- sockets


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts TCP connections on host:port.

    Raises PeerError on timeout, or at once if ``process`` exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise PeerError(f"process exited with code {process.returncode} before listening on {host}:{port}")
        if port_open(host, port):
            return
        if time.monotonic() > deadline:
            raise PeerError(f"nothing listening on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.05)


def wait_for_port_closed(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while port_open(host, port):
        if time.monotonic() > deadline:
            raise PeerError(f"{host}:{port} still accepting connections after {timeout:.0f} s")
        time.sleep(0.05)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0, kill: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def sop_instance_uid_of(path: Path) -> str | None:
    """SOPInstanceUID of a DICOM file, or None when the file is not (yet) readable DICOM."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
        return None
    uid = ds.get("SOPInstanceUID")
    return str(uid) if uid else None


def _wait_until(
    probe: Any, expected: int, timeout: float, what: str
) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        got: Counter[str] = probe()
        if sum(got.values()) >= expected:
            return got
        if time.monotonic() > deadline:
            raise PeerError(f"{what}: {sum(got.values())} of {expected} instances after {timeout:.0f} s")
        time.sleep(0.2)


# --------------------------------------------------------------------------- storescp


class StoreSCP:
    """dcmtk storescp as a subprocess: a stand-in PACS that writes what it receives to out_dir.

    Accepts every storage SOP class (``-pm``) in every transfer syntax dcmtk knows (``+xa``),
    writes the data set bit for bit as received (``+B``) with unique file names (``+uf``, so two
    sends of one SOPInstanceUID are both visible). Extra storescp options (fault injection such
    as ``--refuse``, ``--abort-after``, ``--sleep-after 1``) go in ``extra``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        ae_title: str = "PACS",
        port: int | None = None,
        extra: Sequence[str] = (),
        start: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self._fixed_port = port is not None
        self.extra = tuple(extra)
        self.log_path = self.out_dir.parent / f"{self.out_dir.name}.storescp.log"
        self._proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def command(self) -> list[str]:
        return [
            str(require_path("storescp")),
            "--aetitle", self.ae_title,
            "--output-directory", str(self.out_dir),
            "+xa",  # accept all supported transfer syntaxes
            "-pm",  # promiscuous: accept unknown (storage) SOP classes too
            "+B",  # write data exactly as received
            "+uf",  # unique file names
            "-fe", ".dcm",
            "-dhl",  # no reverse DNS per association
            "-pdu", "131072",
            "-ts", "30",
            "-ll", "info",
            *self.extra,
            str(self.port),
        ]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start storescp and wait until it listens. Retries with a new port when not fixed."""
        if self.running:
            return
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=peer_env()
                )
            try:
                wait_for_port(self.host, self.port, timeout=10.0, process=self._proc)
                return
            except PeerError as exc:
                _stop_process(self._proc)
                self._proc = None
                if attempt + 1 >= attempts:
                    raise PeerError(f"storescp did not start: {exc}\n{_log_tail(self.log_path)}") from None
                self.port = free_port()

    def stop(self) -> None:
        _stop_process(self._proc)
        self._proc = None

    def pause(self) -> None:
        """Simulate the PACS going down: stop the process, keep the port and received files."""
        self._fixed_port = True
        self.stop()
        wait_for_port_closed(self.host, self.port)

    def resume(self) -> None:
        """Bring the PACS back on the same port."""
        self._fixed_port = True
        self.start()

    def files(self) -> list[Path]:
        """Received files (storescp writes them directly into out_dir)."""
        return sorted(p for p in self.out_dir.rglob("*.dcm") if p.is_file())

    def sop_instance_uids(self) -> Counter[str]:
        """How often each SOPInstanceUID was received (files still being written are skipped)."""
        found: Counter[str] = Counter()
        for path in self.files():
            uid = sop_instance_uid_of(path)
            if uid:
                found[uid] += 1
        return found

    def wait_for_instances(self, expected: int, timeout: float = 60.0) -> Counter[str]:
        """Wait until at least ``expected`` files have arrived (counting duplicates)."""
        return _wait_until(self.sop_instance_uids, expected, timeout, f"storescp {self.ae_title}")

    def log(self) -> str:
        return _log_tail(self.log_path, 200)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"StoreSCP({self.ae_title}@{self.host}:{self.port}, running={self.running})"


# --------------------------------------------------------------------------- Orthanc


class Orthanc:
    """An Orthanc server in a temp directory with its own config, DICOM and HTTP ports.

    Accepts every transfer syntax and unknown SOP classes from any AE; no authentication,
    loopback only, no plugins unless ``dicomweb`` (Debian's orthanc-dicomweb: STOW-RS at
    :attr:`dicomweb_url`). Its REST API is read with urllib.
    """

    def __init__(
        self,
        work_dir: str | os.PathLike[str] | None = None,
        ae_title: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        extra_config: dict[str, Any] | None = None,
        start: bool = True,
        dicomweb: bool = False,
    ) -> None:
        self.dicomweb = dicomweb
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.host = LOCALHOST
        self.dicom_port = dicom_port if dicom_port is not None else free_port()
        self.http_port = http_port if http_port is not None else free_port()
        self.extra_config = dict(extra_config or {})
        self.config_path = self.work_dir / "orthanc.json"
        self.log_path = self.work_dir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    @property
    def port(self) -> int:
        """The DICOM port (same name as StoreSCP.port, so tests can treat both as a PACS)."""
        return self.dicom_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root of the plugin (STOW-RS: POST {root}/studies)."""
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "deid-router-test",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            # Orthanc >= 1.9 accepts every transfer syntax by default; be explicit anyway.
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "DeflatedTransferSyntaxAccepted": True,
            "JpegTransferSyntaxAccepted": True,
            "Jpeg2000TransferSyntaxAccepted": True,
            "JpegLosslessTransferSyntaxAccepted": True,
            "JpipTransferSyntaxAccepted": True,
            "Mpeg2TransferSyntaxAccepted": True,
            "Mpeg4TransferSyntaxAccepted": True,
            "RleTransferSyntaxAccepted": True,
            "StorageCompression": False,
            "OverwriteInstances": False,
            "Plugins": [],
            "LuaScripts": [],
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "DicomServerEnabled": True,
            "HttpServerEnabled": True,
            "StableAge": 1,
        }
        if self.dicomweb:
            plugin = Path(DICOMWEB_PLUGIN)
            if not plugin.is_file():
                raise PeerError(f"{plugin} not found; apt-get install -y orthanc-dicomweb (or run scripts/run-tests)")
            cfg["Plugins"] = [str(plugin)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False}
        cfg.update(self.extra_config)
        return cfg

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        binary = find_tool("Orthanc")
        if binary is None:
            raise PeerError(f"Orthanc not found on PATH; {_APT_HINT}")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(binary), str(self.config_path)],
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise PeerError(f"Orthanc exited with code {code} during start\n{_log_tail(self.log_path)}")
            try:
                self.get("/system", timeout=1.0)
                wait_for_port(self.host, self.dicom_port, timeout=max(1.0, deadline - time.monotonic()), process=self._proc)
                return
            except (OSError, PeerError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise PeerError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s\n{_log_tail(self.log_path)}") from None
                time.sleep(0.1)

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (Orthanc takes ~3 s to shut down cleanly), or SIGKILL when not graceful."""
        _stop_process(self._proc, timeout=20.0, kill=not graceful)
        self._proc = None

    def pause(self) -> None:
        """Stop Orthanc cleanly, keeping its ports and database, to simulate the PACS being down."""
        self.stop()
        wait_for_port_closed(self.host, self.dicom_port)

    def resume(self) -> None:
        self.start()

    def close(self) -> None:
        """Stop at once (the test is over) and remove the work directory if we created it."""
        self.stop(graceful=False)
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- REST
    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as exc:
            raise PeerError(f"Orthanc {method} {path}: HTTP {exc.code} {exc.read()[:300]!r}") from exc

    def get(self, path: str, timeout: float = 30.0) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        ids: list[str] = self.get("/instances")
        return ids

    def sop_instance_uids(self) -> Counter[str]:
        """SOPInstanceUID of every stored instance (Orthanc keeps one copy per UID)."""
        found: Counter[str] = Counter()
        for item in self.get("/instances?expand"):
            uid = item.get("MainDicomTags", {}).get("SOPInstanceUID")
            if uid:
                found[str(uid)] += 1
        return found

    def wait_for_instances(self, expected: int, timeout: float = 60.0) -> Counter[str]:
        return _wait_until(self.sop_instance_uids, expected, timeout, f"Orthanc {self.ae_title}")

    def file(self, instance_id: str) -> bytes:
        """The stored Part-10 file, byte for byte."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def tags(self, instance_id: str) -> dict[str, Any]:
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return tags

    def log(self) -> str:
        return _log_tail(self.log_path, 200)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Orthanc({self.ae_title}@{self.host}:{self.dicom_port}, http={self.http_port}, running={self.running})"


# --------------------------------------------------------------------------- storescu

_TS_NAMES = re.compile(r"[^A-Za-z0-9]")
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
_MAX_CONTEXTS = 128


def _input_files(files_or_dirs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    out: list[Path] = []
    for item in files_or_dirs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            out.append(p)
    return out


def _association_profile(files: Sequence[Path], path: Path) -> bool:
    """Write a storescu config whose contexts propose each file's own transfer syntax.

    dcmtk storescu otherwise decompresses what it has no codec for (JPEG 2000 fails) and
    inflates deflated files. One context per (SOP class, transfer syntax) found in the file
    meta (first, so storescu picks it), plus an uncompressed fallback context per SOP class.
    Returns False when there is nothing to propose or too many contexts (storescu then uses
    its defaults).
    """
    pairs: dict[str, set[str]] = {}
    for f in files:
        try:
            meta = read_file_meta_info(f)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
        sop = meta.get("MediaStorageSOPClassUID")
        ts = meta.get("TransferSyntaxUID")
        if sop and ts:
            pairs.setdefault(str(sop), set()).add(str(ts))
    n_contexts = sum(len(ts) + 1 for ts in pairs.values())
    if not pairs or n_contexts > _MAX_CONTEXTS:
        return False
    syntaxes: dict[str, list[str]] = {"uncompressed": list(_UNCOMPRESSED)}
    contexts: list[str] = []
    for sop in sorted(pairs):
        for ts in sorted(pairs[sop]):
            key = "ts_" + _TS_NAMES.sub("_", ts)
            syntaxes[key] = [ts]
            contexts.append(f"{sop}\\{key}")
        contexts.append(f"{sop}\\uncompressed")
    lines = ["[[TransferSyntaxes]]"]
    for key, uids in syntaxes.items():
        lines.append(f"[{key}]")
        lines += [f"TransferSyntax{i} = {uid}" for i, uid in enumerate(uids, 1)]
    lines += ["[[PresentationContexts]]", "[contexts]"]
    lines += [f"PresentationContext{i} = {c}" for i, c in enumerate(contexts, 1)]
    lines += ["[[Profiles]]", "[own]", "PresentationContexts = contexts", ""]
    path.write_text("\n".join(lines), encoding="ascii")
    return True


def storescu(
    host: str,
    port: int,
    files_or_dirs: Iterable[str | os.PathLike[str]],
    called_aet: str = "DEID_ROUTER",
    calling_aet: str = "MODALITY",
    timeout: float = 300.0,
    extra: Sequence[str] = (),
    own_syntax: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Send files (directories are scanned recursively) with dcmtk storescu in ONE association.

    ``-nh``: a failed store does not stop the rest. With ``own_syntax`` every file is proposed
    in its own transfer syntax (see :func:`_association_profile`), so compressed, big-endian
    and deflated files travel as they are. Output is captured (``-v``) for
    :func:`storescu_acknowledged`; the exit code is in ``returncode`` (not raised).
    """
    items = [Path(p) for p in files_or_dirs]
    if not items:
        raise ValueError("storescu: no files to send")
    args: list[str] = [
        str(require_path("storescu")),
        "-v",
        "-aet", calling_aet,
        "-aec", called_aet,
        "-nh",
        "+sd", "+r",
        "-to", "10",  # connect timeout
        "-ta", "30",
        "-ts", "60",
        "-pdu", "131072",
    ]
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        if own_syntax:
            cfg = Path(tmp) / "storescu.cfg"
            if _association_profile(_input_files(items), cfg):
                args += ["-xf", str(cfg), "own"]
        args += [*extra, host, str(port), *map(str, items)]
        try:
            return subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                env=peer_env(),
            )
        except subprocess.TimeoutExpired as exc:
            raise PeerError(f"storescu to {host}:{port} did not finish within {timeout:.0f} s") from exc


_RESPONSE_RE = re.compile(r"Received Store Response \((Success|Warning[^)]*)")


def storescu_acknowledged(result: subprocess.CompletedProcess[str]) -> int:
    """How many C-STOREs storescu saw acknowledged (status Success or Warning)."""
    text = (result.stdout or "") + (result.stderr or "")
    return len(_RESPONSE_RE.findall(text))


def storescu_failed(result: subprocess.CompletedProcess[str]) -> int:
    """How many files storescu reported as failed (refused, error status or not sent)."""
    text = (result.stdout or "") + (result.stderr or "")
    return text.count("Store Failed, file:") + len(re.findall(r"Received Store Response \((?!Success|Warning)", text))


def echoscu(host: str, port: int, called_aet: str = "DEID_ROUTER", calling_aet: str = "MODALITY", timeout: float = 30.0) -> bool:
    """True when a C-ECHO to the peer succeeds."""
    result = subprocess.run(
        [str(require_path("echoscu")), "-aet", calling_aet, "-aec", called_aet, "-to", "5", host, str(port)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=peer_env(),
    )
    return result.returncode == 0


__all__ = [
    "LOCALHOST",
    "Orthanc",
    "PeerError",
    "StoreSCP",
    "echoscu",
    "find_tool",
    "free_port",
    "peer_env",
    "port_open",
    "require_path",
    "sop_instance_uid_of",
    "storescu",
    "storescu_acknowledged",
    "storescu_failed",
    "wait_for_port",
    "wait_for_port_closed",
]
