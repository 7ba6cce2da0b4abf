"""SCRAM against a real pobox: salts that tell no names apart, keys off the event loop, and
aborted or failed exchanges counted like wrong passwords (throttle, log, fail2ban)."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.testing import RunningServer, running_server
from tests.helpers.process import pobox_serve
from tests.integration.wire import Wire
from tests.log.test_forgery import DOVECOT_FILTER, matched_ips, pobox_filter

from .test_integration import scram_client_final

MECHS = "PLAIN SCRAM-SHA-1 SCRAM-SHA-256"


async def server_first(port: int, name: bytes, mech: bytes = b"SCRAM-SHA-256") -> dict[str, bytes]:
    """Send a client-first for ``name``; return the server-first's fields (then abort)."""
    w = await Wire.connect("127.0.0.1", port)
    await w.line()
    await w.send(b"AUTH " + mech + b" " + base64.b64encode(b"n,,n=" + name + b",r=cn") + b"\r\n")
    challenge = await w.line()
    assert challenge.startswith(b"+ "), challenge
    await w.close()
    fields = dict(f.split(b"=", 1) for f in base64.b64decode(challenge[2:]).split(b","))
    return {"salt": base64.b64decode(fields[b"s"]), "iterations": fields[b"i"]}


async def salts(srv: RunningServer, names: list[bytes]) -> list[dict[str, bytes]]:
    """The server-first fields of each name, asked twice each."""
    return [await server_first(srv.port, name) for name in names for _ in range(2)]


@pytest.fixture
def users(tmp_path: Path) -> Path:
    """alice {PLAIN}, hash with a one-way hash (SCRAM cannot use it), in tmp_path/srv."""
    root = tmp_path / "srv"
    root.mkdir()
    add_user(root / "passwd", "hash", b"secret", scheme="SHA512-CRYPT")
    return root


class TestSalts:
    """What SCRAM's first step shows for a name."""

    async def test_same_for_every_request_and_restart(self, users: Path) -> None:
        """Each name's salt and count are the same at every request, after a restart too."""
        names = [b"alice", b"nosuchuser", b"hash"]
        async with running_server(users, auth_mechanisms=MECHS) as srv:
            first = await salts(srv, names)
        async with running_server(users, users={}, auth_mechanisms=MECHS) as srv:
            again = await salts(srv, names)

        assert first == again
        assert [first[0], first[2], first[4]] == [first[1], first[3], first[5]]

    async def test_unknown_names_look_like_known(self, users: Path) -> None:
        """Unknown names, {PLAIN} users and one-way-hash users get salts of one kind."""
        async with running_server(users, auth_mechanisms=MECHS) as srv:
            shown = await salts(srv, [b"alice", b"nosuchuser", b"hash", b"other"])

        assert {b"4096"} == {s["iterations"] for s in shown}
        assert {16} == {len(s["salt"]) for s in shown}
        assert 4 == len({s["salt"] for s in shown})  # each name its own

    async def test_salt_depends_on_the_secret(self, users: Path) -> None:
        """Another server secret gives other salts: nobody can compute them without it."""
        async with running_server(users, auth_mechanisms=MECHS) as srv:
            before = await server_first(srv.port, b"nosuchuser")
        secret = users / "pobox-scram.secret"
        assert 0o600 == secret.stat().st_mode & 0o777
        assert 65 == len(secret.read_text())  # 64 hex digits and a newline
        secret.unlink()
        async with running_server(users, users={}, auth_mechanisms=MECHS) as srv:
            after = await server_first(srv.port, b"nosuchuser")

        assert before["salt"] != after["salt"]

    async def test_secret_file_key(self, users: Path, tmp_path: Path) -> None:
        """scram_secret_file puts the secret where the admin says."""
        path = tmp_path / "elsewhere.secret"
        async with running_server(users, auth_mechanisms=MECHS, scram_secret_file=str(path)) as srv:
            await server_first(srv.port, b"alice")

        assert path.exists()
        assert not (users / "pobox-scram.secret").exists()

    async def test_no_secret_without_scram(self, users: Path) -> None:
        """Without SCRAM in auth_mechanisms no secret file is made."""
        async with running_server(users):
            pass
        assert not (users / "pobox-scram.secret").exists()


@pytest.fixture
def pbkdf2_threads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, for each PBKDF2 computed, whether it ran in the event loop's (main) thread."""
    calls: list[bool] = []
    real = hashlib.pbkdf2_hmac

    def recording(*args: object, **kwargs: object) -> bytes:
        calls.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", recording)
    return calls


