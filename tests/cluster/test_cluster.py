"""Three pobox nodes on one PostgreSQL behind a real HAProxy: the cluster end to end.

One cluster for the module (:func:`tests.helpers.cluster.running_cluster`): a throwaway
PostgreSQL, ``pobox db upgrade`` and ``pobox user add``, three ``pobox serve`` processes with
logs of their own, and HAProxy running ``contrib/haproxy/pobox.cfg`` (``send-proxy-v2``,
``balance leastconn``, the nodes checked with ``GET /health`` every 500 ms).  Clients
connect from their own loopback addresses (127.0.0.11, .12, ...), so each node's log shows
whose address it used and which node served whom.  The test that kills a node starts it
again, so the order of the tests does not matter.
"""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import collections
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.helpers.cluster import (
    CONTRIB_CONFIG,
    Cluster,
    ClusterError,
    connect,
    running_cluster,
)
from tests.helpers.haproxy import HAProxyError, find_haproxy
from tests.helpers.postgres import PostgresError

USERS = dict.fromkeys(("alice", "bob", "carol", "dave", "erin", "frank"), "secret")
LOCKED = b"-ERR [IN-USE] Mailbox is locked by another POP3 session, try later.\r\n"
DELAYED = b"-ERR [LOGIN-DELAY] Too many failed logins, try again later.\r\n"
#: Failed logins from one address after which every node slows it down.
AUTH_FAILURES = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """PostgreSQL, three nodes and HAProxy for the module; all stopped by PID at the end."""
    try:
        with running_cluster(
            tmp_path_factory.mktemp("cluster"),
            3,
            USERS,
            settings={"auth_failures_per_ip": AUTH_FAILURES},
        ) as running:
            yield running
    except (ClusterError, HAProxyError, PostgresError) as exc:
        pytest.fail(str(exc))


class Pop3:
    """A POP3 client from a chosen loopback address, over a raw socket."""

    def __init__(self, port: int, source: str, *, header: bytes = b"", tls: bool = False) -> None:
        sock = connect(port, source)
        if header:
            sock.sendall(header)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
        self.sock = sock
        self.file = sock.makefile("rb")

    def line(self) -> bytes:
        """Read one line."""
        return self.file.readline()

    def command(self, line: bytes) -> bytes:
        """Send a command, read its first line."""
        self.sock.sendall(line + b"\r\n")
        return self.line()

    def multiline(self, line: bytes) -> list[bytes]:
        """Send a command expecting a multi-line answer; return its lines, unstuffed."""
        first = self.command(line)
        assert first.startswith(b"+OK"), first
        lines = []
        while (got := self.line()) != b".\r\n":
            assert got, "connection closed in a multi-line answer"
            lines.append(got[1:] if got.startswith(b"..") else got)
        return lines

    def login(self, user: str, password: str = "secret") -> bytes:
        """Read the greeting, send USER and PASS; return the answer to PASS."""
        greeting = self.line()
        assert greeting.startswith(b"+OK"), greeting
        assert b"+OK" == self.command(b"USER " + user.encode())[:3]
        return self.command(b"PASS " + password.encode())

    def maildrop(self) -> dict[str, bytes]:
        """Every message by its UIDL, retrieved."""
        uidl = [line.split() for line in self.multiline(b"UIDL")]
        return {uid.decode(): b"".join(self.multiline(b"RETR " + n)) for n, uid in uidl}

    def rest(self) -> bytes:
        """Read until the connection closes (or is reset)."""
        try:
            return self.file.read()
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()


def fetch_all(cluster: Cluster, user: str, source: str) -> dict[str, bytes]:
    """Log in through HAProxy, retrieve everything, QUIT without deleting."""
    client = Pop3(cluster.front["pop3"], source)
    assert b"+OK Logged in.\r\n" == client.login(user)
    messages = client.maildrop()
    assert b"+OK" == client.command(b"QUIT")[:3]
    client.close()
    return messages


def proxy_v2(source: str, destination: str) -> bytes:
    """A PROXY protocol v2 header for a TCP4 connection."""
    addresses = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", 1, 2)
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(addresses)) + addresses


# --------------------------------------------------------------------------- LMTP


class Delivered(Exception):
    """The server's answer to the message's final dot was lost: it may have been stored."""


