"""``workers = 2``: a master and two serving processes on the same listeners, run for real.

Which worker serves a connection shows in the APOP greeting (``apop = true``): its timestamp
is ``<pid.time.n@host>``, the pid of the process that accepted the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import smtplib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pobox.auth.passwdfile import add_user
from tests.helpers.process import ServeProcess, pobox_serve, serve_config
from tests.integration.test_health_drain import get_health
from tests.integration.wire import Wire

USERS = {"alice": "secret", "bob": "hunter2"}

#: Connections a test makes at most while looking for one served by a given worker.
TRIES = 400


@pytest.fixture(autouse=True)
async def _close_wires() -> AsyncIterator[None]:
    yield
    await Wire.close_all()


def worker_pids(proc: ServeProcess) -> list[int]:
    """The pids of the live workers, from the master's log lines (restarts included)."""
    alive: dict[str, int] = {}
    for index, pid in re.findall(r"master: worker (\d+) \(pid (\d+)\) serving", proc.text()):
        alive[index] = int(pid)
    return list(alive.values())


async def connect_to(proc: ServeProcess, pid: int) -> Wire:
    """Return a connection served by the worker ``pid`` (greeting read), closing the others."""
    for _ in range(TRIES):
        wire = await Wire.connect("127.0.0.1", proc.port)
        greeting = await wire.line()
        found = re.search(rb"<(\d+)\.", greeting)
        assert found is not None, greeting
        if int(found.group(1)) == pid:
            return wire
        await wire.close()
        Wire.opened.remove(wire)
    pytest.fail(f"no connection reached worker {pid} in {TRIES} tries")


async def login(wire: Wire, user: bytes, password: bytes) -> bytes:
    """Send USER and PASS on a connection whose greeting was read; return the PASS reply."""
    assert b"+OK\r\n" == await wire.command(b"USER " + user)
    return await wire.command(b"PASS " + password)


