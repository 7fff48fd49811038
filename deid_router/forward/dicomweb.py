"""DICOMweb destination: STOW-RS (PS3.18 10.5) of de-identified work files.

* One POST to ``<url>/studies`` per ``instances_per_request`` instances, as
  ``multipart/related; type="application/dicom"``. The body is a generator over the work files
  (1 MiB reads) with its Content-Length computed up front: memory stays flat for instances of
  any size, and servers that refuse chunked uploads still get a plain request.
* Auth from files: HTTP basic (``username`` + ``password_file``) or bearer (``token_file``);
  TLS verified against ``ca_file`` (or the system store) for ``https://`` urls.
* Results: the response's ReferencedSOPSequence / FailedSOPSequence (DICOM JSON) name each
  instance; their FailureReason / WarningReason are C-STORE statuses. Everything is classified in
  :mod:`deid_router.forward.status`, connection failures with the same kinds as an association
  (refused, timeouts, lost), so retries, pauses and quarantine are those of a DIMSE PACS.
* Safety: nothing logs a tag value; the response body is parsed, never logged.
"""

from __future__ import annotations

import errno
import json
import secrets
import ssl
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from deid_router.config import DestinationConfig
from deid_router.forward.base import Delivery
from deid_router.forward.status import classify_association_failure, classify_stow_instance
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.observability.logging import get_logger

_log = get_logger("forward")

_CHUNK = 1 << 20
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def _read_secret(path: Any) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


class _Body:
    """A multipart/related body streamed from files; ``length`` is known before the first byte."""

    def __init__(self, items: Sequence[Delivery]) -> None:
        self.boundary = secrets.token_hex(16)
        self._items = items
        self._heads = [
            f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii") for _ in items
        ]
        self._tail = f"--{self.boundary}--\r\n".encode("ascii")
        self.length = sum(len(h) + item.path.stat().st_size + 2 for h, item in zip(self._heads, items, strict=True))
        self.length += len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        for head, item in zip(self._heads, self._items, strict=True):
            yield head
            with open(item.path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield self._tail


def _connect_kind(exc: httpx.ConnectError) -> tuple[str, str]:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return "connect_failed", "tls"
        if isinstance(cause, ConnectionRefusedError):
            return "connection_refused", ""
        cause = cause.__cause__ or cause.__context__
    return "connect_failed", ""


def _failure_of(exc: Exception) -> Outcome:
    """A request that got no HTTP response, as the association failure it amounts to."""
    if isinstance(exc, httpx.ConnectTimeout):
        return classify_association_failure("connect_timeout")
    if isinstance(exc, httpx.ConnectError):
        return classify_association_failure(*_connect_kind(exc))
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)):
        return classify_association_failure("network_timeout")
    if isinstance(exc, httpx.TransportError):  # reset, closed mid-request: the service went away
        return classify_association_failure("association_lost")
    if isinstance(exc, OSError):
        return classify_association_failure("file_read_failed", errno.errorcode.get(exc.errno or 0, "unknown"))
    return classify_association_failure("internal_error", type(exc).__name__)


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def _from_xml(body: bytes) -> dict[str, Any]:
    """A PS3.19 Native DICOM Model (application/dicom+xml) response, as the JSON model's shape."""
    import xml.etree.ElementTree as ET

    def attrs(node: ET.Element) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in node.findall("DicomAttribute"):
            tag = (a.get("tag") or "").upper()
            if a.get("vr") == "SQ":
                out[tag] = {"Value": [attrs(item) for item in a.findall("Item")]}
            else:
                values: list[Any] = [v.text or "" for v in a.findall("Value")]
                if a.get("vr") == "US":
                    values = [int(v) for v in values if v.strip().isdigit()]
                out[tag] = {"Value": values}
        return out

    return attrs(ET.fromstring(body))