def lmtp_deliver(port: int, source: str, recipient: str, message: bytes) -> bool:
    """Deliver ``message`` over LMTP; return whether it was acknowledged (250 after DATA).

    A failure before the final dot is a plain ``False``: nothing can have been stored.

    Raises:
        Delivered: the connection broke after the final dot, before the answer.
    """
    try:
        sock = connect(port, source, timeout=10)
    except OSError:
        return False
    file = sock.makefile("rb")
    dot_sent = False

    def reply() -> bytes:
        while (line := file.readline())[3:4] == b"-":
            pass
        return line

    try:
        if not reply().startswith(b"220"):
            return False
        for command, want in (
            (b"LHLO test", b"250"),
            (b"MAIL FROM:<sender@example.org>", b"250"),
            (b"RCPT TO:<" + recipient.encode() + b">", b"250"),
            (b"DATA", b"354"),
        ):
            sock.sendall(command + b"\r\n")
            answer = reply()
            assert not answer.startswith(b"5"), answer
            if not answer.startswith(want):
                return False
        sock.sendall(message + b".\r\n")
        dot_sent = True
        answer = reply()
        assert not answer.startswith(b"5"), answer
        if not answer and dot_sent:
            raise Delivered
        return answer.startswith(b"250")
    except OSError:
        if dot_sent:
            raise Delivered from None
        return False
    finally:
        file.close()
        sock.close()


@dataclass
class Deliverer:
    """Delivers numbered messages through HAProxy's LMTP frontend until stopped, retrying
    each one until it is acknowledged, as an MTA does.
    """

    port: int
    source: str
    recipients: tuple[str, ...]
    acked: list[tuple[str, int]] = field(default_factory=list)
    #: Messages whose answer to the final dot was lost at least once (stored maybe twice).
    ambiguous: set[int] = field(default_factory=set)
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        """Deliver message 0, 1, 2... round the recipients; keep the first error."""
        try:
            number = 0
            while not self.stop.is_set():
                recipient = self.recipients[number % len(self.recipients)]
                message = (
                    f"From: sender@example.org\r\nSubject: delivery {number}\r\n"
                    f"X-Seq: {number}\r\n\r\nbody of message {number}\r\n"
                ).encode()
                while True:
                    try:
                        if lmtp_deliver(self.port, self.source, recipient, message):
                            break
                    except Delivered:
                        self.ambiguous.add(number)
                    self.failures += 1
                    time.sleep(0.05)
                self.acked.append((recipient, number))
                number += 1
        except BaseException as exc:
            self.error = exc

    def wait_acked(self, count: int, timeout: float = 60) -> None:
        """Wait until ``count`` messages in all have been acknowledged."""
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"only {len(self.acked)} delivered"
            time.sleep(0.02)


def sequence_numbers(messages: dict[str, bytes]) -> list[int]:
    """The X-Seq of each delivered message (the others have none)."""
    found = [re.search(rb"^X-Seq: (\d+)\r?$", body, re.MULTILINE) for body in messages.values()]
    return sorted(int(match[1]) for match in found if match)


# --------------------------------------------------------------------------- tests


class TestLock:
    """The maildrop lock is one lock for the whole cluster."""

    def test_second_login_on_another_node_is_refused(self, cluster: Cluster):
        """alice in on one node: through HAProxy (to another node) and directly: [IN-USE]."""
        first = Pop3(cluster.front["pop3"], "127.0.0.11")
        assert b"+OK Logged in.\r\n" == first.login("alice")
        holder = cluster.wait_logged("Login: user=<alice>, method=PLAIN, rip=127.0.0.11,")

        # leastconn: the node holding alice's session is the busiest, so HAProxy picks
        # another; a connection of an earlier test still counted could make it pick the
        # holder, so up to three tries, each from an address of its own, all refused.
        proxied, refusers = [], []
        for source in ("127.0.0.61", "127.0.0.62", "127.0.0.63"):
            second = Pop3(cluster.front["pop3"], source)
            proxied.append(second.login("alice"))
            second.close()
            refused = f"Login refused, maildrop locked: user=<alice>, method=PLAIN, rip={source}"
            refusers.append(cluster.wait_logged(refused))
            if refusers[-1] is not holder:
                break
        direct = []
        for node in cluster.nodes:
            if node is not holder:
                client = Pop3(node.ports["pop3"], "127.0.0.13")
                direct.append(client.login("alice"))
                client.close()
        assert b"+OK" == first.command(b"QUIT")[:3]
        first.close()
        again = Pop3(cluster.front["pop3"], "127.0.0.12")
        after_quit = again.login("alice")
        again.close()

        assert ([LOCKED] * len(proxied), True, [LOCKED, LOCKED], b"+OK Logged in.\r\n") == (
            proxied,
            refusers[-1] is not holder,
            direct,
            after_quit,
        )


