"""``pobox who`` and ``pobox kick`` against a real ``pobox serve``, over its control socket.

One process (``workers = 1``), a master and two workers, and two nodes on one PostgreSQL;
real POP3 clients on loopback (plain, POP3S, STLS); the command run as a real process, as
an admin runs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import pty
import pwd
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.config import Config, load_config
from pobox.errors import ConfigError
from pobox.server._control import bind_control_socket, control_socket_path
from pobox.who import format_sessions
from tests.helpers.accounts import unused_uid
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.maildir import deliver
from tests.helpers.process import ServeProcess
from tests.helpers.process import pobox_serve as _pobox_serve
from tests.helpers.users import interpreter, need_root
from tests.integration.test_workers import connect_to, login, worker_pids
from tests.integration.wire import Wire
from tests.tls.helpers import Pki

USERS = {"alice": "secret", "bob": "hunter2"}
MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
#: Heartbeat of the test servers: kicks reach workers and other nodes within fractions of a second.
HEARTBEAT = 0.2
# On PostgreSQL a node's sessions count while its lease runs (3 heartbeats): a loaded CI
# machine can hold a worker past 0.6 s, and who would then not list its sessions.
PG_HEARTBEAT = 1.0


def pobox_serve(
    folder: Path, users: dict[str, str], **settings: object
) -> contextlib.AbstractAsyncContextManager[ServeProcess]:
    """``pobox serve`` that stops at once at the end (a test's sessions need no drain)."""
    return _pobox_serve(folder, users, **{"drain_timeout": 0, **settings})


@pytest.fixture(autouse=True)
async def _close_wires() -> AsyncIterator[None]:
    yield
    await Wire.close_all()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for control sockets (sun_path holds 107 octets, pytest's are long)."""
    path = Path(tempfile.mkdtemp(prefix="pbx-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def pobox(*argv: str) -> tuple[int, str, str]:
    """Run ``python -m pobox ARGV``; return its status, standard output and error."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pobox", *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def who(proc: ServeProcess) -> list[dict[str, object]]:
    """The sessions ``pobox who --json`` lists."""
    status, out, err = await pobox("who", "--json", "-c", str(config_of(proc)))
    assert 0 == status, err
    sessions = json.loads(out)["sessions"]
    assert isinstance(sessions, list)
    return sessions


def config_of(proc: ServeProcess) -> Path:
    return proc.log.parent / "pobox.toml"


def fill(folder: Path) -> None:
    """Give alice and bob one message each."""
    for name in USERS:
        deliver(folder / "mail" / name, MESSAGE)


async def logged_in(
    port: int, user: str, *, tls: Pki | None = None, mechanism: str = "USER"
) -> Wire:
    """A session of ``user`` (over implicit TLS if ``tls``), logged in with USER/PASS or
    ``AUTH LOGIN``."""
    if tls is None:
        wire = await Wire.connect("127.0.0.1", port)
    else:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls.client_context(), server_hostname="localhost"
        )
        wire = Wire(reader, writer)
    assert (await wire.line()).startswith(b"+OK")
    if mechanism == "LOGIN":
        assert (await wire.command(b"AUTH LOGIN")).startswith(b"+ ")
        assert (await wire.command(base64.b64encode(user.encode()))).startswith(b"+ ")
        assert b"+OK Logged in.\r\n" == await wire.command(base64.b64encode(USERS[user].encode()))
        return wire
    assert b"+OK Logged in.\r\n" == await login(wire, user.encode(), USERS[user].encode())
    return wire


async def stls_logged_in(port: int, user: str, pki: Pki) -> Wire:
    """A session of ``user`` that said STLS before logging in."""
    wire = await Wire.connect("127.0.0.1", port)
    assert (await wire.line()).startswith(b"+OK")
    assert (await wire.command(b"STLS")).startswith(b"+OK")
    await wire.writer.start_tls(pki.client_context(), server_hostname="localhost")
    assert b"+OK Logged in.\r\n" == await login(wire, user.encode(), USERS[user].encode())
    return wire


async def ended(wire: Wire) -> bytes:
    """Read what the server sends until it closes the connection (a kick's last line)."""
    async with asyncio.timeout(20):
        return await wire.reader.read()


async def still_there(port: int, user: str) -> bytes:
    """Log in again and return STAT: a kick must not have run UPDATE."""
    wire = await logged_in(port, user)
    return await wire.command(b"STAT")


async def as_uid(path: Path, uid: int, gid: int) -> str:
    """Ask ``who`` on the socket ``path`` from a process of ``uid``; return the answer line
    (``EACCES`` if the socket cannot be opened)."""
    client = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(path)!r})\n"
        "except PermissionError:\n"
        "    print('EACCES'); sys.exit(0)\n"
        "try:\n"
        '    s.sendall(b\'{"v": 1, "op": "who"}\\n\')\n'
        "except BrokenPipeError:\n"
        "    pass  # refused before its request was read\n"
        "print(s.makefile('rb').readline().decode().strip())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        interpreter(), "-I", "-c", client,
        stdout=asyncio.subprocess.PIPE,
        user=uid,
        group=gid,
        extra_groups=[],
        cwd="/",
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert 0 == proc.returncode
    return out.decode().strip()


def by_user(sessions: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {s["user"]: s for s in sessions}


class TestOneProcess:
    """``workers = 1``: the serving process answers on its control socket."""

    async def test_who_lists_every_field(self, tmp_path: Path, sockdir: Path) -> None:
        """who lists user, address, since, TLS, mechanism, octets sent, node and session id."""
        pki = Pki.create(tmp_path / "pki")
        fill(tmp_path)
        async with pobox_serve(
            tmp_path,
            USERS,
            ssl_listen=["127.0.0.1:0"],
            control_socket=str(sockdir / "control"),
            node_name="n1",
            **pki.settings,
        ) as proc:
            ports = re.findall(r"127\.0\.0\.1:(\d+)", await proc.wait_log("started, listening"))
            ssl_port = int(ports[1])
            plain = await logged_in(proc.port, "alice")
            await plain.send(b"RETR 1\r\n")
            assert (await plain.multiline()).endswith(b"\r\n.\r\n")
            secure = await logged_in(ssl_port, "bob", tls=pki, mechanism="LOGIN")
            sessions = await who(proc)
            assert 2 == len(sessions)
            alice, bob = by_user(sessions)["alice"], by_user(sessions)["bob"]
            assert "127.0.0.1" == alice["rip"]
            assert (False, True) == (alice["tls"], bob["tls"])
            assert ("PLAIN", "LOGIN") == (alice["mechanism"], bob["mechanism"])  # as Dovecot
            assert len(MESSAGE + b".\r\n") == alice["bytes"]  # as retr= counts in the logs
            assert 0 == bob["bytes"]
            assert ("n1", "n1") == (alice["node"], bob["node"])
            log = proc.text()
            assert f"session=<{alice['id']}>" in log
            assert f"session=<{bob['id']}>" in log
            assert isinstance(alice["since"], float)
            assert 0 < float(bob["since"]) - float(alice["since"]) < 600
            await plain.command(b"QUIT")
            await secure.command(b"QUIT")

    async def test_stls_session_counts_as_tls(self, tmp_path: Path, sockdir: Path) -> None:
        """A session that said STLS is listed with TLS true."""
        pki = Pki.create(tmp_path / "pki")
        async with pobox_serve(
            tmp_path, USERS, control_socket=str(sockdir / "control"), **pki.settings
        ) as proc:
            await stls_logged_in(proc.port, "alice", pki)
            [alice] = await who(proc)
            assert True is alice["tls"]

    async def test_table_off_a_terminal(self, tmp_path: Path, sockdir: Path) -> None:
        """Without --json, who prints a column table and a count."""
        async with pobox_serve(tmp_path, USERS, control_socket=str(sockdir / "c")) as proc:
            await logged_in(proc.port, "alice")
            await logged_in(proc.port, "bob")
            status, out, err = await pobox("who", "-c", str(config_of(proc)))
            assert (0, "") == (status, err)
            lines = out.splitlines()
            header = ["USER", "ADDRESS", "SINCE", "TLS", "MECHANISM", "BYTES", "NODE", "SESSION"]
            assert header == lines[0].split()
            assert ["alice", "127.0.0.1"] == lines[1].split()[:2]
            assert ["no", "PLAIN", "0"] == lines[2].split()[4:7]
            assert "2 sessions" == lines[-1]

    async def test_table_on_a_terminal(self, tmp_path: Path, sockdir: Path) -> None:
        """On a terminal, who draws a rich table, and a user name is never read as markup."""
        users = {"[bold]eve": "pw", "alice": "secret"}
        async with pobox_serve(tmp_path, users, control_socket=str(sockdir / "c")) as proc:
            wire = await Wire.connect("127.0.0.1", proc.port)
            assert (await wire.line()).startswith(b"+OK")
            assert b"+OK Logged in.\r\n" == await login(wire, b"[bold]eve", b"pw")
            leader, follower = pty.openpty()
            try:
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "pobox", "who", "-c", str(config_of(proc)),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=follower,
                    env={**os.environ, "COLUMNS": "200", "TERM": "xterm"},
                )  # fmt: skip
                os.close(follower)
                async with asyncio.timeout(60):
                    assert 0 == await child.wait()
                out = b""
                with contextlib.suppress(OSError):  # EIO: the child closed the terminal
                    while chunk := os.read(leader, 65536):
                        out += chunk
            finally:
                os.close(leader)
        text = out.decode()
        assert "[bold]eve" in text
        assert "MECHANISM" in text
        assert "1 session" in text

    async def test_kick_by_user_ends_without_update(self, tmp_path: Path, sockdir: Path) -> None:
        """kick ALICE (as %Lu makes it: alice) ends her sessions without UPDATE; bob's goes on."""
        fill(tmp_path)
        async with pobox_serve(
            tmp_path, USERS, control_socket=str(sockdir / "control"), pop3_lock_session=False
        ) as proc:
            first = await logged_in(proc.port, "alice")
            assert (await first.command(b"DELE 1")).startswith(b"+OK")
            second = await logged_in(proc.port, "alice")
            bob = await logged_in(proc.port, "bob")
            status, out, err = await pobox("kick", "ALICE", "-c", str(config_of(proc)))
            assert (0, "2 sessions ended\n", "") == (status, out, err)
            assert (await ended(first)).startswith(b"-ERR [SYS/TEMP]")
            assert (await ended(second)).startswith(b"-ERR [SYS/TEMP]")
            assert b"+OK\r\n" == await bob.command(b"NOOP")
            assert b"+OK 1 %d\r\n" % len(MESSAGE) == await still_there(proc.port, "alice")
            assert ["bob", "alice"] == [s["user"] for s in await who(proc)]
            assert "Kicked by the administrator" in proc.text()

    async def test_kick_by_session_id(self, tmp_path: Path, sockdir: Path) -> None:
        """kick SESSION ends that one session of alice and not her other one."""
        async with pobox_serve(
            tmp_path, USERS, control_socket=str(sockdir / "control"), pop3_lock_session=False
        ) as proc:
            first = await logged_in(proc.port, "alice")
            second = await logged_in(proc.port, "alice")
            sessions = await who(proc)
            target = str(sessions[0]["id"])
            status, out, _ = await pobox("kick", target, "-c", str(config_of(proc)))
            assert (0, "1 session ended\n") == (status, out)
            assert (await ended(first)).startswith(b"-ERR [SYS/TEMP]")
            assert b"+OK\r\n" == await second.command(b"NOOP")
            assert [sessions[1]["id"]] == [s["id"] for s in await who(proc)]

    async def test_kick_matching_nothing(self, tmp_path: Path, sockdir: Path) -> None:
        """kick of a user with no session prints 0 and exits 1."""
        async with pobox_serve(tmp_path, USERS, control_socket=str(sockdir / "control")) as proc:
            bob = await logged_in(proc.port, "bob")
            status, out, _ = await pobox("kick", "alice", "-c", str(config_of(proc)))
            assert (1, "0 sessions ended\n") == (status, out)
            assert b"+OK\r\n" == await bob.command(b"NOOP")
            forged = "bob\n2026-01-01 00:00:00,000 INFO master: forged"
            status, out, _ = await pobox("kick", forged, "-c", str(config_of(proc)))
            assert (1, "0 sessions ended\n") == (status, out)
            line = await proc.wait_log(r"control socket: kick bob.*forged")
            assert line.endswith("by uid 0: 0 sessions asked to end, 0 ended")
            assert not any("master: forged" in x[:40] for x in proc.text().splitlines())
            assert b"+OK\r\n" == await bob.command(b"NOOP")

    async def test_socket_mode_and_removal(self, tmp_path: Path, sockdir: Path) -> None:
        """A stale socket file is replaced; the socket is mode 0600, and gone at the end."""
        path = sockdir / "control"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))  # what a server killed by SIGKILL leaves
        stale.close()
        async with pobox_serve(tmp_path, USERS, control_socket=str(path)) as proc:
            mode = path.lstat().st_mode
            assert stat.S_ISSOCK(mode)
            assert 0o600 == stat.S_IMODE(mode)
            assert [] == await who(proc)
        assert not path.exists()

    async def test_socket_taken(self, tmp_path: Path, sockdir: Path) -> None:
        """A second server on a control_socket another one answers on exits 78 naming it."""
        path = sockdir / "control"
        async with pobox_serve(tmp_path / "a", USERS, control_socket=str(path)) as first:
            config = config_of(first).read_text().replace(str(tmp_path / "a"), str(tmp_path / "b"))
            (tmp_path / "b").mkdir()
            (tmp_path / "b" / "pobox.toml").write_text(config)
            shutil.copy(tmp_path / "a" / "passwd", tmp_path / "b" / "passwd")
            status, _, err = await pobox("serve", "-c", str(tmp_path / "b" / "pobox.toml"))
            assert 78 == status
            assert f"control_socket: a server already answers on {path}" in err
            assert [] == await who(first)


class TestFormat:
    """The table of ``who`` off a terminal."""

    def test_control_characters_escaped(self) -> None:
        """A user name (from the userdb) cannot drive the admin's terminal."""
        row = {"id": "abc", "user": "eve\x1b[2J\r", "node": "n", "rip": "::1", "since": 0.0}
        text = format_sessions([{**row, "tls": True, "mechanism": "PLAIN", "bytes": None}])
        assert "eve\\x1b[2J\\x0d" == text.splitlines()[1].split()[0]
        assert "\x1b" not in text
        assert ["yes", "PLAIN", "-", "n", "abc"] == text.splitlines()[1].split()[4:]


class TestConfig:
    """The control_socket key."""

    def test_relative_path_refused(self, tmp_path: Path) -> None:
        """A relative path (resolved differently by the server and by who) is an error."""
        config = tmp_path / "pobox.toml"
        config.write_text(f'mail_location = "maildir:{tmp_path}/%u"\ncontrol_socket = "run/c"\n')
        with pytest.raises(
            ConfigError, match=r"pobox\.toml:2: control_socket: 'run/c' must be auto, off or"
        ):
            load_config(config)

    def test_auto(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """auto: systemd's RUNTIME_DIRECTORY, /run/pobox/control for root, XDG_RUNTIME_DIR..."""
        config = Config()
        monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/pobox:/run/other")
        assert Path("/run/pobox/control") == control_socket_path(config, euid=1000)
        monkeypatch.delenv("RUNTIME_DIRECTORY")
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
        assert Path("/run/pobox/control") == control_socket_path(config, euid=0)
        assert Path("/run/user/1000/pobox/control") == control_socket_path(config, euid=1000)
        monkeypatch.delenv("XDG_RUNTIME_DIR")
        assert None is control_socket_path(config, euid=1000)
        off = dataclasses.replace(config, control_socket="off")
        assert None is control_socket_path(off, euid=0)


class TestSocketFile:
    """bind_control_socket on its own."""

    def test_group_mode_and_owner(self, sockdir: Path) -> None:
        """With group, the socket is 0660, owned by the uid and gid given."""
        need_root()
        nobody = pwd.getpwnam("nobody")
        path = sockdir / "sub" / "control"
        sock = bind_control_socket(path, uid=nobody.pw_uid, gid=nobody.pw_gid, group=True)
        try:
            info = path.lstat()
            assert (nobody.pw_uid, nobody.pw_gid) == (info.st_uid, info.st_gid)
            assert 0o660 == stat.S_IMODE(info.st_mode)
            assert 0o755 == stat.S_IMODE(path.parent.stat().st_mode)
            with pytest.raises(ConfigError, match="a server already answers on"):
                bind_control_socket(path, uid=None, gid=None, group=False)
        finally:
            sock.close()

    def test_not_a_socket(self, sockdir: Path) -> None:
        """A regular file at the path is left alone and named in the error."""
        path = sockdir / "control"
        path.write_text("precious")
        with pytest.raises(ConfigError, match="exists and is not a socket"):
            bind_control_socket(path, uid=None, gid=None, group=False)
        assert "precious" == path.read_text()


class TestRefusals:
    """No server, another user, a hostile client."""

    async def test_no_server(self, tmp_path: Path, sockdir: Path) -> None:
        """who with no server running exits 69 naming the socket and the key, no traceback."""
        config = tmp_path / "pobox.toml"
        path = sockdir / "control"
        config.write_text(f'mail_location = "maildir:{tmp_path}/%u"\ncontrol_socket = "{path}"\n')
        for argv in (("who",), ("kick", "alice")):
            status, out, err = await pobox(*argv, "-c", str(config))
            assert 69 == status
            assert "" == out
            assert str(path) in err
            assert "control_socket" in err
            assert "Traceback" not in err
        config.write_text(f'mail_location = "maildir:{tmp_path}/%u"\ncontrol_socket = "off"\n')
        status, _, err = await pobox("who", "-c", str(config))
        assert 78 == status
        assert "pobox who: no control socket: control_socket is off in this configuration\n" == err
        config.write_text(f'mail_location = "maildir:{tmp_path}/%u"\ncontrol_socket = "{path}"\n')
        path.touch()  # a file where the socket should be: still "no server"
        status, _, err = await pobox("who", "-c", str(config))
        assert 69 == status
        assert "Traceback" not in err

    async def test_other_uid_refused(self, tmp_path: Path, sockdir: Path) -> None:
        """A peer of another uid cannot open the socket; made openable, the server refuses it."""
        need_root()
        path = sockdir / "control"
        sockdir.chmod(0o755)
        uid = unused_uid()

        async with pobox_serve(tmp_path, USERS, control_socket=str(path)) as proc:
            await logged_in(proc.port, "alice")
            assert "EACCES" == await as_uid(path, uid, uid)
            path.chmod(0o666)  # the file's mode is one layer; the peer's uid is the other
            answer = json.loads(await as_uid(path, uid, uid))
            assert {"v": 1, "ok": False, "error": f"permission denied for uid {uid}"} == answer
            await proc.wait_log(rf"control socket: refused uid {uid} \(pid \d+\)")
            assert 1 == len(await who(proc))  # root still may

    async def test_service_user_owns_and_may_ask(self, sockdir: Path) -> None:
        """Started as root to serve as nobody: the socket is nobody's, and nobody is answered."""
        need_root()
        nobody = pwd.getpwnam("nobody")
        path = sockdir / "control"
        sockdir.chmod(0o755)
        with searchable_tmpdir() as folder:
            for name, password in USERS.items():
                add_user(folder / "passwd", name, password.encode(), scheme="PLAIN")
                (folder / "mail" / name).mkdir(parents=True)
            (folder / "passwd").chmod(0o644)
            for mail in [folder / "mail", *(folder / "mail").rglob("*")]:
                os.chown(mail, nobody.pw_uid, nobody.pw_gid)
            settings = {"mail_uid": "nobody", "control_socket": str(path)}
            async with pobox_serve(folder, {}, **settings) as proc:
                await logged_in(proc.port, "alice")
                info = path.lstat()
                assert (nobody.pw_uid, 0o600) == (info.st_uid, stat.S_IMODE(info.st_mode))
                answer = json.loads(await as_uid(path, nobody.pw_uid, nobody.pw_gid))
                assert True is answer["ok"]
                assert ["alice"] == [s["user"] for s in answer["sessions"]]
                assert ["alice"] == [s["user"] for s in await who(proc)]  # and root

    async def test_hostile_requests(self, tmp_path: Path, sockdir: Path) -> None:
        """Bad JSON, a wrong version, a long line, a silent client: an error each, server fine."""
        path = sockdir / "control"
        async with pobox_serve(tmp_path, USERS, control_socket=str(path)) as proc:

            async def exchange(data: bytes) -> dict[str, object]:
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(data)
                answer = json.loads(await asyncio.wait_for(reader.readline(), 20))
                writer.close()
                assert isinstance(answer, dict)
                return answer

            silent_reader, silent_writer = await asyncio.open_unix_connection(str(path))
            assert False is (await exchange(b"nonsense\n"))["ok"]
            assert False is (await exchange(b"[1]\n"))["ok"]
            assert "protocol version must be 1" == (await exchange(b'{"v": 2}\n'))["error"]
            assert (
                "unknown operation (who, kick)"
                == (await exchange(b'{"v": 1, "op": "shutdown"}\n'))["error"]
            )
            assert (
                "request longer than 4096 octets" == (await exchange(b"x" * 70000 + b"\n"))["error"]
            )
            # The silent client still waits for its request timeout; others are answered.
            assert True is (await exchange(b'{"v": 1, "op": "who"}\n'))["ok"]
            timeout = json.loads(await asyncio.wait_for(silent_reader.readline(), 20))
            assert "no request within 5 s" == timeout["error"]
            silent_writer.close()
            assert [] == await who(proc)


class TestWorkers:
    """``workers = 2``: the master answers for both workers."""

    async def test_who_and_kick_across_workers(self, tmp_path: Path, sockdir: Path) -> None:
        """who lists the sessions of both workers; kick ends one in a worker, without UPDATE."""
        fill(tmp_path)
        async with pobox_serve(
            tmp_path,
            USERS,
            workers=2,
            apop=True,
            shared_state_heartbeat=HEARTBEAT,
            control_socket=str(sockdir / "control"),
        ) as proc:
            await proc.wait_log(r"master: pobox \S+ started, listening on 127\.0\.0\.1:")
            first, second = worker_pids(proc)
            alice = await connect_to(proc, first)
            assert b"+OK Logged in.\r\n" == await login(alice, b"alice", b"secret")
            assert (await alice.command(b"DELE 1")).startswith(b"+OK")
            bob = await connect_to(proc, second)
            assert b"+OK Logged in.\r\n" == await login(bob, b"bob", b"hunter2")
            await bob.send(b"RETR 1\r\n")
            assert (await bob.multiline()).endswith(b"\r\n.\r\n")
            for _ in range(400):  # the worker reports octets with its heartbeat
                sessions = by_user(await who(proc))
                if sessions["bob"]["bytes"]:
                    break
                await asyncio.sleep(HEARTBEAT)
            assert ["alice", "bob"] == sorted(sessions)
            assert len(MESSAGE + b".\r\n") == sessions["bob"]["bytes"]
            assert 0 == sessions["alice"]["bytes"]
            status, out, _ = await pobox("kick", "alice", "-c", str(config_of(proc)))
            assert (0, "1 session ended\n") == (status, out)
            assert (await ended(alice)).startswith(b"-ERR [SYS/TEMP]")
            assert b"+OK\r\n" == await bob.command(b"NOOP")
            assert ["bob"] == [s["user"] for s in await who(proc)]
            wire = await connect_to(proc, second)
            assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")
            assert b"+OK 1 %d\r\n" % len(MESSAGE) == await wire.command(b"STAT")

    @pytest.mark.parametrize("state", ["memory", "postgresql"])
    async def test_kick_reaches_a_worker_at_once(
        self, tmp_path: Path, sockdir: Path, state: str, request: pytest.FixtureRequest
    ) -> None:
        """The master tells the worker: the kick does not wait for a (minute-long) heartbeat."""
        more = {"postgresql_dsn": request.getfixturevalue("pg_dsn")} if state != "memory" else {}
        async with pobox_serve(
            tmp_path,
            USERS,
            workers=2,
            shared_state=state,
            shared_state_heartbeat=60,
            shared_state_timeout=3,
            control_socket=str(sockdir / "control"),
            **more,
        ) as proc:
            await proc.wait_log(r"master: pobox \S+ started, listening on 127\.0\.0\.1:")
            alice = await logged_in(proc.port, "alice")
            bob = await logged_in(proc.port, "bob")
            status, out, _ = await pobox("kick", "alice", "-c", str(config_of(proc)))
            assert (0, "1 session ended\n") == (status, out)
            assert (await ended(alice)).startswith(b"-ERR [SYS/TEMP]")
            assert b"+OK\r\n" == await bob.command(b"NOOP")


class TestPostgresCluster:
    """Two nodes on one PostgreSQL: who and kick on one reach the other's sessions."""

    async def test_who_and_kick_across_nodes(
        self, tmp_path: Path, sockdir: Path, pg_dsn: str
    ) -> None:
        """who on node a lists node b's session; kick on a ends it, without UPDATE."""
        fill(tmp_path / "a")
        shared = {
            "shared_state": "postgresql",
            "postgresql_dsn": pg_dsn,
            "shared_state_heartbeat": PG_HEARTBEAT,
            "shared_state_timeout": 3,
        }
        async with (
            pobox_serve(
                tmp_path / "a", USERS, node_name="a", control_socket=str(sockdir / "a"), **shared
            ) as a,
            pobox_serve(
                tmp_path / "b",
                USERS,
                node_name="b",
                control_socket=str(sockdir / "b"),
                mail_location=f"maildir:{tmp_path}/a/mail/%u",  # the same mail: one cluster
                **shared,
            ) as b,
        ):
            on_b = await logged_in(b.port, "alice")
            assert (await on_b.command(b"DELE 1")).startswith(b"+OK")
            on_a = await logged_in(a.port, "bob")
            sessions = by_user(await who(a))
            assert ("a", "b") == (sessions["bob"]["node"], sessions["alice"]["node"])
            assert None is sessions["alice"]["bytes"]  # node b counts its own
            assert 0 == sessions["bob"]["bytes"]
            status, out, _ = await pobox("who", "-c", str(config_of(a)))
            assert 0 == status
            assert "BYTES '-': a session of another node" in out
            status, out, _ = await pobox("kick", "alice", "-c", str(config_of(a)))
            assert (0, "1 session ended\n") == (status, out)
            assert (await ended(on_b)).startswith(b"-ERR [SYS/TEMP]")
            assert b"+OK\r\n" == await on_a.command(b"NOOP")
            assert ["bob"] == [s["user"] for s in await who(b)]
            assert b"+OK 1 %d\r\n" % len(MESSAGE) == await still_there(b.port, "alice")

    async def test_workers_on_postgres(self, tmp_path: Path, sockdir: Path, pg_dsn: str) -> None:
        """With workers on PostgreSQL state, the master lists and kicks through the database."""
        fill(tmp_path)
        async with pobox_serve(
            tmp_path,
            USERS,
            workers=2,
            apop=True,
            node_name="mx",
            shared_state="postgresql",
            postgresql_dsn=pg_dsn,
            shared_state_heartbeat=PG_HEARTBEAT,
            shared_state_timeout=3,
            pop3_lock_session=False,
            control_socket=str(sockdir / "control"),
        ) as proc:
            await proc.wait_log(r"master: pobox \S+ started, listening on 127\.0\.0\.1:")
            first, second = worker_pids(proc)
            alice = await connect_to(proc, first)
            assert b"+OK Logged in.\r\n" == await login(alice, b"alice", b"secret")
            assert (await alice.command(b"DELE 1")).startswith(b"+OK")
            bob = await connect_to(proc, second)
            assert b"+OK Logged in.\r\n" == await login(bob, b"bob", b"hunter2")
            for _ in range(100):  # each worker reports its octets with its heartbeat
                sessions = by_user(await who(proc))
                if len(sessions) == 2 and all(s["bytes"] is not None for s in sessions.values()):
                    break
                await asyncio.sleep(PG_HEARTBEAT / 4)
            assert {"mx-w1", "mx-w2"} == {s["node"] for s in sessions.values()}  # one each
            assert (0, 0) == (sessions["alice"]["bytes"], sessions["bob"]["bytes"])
            status, out, _ = await pobox("kick", "alice", "-c", str(config_of(proc)))
            assert (0, "1 session ended\n") == (status, out)
            assert (await ended(alice)).startswith(b"-ERR [SYS/TEMP]")
            assert b"+OK\r\n" == await bob.command(b"NOOP")
            assert ["bob"] == [s["user"] for s in await who(proc)]
            assert b"+OK 1 %d\r\n" % len(MESSAGE) == await still_there(proc.port, "alice")
