"""``metrics_listen``: a real server, a scripted workload, a real HTTP scrape of ``/metrics``.

Each test scrapes before and after its workload and checks that each counter moved by what
the workload does, no more: the counts of one process, and of two workers summed by the
master.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from pobox.metrics import METRIC_NAMES
from tests.helpers.process import ServeProcess, pobox_serve
from tests.integration.test_workers import connect_to, login, worker_pids
from tests.integration.wire import Wire

USERS = {"alice": "secret", "bob": "hunter2"}

#: One sample: the series name and its labels.
Key = tuple[str, frozenset[tuple[str, str]]]


@pytest.fixture(autouse=True)
async def _close_wires() -> AsyncIterator[None]:
    yield
    await Wire.close_all()


async def http_get(port: int, target: bytes = b"/metrics") -> bytes:
    """Ask ``GET target`` on loopback ``port``; return the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET " + target + b" HTTP/1.0\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def scrape(port: int) -> dict[Key, float]:
    """Scrape ``/metrics``; return every sample by name and labels."""
    answer = await http_get(port)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n"), head
    assert b"Content-Type: text/plain; version=0.0.4" in head
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def moved(before: dict[Key, float], after: dict[Key, float]) -> dict[Key, float]:
    """Return the counter samples that changed, by how much (gauges left out)."""
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if after[key] != before.get(key, 0.0)
        and not key[0].endswith(("_bucket", "_sum", "_created"))
        and key[0] not in ("pobox_connections_open", "pobox_sessions")
    }


def key(name: str, **labels: str) -> Key:
    return name, frozenset(labels.items())


async def metrics_port(proc: ServeProcess) -> int:
    line = await proc.wait_log(r"Metrics on http://127\.0\.0\.1:\d+/metrics")
    found = re.search(r"127\.0\.0\.1:(\d+)/metrics", line)
    assert found is not None
    return int(found.group(1))


async def port_of(proc: ServeProcess, pattern: str) -> int:
    line = await proc.wait_log(pattern)
    found = re.search(pattern, line)
    assert found is not None
    return int(found.group(1))


def send_lmtp(port: int, recipient: str) -> dict[str, tuple[int, bytes]]:
    """Deliver one message over LMTP; return the refusals."""
    client = smtplib.LMTP()
    client.connect("127.0.0.1", port)
    try:
        return client.sendmail("s@example.org", [recipient], b"Subject: m\r\n\r\nmetrics\r\n")
    finally:
        client.quit()


def bad_handshake(port: int) -> None:
    """Open a POP3S connection and send plaintext where the ClientHello belongs."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"USER alice\r\n" * 20)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass


def good_handshake(port: int, ca: trustme.CA) -> bytes:
    """Do a TLS handshake on POP3S; return the greeting."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        return sock.recv(4096)


