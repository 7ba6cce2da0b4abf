"""Fixtures for the fetch client: a real POP3 server (pobox or Dovecot) with alice's maildrop.

The ``peer`` fixture is parametrized, so every test that uses it runs against both servers.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from pobox.client import Account
from pobox.testing import deliver_to_maildir, running_server
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir

PASSWORD = "secret"


@dataclass
class Peer:
    """A running POP3 server with user alice/secret and a way to drop mail into her maildrop."""

    kind: str
    host: str
    port: int
    maildrop: Path
    owner: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def deliver(self, data: bytes) -> Path:
        """Deliver ``data`` to alice's maildrop on the server."""
        owner = self.owner[0] if self.owner is not None else None
        return deliver_to_maildir(self.maildrop, data, owner=owner)

    def remaining(self) -> int:
        """Count the messages still in alice's maildrop on the server.

        By base name, new/ first: a message the server marks seen meanwhile (renamed from
        new/ to cur/ with a ``:2,S`` suffix) is counted once, never missed.
        """
        return len(
            {
                path.name.split(":", 1)[0]
                for sub in ("new", "cur")
                for path in (self.maildrop / sub).iterdir()
            }
        )


def dovecot_maildrop(tmp: Path) -> tuple[Path, tuple[int, int] | None]:
    """Create alice's Maildir under a Dovecot home before Dovecot starts (it gets chowned)."""
    maildrop = tmp / "home" / "alice" / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildrop / sub).mkdir(parents=True, exist_ok=True)
    owner = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        owner = (nobody.pw_uid, nobody.pw_gid)
    return maildrop, owner


@contextlib.contextmanager
def dovecot_peer(extra_config: str = "") -> Iterator[Peer]:
    """Run Dovecot for alice and yield it as a :class:`Peer`."""
    with searchable_tmpdir() as tmp:
        maildrop, owner = dovecot_maildrop(tmp)
        with running_dovecot(tmp, {"alice": PASSWORD}, extra_config=extra_config) as dovecot:
            extra = {"tmp": tmp, "dovecot": dovecot}
            yield Peer("dovecot", dovecot.host, dovecot.port, maildrop, owner, extra)


@pytest.fixture(params=["pobox", "dovecot"])
async def peer(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Peer]:
    """A real POP3 server holding alice's maildrop: pobox in-process, or Dovecot."""
    if request.param == "pobox":
        async with running_server(tmp_path / "server", {"alice": PASSWORD}) as srv:
            yield Peer("pobox", srv.host, srv.port, srv.maildir("alice"))
    else:
        with dovecot_peer() as dovecot:
            yield dovecot


@pytest.fixture
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


def make_account(peer: Peer, tmp_path: Path, **settings: Any) -> Account:
    """An account for alice on ``peer`` (plaintext on loopback), delivering to tmp_path/local."""
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    values: dict[str, Any] = {
        "host": peer.host,
        "port": peer.port,
        "user": "alice",
        "tls": "none",
        "insecure": True,
        "password_file": str(password_file),
        "maildir": str(tmp_path / "local"),
        "state_dir": str(tmp_path / "state"),
        "timeout": 20.0,
    }
    values.update(settings)
    if "mbox" in settings or "mda" in settings:
        values.pop("maildir")
    return Account(**values).validate()


def local_messages(maildir: Path) -> list[bytes]:
    """Return the messages of a local Maildir (new and cur), sorted."""
    return sorted(p.read_bytes() for sub in ("new", "cur") for p in (maildir / sub).iterdir())


def lf(data: bytes) -> bytes:
    """A message as stored locally: LF line ends, ending in a line end."""
    data = data.replace(b"\r\n", b"\n")
    return data if data.endswith(b"\n") else data + b"\n"
