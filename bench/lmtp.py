"""LMTP delivery throughput: pobox against Dovecot's LMTP, same machine, same run.

Both servers get the same load: ``--messages`` messages of ``--size`` octets sent by
``--clients`` parallel LMTP connections (stdlib ``smtplib.LMTP`` in threads), one recipient
per transaction; every message must get ``250``. Each server writes Maildir and fsyncs before
it answers (Dovecot: ``mail_fsync = optimized``, its default). pobox runs as
``python -m pobox serve`` in its own process, Dovecot as ``dovecot -F`` from
``tests/helpers/dovecot.py``. After each run the messages in the maildir are counted.

Usage: ``.venv/bin/python bench/lmtp.py [--messages 2000] [--clients 4] [--size 2048]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.dovecot import running_dovecot, searchable_tmpdir

from pobox.auth.passwdfile import add_user

HOST = "127.0.0.1"


def _message(number: int, size: int) -> str:
    head = f"From: bench@example.org\r\nSubject: {number}\r\nMessage-ID: <{number}@bench>\r\n\r\n"
    line = "x" * 70 + "\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def _client(port: int, rcpt: str, numbers: range, size: int) -> int:
    ok = 0
    with smtplib.LMTP(HOST, port) as client:
        for number in numbers:
            if not client.sendmail("bench@example.org", [rcpt], _message(number, size)):
                ok += 1
    return ok


def _load(port: int, rcpt: str, messages: int, clients: int, size: int) -> tuple[float, int]:
    """Send the load; return the seconds it took and the number of 250 replies."""
    per = messages // clients
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(
            pool.map(
                lambda i: _client(port, rcpt, range(i * per, (i + 1) * per), size),
                range(clients),
            )
        )
    return time.perf_counter() - start, done


def _count(maildir: Path) -> int:
    return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur") if (maildir / sub).is_dir())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    msg = f"nothing listens on {HOST}:{port}"
    raise RuntimeError(msg)


def bench_pobox(root: Path, args: argparse.Namespace) -> tuple[float, int, int]:
    """Run pobox's LMTP listener in its own process and load it."""
    add_user(root / "passwd", "alice", b"secret", scheme="PLAIN")
    lmtp = _free_port()
    config = root / "pobox.toml"
    config.write_text(
        f'listen = ["{HOST}:{_free_port()}"]\n'
        f'lmtp_listen = ["{HOST}:{lmtp}"]\n'
        f'mail_location = "maildir:{root}/mail/%u"\n'
        f'passwd_file = "{root / "passwd"}"\n'
        'log_level = "warning"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pobox", "serve", "-c", str(config)], stdin=subprocess.DEVNULL
    )
    try:
        _wait_port(lmtp)
        seconds, done = _load(lmtp, "alice", args.messages, args.clients, args.size)
    finally:
        process.terminate()
        process.wait(10)
    return seconds, done, _count(root / "mail" / "alice")


def bench_dovecot(args: argparse.Namespace) -> tuple[float, int, int]:
    """Run Dovecot with its LMTP service on a loopback port and load it."""
    lmtp = _free_port()
    extra = (
        "protocols = pop3 lmtp\n"
        "service lmtp {\n"
        f"  inet_listener lmtp {{\n    address = {HOST}\n    port = {lmtp}\n  }}\n"
        "}\n"
    )
    with (
        searchable_tmpdir() as tmp,
        running_dovecot(tmp, {"alice": "secret"}, extra_config=extra) as dovecot,
    ):
        _wait_port(lmtp)
        seconds, done = _load(lmtp, "alice", args.messages, args.clients, args.size)
        count = _count(dovecot.homes["alice"] / "Maildir")
    return seconds, done, count


def main() -> None:
    """Run both benchmarks and print messages per second."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    results = {}
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"pobox-bench-lmtp-{os.getpid()}"
    root.mkdir()
    try:
        results["pobox"] = bench_pobox(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["dovecot"] = bench_dovecot(args)
    print(
        f"LMTP delivery: {args.messages} messages of ~{args.size} octets, "
        f"{args.clients} connections, one recipient each"
    )
    for name, (seconds, done, stored) in results.items():
        print(
            f"  {name:8} {done / seconds:8.0f} msg/s  ({done} acknowledged in {seconds:.2f} s, "
            f"{stored} in the maildir)"
        )
    ratio = (results["pobox"][1] / results["pobox"][0]) / (
        results["dovecot"][1] / results["dovecot"][0]
    )
    print(f"  pobox / dovecot: {ratio:.2f}")


if __name__ == "__main__":
    main()