@contextlib.asynccontextmanager
async def two_workers(folder: Path, **settings: object) -> AsyncIterator[ServeProcess]:
    """A ``pobox serve`` with two workers, both serving."""
    async with pobox_serve(folder, USERS, workers=2, apop=True, **settings) as proc:
        await proc.wait_log(r"master: pobox \S+ started, listening on 127\.0\.0\.1:")
        assert 2 == len(worker_pids(proc))
        yield proc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class TestWorkers:
    """Two workers share the listeners, the node's state and its signals."""

    async def test_connections_reach_both_workers(self, tmp_path: Path) -> None:
        """Connections are spread over both workers, and each logs under its own name."""
        async with two_workers(tmp_path) as proc:
            for pid in worker_pids(proc):
                wire = await connect_to(proc, pid)
                assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")
                assert b"+OK" == (await wire.command(b"QUIT"))[:3]
            text = proc.text()
            assert "worker 1: pobox" in text
            assert "worker 2: pobox" in text
            assert 2 == text.count("Login: user=<alice>")

    @pytest.mark.parametrize("second_logged_in_before", [False, True])
    async def test_throttle_counts_across_workers(
        self, tmp_path: Path, second_logged_in_before: bool
    ) -> None:
        """Failures made on one worker refuse the next login on the other (memory state),
        whether the other has logged users in before (and so asks the master only about
        addresses it was told failed) or not."""
        async with two_workers(tmp_path, auth_failures_per_ip=3) as proc:
            first, second = worker_pids(proc)
            if second_logged_in_before:
                wire = await connect_to(proc, second)
                assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")
                assert b"+OK" == (await wire.command(b"QUIT"))[:3]
            for _ in range(3):
                wire = await connect_to(proc, first)
                assert b"-ERR [AUTH]" == (await login(wire, b"alice", b"wrong"))[:11]
                await wire.close()
            wire = await connect_to(proc, second)
            assert b"-ERR [LOGIN-DELAY]" == (await login(wire, b"alice", b"secret"))[:18]
            await proc.wait_log(r"Login refused, too many failures: user=<alice>")

    async def test_user_limit_counts_across_workers(self, tmp_path: Path) -> None:
        """mail_max_user_connections counts the user's sessions on every worker."""
        async with two_workers(
            tmp_path, mail_max_user_connections=1, pop3_lock_session=False
        ) as proc:
            first, second = worker_pids(proc)
            held = await connect_to(proc, first)
            assert b"+OK Logged in.\r\n" == await login(held, b"alice", b"secret")
            wire = await connect_to(proc, second)
            assert b"-ERR [IN-USE]" == (await login(wire, b"alice", b"secret"))[:13]

    async def test_quit_frees_the_limit_for_the_other_worker(self, tmp_path: Path) -> None:
        """A session's unregister (a notice to the master, not waited for) is applied before
        a login that follows its QUIT on the other worker, every time."""
        async with two_workers(
            tmp_path, mail_max_user_connections=1, pop3_lock_session=False
        ) as proc:
            pids = worker_pids(proc)
            for turn in range(6):
                wire = await connect_to(proc, pids[turn % 2])
                assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")
                assert b"+OK" == (await wire.command(b"QUIT"))[:3]
            assert "[IN-USE]" not in proc.text()

    async def test_maildrop_lock_across_workers(self, tmp_path: Path) -> None:
        """A maildrop open on one worker is [IN-USE] on the other."""
        async with two_workers(tmp_path) as proc:
            first, second = worker_pids(proc)
            held = await connect_to(proc, first)
            assert b"+OK Logged in.\r\n" == await login(held, b"alice", b"secret")
            wire = await connect_to(proc, second)
            assert b"-ERR [IN-USE]" == (await login(wire, b"alice", b"secret"))[:13]
            assert b"+OK" == (await held.command(b"QUIT"))[:3]
            wire = await connect_to(proc, second)
            assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")

    async def test_sighup_reaches_every_worker(self, tmp_path: Path) -> None:
        """SIGHUP to the master makes each worker reopen the rotated log."""
        async with two_workers(tmp_path) as proc:
            proc.log.rename(tmp_path / "pobox.log.1")
            proc.signal(signal.SIGHUP)
            await proc.wait_log(r"master: log file reopened")
            await proc.wait_log(r"worker 1: log file reopened")
            await proc.wait_log(r"worker 2: log file reopened")

    async def test_sigterm_drains_every_worker(self, tmp_path: Path) -> None:
        """SIGTERM closes the port; sessions on both workers still QUIT with UPDATE; exit 0."""
        async with two_workers(tmp_path, drain_timeout=60, health_listen="127.0.0.1:0") as proc:
            health = int((await proc.wait_log(r"master: Health check on")).rsplit(":", 1)[1][:-7])
            assert b"HTTP/1.0 200 OK" == (await get_health(health))[:15]
            maildir = tmp_path / "mail" / "alice"
            (maildir / "new").mkdir(parents=True, exist_ok=True)
            (maildir / "new" / "1.msg").write_bytes(b"Subject: one\r\n\r\nbody\r\n")
            first, second = worker_pids(proc)
            alice = await connect_to(proc, first)
            assert b"+OK Logged in.\r\n" == await login(alice, b"alice", b"secret")
            bob = await connect_to(proc, second)
            assert b"+OK Logged in.\r\n" == await login(bob, b"bob", b"hunter2")
            proc.signal(signal.SIGTERM)
            await proc.wait_count("draining: no new connections", 2)
            with pytest.raises(ConnectionRefusedError):
                await Wire.connect("127.0.0.1", proc.port)
            assert b"draining" in await get_health(health)
            assert b"+OK" == (await alice.command(b"DELE 1"))[:3]
            assert b"+OK" == (await alice.command(b"QUIT"))[:3]
            assert b"+OK" == (await bob.command(b"QUIT"))[:3]
            async with asyncio.timeout(20):
                assert 0 == await proc.proc.wait()
            assert [] == list((maildir / "new").iterdir()) + list((maildir / "cur").iterdir())
            assert "master: stopped" in proc.text()

    async def test_second_signal_stops_every_worker(self, tmp_path: Path) -> None:
        """A second SIGTERM ends the sessions on every worker at once, without UPDATE."""
        async with two_workers(tmp_path, drain_timeout=600) as proc:
            first, second = worker_pids(proc)
            alice = await connect_to(proc, first)
            assert b"+OK Logged in.\r\n" == await login(alice, b"alice", b"secret")
            bob = await connect_to(proc, second)
            assert b"+OK Logged in.\r\n" == await login(bob, b"bob", b"hunter2")
            proc.signal(signal.SIGTERM)
            await proc.wait_count("draining: no new connections", 2)
            proc.signal(signal.SIGTERM)
            assert b"-ERR [SYS/TEMP]" == (await alice.line(timeout=20))[:15]
            assert b"-ERR [SYS/TEMP]" == (await bob.line(timeout=20))[:15]
            async with asyncio.timeout(20):
                assert 0 == await proc.proc.wait()

    async def test_killed_master_frees_everything(self, tmp_path: Path) -> None:
        """SIGKILL of the master: the workers stop, the port and the maildrop lock are free."""
        async with two_workers(tmp_path) as proc:
            pids = worker_pids(proc)
            held = await connect_to(proc, pids[0])
            assert b"+OK Logged in.\r\n" == await login(held, b"alice", b"secret")
            lock = tmp_path / "mail" / "alice" / "dovecot-pop3-session.lock"
            assert lock.exists()
            proc.proc.kill()
            await proc.proc.wait()
            async with asyncio.timeout(20):
                while any(pid_alive(pid) for pid in pids):
                    await asyncio.sleep(0.05)
            assert not lock.exists()
            assert b"-ERR [SYS/TEMP]" == (await held.read_all())[:15]
            with socket.socket() as sock:  # nobody listens on the port any more
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", proc.port))
                sock.listen()
            assert 2 == proc.text().count("the master process is gone; stopping at once")

    async def test_dead_worker_is_started_again(self, tmp_path: Path) -> None:
        """A worker that dies is started again, logged, and serves."""
        async with two_workers(tmp_path) as proc:
            dead = worker_pids(proc)[0]
            os.kill(dead, signal.SIGKILL)
            await proc.wait_log(rf"master: worker \d \(pid {dead}\) died \(status -9\)")
            await proc.wait_count(") serving", 3)
            pids = worker_pids(proc)
            assert dead not in pids
            assert 2 == len(pids)
            for pid in pids:
                wire = await connect_to(proc, pid)
                assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")
                assert b"+OK" == (await wire.command(b"QUIT"))[:3]