class TestRealAddress:
    """Each node logs the client's address from HAProxy's header, never HAProxy's."""

    def test_login_lines(self, cluster: Cluster):
        """Six logins from six addresses: each logged by one node with rip=, spread over nodes."""
        sources = [f"127.0.0.{n}" for n in range(31, 37)]
        for source in sources:
            client = Pop3(cluster.front["pop3"], source)
            assert b"+OK Logged in.\r\n" == client.login("dave")
            assert b"+OK" == client.command(b"QUIT")[:3]
            client.close()

        served = []
        for source in sources:
            node = cluster.wait_logged(f"Login: user=<dave>, method=PLAIN, rip={source}, lip=")
            connected = node.lines(
                f"pop3-login: haproxy: Client connected: PROXY v2: rip={source},"
            )
            assert 1 == len(connected)
            assert ", real_rip=127.0.0.1, " in connected[0]
            served.append(node.name)
        proxy_logins = [
            n.name for n in cluster.logged("Login: user=<dave>, method=PLAIN, rip=127.0.0.1,")
        ]
        assert ([], True) == (proxy_logins, len(set(served)) >= 2)

    def test_pop3s_passthrough(self, cluster: Cluster):
        """POP3S through HAProxy: TLS with the node, the client's address in its log."""
        client = Pop3(cluster.front["pop3s"], "127.0.0.37", tls=True)
        assert b"+OK Logged in.\r\n" == client.login("dave")
        client.close()

        node = cluster.wait_logged("Login: user=<dave>, method=PLAIN, rip=127.0.0.37, lip=")
        assert 1 == len(node.lines("haproxy: Client connected: PROXY v2: rip=127.0.0.37,"))

    def test_lmtp(self, cluster: Cluster):
        """A delivery through HAProxy is logged with the MTA's address."""
        assert lmtp_deliver(cluster.front["lmtp"], "127.0.0.38", "dave", b"Subject: x\r\n\r\nx\r\n")

        node = cluster.wait_logged("lmtp: haproxy: Client connected: PROXY v2: rip=127.0.0.38,")
        assert ", real_rip=127.0.0.1, " in node.lines("PROXY v2: rip=127.0.0.38,")[0]


class TestThrottleAcrossNodes:
    """Failed logins are counted for the cluster (shared state in PostgreSQL), not per node."""

    def test_failures_on_one_node_slow_the_address_on_the_others(self, cluster: Cluster):
        """Three failures straight to node 1: the right password from that address gets
        [LOGIN-DELAY] on nodes 2 and 3 and through HAProxy; another address logs in.
        """
        first = cluster.nodes[0]
        failed = []
        for _ in range(AUTH_FAILURES):
            client = Pop3(first.ports["pop3"], "127.0.0.81")
            failed.append(client.login("erin", "wrong")[:11])
            client.close()
        delayed = []
        for node in cluster.nodes[1:]:
            client = Pop3(node.ports["pop3"], "127.0.0.81")
            delayed.append(client.login("erin"))
            client.close()
        proxied = Pop3(cluster.front["pop3"], "127.0.0.81")
        delayed.append(proxied.login("erin"))
        proxied.close()
        other = Pop3(cluster.front["pop3"], "127.0.0.82")
        allowed = other.login("erin")
        other.close()

        assert ([b"-ERR [AUTH]"] * AUTH_FAILURES, [DELAYED] * 3, b"+OK Logged in.\r\n") == (
            failed,
            delayed,
            allowed,
        )


class TestHeaderThenEnd:
    """HAProxy passes on a client that left at once: its header, then the end of the stream."""

    @pytest.mark.parametrize("service", ["pop3", "lmtp"])
    def test_connection_closed(self, cluster: Cluster, service):
        """The node closes the connection (nothing but a greeting first), keeping no slot."""
        sock = connect(cluster.nodes[0].ports[service], "127.0.0.1")
        sock.sendall(proxy_v2("127.0.0.71", "127.0.0.1"))
        sock.shutdown(socket.SHUT_WR)
        file = sock.makefile("rb")
        answer = file.read()  # the socket's timeout (15 s) guards a connection left open
        file.close()
        sock.close()

        assert [] == [
            line for line in answer.splitlines() if not line.startswith((b"220 ", b"+OK"))
        ]


