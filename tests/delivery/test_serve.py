"""``pobox serve`` with its delivery listeners, as one real process: LMTP from the TOML file, a
delivery flood that POP3 outlives in bounded memory, and fsync before every ``250``."""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pobox.auth.passwdfile import add_user
from pobox.testing import deliver_to_maildir
from tests.delivery.helpers import split_received
from tests.helpers.accounts import ROOT_MAIL_SETTINGS

#: How long pobox may take to start (a deadline for the start-up, not a timed assertion).
_START_DEADLINE = 30.0
#: Seconds a client of the flood test waits for any one reply (a deadline, not a speed test).
_CLIENT_DEADLINE = 60.0
_POP3_LISTEN = re.compile(r"Listening for POP3 on 127\.0\.0\.1:(\d+)")
_SMTP_LISTEN = re.compile(r"delivery: smtp listening on \('127\.0\.0\.1', (\d+)\)")
_PER_ADDRESS = b"421 4.7.0 mx.pobox.test Error: too many connections from 127.0.0.1\r\n"
#: The message POP3 clients retrieve during the flood: about 1 MiB.
_MAILBOX_MESSAGE = b"Subject: kept\n\n" + (b"k" * 70 + b"\n") * (1024 * 1024 // 71)
#: The large messages of the flood: 40 MiB each, the size in the issue (84 MB RSS each).
_LARGE_SIZE = 40 * 1024 * 1024
_LARGE_CHUNK = (b"L" * 1022 + b"\r\n") * 1024
#: Growth of the server's resident memory allowed during the flood.
_RSS_BOUND = 150 * 1024 * 1024


def _rss(pid: int, field: str = "VmRSS") -> int:
    """Return the resident memory of process ``pid`` in octets (``VmHWM``: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    msg = f"no {field} for {pid}"
    raise LookupError(msg)


@dataclass
class _Serve:
    """A ``pobox serve`` process and what it listens on."""

    process: subprocess.Popen[bytes]
    #: The server's process id (the wrapper's child when there is a wrapper).
    pid: int
    pop3: int
    smtp: int


@contextmanager
def _pobox_serve(root: Path, *, wrapper: tuple[str, ...] = ()) -> Iterator[_Serve]:
    """Run ``pobox serve`` (under ``wrapper``, e.g. strace) with POP3 and SMTP on loopback."""
    add_user(root / "passwd", "alice", b"secret", scheme="PLAIN")
    (root / "mail" / "alice").mkdir(parents=True, exist_ok=True)
    log = root / "pobox.log"
    config = root / "pobox.toml"
    config.write_text(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n'
        'smtp_listen = ["127.0.0.1:0"]\n'
        'hostname = "mx.pobox.test"\n'
        f'mail_location = "maildir:{root}/mail/%u"\n'
        f'passwd_file = "{root / "passwd"}"\n'
        f'log_path = "{log}"\n'
        "auth_failure_delay = 0\n" + ROOT_MAIL_SETTINGS
    )
    command = [*wrapper, sys.executable, "-m", "pobox", "serve", "-c", str(config)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = process.pid
    try:
        deadline = time.monotonic() + _START_DEADLINE
        while True:
            text = log.read_text() if log.exists() else ""
            pop3, smtp = _POP3_LISTEN.search(text), _SMTP_LISTEN.search(text)
            if pop3 and smtp:
                break
            assert process.poll() is None, "pobox serve exited"
            assert time.monotonic() < deadline, "pobox serve did not start listening"
            time.sleep(0.05)
        if wrapper:  # strace runs pobox as its child, and would leave it running on SIGTERM
            pid = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
        yield _Serve(process, pid, int(pop3.group(1)), int(smtp.group(1)))
    finally:
        os.kill(pid, signal.SIGTERM)
        process.wait(30)


def _pop3_round(port: int) -> int:
    """Log in, STAT, RETR 1 and QUIT; return the size of the message retrieved (LF lines)."""
    client = poplib.POP3("127.0.0.1", port, timeout=_CLIENT_DEADLINE)
    try:
        client.user("alice")
        client.pass_("secret")
        client.stat()
        _, lines, _ = client.retr(1)
    finally:
        client.quit()
    return sum(len(line) + 1 for line in lines)


def _smtp_session(port: int, source: str) -> socket.socket:
    """Connect from ``source``, get to DATA as alice's sender; return the socket."""
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=_CLIENT_DEADLINE, source_address=(source, 0)
    )
    replies = sock.makefile("rb")
    assert replies.readline().startswith(b"220 ")
    sock.sendall(b"HELO client.test\r\nMAIL FROM:<s@example.org>\r\n")
    sock.sendall(b"RCPT TO:<alice@mx.pobox.test>\r\nDATA\r\n")
    answers = [replies.readline() for _ in range(4)]
    assert [b"250", b"250", b"250", b"354"] == [answer[:3] for answer in answers]
    return sock


