"""DICOM TLS (PS3.15 B.1 with the BCP 195 profile): the SSL contexts of both directions.

The listener's context (:func:`server_context`) and a DICOM destination's
(:func:`client_context`) share one hardening: TLS 1.2 and 1.3 only, for TLS 1.2 only the
ECDHE suites with AES-GCM or ChaCha20-Poly1305 (RFC 9325, 4.2), TLS 1.3 with OpenSSL's
defaults (all AEAD), no compression, no renegotiation. A failed handshake becomes one of a
few fixed refusal codes (:func:`refusal_reason`): logs and counters carry the code, never a
certificate's subject.

``ssl`` exceptions are translated here into :class:`deid_router.errors.TlsError`.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deid_router.errors import TlsError

if TYPE_CHECKING:
    from deid_router.config import DestinationConfig, ListenerTlsConfig

__all__ = [
    "BCP195_TLS12_CIPHERS",
    "ClientTls",
    "client_context",
    "client_tls",
    "refusal_reason",
    "server_context",
    "server_context_for",
]

# RFC 9325 4.2 (BCP 195): ECDHE key exchange with an AEAD cipher; TLS 1.3 suites are all AEAD.
BCP195_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

# X.509 verification results (OpenSSL's X509_V_ERR_*) -> refusal code.
_VERIFY_CODES: dict[int, str] = {
    2: "untrusted_ca",  # unable to get issuer certificate
    9: "certificate_not_yet_valid",
    10: "certificate_expired",
    18: "untrusted_ca",  # self-signed leaf
    19: "untrusted_ca",  # self-signed certificate in chain
    20: "untrusted_ca",  # unable to get local issuer certificate
    21: "untrusted_ca",
    23: "certificate_revoked",
    26: "certificate_purpose",  # unsuitable purpose (a server certificate used as a client's)
    62: "hostname_mismatch",
    64: "ip_address_mismatch",
}

# OpenSSL reason strings -> refusal code. Unknown reasons become "error" (logged "tls_error").
_SSL_REASONS: dict[str, str] = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "WRONG_SSL_VERSION": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake_failure",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_client_certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "peer_rejected_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "peer_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "peer_rejected_certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "peer_rejected_certificate",
    "WRONG_VERSION_NUMBER": "plain_client",
    "HTTP_REQUEST": "plain_client",
    "UNKNOWN_PROTOCOL": "plain_client",
    "PACKET_LENGTH_TOO_LONG": "plain_client",
    "RECORD_LAYER_FAILURE": "plain_client",
    "UNEXPECTED_EOF_WHILE_READING": "eof_in_handshake",
}


def refusal_codes() -> list[str]:
    """Every refusal code :func:`refusal_reason` can give (for the conformance statement)."""
    return sorted({*_VERIFY_CODES.values(), *_SSL_REASONS.values(), "bad_certificate", "error"})


def refusal_reason(exc: ssl.SSLError) -> str:
    """A fixed code for a failed handshake (``certificate_expired``, ``untrusted_ca``, ...)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(int(exc.verify_code or 0), "bad_certificate")
    return _SSL_REASONS.get(str(exc.reason or ""), "error")


MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
MAXIMUM_VERSION = ssl.TLSVersion.TLSv1_3
MINIMUM_VERSION_NAME, MAXIMUM_VERSION_NAME = "TLS 1.2", "TLS 1.3"


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.maximum_version = MAXIMUM_VERSION
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


def _readable(key: str, path: Path) -> None:
    if not path.is_file():
        raise TlsError(key, f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise TlsError(key, f"{path} is not readable")


def _load_cas(ctx: ssl.SSLContext, ca_file: Path) -> None:
    _readable("ca_file", ca_file)
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsError("ca_file", f"{ca_file} holds no usable PEM certificate") from exc


def _load_own(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    _readable("cert_file", cert_file)
    _readable("key_file", key_file)
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file), password=lambda: b"")
    except (ssl.SSLError, OSError, ValueError) as exc:
        text = cert_file.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in text:
            raise TlsError("cert_file", f"{cert_file} holds no PEM certificate") from exc
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError("key_file", f"{key_file} is not the key of {cert_file}") from exc
        raise TlsError("key_file", f"{key_file} holds no unencrypted PEM private key") from exc


def server_context(cert_file: Path, key_file: Path, ca_file: Path | None, require_client_cert: bool) -> ssl.SSLContext:
    """The listener's context: our certificate; peers verified against ``ca_file``.

    With ``require_client_cert`` a peer without a valid certificate is refused (mutual TLS);
    without it a certificate, if sent, is still verified.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_own(ctx, cert_file, key_file)
    if ca_file is not None:
        _load_cas(ctx, ca_file)
    if require_client_cert:
        if ca_file is None:
            raise TlsError("ca_file", "is required when require_client_cert = true")
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL if ca_file is not None else ssl.CERT_NONE
    return ctx


def server_context_for(cfg: ListenerTlsConfig) -> ssl.SSLContext:
    return server_context(cfg.cert_file, cfg.key_file, cfg.ca_file, cfg.require_client_cert)


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """A destination's context: the PACS certificate and host name are verified against
    ``ca_file`` (the system's trust store when absent); our certificate when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    _harden(ctx)
    if ca_file is not None:
        _load_cas(ctx, ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        _load_own(ctx, cert_file, key_file)
    return ctx


@dataclass(frozen=True)
class ClientTls:
    """What a requested association needs to wrap its socket."""

    context: ssl.SSLContext
    server_name: str


_cache: dict[tuple[object, ...], ssl.SSLContext] = {}
_cache_lock = threading.Lock()


def _stamp(path: Path | None) -> tuple[str, int]:
    if path is None:
        return ("", 0)
    try:
        return (str(path), os.stat(path).st_mtime_ns)
    except OSError:
        return (str(path), -1)


def client_tls(cfg: DestinationConfig) -> ClientTls | None:
    """The TLS settings of a DICOM destination, None without ``tls = true``.

    The context is rebuilt when one of its files changed (a renewed certificate is used from
    the next association on, without a restart). Raises :class:`TlsError`.
    """
    if not cfg.tls:
        return None
    key = (_stamp(cfg.ca_file), _stamp(cfg.cert_file), _stamp(cfg.key_file))
    with _cache_lock:
        ctx = _cache.get(key)
        if ctx is None:
            ctx = client_context(cfg.ca_file, cfg.cert_file, cfg.key_file)
            _cache[key] = ctx
            if len(_cache) > 64:
                _cache.pop(next(iter(_cache)))
    return ClientTls(ctx, cfg.server_name or cfg.host)
