"""A network partition between one pobox node and PostgreSQL, made for real.

The test builds its own network (root needed; it fails, never skips, without it)::

    PostgreSQL (root namespace, 10.N.7.1) ── veth ── router netns ── veth ── node A netns
    test client (root namespace, 10.N.8.1) ─────────── veth ────────────────┘ (10.N.8.2)

Node A (a real ``pobox serve`` run with ``ip netns exec``) reaches PostgreSQL only through
the router; the test client reaches node A on a link of its own.  The partition is the router
ceasing to forward (``net.ipv4.ip_forward = 0`` in its namespace): packets between node A and
PostgreSQL are dropped silently, both ways, no RST, no ICMP - the case a node must detect by
itself.  Node B (in-process, loopback) uses the same PostgreSQL and is never cut off.

Everything made here (namespaces, links, the cluster, node A) is removed at the end, even on
failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.testing import running_server
from tests.helpers.accounts import ROOT_MAIL_VALUES, require_root
from tests.helpers.postgres import (
    TEST_DATABASE,
    Postgres,
    PostgresError,
    migrate,
    running_postgres,
    stored_messages,
)
from tests.helpers.process import ServeProcess, _toml
from tests.integration.wire import Wire

USERS = {"alice": "secret", "bob": "secret"}
#: Seconds node A's lock connections are probed at, and its statement timeout.
CHECK_INTERVAL, PG_TIMEOUT = 1, 2
#: Generous bounds for what must happen by itself (a failure, never a measurement).
WAIT = 60.0


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        msg = f"ip {' '.join(args)}: {done.stderr.strip()}"
        raise RuntimeError(msg)


@dataclass(frozen=True)
class Network:
    """The namespaces and addresses of the test network."""

    router: str
    node: str
    db_ip: str  #: PostgreSQL's address on the router link (root namespace)
    node_db_ip: str  #: node A's address towards the router
    node_ip: str  #: node A's address on the client link
    links: tuple[str, ...]  #: veth ends left in the root namespace

    def forward(self, *, on: bool) -> None:
        """Let the router forward (heal) or drop everything silently (partition)."""
        subprocess.run(
            ["ip", "netns", "exec", self.router, "sh", "-c",
             f"echo {int(on)} > /proc/sys/net/ipv4/ip_forward"],
            check=True,
        )  # fmt: skip


def _free_subnet() -> int:
    """Return N such that 10.N.0.0/16 has no route here (to stay clear of other tests)."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True)
    used = set(re.findall(r"\b10\.(\d+)\.", routes.stdout))
    for n in [*range(os.getpid() % 200 + 20, 250), *range(20, 250)]:
        if str(n) not in used:
            return n
    msg = "no free 10.N.0.0/16 for the test network"
    raise RuntimeError(msg)


@contextlib.contextmanager
def partitionable_network() -> Iterator[Network]:
    """Build the network of the module docstring; remove it at the end."""
    require_root()
    tag = f"{os.getpid() % 100000}"
    router, node = f"pbx-r{tag}", f"pbx-a{tag}"
    host_db, host_client = f"pbxd{tag}", f"pbxc{tag}"
    n = _free_subnet()
    net = Network(router, node, f"10.{n}.7.1", f"10.{n}.7.6", f"10.{n}.8.2", (host_db, host_client))
    try:
        _ip("netns", "add", router)
        _ip("netns", "add", node)
        _ip("link", "add", host_db, "type", "veth", "peer", "name", "r-db", "netns", router)
        _ip("link", "add", host_client, "type", "veth", "peer", "name", "a-cl", "netns", node)
        _ip("-n", router, "link", "add", "r-a", "type", "veth", "peer", "name", "a-r",
            "netns", node)  # fmt: skip
        _ip("addr", "add", f"10.{n}.7.1/30", "dev", host_db)
        _ip("addr", "add", f"10.{n}.8.1/30", "dev", host_client)
        _ip("link", "set", host_db, "up")
        _ip("link", "set", host_client, "up")
        _ip("route", "add", f"10.{n}.7.4/30", "via", f"10.{n}.7.2")
        _ip("-n", router, "addr", "add", f"10.{n}.7.2/30", "dev", "r-db")
        _ip("-n", router, "addr", "add", f"10.{n}.7.5/30", "dev", "r-a")
        for link in ("lo", "r-db", "r-a"):
            _ip("-n", router, "link", "set", link, "up")
        _ip("-n", node, "addr", "add", f"10.{n}.7.6/30", "dev", "a-r")
        _ip("-n", node, "addr", "add", f"10.{n}.8.2/30", "dev", "a-cl")
        for link in ("lo", "a-r", "a-cl"):
            _ip("-n", node, "link", "set", link, "up")
        _ip("-n", node, "route", "add", f"10.{n}.7.0/30", "via", f"10.{n}.7.5")
        net.forward(on=True)
        yield net
    finally:
        for name in (node, router):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        for link in (host_db, host_client):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