class TestKeysOffTheLoop:
    """SCRAM's key derivation never runs in the event loop."""

    @pytest.mark.parametrize("name", [b"alice", b"nosuchuser", b"hash"])
    async def test_pbkdf2_in_a_worker(
        self, users: Path, pbkdf2_threads: list[bool], name: bytes
    ) -> None:
        """The server-first message costs one PBKDF2, in a worker thread, for every name."""
        async with running_server(users, auth_mechanisms=MECHS) as srv:
            await server_first(srv.port, name)

        assert [False] == pbkdf2_threads

    async def test_login_still_works(self, users: Path) -> None:
        """A {PLAIN} user logs in with SCRAM-SHA-1 and SCRAM-SHA-256."""
        async with running_server(users, auth_mechanisms=MECHS) as srv:
            replies = []
            for mech, hash_name in ((b"SCRAM-SHA-1", "sha1"), (b"SCRAM-SHA-256", "sha256")):
                w = await Wire.connect(srv.host, srv.port)
                await w.line()
                bare = b"n=alice,r=cn"
                await w.send(b"AUTH " + mech + b" " + base64.b64encode(b"n,," + bare) + b"\r\n")
                first = base64.b64decode((await w.line())[2:])
                final, _ = scram_client_final(first, bare, b"secret", hash_name)
                await w.send(base64.b64encode(final) + b"\r\n")
                await w.line()
                replies.append(await w.command(b""))
                await w.close()

        assert [b"+OK Logged in.\r\n"] * 2 == replies


async def abort_scram(port: int, name: bytes = b"alice") -> bytes:
    """Start SCRAM as ``name``, answer the server-first with '*'; return the reply."""
    w = await Wire.connect("127.0.0.1", port)
    await w.line()
    await w.send(b"AUTH SCRAM-SHA-256 " + base64.b64encode(b"n,,n=" + name + b",r=cn") + b"\r\n")
    await w.line()
    reply = await w.command(b"*")
    await w.send(b"QUIT\r\n")
    await w.read_all()
    await w.close()
    return reply


async def wrong_scram(port: int, name: bytes = b"alice") -> bytes:
    """Run SCRAM as ``name`` with a wrong password; return the reply."""
    w = await Wire.connect("127.0.0.1", port)
    await w.line()
    bare = b"n=" + name + b",r=cn"
    await w.send(b"AUTH SCRAM-SHA-256 " + base64.b64encode(b"n,," + bare) + b"\r\n")
    first = base64.b64decode((await w.line())[2:])
    final, _ = scram_client_final(first, bare, b"wrong", "sha256")
    reply = await w.command(base64.b64encode(final))
    await w.send(b"QUIT\r\n")
    await w.read_all()
    await w.close()
    return reply


class TestFailuresCount:
    """An aborted or failed SCRAM exchange is a failed login like a wrong PLAIN password."""

    async def test_abort_answered_as_a_failure(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """'*' after the server-first: -ERR [AUTH], logged as a failed login."""
        # pytest's caplog sees the pobox logger whether it propagates or not.
        with caplog.at_level(logging.INFO, logger="pobox"):
            async with running_server(tmp_path, auth_mechanisms=MECHS) as srv:
                reply = await abort_scram(srv.port)

        assert b"-ERR [AUTH] Authentication failed.\r\n" == reply
        failed = [m for m in caplog.messages if "Authentication failed:" in m]
        assert 1 == len(failed)
        assert "user=<alice>, method=SCRAM-SHA-256, rip=127.0.0.1" in failed[0]

    @pytest.mark.parametrize("fail", [abort_scram, wrong_scram])
    async def test_throttled(self, tmp_path: Path, fail: object) -> None:
        """Enough aborted (or failed) exchanges get the address refused, as PLAIN failures do."""
        async with running_server(tmp_path, auth_mechanisms=MECHS, auth_failures_per_ip=2) as srv:
            assert callable(fail)
            replies = [await fail(srv.port), await fail(srv.port)]
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            refused = await w.command(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret"))

        assert [b"-ERR [AUTH] Authentication failed.\r\n"] * 2 == replies
        assert refused.startswith(b"-ERR [LOGIN-DELAY] ")

    async def test_failure_delay(self, tmp_path: Path, failure_waits: list[float]) -> None:
        """An aborted exchange waits the failure delay before its answer."""
        async with running_server(tmp_path, auth_mechanisms=MECHS, auth_failure_delay=1.0) as srv:
            await abort_scram(srv.port)

        assert 1 == len(failure_waits)
        assert 0 < failure_waits[0] <= 1.0

    @pytest.mark.external
    async def test_fail2ban_counts_them(self, tmp_path: Path) -> None:
        """Both filters see each aborted and failed exchange from the real address."""
        async with pobox_serve(tmp_path / "srv", auth_mechanisms=MECHS) as proc:
            for fail in (abort_scram, wrong_scram, abort_scram):
                await fail(proc.port)
            await proc.wait_count("Disconnected (auth failed", 3)
            log = proc.log

        assert ["127.0.0.1"] * 3 == matched_ips(log, pobox_filter(tmp_path))
        assert ["127.0.0.1"] * 3 == matched_ips(log, DOVECOT_FILTER)