def stls(port: int, ca: trustme.CA | None) -> bytes:
    """STLS, then a real handshake and CAPA (``ca``), or plaintext where the hello belongs."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"STLS\r\n")
        assert reader.readline().startswith(b"+OK")
        if ca is None:
            raw.sendall(b"NOOP\r\n" * 20)
            with contextlib.suppress(OSError):
                while raw.recv(4096):
                    pass
            return b""
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"CAPA\r\n")
            answer = sock.recv(4096)
            sock.sendall(b"QUIT\r\n")
            sock.recv(4096)
            return answer


@pytest.fixture
def pems(tmp_path: Path) -> tuple[trustme.CA, dict[str, str]]:
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key_path))
    return ca, {"ssl_cert": str(cert), "ssl_key": str(key_path)}


def deliver_local(folder: Path, user: str, count: int) -> None:
    new = folder / "mail" / user / "new"
    for sub in ("new", "cur", "tmp"):
        (folder / "mail" / user / sub).mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (new / f"100{n}.M1P1.host").write_bytes(b"Subject: %d\r\n\r\nbody\r\n" % n)


class TestOneProcess:
    """``workers = 1``: the process counts and answers the scrape itself."""

    async def test_workload_moves_each_counter(
        self, tmp_path: Path, pems: tuple[trustme.CA, dict[str, str]]
    ) -> None:
        """Logins ok and failed, RETR, DELE/QUIT, [IN-USE], LMTP, TLS: each count moves."""
        ca, tls = pems
        deliver_local(tmp_path, "alice", 2)
        async with pobox_serve(
            tmp_path,
            USERS,
            metrics_listen="127.0.0.1:0",
            lmtp_listen=["127.0.0.1:0"],
            ssl_listen=["127.0.0.1:0"],
            **tls,
        ) as proc:
            port = await metrics_port(proc)
            lmtp = await port_of(proc, r"lmtp listening on \('127\.0\.0\.1', (\d+)\)")
            pop3s = await port_of(proc, r"POP3S \(implicit TLS\) on 127\.0\.0\.1:(\d+)")
            before = await scrape(port)
            assert 0 == before[key("pobox_sessions", state="transaction")]

            wire = await Wire.connect("127.0.0.1", proc.port)
            await wire.line()
            assert b"-ERR [AUTH]" == (await login(wire, b"alice", b"wrong"))[:11]
            assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")
            await wire.send(b"RETR 1\r\n")
            assert (await wire.multiline()).endswith(b"body\r\n.\r\n")
            assert b"+OK" == (await wire.command(b"DELE 2"))[:3]
            assert b"-ERR" == (await wire.command(b"XYZZY"))[:4]
            during = await scrape(port)
            assert 1 == during[key("pobox_sessions", state="transaction")]
            assert 1 == during[key("pobox_connections_open")]

            other = await Wire.connect("127.0.0.1", proc.port)
            await other.line()
            assert b"-ERR [IN-USE]" == (await login(other, b"alice", b"secret"))[:13]
            await other.close()
            assert b"+OK" == (await wire.command(b"QUIT"))[:3]
            await wire.close()

            assert {} == await asyncio.to_thread(send_lmtp, lmtp, "bob")
            assert (await asyncio.to_thread(good_handshake, pop3s, ca)).startswith(b"+OK")
            await asyncio.to_thread(bad_handshake, pop3s)
            await proc.wait_log(r"TLS handshaking failed")
            await proc.wait_count("Disconnected", 4)  # every POP3 session has ended
            after = await scrape(port)

        command = "pobox_pop3_command_duration_seconds_count"
        assert {
            key("pobox_connections_total", listener="pop3"): 2,
            key("pobox_connections_total", listener="pop3s"): 2,
            key("pobox_connections_total", listener="lmtp"): 1,
            key("pobox_logins_total", mechanism="PLAIN", result="failed"): 1,
            key("pobox_logins_total", mechanism="PLAIN", result="ok"): 1,
            key("pobox_logins_total", mechanism="PLAIN", result="locked"): 1,
            key("pobox_login_refusals_total", reason="locked"): 1,
            key(command, command="USER"): 3,
            key(command, command="PASS"): 3,
            key(command, command="RETR"): 1,
            key(command, command="DELE"): 1,
            key(command, command="QUIT"): 1,
            key(command, command="other"): 1,
            key("pobox_deliveries_total", protocol="lmtp", result="ok"): 1,
            key("pobox_tls_handshakes_total", listener="pop3s", result="ok"): 1,
            key("pobox_tls_handshakes_total", listener="pop3s", result="failed"): 1,
            key("pobox_tls_handshake_failures_total", listener="pop3s", reason="protocol"): 1,
            key("pobox_pop3_bytes_sent_total"): after[key("pobox_pop3_bytes_sent_total")],
        } == moved(before, after)
        # Every byte the sessions wrote: greetings, replies, the message.
        assert after[key("pobox_pop3_bytes_sent_total")] > 100
        for state in ("authorization", "transaction", "update"):
            assert 0 == after[key("pobox_sessions", state=state)]
        assert 0 == after[key("pobox_connections_open")]

    async def test_stls_handshakes(
        self, tmp_path: Path, pems: tuple[trustme.CA, dict[str, str]]
    ) -> None:
        """An STLS handshake that succeeds and one fed plaintext: one ok, one protocol."""
        ca, tls = pems
        async with pobox_serve(tmp_path, USERS, metrics_listen="127.0.0.1:0", **tls) as proc:
            port = await metrics_port(proc)
            before = await scrape(port)
            assert b"+OK" == (await asyncio.to_thread(stls, proc.port, ca))[:3]
            await asyncio.to_thread(stls, proc.port, None)
            await proc.wait_count("Disconnected", 2)
            after = await scrape(port)
        assert {
            key("pobox_connections_total", listener="pop3"): 2,
            key("pobox_tls_handshakes_total", listener="stls", result="ok"): 1,
            key("pobox_tls_handshakes_total", listener="stls", result="failed"): 1,
            key("pobox_tls_handshake_failures_total", listener="stls", reason="protocol"): 1,
            key("pobox_pop3_command_duration_seconds_count", command="STLS"): 2,
            key("pobox_pop3_command_duration_seconds_count", command="CAPA"): 1,
            key("pobox_pop3_command_duration_seconds_count", command="QUIT"): 1,
            key("pobox_pop3_bytes_sent_total"): after[key("pobox_pop3_bytes_sent_total")]
            - before[key("pobox_pop3_bytes_sent_total")],
        } == moved(before, after)

    async def test_other_paths_404_and_names_are_documented(self, tmp_path: Path) -> None:
        """Only /metrics answers; each family exported is one of METRIC_NAMES."""
        async with pobox_serve(tmp_path, USERS, metrics_listen="127.0.0.1:0") as proc:
            port = await metrics_port(proc)
            assert (await http_get(port, b"/")).startswith(b"HTTP/1.0 404 ")
            assert (await http_get(port, b"/health")).startswith(b"HTTP/1.0 404 ")
            samples = await scrape(port)
        families = {re.sub(r"(_total|_count|_sum|_bucket|_created)$", "", n) for n, _ in samples}
        documented = {re.sub(r"_total$", "", name) for name in METRIC_NAMES}
        assert documented == families

    async def test_off_by_default_nothing_listens(self, tmp_path: Path) -> None:
        """Without metrics_listen no metrics port is opened (none logged, none bound)."""
        async with pobox_serve(tmp_path, USERS) as proc:
            text = proc.text()
            assert "Metrics on" not in text
            assert {proc.port} == listening_ports(proc.proc.pid)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its socket inodes in /proc's tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found = re.fullmatch(r"socket:\[(\d+)\]", str(fd.readlink()))
        except OSError:
            continue
        if found:
            inodes.add(found.group(1))
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class TestWorkers:
    """``workers = 2``: the master answers with the sum of both workers' counts."""

    async def test_counts_add_up_over_both_workers(self, tmp_path: Path) -> None:
        """A login on each worker, and a failed one on each: the master shows 2 and 2."""
        async with pobox_serve(
            tmp_path, USERS, workers=2, apop=True, metrics_listen="127.0.0.1:0"
        ) as proc:
            await proc.wait_log(r"master: pobox \S+ started, listening on 127\.0\.0\.1:")
            port = await metrics_port(proc)
            pids = worker_pids(proc)
            assert 2 == len(pids)
            before = await scrape(port)
            held = []
            for pid in pids:
                wire = await connect_to(proc, pid)
                assert b"-ERR [AUTH]" == (await login(wire, b"bob", b"wrong"))[:11]
                assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")
                held.append(wire)
                if len(held) == 1:  # the maildrop lock: one QUIT before the next login
                    assert b"+OK" == (await wire.command(b"QUIT"))[:3]
            during = await scrape(port)
            assert 1 == during[key("pobox_sessions", state="transaction")]
            assert b"+OK" == (await held[1].command(b"QUIT"))[:3]
            await proc.wait_count("Disconnected: Logged out", 2)
            after = await scrape(port)
        ok = key("pobox_logins_total", mechanism="PLAIN", result="ok")
        failed = key("pobox_logins_total", mechanism="PLAIN", result="failed")
        assert (2, 2) == (after[ok] - before.get(ok, 0), after[failed] - before.get(failed, 0))
        quit_count = key("pobox_pop3_command_duration_seconds_count", command="QUIT")
        assert 2 == after[quit_count] - before.get(quit_count, 0)
        assert 0 == after[key("pobox_sessions", state="transaction")]
        connections = key("pobox_connections_total", listener="pop3")
        assert len(held) <= after[connections] - before.get(connections, 0)

    async def test_dead_worker_gauges_go_counts_stay(self, tmp_path: Path) -> None:
        """SIGKILL of a worker in a session: its gauges are dropped, its counts kept."""
        async with pobox_serve(
            tmp_path, USERS, workers=2, apop=True, metrics_listen="127.0.0.1:0"
        ) as proc:
            await proc.wait_log(r"master: pobox \S+ started, listening on 127\.0\.0\.1:")
            port = await metrics_port(proc)
            victim = worker_pids(proc)[0]
            wire = await connect_to(proc, victim)
            assert b"+OK Logged in.\r\n" == await login(wire, b"alice", b"secret")
            during = await scrape(port)
            os.kill(victim, signal.SIGKILL)
            await proc.wait_log(rf"master: worker \d \(pid {victim}\) died")
            after = await scrape(port)
        ok = key("pobox_logins_total", mechanism="PLAIN", result="ok")
        transaction = key("pobox_sessions", state="transaction")
        assert (1, 1) == (during[transaction], during[ok])
        assert (0, 1) == (after[transaction], after[ok])
        assert 0 == after[key("pobox_connections_open")]
