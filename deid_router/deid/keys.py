"""All keyed derivations (UIDs, pseudonyms, tokens, date offsets, crosswalk encryption) from one secret.

Nothing here is a plain hash: without the secret an attacker cannot test guesses of a
patient ID against a pseudonym. Each use has its own domain-separation prefix so that a
value derived for one purpose never equals a value derived for another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from deid_router.config import DEFAULT_SCOPE  # the v1 keys: deployments keep their pseudonyms and UIDs
from deid_router.errors import ConfigError, SecretMismatchError

_SECRET_BYTES = 32
_BLOB_VERSION = b"\x01"


class Keys:
    """All keyed derivations from one secret. Never a plain hash."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("secret must be at least 16 bytes")
        self._secret = secret
        aead_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=b"deid-router", info=b"crosswalk-aes-gcm v1"
        ).derive(secret)
        self._aead = AESGCM(aead_key)

    @classmethod
    def load_or_create(cls, path: Path) -> Keys:
        """Read the hex secret at ``path``; create it (0600) if missing.

        Creation is exclusive and atomic: the full secret is written to a private temporary
        file which is then hard-linked to ``path`` (fails if it exists). Two processes
        starting together therefore agree: the loser of the race reads the winner's secret.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, (secrets.token_bytes(_SECRET_BYTES).hex() + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race: use its secret
            finally:
                os.unlink(tmp)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> Keys:
        """Read the hex secret at ``path``; never creates it (ConfigError naming the file)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError([(str(path), "deid.secret_file", "does not exist")])
        text = ""
        for _ in range(50):  # the file is complete when linked; the loop only guards odd filesystems
            text = path.read_text(encoding="ascii").strip()
            if text:
                break
            time.sleep(0.01)
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) != _SECRET_BYTES:
            raise ConfigError([(str(path), "deid.secret_file", "must hold 64 hexadecimal characters")])
        return cls(secret)

    def for_scope(self, scope: str) -> Keys:
        """The keys of a pseudonym scope (a profile's): derived from the one secret with HKDF,
        so two scopes share no UID, pseudonym, date shift or crosswalk key; the default scope
        is this object itself (v1 outputs, bit for bit)."""
        if scope == DEFAULT_SCOPE:
            return self
        derived = HKDF(
            algorithm=hashes.SHA256(), length=_SECRET_BYTES, salt=b"deid-router scope",
            info=b"scope v1:" + scope.encode("utf-8"),
        ).derive(self._secret)
        return Keys(derived)

    def fingerprint(self) -> str:
        """A keyed hash identifying this secret (stored in the database); reveals nothing of it."""
        return self._mac(b"fingerprint", "deid-router secret v1").hex()

    def _mac(self, domain: bytes, value: str) -> bytes:
        return hmac.new(self._secret, domain + b"\0" + value.encode("utf-8"), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """A valid UID under the 2.25 root (UUID-derived form), at most 44 characters."""
        return "2.25." + str(int.from_bytes(self._mac(b"uid", original)[:16], "big"))

    def token(self, kind: str, value: str) -> str:
        """Hex HMAC for database keys and logs; not reversible without the secret."""
        return self._mac(b"token:" + kind.encode("utf-8"), value).hex()

    def pseudonym(self, kind: str, value: str, length: int) -> str:
        """Keyed, deterministic, uppercase base32 (A-Z, 2-7) string of ``length`` characters."""
        out = ""
        counter = 0
        while len(out) < length:
            digest = self._mac(b"pseudonym:" + kind.encode("utf-8") + b":" + str(counter).encode(), value)
            out += base64.b32encode(digest).decode("ascii").rstrip("=")
            counter += 1
        return out[:length]

    def day_offset(self, patient_key: str, lo: int, hi: int) -> int:
        """Keyed per-patient shift in days, uniformly in [lo, hi]."""
        if hi < lo:
            raise ValueError("hi must be >= lo")
        n = int.from_bytes(self._mac(b"day_offset", patient_key), "big")
        return lo + n % (hi - lo + 1)

    def encrypt(self, text: str) -> bytes:
        """AES-256-GCM with a key derived by HKDF (not the HMAC key); random nonce."""
        nonce = os.urandom(12)
        return _BLOB_VERSION + nonce + self._aead.encrypt(nonce, text.encode("utf-8"), _BLOB_VERSION)

    def decrypt(self, blob: bytes) -> str:
        if blob[:1] != _BLOB_VERSION or len(blob) < 29:
            raise ValueError("not a deid-router crosswalk blob")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], _BLOB_VERSION).decode("utf-8")
        except InvalidTag as exc:
            raise SecretMismatchError(
                "a crosswalk entry cannot be decrypted with this secret: deid.secret_file is not the "
                "secret the entries were written with (restore the right one from backup)"
            ) from exc