def parse_stow_response(body: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """(stored UID -> WarningReason, failed UID -> FailureReason) of a STOW-RS response in
    DICOM JSON (or XML, for servers that ignore our Accept); empty maps for a body that is
    neither (the HTTP status then decides)."""
    stored: dict[str, int | None] = {}
    failed: dict[str, int | None] = {}
    try:
        text = body.strip()
        doc = _from_xml(text) if text.startswith(b"<") else json.loads(text) if text else {}
    except (ValueError, UnicodeDecodeError, SyntaxError):  # ET.ParseError is a SyntaxError
        return stored, failed
    if isinstance(doc, list):
        doc = doc[0] if doc and isinstance(doc[0], dict) else {}
    if not isinstance(doc, dict):
        return stored, failed
    for tag, into, reason_tag in (
        (_REFERENCED_SOP_SEQUENCE, stored, _WARNING_REASON),
        (_FAILED_SOP_SEQUENCE, failed, _FAILURE_REASON),
    ):
        for item in (doc.get(tag) or {}).get("Value") or []:
            if not isinstance(item, dict):
                continue
            uid = _first(item, _REFERENCED_SOP_INSTANCE_UID)
            reason = _first(item, reason_tag)
            if isinstance(uid, str):
                into[uid] = int(reason) if isinstance(reason, (int, float)) else None
    return stored, failed


class DicomwebDestination:
    """STOW-RS client for one configured destination; ``send`` is serialised by a lock."""

    def __init__(self, cfg: DestinationConfig, calling_ae_title: str = "") -> None:
        if not cfg.url:
            raise ValueError(f"destination {cfg.name!r} of type 'dicomweb' has no url")
        self.name = cfg.name
        self._url = f"{cfg.url}/studies"
        self._per_request = max(1, cfg.instances_per_request)
        self._headers = {"Accept": "application/dicom+json"}
        self._auth: httpx.BasicAuth | None = None
        if cfg.token_file is not None:
            self._headers["Authorization"] = f"Bearer {_read_secret(cfg.token_file)}"
        elif cfg.username and cfg.password_file is not None:
            self._auth = httpx.BasicAuth(cfg.username, _read_secret(cfg.password_file))
        self._verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(cfg.ca_file)) if cfg.ca_file is not None else True
        )
        self._timeout = httpx.Timeout(
            connect=cfg.connect_timeout_seconds, read=cfg.network_timeout_seconds,
            write=cfg.network_timeout_seconds, pool=cfg.connect_timeout_seconds,
        )
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(auth=self._auth, verify=self._verify, timeout=self._timeout,
                                        headers=self._headers, follow_redirects=False)
        return self._client

    def send(self, items: Sequence[Delivery]) -> dict[int, Outcome]:
        """POST ``items`` in requests of ``instances_per_request``; once the service is
        unavailable the rest are not tried (they get the same outcome, spending no attempt)."""
        outcomes: dict[int, Outcome] = {}
        statuses: list[int] = []
        with self._lock:
            down: Outcome | None = None
            for start in range(0, len(items), self._per_request):
                batch = items[start : start + self._per_request]
                if down is not None:
                    outcomes.update({item.job_id: down for item in batch})
                    continue
                result, status = self._post(batch)
                if status == 413 and len(batch) > 1:
                    # the request was too large for the server, not the instances: one per request
                    statuses.append(status)
                    result = {}
                    for item in batch:
                        one, status = self._post([item])
                        result.update(one)
                        statuses.append(status)
                elif status:
                    statuses.append(status)
                outcomes.update(result)
                down = next((o for o in result.values() if o.kind is OutcomeKind.UNAVAILABLE), None)
        counts: dict[str, int] = {}
        for o in outcomes.values():
            counts[o.kind.value] = counts.get(o.kind.value, 0) + 1
        _log.info("forward_stow_batch", destination=self.name, items=len(items), http_statuses=statuses,
                  outcomes=counts)
        return outcomes

    def _post(self, batch: Sequence[Delivery]) -> tuple[dict[int, Outcome], int]:
        try:
            body = _Body(batch)
            response = self._http().post(
                self._url,
                content=iter(body),
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={body.boundary}',
                    "Content-Length": str(body.length),
                },
            )
            payload = response.read()
        except Exception as exc:  # a transport failure answers for the whole request
            outcome = _failure_of(exc)
            if outcome.kind is OutcomeKind.UNAVAILABLE:
                self._drop_client()
            _log.warning("forward_stow_failed", destination=self.name, reason=outcome.reason, items=len(batch))
            return {item.job_id: outcome for item in batch}, 0
        stored, failed = parse_stow_response(payload)
        result = {}
        for item in batch:
            uid = item.sop_instance_uid
            result[item.job_id] = classify_stow_instance(
                response.status_code, uid in stored and uid not in failed, failed.get(uid), stored.get(uid)
            )
        return result, response.status_code

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def close(self) -> None:
        """Close the connection pool; safe to call twice."""
        with self._lock:
            self._drop_client()
