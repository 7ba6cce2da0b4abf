"""``python -m pobox serve`` as a real process: privilege drop and SIGHUP certificate reload."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.testing import deliver_to_maildir
from tests.helpers.accounts import ROOT_MAIL_SETTINGS, process_ids
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.process import serve_config
from tests.integration.wire import Wire

from .helpers import Pki, der_of_pem

MESSAGE = b"From: a@example.test\nSubject: hi\n\nhello\n"


@dataclass
class Process:
    """A running pobox server process and what its log said."""

    proc: asyncio.subprocess.Process
    port: int
    ssl_port: int

    async def wait_log(self, pattern: str, timeout: float = 20) -> str:
        """Read the log until a line matches ``pattern``; return that line."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                assert line, "the server exited"
                if re.search(pattern, line):
                    return line


@asynccontextmanager
async def pobox_process(folder: Path, pki: Pki, **extra: str) -> AsyncIterator[Process]:
    """Run ``python -m pobox serve`` on ``folder`` (a passwd-file and Maildirs in it)."""
    lines = [
        'listen = ["127.0.0.1:0"]',
        "workers = 1",
        'ssl_listen = ["127.0.0.1:0"]',
        f'mail_location = "maildir:{folder}/mail/%u"',
        f'passwd_file = "{folder}/passwd"',
        f'ssl_cert = "{pki.cert_pem}"',
        f'ssl_key = "{pki.key_pem}"',
        "auth_failure_delay = 0",
        *(f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()),
    ]
    if "mail_uid" not in extra:
        lines.append(ROOT_MAIL_SETTINGS)  # started as root, on root's files
    (folder / "pobox.toml").write_text("\n".join(lines) + "\n")
    async with serve_config(folder / "pobox.toml", stderr=asyncio.subprocess.PIPE) as proc:
        started = Process(proc, 0, 0)
        line = await started.wait_log(r"started, listening on")
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
        started.port, started.ssl_port = ports
        yield started


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder every user may traverse, with alice's passwd entry and one message."""
    with searchable_tmpdir() as folder:
        add_user(folder / "passwd", "alice", b"secret", scheme="PLAIN")
        (folder / "passwd").chmod(0o644)
        deliver_to_maildir(folder / "mail" / "alice", MESSAGE)
        yield folder


async def tls_wire(port: int, pki: Pki) -> Wire:
    """An implicit-TLS connection verified against the test CA."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.client_context(), server_hostname="localhost"
    )
    return Wire(reader, writer)


class TestPrivilegeDrop:
    """Started as root with mail_uid = "nobody", the server serves as nobody."""

    async def test_runs_as_nobody(self, shared_folder: Path):
        """All four uids and gids are nobody's, and a login over TLS still works."""
        if os.geteuid() != 0:
            pytest.fail("this test starts the server as root: run the suite as root")
        nobody = pwd.getpwnam("nobody")
        pki = Pki.create(shared_folder / "pki")
        for path in (shared_folder / "pki").iterdir():
            path.chmod(0o644)
        mail = shared_folder / "mail"
        for path in [mail, *mail.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)

        async with pobox_process(shared_folder, pki, mail_uid="nobody") as srv:
            uids, gids = process_ids(srv.proc.pid)
            wire = await tls_wire(srv.ssl_port, pki)
            await wire.login()
            stat = await wire.command(b"STAT")

        assert [nobody.pw_uid] * 4 == uids
        assert [nobody.pw_gid] * 4 == gids
        assert stat.startswith(b"+OK 1 ")

    async def test_unknown_user_refused(self, shared_folder: Path):
        """A user that does not exist stops the start with a config error naming the key."""
        pki = Pki.create(shared_folder / "pki")
        (shared_folder / "pobox.toml").write_text(
            f'listen = ["127.0.0.1:0"]\nworkers = 1\npasswd_file = "{shared_folder}/passwd"\n'
            f'ssl_cert = "{pki.cert_pem}"\nssl_key = "{pki.key_pem}"\n'
            'user = "no-such-user-pobox"\n'
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pobox", "serve", "-c", str(shared_folder / "pobox.toml"),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30):
            _, err = await proc.communicate()

        assert 78 == proc.returncode  # EX_CONFIG
        assert b"user: no such user 'no-such-user-pobox'" in err


class TestSighup:
    """SIGHUP reloads the certificates of a running server."""

    async def test_reload(self, shared_folder: Path):
        """After SIGHUP a new connection gets the new certificate; an open session goes on."""
        pki = Pki.create(shared_folder / "pki")
        async with pobox_process(shared_folder, pki) as srv:
            old = await tls_wire(srv.ssl_port, pki)
            await old.login()
            old_der = old.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            new_pem = pki.issue("localhost", "127.0.0.1")

            srv.proc.send_signal(signal.SIGHUP)
            await srv.wait_log("TLS certificates reloaded")
            fresh = await tls_wire(srv.ssl_port, pki)
            ssl_object = fresh.writer.get_extra_info("ssl_object")
            assert isinstance(ssl_object, ssl.SSLObject)
            served = ssl_object.getpeercert(binary_form=True)
            stat = await old.command(b"STAT")
            greeting = await fresh.line()

        assert der_of_pem(new_pem) == served
        assert old_der != served
        assert stat.startswith(b"+OK 1 ")
        assert b"+OK pobox ready.\r\n" == greeting
