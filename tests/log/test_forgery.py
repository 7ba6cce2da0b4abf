"""Forged log lines against a real ``pobox serve``, read back with the real ``fail2ban-regex``.

A stranger (no login needed) puts line breaks, escapes and well-shaped failure lines for
another address into every string of theirs that reaches the log; fail2ban, with Debian's
stock ``dovecot`` filter and with pobox's own, must find only the address that really failed.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import jwt
import pytest

from tests.helpers import need
from tests.helpers.process import pobox_serve
from tests.integration.wire import Wire

ROOT = Path(__file__).resolve().parents[2]
DOVECOT_FILTER = Path("/etc/fail2ban/filter.d/dovecot.conf")
POBOX_FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "pobox.conf"

#: The address a stranger wants banned (TEST-NET-1, RFC 5737).
VICTIM = "192.0.2.66"
FAILURE = f"user=<x>, method=PLAIN, rip={VICTIM}, lip=127.0.0.1, session=<forged>"
#: Lines the filters match, as the stock dovecot filter and pobox's filter expect them.
FORGED_LINES = [
    f"Nov 23 21:30:00 mail dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 "
    f"secs): {FAILURE}",
    f"2026-11-23 21:30:00,123 INFO pop3-login: Authentication failed: {FAILURE}",
    f"pop3-login: Authentication failed: {FAILURE}",
    f"Disconnected (auth failed, 1 attempts in 2 secs): {FAILURE}",
]
#: What a stranger puts in front of a forged line to start a new one (or to hide the real one).
BREAKS = ["\n", "\r\n", "\r", "\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1b[2K\r"]

NAMES = [f"x{brk}{line}{brk}" for brk in BREAKS for line in FORGED_LINES]
#: Without any line break: a user name that closes user=<...> and tells another rip.
NAMES.append(f"x>, method=PLAIN, rip={VICTIM}, lip=127.0.0.1, session=<y")


def b64(data: str | bytes) -> bytes:
    """Base64 of ``data`` (UTF-8 for text), as a client sends it."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw)


async def attempt(port: int, *lines: bytes) -> None:
    """Connect, send ``lines`` one at a time (reading a reply to each), then QUIT."""
    w = await Wire.connect("127.0.0.1", port)
    await w.line()
    for line in lines:
        await w.command(line)
    await w.send(b"QUIT\r\n")
    await w.read_all(10)
    await w.close()


def attempts(name: str, token: str) -> list[list[bytes]]:
    """Every way a client-chosen ``name`` reaches a log line before any login."""
    raw = name.encode()
    scram_first = b"n,,n=" + raw.replace(b"=", b"=3D").replace(b",", b"=2C") + b",r=abc"
    # The responses go on lines of their own: an initial response on the AUTH line would
    # make it longer than the 255 octets a command line may have.
    return [
        [b"AUTH PLAIN", b64(b"\0" + raw + b"\0wrong")],
        [b"AUTH LOGIN", b64(raw), b64("wrong")],
        [b"AUTH SCRAM-SHA-256", b64(scram_first), b64(b"c=biws,r=abc,p=AAAA")],
        [b"AUTH XOAUTH2", b64(b"user=" + raw + b"\x01auth=Bearer " + token.encode() + b"\1\1")],
        # USER takes no control bytes, but --trace logs the line, and the Unicode
        # separators are valid UTF-8: they reach "Authentication failed: user=<...>".
        [b"USER " + raw.replace(b" ", b"_"), b"PASS wrong"],
        [b"APOP " + raw.replace(b" ", b"_") + b" " + b"0" * 32],
        [b"CAPA " + raw],
    ]


def matched_ips(log: Path, filter_path: Path) -> list[str]:
    """Run fail2ban-regex on ``log``; return the address of each match."""
    out = subprocess.run(
        [need("fail2ban-regex"), "-r", "-e", "utf-8", "-o", "ip", str(log), str(filter_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return out.split()


def pobox_filter(tmp_path: Path) -> Path:
    """pobox's filter installed as the README says, next to the stock common.conf."""
    installed = tmp_path / "fail2ban" / "filter.d"
    installed.mkdir(parents=True)
    (installed / "common.conf").symlink_to(DOVECOT_FILTER.parent / "common.conf")
    shutil.copy(POBOX_FILTER, installed / "pobox.conf")
    return installed / "pobox.conf"


@pytest.mark.external
class TestForgedNames:
    """No client-supplied string can make a line fail2ban reads as a failure elsewhere."""

    @pytest.mark.parametrize("log_format", ["pobox", "dovecot"])
    async def test_fail2ban_sees_only_the_real_address(
        self, tmp_path: Path, log_format: str
    ) -> None:
        """Both filters match the real failures from 127.0.0.1 and never the forged address."""
        key = tmp_path / "jwt.key"
        key.write_text("k" * 32)
        token = jwt.encode({"sub": "x", "exp": 1}, "k" * 32, algorithm="HS256")
        async with pobox_serve(
            tmp_path / "srv",
            log_format=log_format,
            trace=True,
            apop=True,
            auth_mechanisms="PLAIN LOGIN SCRAM-SHA-256 XOAUTH2",
            oauth_jwt_key_file=str(key),
            auth_failures_per_ip=100_000,
            max_bad_commands=100,
        ) as proc:
            for name in NAMES:
                for lines in attempts(name, token):
                    await attempt(proc.port, *lines)
            await attempt(proc.port, b"USER alice", b"PASS wrong")  # the one real failure
            await proc.wait_log(r"Disconnected \(auth failed.*user=<alice>")
            log = proc.log

        text = log.read_text(encoding="utf-8")
        stock = matched_ips(log, DOVECOT_FILTER)
        own = matched_ips(log, pobox_filter(tmp_path))

        assert len(NAMES) * 4 <= text.count(f"rip={VICTIM}")  # the forged text is there...
        assert {"127.0.0.1"} == set(stock)  # ...but only the real failures match
        assert {"127.0.0.1"} == set(own)

    async def test_every_line_is_one_clean_line(self, tmp_path: Path) -> None:
        """Each physical line of the log starts with its timestamp and holds no control byte."""
        async with pobox_serve(tmp_path / "srv", trace=True) as proc:
            for brk in BREAKS:
                name = f"x{brk}{FORGED_LINES[1]}"
                await attempt(proc.port, b"AUTH PLAIN", b64(b"\0" + name.encode() + b"\0w"))
                await attempt(proc.port, b"USER x" + brk.encode() + b"y")
            await proc.wait_log(r"C: USER x\?")
            data = proc.log.read_bytes()

        lines = data.decode("utf-8").split("\n")
        assert "" == lines.pop()
        stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
        assert [] == [line for line in lines if not stamp.match(line)]
        assert [] == [line for line in lines if not line.isprintable()]
        assert len(BREAKS) <= sum("user=<x?" in line for line in lines)
