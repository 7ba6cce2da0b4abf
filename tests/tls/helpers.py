"""Helpers for the TLS tests: a test PKI on disk, external programs, TLS clients."""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from pobox.testing import RunningServer


@dataclass
class Pki:
    """A test CA and a server certificate for localhost/127.0.0.1, as PEM files."""

    ca: trustme.CA
    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    @classmethod
    def create(cls, folder: Path, *names: str) -> Pki:
        """Write a fresh CA and a certificate for ``names`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        pki = cls(ca, folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
        ca.cert_pem.write_to_path(str(pki.ca_pem))
        pki.issue(*(names or ("localhost", "127.0.0.1")))
        return pki

    def issue(self, *names: str) -> bytes:
        """Replace the server certificate and key with new ones; return the new cert PEM."""
        cert = self.ca.issue_cert(*names, common_name=names[0])
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        self.cert_pem.write_bytes(chain)
        cert.private_key_pem.write_to_path(str(self.key_pem))
        return cert.cert_chain_pems[0].bytes()

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and verifies host names."""
        return ssl.create_default_context(cafile=str(self.ca_pem))

    @property
    def settings(self) -> dict[str, str]:
        """The ``ssl_cert``/``ssl_key`` config keys for this certificate."""
        return {"ssl_cert": str(self.cert_pem), "ssl_key": str(self.key_pem)}


async def run(
    *argv: str,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = 60,
    check: bool = True,
) -> tuple[int, bytes, bytes]:
    """Run a program with ``stdin``; return (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    if check:
        assert 0 == proc.returncode, f"{argv[0]} failed: {err.decode(errors='replace')}"
    return proc.returncode, out, err


def der_of_pem(pem: bytes) -> bytes:
    """The DER bytes of the first certificate in ``pem``."""
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def ssl_port(srv: RunningServer) -> int:
    """The implicit-TLS port of ``srv``."""
    return srv.server.ssl_addresses[0][1]