class TestForgedHeader:
    """A PROXY header from an address not in haproxy_trusted_networks is never believed."""

    V1 = b"PROXY TCP4 198.51.100.7 192.0.2.1 4000 110\r\n"
    V2 = proxy_v2("198.51.100.8", "192.0.2.1")

    @pytest.mark.parametrize(
        ("header", "source"), [(V1, "127.0.0.41"), (V2, "127.0.0.42")], ids=["v1", "v2"]
    )
    def test_pop3_straight_to_a_node(self, cluster: Cluster, header, source):
        """Straight to a node from 127.0.0.4x: -ERR, the connection closed, logged."""
        node = cluster.nodes[1]
        client = Pop3(node.ports["pop3"], source, header=header + b"USER alice\r\n")
        answer = client.line() + client.rest()
        client.close()

        assert b"-ERR PROXY protocol header refused.\r\n" == answer.partition(b"\r\n")[2]
        refused = f"haproxy: Client not trusted, PROXY header refused (rip={source}, "
        assert node is cluster.wait_logged(refused)
        assert 1 == len(node.lines(refused))

    def test_lmtp_straight_to_a_node(self, cluster: Cluster):
        """Straight to a node's LMTP port: closed, logged."""
        node = cluster.nodes[2]
        sock = connect(node.ports["lmtp"], "127.0.0.43")
        sock.sendall(self.V1)
        file = sock.makefile("rb")
        answer = file.read()
        file.close()
        sock.close()

        # The greeting may or may not have gone out before the header arrived: nothing else.
        assert [] == [line for line in answer.splitlines() if not line.startswith(b"220 ")]
        refused = "lmtp: haproxy: Client not trusted, PROXY header refused (rip=127.0.0.43,"
        assert node is cluster.wait_logged(refused)
        assert 1 == len(node.lines(refused))

    def test_through_haproxy(self, cluster: Cluster):
        """Sent to HAProxy, a client's header follows HAProxy's own: refused under its address."""
        client = Pop3(cluster.front["pop3"], "127.0.0.44", header=self.V1)
        answer = client.line() + client.rest()
        client.close()

        assert b"-ERR PROXY protocol header refused.\r\n" == answer.partition(b"\r\n")[2]
        node = cluster.wait_logged("Client not trusted, PROXY header refused (rip=127.0.0.44, ")
        assert 1 == len(node.lines("Client connected: PROXY v2: rip=127.0.0.44, "))

    def test_claimed_addresses_appear_nowhere(self, cluster: Cluster):
        """No node's log has the addresses the forged headers claimed."""
        for header, source in ((self.V1, "127.0.0.45"), (self.V2, "127.0.0.46")):
            for node in cluster.nodes:
                client = Pop3(node.ports["pop3"], source, header=header)
                client.rest()
                client.close()
                node.wait_for(f"PROXY header refused (rip={source}, ")
        assert [] == [
            node.name
            for node in cluster.nodes
            if "198.51.100." in node.text() or "192.0.2.1" in node.text()
        ]


class TestNodeDies:
    """SIGKILL of the node holding a session: nothing lost, nothing twice, service goes on."""

    def test_sigkill(self, cluster: Cluster):
        """bob gets in again through HAProxy; his maildrop and every delivery are intact."""
        lmtp = cluster.front["lmtp"]
        for number in range(4):
            assert lmtp_deliver(
                lmtp, "127.0.0.51", "bob", b"Subject: before %d\r\n\r\nx\r\n" % number
            )
        session = Pop3(cluster.front["pop3"], "127.0.0.52")
        assert b"+OK Logged in.\r\n" == session.login("bob")
        before = session.maildrop()
        assert [b"+OK", b"+OK"] == [session.command(b"DELE %d" % n)[:3] for n in (1, 2)]
        holder = cluster.wait_logged("Login: user=<bob>, method=PLAIN, rip=127.0.0.52,")
        half = self._half_delivered(holder.ports["lmtp"], "127.0.0.55", "bob")
        deliverer = Deliverer(lmtp, "127.0.0.53", ("bob", "carol"))
        thread = threading.Thread(target=deliverer.run, daemon=True)
        thread.start()
        try:
            deliverer.wait_acked(6)
            holder.kill()
            cut = session.rest()
            session.close()
            half_cut = half.recv(100)
            half.close()
            cluster.wait_states({holder.name: "DOWN"})
            relogin, attempts = self._login_again(cluster, "bob", "127.0.0.52")
            deliverer.wait_acked(len(deliverer.acked) + 9)
        finally:
            deliverer.stop.set()
            thread.join(30)
        assert deliverer.error is None, deliverer.error

        after = fetch_all(cluster, "bob", "127.0.0.54")
        carol = fetch_all(cluster, "carol", "127.0.0.54")
        holder.start()
        holder.wait_started()
        cluster.wait_states({node.name: "UP" for node in cluster.nodes})

        delivered = collections.Counter(sequence_numbers(after) + sequence_numbers(carol))
        twice = {n for n, count in delivered.items() if count > 1}
        acked = sorted(n for _, n in deliverer.acked)
        assert (b"", b"", True) == (cut, half_cut, relogin.startswith(b"+OK Logged in."))
        assert [] == [body for body in after.values() if b"X-Seq: half" in body]
        assert before == {uid: after.get(uid) for uid in before}  # DELE without QUIT: kept
        assert acked == sorted(delivered)  # every acknowledged delivery, nothing else
        assert twice <= deliverer.ambiguous, (twice, attempts)  # twice only if the ack was lost
        assert len(after) == len(set(after))
        assert {("bob", n) for n in sequence_numbers(after)} | {
            ("carol", n) for n in sequence_numbers(carol)
        } == set(deliverer.acked)

    @staticmethod
    def _half_delivered(port: int, source: str, recipient: str) -> socket.socket:
        """An LMTP transaction straight to a node, stopped in the middle of the message."""
        sock = connect(port, source)
        file = sock.makefile("rb")
        assert file.readline().startswith(b"220")
        sock.sendall(b"LHLO test\r\n")
        while file.readline()[3:4] == b"-":
            pass
        for command, want in (
            (b"MAIL FROM:<sender@example.org>", b"250"),
            (b"RCPT TO:<" + recipient.encode() + b">", b"250"),
            (b"DATA", b"354"),
        ):
            sock.sendall(command + b"\r\n")
            assert file.readline().startswith(want)
        sock.sendall(b"Subject: half\r\nX-Seq: half\r\n\r\nthe first half, and no end")
        file.close()
        return sock

    @staticmethod
    def _login_again(cluster: Cluster, user: str, source: str) -> tuple[bytes, list[bytes]]:
        """Log in through HAProxy until it works (a guard of 30 s); return the answer and
        what the failed attempts got.
        """
        attempts: list[bytes] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client = Pop3(cluster.front["pop3"], source)
                answer = client.login(user)
                client.close()
            except (OSError, AssertionError) as exc:
                answer = repr(exc).encode()
            if answer.startswith(b"+OK"):
                return answer, attempts
            attempts.append(answer)
            time.sleep(0.1)
        return b"", attempts


