"""A real HAProxy in front of a real ``pobox serve``: the PROXY protocol end to end.

One pobox process (``haproxy_trusted_networks = ["127.0.0.1/32"]``, logging to a file) and
one HAProxy with a frontend per way of proxying: ``send-proxy``, ``send-proxy-v2`` (with and
without CRC32C), TCP passthrough to implicit TLS, TLS terminated by HAProxy with
``send-proxy-v2-ssl-cn``, LMTP, and ``accept-proxy`` frontends through which a test can
stand for a client anywhere (203.0.113.x, IPv6).  Test clients connect from their own
loopback addresses (127.0.0.21, .22, ...), so pobox's log shows whose address it used.
"""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from pobox.auth.passwdfile import add_user
from tests.helpers.accounts import ROOT_MAIL_SETTINGS
from tests.helpers.haproxy import HAProxy, free_port, running_haproxy
from tests.tls.helpers import Pki

DOVECOT_FILTER = Path("/etc/fail2ban/filter.d/dovecot.conf")
POBOX_FILTER = Path(__file__).resolve().parents[2] / "contrib/fail2ban/filter.d/pobox.conf"

FRONTENDS = (
    "v1",  # send-proxy to the POP3 port
    "v2",  # send-proxy-v2, with health checks
    "crc",  # send-proxy-v2 with a CRC32C TLV
    "pop3s",  # TCP passthrough to the implicit-TLS port, send-proxy-v2
    "pop3s_v1",  # the same with send-proxy
    "tls",  # TLS ends at HAProxy (client certificates verified), send-proxy-v2-ssl-cn
    "tls_lax",  # the same, but certificates HAProxy could not verify are let through
    "lmtp",  # send-proxy-v2 to LMTP
    "chain",  # accept-proxy: the test's own header names the client; send-proxy-v2 on
    "chain_tls",  # accept-proxy, then TLS at HAProxy; send-proxy-v2-ssl-cn on
)


@dataclass
class Stack:
    """pobox behind HAProxy, and where everything listens."""

    root: Path
    log: Path
    pki: Pki
    haproxy: HAProxy | None = None
    pobox: dict[str, int] = field(default_factory=dict)
    front: dict[str, int] = field(default_factory=dict)

    def lines(self, text: str) -> list[str]:
        """The lines of pobox's log containing ``text``."""
        return [line for line in self.log.read_text().splitlines() if text in line]

    def wait_for(self, text: str, count: int = 1, timeout: float = 10) -> list[str]:
        """Wait until ``count`` lines of pobox's log contain ``text``; return them."""
        deadline = time.monotonic() + timeout
        while len(found := self.lines(text)) < count:
            assert time.monotonic() < deadline, f"no {count} log lines with {text!r}: {found}"
            time.sleep(0.02)
        return found