@dataclass
class Setup:
    network: Network
    pg: Postgres


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    """The network, and a PostgreSQL listening on loopback and on its end of the router link."""
    with partitionable_network() as network:
        try:
            with running_postgres({"listen_addresses": f"127.0.0.1,{network.db_ip}"}) as pg:
                with (pg.data / "pg_hba.conf").open("a") as hba:
                    hba.write(f"host all all {network.node_db_ip}/32 trust\n")
                pg.psql("SELECT pg_reload_conf()")
                pg.psql(f'CREATE DATABASE "{TEST_DATABASE}"')
                migrate(pg.dsn(TEST_DATABASE))
                yield Setup(network, pg)
        except PostgresError as exc:
            pytest.fail(str(exc))


@contextlib.asynccontextmanager
async def node_in_namespace(folder: Path, setup: Setup) -> AsyncIterator[ServeProcess]:
    """Run `pobox serve` inside node A's namespace, its database over the router link."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, password in USERS.items():
        add_user(folder / "passwd", name, password.encode(), scheme="PLAIN")
    log = folder / "pobox.log"
    dsn = f"host={setup.network.db_ip} port={setup.pg.port} dbname={TEST_DATABASE} user=postgres"
    values: dict[str, object] = {
        "listen": [f"{setup.network.node_ip}:1110"],
        "workers": 1,
        "health_listen": f"{setup.network.node_ip}:8080",
        "mail_location": "postgresql",
        "postgresql_dsn": dsn,
        "postgresql_timeout": PG_TIMEOUT,
        "postgresql_lock_check_interval": CHECK_INTERVAL,
        "postgresql_pool_min": 1,
        "passwd_file": str(folder / "passwd"),
        "auth_failure_delay": 0,
        "disable_plaintext_auth": "no",  # the test client is not on loopback
        "log_path": str(log),
        **ROOT_MAIL_VALUES,
    }
    config = folder / "pobox.toml"
    config.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in values.items()))
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", setup.network.node, sys.executable, "-m", "pobox", "serve",
        "-c", str(config), stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        node = ServeProcess(proc, log, 1110)
        await node.wait_log(r"started, listening on")
        yield node
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def get_health(host: str) -> bytes:
    """Ask node A's ``GET /health``; return the status line."""
    reader, writer = await asyncio.open_connection(host, 8080)
    try:
        writer.write(b"GET /health HTTP/1.0\r\n\r\n")
        return (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n")[0]
    finally:
        writer.close()
        await writer.wait_closed()


async def login_when_free(host: str, port: int, user: bytes) -> tuple[Wire, float]:
    """Log ``user`` in as soon as the server lets it (``[IN-USE]``, ``[SYS/TEMP]``: again).

    Returns:
        the logged-in connection and when it got in (``time.monotonic()``).
    """
    async with asyncio.timeout(WAIT):
        while True:
            with contextlib.suppress(OSError):
                wire = await Wire.connect(host, port)
                reply = await wire.attempt(user)
                if reply == b"+OK Logged in.\r\n":
                    return wire, time.monotonic()
                await wire.close()
            await asyncio.sleep(0.1)


def subjects(dsn: str, user: str) -> list[bytes]:
    """The subjects of ``user``'s messages in the database, in order."""
    return [re.findall(rb"Subject: (\S+ \d)", m)[0] for m in stored_messages(dsn, user)]


def message(user: str, number: int) -> bytes:
    return b"Subject: %s %d\r\n\r\nbody\r\n" % (user.encode(), number)


class TestPartition:
    """Node A cut off from PostgreSQL: sessions end unchanged, B takes over, A comes back."""

    async def test_partition_and_heal(self, tmp_path: Path, setup: Setup) -> None:
        """Cut off after DELE: A's sessions end without UPDATE (QUIT included), the locks are
        freed so B serves both users, nothing is deleted twice or lost, and once the network
        heals A serves again by itself."""
        pg, network = setup.pg, setup.network
        dsn = pg.dsn(TEST_DATABASE)
        tables = "pobox.mailbox, pobox.message, pobox.body, pobox.body_chunk"
        pg.psql(f"TRUNCATE {tables}", TEST_DATABASE)
        b_settings = {"mail_location": "postgresql", "postgresql_dsn": dsn, "postgresql_timeout": 3}
        async with (
            running_server(tmp_path / "b", USERS, **b_settings) as b,
            node_in_namespace(tmp_path / "a", setup) as a,
        ):
            for number in (1, 2, 3):
                b.deliver("alice", message("alice", number))
            for number in (1, 2):
                b.deliver("bob", message("bob", number))
            alice = await Wire.connect(network.node_ip, a.port)
            await alice.login(b"alice")
            bob = await Wire.connect(network.node_ip, a.port)
            await bob.login(b"bob")
            assert (await alice.command(b"DELE 1")).startswith(b"+OK")
            assert (await bob.command(b"DELE 1")).startswith(b"+OK")
            healthy = await get_health(network.node_ip)

            network.forward(on=False)
            cut = time.monotonic()
            # Bob quits at once: his UPDATE cannot reach the database (or commit later).
            bob.writer.write(b"QUIT\r\n")
            bob_reply, alice_end = await asyncio.gather(
                bob.line(timeout=WAIT), alice.line(timeout=WAIT)
            )
            alice_ended = time.monotonic()
            unhealthy = await get_health(network.node_ip)
            on_b_alice, alice_free = await login_when_free(b.host, b.port, b"alice")
            on_b_stat = await on_b_alice.command(b"STAT")
            assert (await on_b_alice.command(b"DELE 2")).startswith(b"+OK")
            on_b_quit = await on_b_alice.command(b"QUIT")
            on_b_bob, _ = await login_when_free(b.host, b.port, b"bob")
            on_b_bob_stat = await on_b_bob.command(b"STAT")
            await on_b_bob.command(b"QUIT")

            network.forward(on=True)
            healed = time.monotonic()
            again, back = await login_when_free(network.node_ip, a.port, b"alice")
            again_stat = await again.command(b"STAT")
            await again.command(b"QUIT")
            log = a.text()

        # The figures the README quotes (seen with pytest -s).
        print(
            f"\npartition: lock loss detected after {alice_ended - cut:.1f} s, lock free on "
            f"node B after {alice_free - cut:.1f} s, node A serving {back - healed:.1f} s "
            "after the heal"
        )
        assert b"HTTP/1.0 200 OK" == healthy
        assert b"HTTP/1.0 503 Service Unavailable" == unhealthy
        assert bob_reply.startswith(b"-ERR [SYS/TEMP]")
        assert b"-ERR [SYS/TEMP] Mailbox lock lost, no changes made; log in again.\r\n" == alice_end
        assert on_b_stat.startswith(b"+OK 3 ")
        assert on_b_quit.startswith(b"+OK")
        assert on_b_bob_stat.startswith(b"+OK 2 ")
        assert again_stat.startswith(b"+OK 2 ")
        assert [b"alice 1", b"alice 3"] == subjects(dsn, "alice")
        assert [b"bob 1", b"bob 2"] == subjects(dsn, "bob")
        assert "lock connection" in log
