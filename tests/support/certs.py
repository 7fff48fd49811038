"""Test certificates made with the real ``openssl`` command line, in a temporary folder.

``Pki(root)`` makes a CA; ``issue(name)`` a key and certificate signed by it for localhost and
127.0.0.1, usable by servers and clients; ``expired=True`` one whose validity already ended.
Two ``Pki`` objects are two CAs that do not trust each other.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        raise RuntimeError("openssl not found; apt-get install -y openssl")
    return path


def _run(*args: str, cwd: Path) -> None:
    res = subprocess.run([openssl(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {res.stderr[-2000:]}")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Pki:
    def __init__(self, root: Path, name: str = "ca") -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cert = root / f"{name}.crt"
        self.key = root / f"{name}.key"
        _run(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key), "-out", str(self.cert),
            "-days", "30", "-subj", f"/CN=deid-router test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=root,
        )

    def issue(self, name: str, expired: bool = False, sans: str = "DNS:localhost,IP:127.0.0.1") -> Issued:
        key, csr, cert = (self.root / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        ext = self.root / f"{name}.ext"
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName={sans}\n",
            encoding="ascii",
        )
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={name}", cwd=self.root)
        # -days -1: valid from now until yesterday, i.e. already expired
        _run("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key), "-CAcreateserial",
             "-out", str(cert), "-days", "-1" if expired else "30", "-extfile", str(ext), cwd=self.root)
        return Issued(cert, key)