class Line:
    """A line-oriented client from a chosen loopback address (POP3 or LMTP)."""

    def __init__(
        self,
        port: int,
        source: str,
        *,
        header: bytes = b"",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        if header:
            sock.sendall(header)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.file = sock.makefile("rb")

    def line(self) -> bytes:
        """Read one reply line."""
        return self.file.readline()

    def command(self, line: bytes) -> bytes:
        """Send a line, read one reply line."""
        self.sock.sendall(line + b"\r\n")
        return self.line()

    def multiline(self, line: bytes) -> bytes:
        """Send a command, read a multi-line reply to its end."""
        reply = self.command(line)
        while not reply.endswith(b"\r\n.\r\n") and reply.startswith(b"+OK"):
            reply += self.line()
        return reply

    def login(self, user: bytes = b"alice", password: bytes = b"secret") -> bytes:
        """Read the greeting, send USER/PASS; return the PASS reply."""
        assert self.line().startswith(b"+OK")
        self.command(b"USER " + user)
        return self.command(b"PASS " + password)

    def rest(self) -> bytes:
        """Read until the server closes the connection."""
        return self.file.read()

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()


def client_context(stack: Stack, cert: Path | None = None) -> ssl.SSLContext:
    """A TLS client context trusting the test CA, with a client certificate if given."""
    ctx = stack.pki.client_context()
    if cert is not None:
        ctx.load_cert_chain(str(cert))
    return ctx


def start_pobox(stack: Stack) -> subprocess.Popen[bytes]:
    """Start ``python -m pobox serve`` for ``stack``; wait until it listens; read its ports."""
    root = stack.root
    for user in ("alice", "bob"):
        add_user(root / "passwd", user, b"secret", scheme="PLAIN")
        (root / "mail" / user).mkdir(parents=True)
    settings = [
        'listen = ["127.0.0.1:0"]',
        "workers = 1",
        'ssl_listen = ["127.0.0.1:0"]',
        'lmtp_listen = ["127.0.0.1:0"]',
        f'mail_location = "maildir:{root}/mail/%u"',
        f'passwd_file = "{root}/passwd"',
        f'ssl_cert = "{stack.pki.cert_pem}"',
        f'ssl_key = "{stack.pki.key_pem}"',
        'auth_mechanisms = "PLAIN EXTERNAL"',
        'haproxy_trusted_networks = ["127.0.0.1/32"]',
        "auth_failure_delay = 0",
        "auth_failures_per_ip = 3",
        "max_connections_per_ip = 2",
        f'log_path = "{stack.log}"',
        'log_format = "dovecot"',
        'log_level = "debug"',
    ]
    (root / "pobox.toml").write_text("\n".join(settings) + "\n" + ROOT_MAIL_SETTINGS)
    with (root / "pobox.err").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "pobox", "serve", "-c", str(root / "pobox.toml")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + 30
    while not (stack.log.exists() and stack.lines("started, listening on")):
        assert process.poll() is None, (root / "pobox.err").read_text()
        assert time.monotonic() < deadline, "pobox serve did not start"
        time.sleep(0.05)
    started = stack.lines("started, listening on")[0]
    stack.pobox["pop3"], stack.pobox["pop3s"] = map(int, re.findall(r"127\.0\.0\.1:(\d+)", started))
    lmtp = stack.lines("delivery: lmtp listening on")[0]
    stack.pobox["lmtp"] = int(re.findall(r"(\d+)\)$", lmtp)[0])
    return process


def haproxy_sections(stack: Stack, tmp: Path) -> str:
    """The frontends and backends of the test's HAProxy."""
    pem = tmp / "haproxy.pem"
    pem.write_bytes(stack.pki.cert_pem.read_bytes() + stack.pki.key_pem.read_bytes())
    ca = stack.pki.ca_pem
    tls = f"ssl crt {pem} ca-file {ca} verify optional"
    port = stack.front
    pop3, pop3s, lmtp = (f"127.0.0.1:{stack.pobox[k]}" for k in ("pop3", "pop3s", "lmtp"))
    return f"""
listen v1
    bind 127.0.0.1:{port["v1"]}
    server pobox {pop3} send-proxy

listen v2
    bind 127.0.0.1:{port["v2"]}
    option tcp-check
    tcp-check expect string +OK\\ pobox
    server pobox {pop3} send-proxy-v2 check check-send-proxy inter 200ms

listen crc
    bind 127.0.0.1:{port["crc"]}
    server pobox {pop3} send-proxy-v2 proxy-v2-options crc32c

listen pop3s
    bind 127.0.0.1:{port["pop3s"]}
    server pobox {pop3s} send-proxy-v2

listen pop3s_v1
    bind 127.0.0.1:{port["pop3s_v1"]}
    server pobox {pop3s} send-proxy

listen tls
    bind 127.0.0.1:{port["tls"]} {tls}
    server pobox {pop3} send-proxy-v2-ssl-cn

listen tls_lax
    bind 127.0.0.1:{port["tls_lax"]} {tls} ca-ignore-err all crt-ignore-err all
    server pobox {pop3} send-proxy-v2-ssl-cn

listen lmtp
    bind 127.0.0.1:{port["lmtp"]}
    server pobox {lmtp} send-proxy-v2

listen chain
    bind 127.0.0.1:{port["chain"]} accept-proxy
    server pobox {pop3} send-proxy-v2

listen chain_tls
    bind 127.0.0.1:{port["chain_tls"]} accept-proxy {tls}
    server pobox {pop3} send-proxy-v2-ssl-cn
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """pobox serve, and HAProxy in front of it; both stopped by PID at the end."""
    tmp = tmp_path_factory.mktemp("haproxy")
    stack = Stack(tmp / "pobox", tmp / "pobox" / "pobox.log", Pki.create(tmp / "pki", "localhost"))
    stack.root.mkdir()
    process = start_pobox(stack)
    try:
        stack.front = {name: free_port() for name in FRONTENDS}
        with running_haproxy(tmp / "haproxy", haproxy_sections(stack, tmp)) as haproxy:
            stack.haproxy = haproxy
            yield stack
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="module")
def certs(stack: Stack) -> dict[str, Path]:
    """Client certificates named alice: one from the test CA, one from a CA nobody trusts."""
    out = {}
    for name, ca in (("alice", stack.pki.ca), ("rogue", trustme.CA())):
        cert = ca.issue_cert("alice", common_name="alice")
        out[name] = stack.root.parent / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(out[name]))
    return out


class TestRealAddress:
    """Through HAProxy, pobox logs and counts the client's address."""

    @pytest.mark.parametrize(
        ("frontend", "source", "version"),
        [("v1", "127.0.0.21", 1), ("v2", "127.0.0.22", 2), ("crc", "127.0.0.23", 2)],
    )
    def test_login_line(self, stack: Stack, frontend, source, version):
        """The Login line has the client's rip=; the connection line names HAProxy too."""
        client = Line(stack.front[frontend], source)
        assert b"+OK Logged in.\r\n" == client.login()
        client.command(b"QUIT")
        client.close()

        login = stack.wait_for(f"Login: user=<alice>, method=PLAIN, rip={source}, lip=127.0.0.1,")
        connected = stack.lines(f"haproxy: Client connected: PROXY v{version}: rip={source}, ")
        assert (1, 1) == (len(login), len(connected))
        assert f"lip=127.0.0.1, lport={stack.front[frontend]}, real_rip=127.0.0.1, " in connected[0]

    def test_fail2ban_sees_the_client(self, stack: Stack):
        """The stock dovecot filter and pobox's own find the client's address, not HAProxy's."""
        for _ in range(2):
            client = Line(stack.front["v2"], "127.0.0.24")
            assert client.login(password=b"wrong").startswith(b"-ERR [AUTH]")
            client.close()
        stack.wait_for("Disconnected (auth failed, 1 attempts", count=2)

        # pobox's filter installed as the README says: next to the common.conf it includes.
        installed = stack.root.parent / "fail2ban" / "filter.d"
        installed.mkdir(parents=True)
        (installed / "common.conf").symlink_to(DOVECOT_FILTER.parent / "common.conf")
        shutil.copy(POBOX_FILTER, installed / "pobox.conf")
        for filter_path in (DOVECOT_FILTER, installed / "pobox.conf"):
            found = fail2ban_ips(stack.log, filter_path)
            assert ["127.0.0.24", "127.0.0.24"] == [ip for ip in found if ip == "127.0.0.24"]
            assert "127.0.0.1" not in found

    def test_throttle_per_client(self, stack: Stack):
        """Three failures slow down the client that failed; another behind HAProxy logs in."""
        for _ in range(3):
            client = Line(stack.front["v2"], "127.0.0.26")
            assert client.login(password=b"wrong").startswith(b"-ERR [AUTH]")
            client.close()
        client = Line(stack.front["v2"], "127.0.0.26")

        assert client.login().startswith(b"-ERR [LOGIN-DELAY]")
        client.close()
        other = Line(stack.front["v2"], "127.0.0.27")
        assert b"+OK Logged in.\r\n" == other.login()
        other.close()

    def test_caps_per_client(self, stack: Stack):
        """max_connections_per_ip = 2 holds for each client, not for HAProxy's address."""
        held = [Line(stack.front["v2"], "127.0.0.28") for _ in range(2)]
        assert [True, True] == [c.line().startswith(b"+OK") for c in held]
        third = Line(stack.front["v2"], "127.0.0.28")
        other = Line(stack.front["v2"], "127.0.0.29")

        assert b"-ERR [SYS/TEMP] Too many connections, try later.\r\n" == third.line()
        assert other.line().startswith(b"+OK")
        for client in (*held, third, other):
            client.close()
        assert 1 == len(stack.lines("Too many connections from 127.0.0.28, refusing"))

    def test_ipv6_client(self, stack: Stack):
        """A client HAProxy took in over IPv6 (here: named by an accept-proxy header)."""
        header = b"PROXY TCP6 2001:db8::42 2001:db8::1 4242 110\r\n"
        client = Line(stack.front["chain"], "127.0.0.39", header=header)
        assert client.line().startswith(b"+OK")
        client.close()

        assert 1 == len(stack.wait_for("PROXY v2: rip=2001:db8::42, rport=4242, lip=2001:db8::1"))

    def test_health_checks(self, stack: Stack):
        """HAProxy's checks (PROXY v2 LOCAL) are greeted: the server is UP, L7OK."""
        assert stack.haproxy is not None
        deadline = time.monotonic() + 10
        while (state := stack.haproxy.server_state("v2", "pobox")) != ("UP", "L7OK"):
            assert time.monotonic() < deadline, state
            time.sleep(0.1)

        assert stack.wait_for("haproxy: Client connected: LOCAL (health check), rip=127.0.0.1")


def fail2ban_ips(log: Path, filter_path: Path) -> list[str]:
    """Run fail2ban-regex; return the address of every match."""
    tool = shutil.which("fail2ban-regex")
    if tool is None:
        pytest.fail("fail2ban is not installed: run scripts/install-deps --test")
    out = subprocess.run(
        [tool, "--out", "ip", str(log), str(filter_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split()


class TestPlaintextPolicy:
    """disable_plaintext_auth = loopback judges the client, and HAProxy's TLS counts."""

    def test_remote_client_plain(self, stack: Stack):
        """A remote client through a plain frontend may not send a password in clear."""
        header = b"PROXY TCP4 203.0.113.40 192.0.2.1 4000 110\r\n"
        client = Line(stack.front["chain"], "127.0.0.40", header=header)
        assert client.line().startswith(b"+OK")

        assert b"STLS" in client.multiline(b"CAPA")
        assert client.command(b"USER alice").startswith(b"-ERR [AUTH] Plaintext")
        client.close()

    def test_remote_client_over_tls_at_haproxy(self, stack: Stack):
        """The same client over TLS to HAProxy logs in; pobox offers no STLS."""
        header = b"PROXY TCP4 203.0.113.41 192.0.2.1 4000 995\r\n"
        client = Line(
            stack.front["chain_tls"], "127.0.0.41", header=header, tls=client_context(stack)
        )
        assert client.line().startswith(b"+OK")

        assert b"STLS" not in client.multiline(b"CAPA")
        assert b"+OK\r\n" == client.command(b"USER alice")
        assert b"+OK Logged in.\r\n" == client.command(b"PASS secret")
        client.close()
        assert 1 == len(stack.wait_for("method=PLAIN, rip=203.0.113.41,"))
        assert 1 == len(stack.lines("PROXY v2: rip=203.0.113.41, rport=4000, lip=192.0.2.1"))


class TestTls:
    """TLS through HAProxy: passed through to pobox, or ended at HAProxy."""

    @pytest.mark.parametrize(
        ("frontend", "source"), [("pop3s", "127.0.0.30"), ("pop3s_v1", "127.0.0.31")]
    )
    def test_passthrough(self, stack: Stack, frontend, source):
        """PROXY header, then TLS between the client and pobox."""
        client = Line(stack.front[frontend], source, tls=client_context(stack))

        assert b"+OK Logged in.\r\n" == client.login()
        assert "TLSv1.3" == client.sock.version()  # type: ignore[attr-defined]
        client.close()
        assert 1 == len(stack.wait_for(f"method=PLAIN, rip={source}, lip=127.0.0.1"))

    def test_external_with_verified_certificate(self, stack: Stack, certs):
        """HAProxy verified alice's certificate: SASL EXTERNAL logs in as its CN."""
        client = Line(stack.front["tls"], "127.0.0.32", tls=client_context(stack, certs["alice"]))
        assert client.line().startswith(b"+OK")

        assert b"+OK Logged in.\r\n" == client.command(b"AUTH EXTERNAL =")
        client.close()
        assert 1 == len(stack.wait_for("Login: user=<alice>, method=EXTERNAL, rip=127.0.0.32,"))

    @pytest.mark.parametrize(
        ("frontend", "cert", "source"),
        [("tls_lax", "rogue", "127.0.0.33"), ("tls", None, "127.0.0.34")],
        ids=["not-verified", "no-certificate"],
    )
    def test_external_refused(self, stack: Stack, certs, frontend, cert, source):
        """A certificate HAProxy could not verify, or none: EXTERNAL names no one."""
        ctx = client_context(stack, certs[cert] if cert else None)
        client = Line(stack.front[frontend], source, tls=ctx)
        assert client.line().startswith(b"+OK")

        assert client.command(b"AUTH EXTERNAL =").startswith(b"-ERR")
        client.close()


class TestLmtp:
    """LMTP through HAProxy."""

    def test_delivery(self, stack: Stack):
        """The message is delivered; pobox logs the client's address."""
        client = Line(stack.front["lmtp"], "127.0.0.35")
        replies = [client.line()]
        for line in (b"LHLO mx", b"MAIL FROM:<a@example.org>", b"RCPT TO:<bob>", b"DATA"):
            reply = client.command(line)
            while reply[3:4] == b"-":
                reply = client.line()
            replies.append(reply)
        client.sock.sendall(b"Subject: via haproxy\r\n\r\nhello\r\n.\r\n")
        replies.append(client.line())
        client.close()

        assert [b"220", b"250", b"250", b"250", b"354", b"250"] == [r[:3] for r in replies]
        assert 1 == len(list((stack.root / "mail" / "bob" / "new").iterdir()))
        assert 1 == len(
            stack.wait_for("lmtp: haproxy: Client connected: PROXY v2: rip=127.0.0.35,")
        )


class TestForgedHeader:
    """A header straight from an address not in haproxy_trusted_networks."""

    FORGED = b"PROXY TCP4 198.51.100.7 192.0.2.1 4000 110\r\n"

    def test_pop3(self, stack: Stack):
        """Refused with -ERR and logged; the claimed address appears nowhere."""
        client = Line(stack.pobox["pop3"], "127.0.0.36", header=self.FORGED + b"USER alice\r\n")

        assert client.line().startswith(b"+OK")
        assert b"-ERR PROXY protocol header refused.\r\n" == client.rest()
        client.close()
        assert 1 == len(stack.wait_for("Client not trusted, PROXY header refused (rip=127.0.0.36"))
        assert [] == stack.lines("198.51.100.7")

    def test_lmtp(self, stack: Stack):
        """Refused on LMTP: the connection is closed, logged."""
        client = Line(stack.pobox["lmtp"], "127.0.0.37")
        assert client.line().startswith(b"220")
        client.sock.sendall(self.FORGED)

        assert b"" == client.rest()
        client.close()
        assert 1 == len(
            stack.wait_for(
                "lmtp: haproxy: Client not trusted, PROXY header refused (rip=127.0.0.37"
            )
        )

    def test_pop3s(self, stack: Stack):
        """Before TLS it breaks the handshake: closed, logged under the sender's address."""
        client = Line(stack.pobox["pop3s"], "127.0.0.38", header=self.FORGED)

        assert b"" == client.rest()
        client.close()
        failed = stack.wait_for("rip=127.0.0.38, lip=127.0.0.1")
        assert 1 == len(failed)
        assert (
            "pop3-login: Disconnected (no auth attempts in 0 secs): TLS handshaking failed"
            in failed[0]
        )
        assert [] == stack.lines("198.51.100.7")