class TestWorkerFailsAtStart:
    """A worker that cannot serve at all is not started again and again."""

    async def test_node_stops_with_the_worker_status(self, tmp_path: Path) -> None:
        """A store a worker cannot reach stops the node with the worker's status (65)."""
        config = tmp_path / "pobox.toml"
        add_user(tmp_path / "passwd", "alice", b"secret", scheme="PLAIN")
        config.write_text(
            'listen = ["127.0.0.1:0"]\nworkers = 2\nmail_location = "postgresql"\n'
            'postgresql_dsn = "host=127.0.0.1 port=1 dbname=none user=none"\n'
            f'postgresql_timeout = 1\npasswd_file = "{tmp_path / "passwd"}"\n'
            f'log_path = "{tmp_path / "pobox.log"}"\n'
        )
        async with serve_config(config, stderr=asyncio.subprocess.PIPE) as proc:
            async with asyncio.timeout(60):
                _, err = await proc.communicate()
            assert 65 == proc.returncode
        assert b"no database connection" in err
        log = (tmp_path / "pobox.log").read_text()
        assert re.search(r"master: worker \d \(pid \d+\) failed at start \(status 65\)", log)
        assert "master: stopped" in log
        assert "starting it again" not in log


class TestWorkersOnPostgresState:
    """With shared_state = postgresql each worker is a node of its own in the registry."""

    async def test_heartbeats_keep_each_others_sessions(self, tmp_path: Path, pg_dsn: str) -> None:
        """A session on one worker outlives the other worker's heartbeats, and still counts."""
        async with two_workers(
            tmp_path,
            shared_state="postgresql",
            postgresql_dsn=pg_dsn,
            shared_state_heartbeat=0.5,  # a lease of 1.5 s: not overrun on loaded CI
            mail_max_user_connections=1,
            pop3_lock_session=False,
        ) as proc:
            first, second = worker_pids(proc)
            held = await connect_to(proc, first)
            assert b"+OK Logged in.\r\n" == await login(held, b"alice", b"secret")
            with psycopg.connect(pg_dsn, autocommit=True) as conn:

                def leases() -> dict[str, float]:
                    rows = conn.execute("SELECT name, last_seen FROM pobox.cluster_node")
                    return {str(name): float(seen) for name, seen in rows.fetchall()}

                for _ in range(2):  # two heartbeats of each worker after the login
                    before = leases()
                    async with asyncio.timeout(20):
                        while True:
                            now = leases()
                            renewed = [n for n in now if now[n] > before.get(n, now[n])]
                            if len(renewed) >= 2:
                                break
                            await asyncio.sleep(0.05)
                names = sorted(leases())
                sessions = conn.execute("SELECT username FROM pobox.cluster_session").fetchall()
            assert names[0].endswith("-w1")
            assert names[1].endswith("-w2")
            assert [("alice",)] == sessions
            wire = await connect_to(proc, second)
            assert b"-ERR [IN-USE]" == (await login(wire, b"alice", b"secret"))[:13]


def send_lmtp(where: str | tuple[str, int], recipient: str) -> dict[str, tuple[int, bytes]]:
    """Deliver one message over LMTP (a socket path or a TCP address); return the refusals."""
    client = smtplib.LMTP()
    if isinstance(where, str):
        client.connect(where)
    else:
        client.connect(*where)
    try:
        return client.sendmail("s@example.org", [recipient], b"Subject: w\r\n\r\nvia lmtp\r\n")
    finally:
        client.quit()


class TestWorkersDeliver:
    """The workers serve the delivery listeners the master bound too."""

    async def test_lmtp_on_tcp_and_unix_socket(self, tmp_path: Path) -> None:
        """LMTP over TCP and a Unix socket delivers; the socket file goes with the master."""
        path = tmp_path / "lmtp.sock"
        async with two_workers(tmp_path, lmtp_listen=["127.0.0.1:0", f"unix:{path}"]) as proc:
            line = await proc.wait_log(r"lmtp listening on \('127\.0\.0\.1'")
            port = int(re.findall(r"(\d+)\)$", line.strip())[0])
            await proc.wait_count("lmtp listening on", 4)  # two listeners, two workers
            assert {} == await asyncio.to_thread(send_lmtp, str(path), "alice")
            assert {} == await asyncio.to_thread(send_lmtp, ("127.0.0.1", port), "bob")
            assert path.exists()
        assert 1 == len(list((tmp_path / "mail" / "alice" / "new").iterdir()))
        assert 1 == len(list((tmp_path / "mail" / "bob" / "new").iterdir()))
        assert not path.exists()