class TestNodeDrains:
    """SIGTERM: HAProxy's health check sees the drain, the node's open session finishes."""

    def test_sigterm(self, cluster: Cluster):
        """frank's session on the draining node ends with QUIT and its UPDATE; HAProxy marks
        the node down and sends new logins elsewhere; the node exits 0.
        """
        for number in range(2):
            message = b"Subject: drain %d\r\n\r\nx\r\n" % number
            assert lmtp_deliver(cluster.front["lmtp"], "127.0.0.91", "frank", message)
        session = Pop3(cluster.front["pop3"], "127.0.0.92")
        assert b"+OK Logged in.\r\n" == session.login("frank")
        holder = cluster.wait_logged("Login: user=<frank>, method=PLAIN, rip=127.0.0.92,")
        assert b"+OK" == session.command(b"DELE 1")[:3]

        holder.signal(signal.SIGTERM)
        cluster.wait_states({holder.name: "DOWN"})
        other = Pop3(cluster.front["pop3"], "127.0.0.93")
        elsewhere = other.login("dave")
        other.close()
        served = cluster.wait_logged("Login: user=<dave>, method=PLAIN, rip=127.0.0.93,")
        quit_reply = session.command(b"QUIT")
        session.close()
        status = holder.wait_exited()
        left = fetch_all(cluster, "frank", "127.0.0.94")
        holder.start()
        holder.wait_started()
        cluster.wait_states({node.name: "UP" for node in cluster.nodes})

        assert (b"+OK Logged in.\r\n", True, b"+OK", 0, [b"drain 1"]) == (
            elsewhere,
            served is not holder,
            quit_reply[:3],
            status,
            [re.findall(rb"Subject: (drain \d)", body)[0] for body in left.values()],
        )


class TestDocumentedConfig:
    """The HAProxy configuration admins copy is the one these tests run."""

    def test_guide_shows_the_contrib_file(self):
        """docs/deployment.md holds contrib/haproxy/pobox.cfg verbatim, in a code block."""
        guide = (CONTRIB_CONFIG.parents[2] / "docs" / "deployment.md").read_text()

        assert "```haproxy\n" + CONTRIB_CONFIG.read_text() + "```\n" in guide

    def test_haproxy_accepts_it_as_shipped(self):
        """``haproxy -c`` finds the file valid as it is, 10.0.0.x addresses and all."""
        done = subprocess.run(
            [str(find_haproxy()), "-c", "-f", str(CONTRIB_CONFIG)],
            capture_output=True,
            text=True,
            check=False,
        )

        assert 0 == done.returncode, done.stdout + done.stderr