def _send_large(port: int) -> bytes:
    """Send a 40 MiB message from 127.0.0.2, a chunk at a time; return the reply."""
    with _smtp_session(port, "127.0.0.2") as sock:
        for _ in range(_LARGE_SIZE // len(_LARGE_CHUNK)):
            sock.sendall(_LARGE_CHUNK)
        sock.sendall(b".\r\n")
        return sock.makefile("rb").readline()


def _slow_writer(port: int, stop: threading.Event) -> int:
    """Trickle a DATA line a second from 127.0.0.3 until ``stop``; return the lines sent."""
    sent = 0
    with _smtp_session(port, "127.0.0.3") as sock:
        while not stop.wait(1.0):
            sock.sendall(b"slow\r\n")
            sent += 1
    return sent


def _idle_flood(port: int, count: int) -> tuple[list[socket.socket], list[bytes]]:
    """Open ``count`` connections from 127.0.0.1; return them and the first line of each."""
    socks, first = [], []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=_CLIENT_DEADLINE)
        socks.append(sock)
        first.append(sock.makefile("rb").readline())
    return socks, first


class TestServeStartsLmtp:
    """The composition root wires the delivery listeners."""

    def test_lmtp_on_unix_socket(self, tmp_path: Path) -> None:
        """A message sent to the configured LMTP socket lands in the user's maildir."""
        add_user(tmp_path / "passwd", "alice", b"secret", scheme="PLAIN")
        socket_path = tmp_path / "lmtp.sock"
        config = tmp_path / "pobox.toml"
        config.write_text(
            'listen = ["127.0.0.1:0"]\nworkers = 1\n'
            f'lmtp_listen = ["unix:{socket_path}"]\n'
            f'mail_location = "maildir:{tmp_path}/mail/%u"\n'
            f'passwd_file = "{tmp_path / "passwd"}"\n' + ROOT_MAIL_SETTINGS
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "pobox", "serve", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + _START_DEADLINE
            while not socket_path.exists() and process.poll() is None:
                assert time.monotonic() < deadline, "pobox serve did not create the socket"
                time.sleep(0.05)
            client = smtplib.LMTP(str(socket_path))
            try:
                refused = client.sendmail("s@example.org", ["alice"], b"Subject: hi\r\n\r\nhi\r\n")
            finally:
                client.quit()
        finally:
            process.terminate()
            process.wait(10)
        files = list((tmp_path / "mail" / "alice" / "new").iterdir())
        assert {} == refused
        assert [b"Return-Path: <s@example.org>\nDelivered-To: alice\nSubject: hi\n\nhi\n"] == [
            split_received(path.read_bytes())[1] for path in files
        ]
        assert 0 == process.returncode
        assert not socket_path.exists()


class TestDeliveryFlood:
    """An SMTP flood on the same process: POP3 keeps serving, memory stays bounded."""

    def test_pop3_outlives_an_smtp_flood(self, tmp_path: Path) -> None:
        """300 idle connections from one address, four 40 MiB messages at once and five
        slow writers: POP3 logins and RETRs all succeed meanwhile, 280 of the idle
        connections are refused, the messages are delivered, and RSS grows < 150 MB."""
        deliver_to_maildir(tmp_path / "mail" / "alice", _MAILBOX_MESSAGE)
        with _pobox_serve(tmp_path) as serve:
            pid = serve.pid
            assert len(_MAILBOX_MESSAGE) == _pop3_round(serve.pop3)
            before = _rss(pid)
            peak = [before]
            stop, flood_done = threading.Event(), threading.Event()

            def sample() -> None:
                while not flood_done.wait(0.02):
                    peak.append(_rss(pid))

            def pop3_rounds() -> list[int]:
                sizes = []
                while not flood_done.is_set() or len(sizes) < 5:
                    sizes.append(_pop3_round(serve.pop3))
                return sizes

            with ThreadPoolExecutor(16) as pool:
                sampler = pool.submit(sample)
                slow = [pool.submit(_slow_writer, serve.smtp, stop) for _ in range(5)]
                large = [pool.submit(_send_large, serve.smtp) for _ in range(4)]
                idle = pool.submit(_idle_flood, serve.smtp, 300)
                pop3 = pool.submit(pop3_rounds)
                socks, first_lines = idle.result()
                replies = [future.result() for future in large]
                flood_done.set()
                sizes = pop3.result()
                stop.set()
                trickled = [future.result() for future in slow]
                sampler.result()
            for sock in socks:
                sock.close()
            peak.append(_rss(pid, "VmHWM"))
        grown = max(peak) - before
        print(  # the figures for the record (pytest -s)
            f"\nflood: RSS {before / 2**20:.0f} MiB before, peak {max(peak) / 2**20:.0f} MiB "
            f"(+{grown / 2**20:.1f} MiB); {len(sizes)} POP3 rounds; "
            f"{sum(1 for line in first_lines if line.startswith(b'220'))} of 300 served"
        )
        assert [b"250 2.0.0 Ok: delivered\r\n"] * 4 == replies
        assert {len(_MAILBOX_MESSAGE)} == set(sizes)
        assert 20 == sum(1 for line in first_lines if line.startswith(b"220 mx.pobox.test"))
        assert [_PER_ADDRESS] * 280 == [line for line in first_lines if line[:3] != b"220"]
        assert all(trickled)
        assert grown < _RSS_BOUND, f"RSS grew by {grown / 2**20:.0f} MiB"


class TestDurableBeforeAcknowledged:
    """The 250 after DATA is sent only once the message and its name are on disk."""

    def test_fsync_before_250(self, tmp_path: Path) -> None:
        """strace of pobox serve: the message file and new/ are fsynced before the 250."""
        strace = shutil.which("strace")
        assert strace is not None, "strace is not installed (Debian: apt install strace)"
        trace = tmp_path / "strace.log"
        wrapper = (strace, "-f", "-y", "-s", "64", "-o", str(trace))
        wrapper += ("-e", "trace=fsync,fdatasync,write,writev,sendto,sendmsg")
        with _pobox_serve(tmp_path, wrapper=wrapper) as serve:
            with smtplib.SMTP("127.0.0.1", serve.smtp, timeout=_CLIENT_DEADLINE) as client:
                body = b"Subject: durable\r\n\r\n" + (b"d" * 70 + b"\r\n") * 10_000
                refused = client.sendmail("s@example.org", ["alice@mx.pobox.test"], body)
        lines = trace.read_text().splitlines()
        acknowledged = next(i for i, line in enumerate(lines) if "250 2.0.0 Ok: delivered" in line)
        maildir = tmp_path / "mail" / "alice"
        synced = _completed_fsyncs(lines[:acknowledged])
        assert {} == refused
        assert any(path.startswith(f"{maildir}/tmp/") for path in synced), synced
        assert f"{maildir}/new" in synced, synced


def _completed_fsyncs(lines: list[str]) -> list[str]:
    """Return the paths of the fsyncs that returned 0 in these strace ``-f -y`` lines."""
    call = re.compile(r"^(\d+) +f(?:data)?sync\(\d+<([^>]*)>(\) += 0| <unfinished)")
    resumed = re.compile(r"^(\d+) +<\.\.\. f(?:data)?sync resumed>\) += 0")
    pending: dict[str, str] = {}
    done = []
    for line in lines:
        if match := call.match(line):
            if match.group(3).startswith(")"):
                done.append(match.group(2))
            else:
                pending[match.group(1)] = match.group(2)
        elif (match := resumed.match(line)) and match.group(1) in pending:
            done.append(pending.pop(match.group(1)))
    return done
