"""Real POP3 clients against a real pobox on loopback: poplib, curl, fetchmail, getmail6.

Each downloads a maildrop and the result is compared byte for byte with what was delivered
(clients store messages with LF line ends, so both sides are compared in that form). Every
test runs on each store: Maildir, and PostgreSQL on the throwaway cluster.
"""

from __future__ import annotations

import asyncio
import os
import poplib
import pwd
import random
import sys
from pathlib import Path

import pytest

from pobox.testing import RunningServer
from tests.helpers import need
from tests.helpers.dovecot import searchable_tmpdir

MESSAGES = [
    b"From: a@example.test\nSubject: plain\n\nhello\n",
    b"From: b@example.test\nSubject: dots\n\n.leading dot\n..two dots\n.\nend\n",
    b"From: c@example.test\r\nSubject: crlf stored\r\n\r\nbody with CRLF\r\n",
    b"From: d@example.test\nSubject: 8bit\n\ncaf\xc3\xa9 \xff\xfe bytes\n",
    b"From: e@example.test\nSubject: no final newline\n\nno newline at end",
]


def lf(data: bytes) -> bytes:
    """A message as clients store it: LF line ends, ending in a line end."""
    data = data.replace(b"\r\n", b"\n")
    return data if data.endswith(b"\n") else data + b"\n"


async def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> bytes:
    """Run a program, return its stdout; fail with its output if it exits non-zero."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert 0 == proc.returncode, f"{argv[0]} failed: {err.decode(errors='replace')}"
    return out


def remaining(srv: RunningServer, user: str = "alice") -> int:
    """Messages left in the user's maildrop."""
    return srv.count(user)


@pytest.fixture
def srv(any_srv: RunningServer) -> RunningServer:
    """Every client test runs against each store: Maildir and PostgreSQL."""
    return any_srv


class TestPoplib:
    """Python's poplib, the stdlib client."""

    async def test_download_and_delete(self, srv: RunningServer) -> None:
        """poplib lists, retrieves byte-identical messages and deletes them on QUIT."""
        for m in MESSAGES:
            srv.deliver("alice", m)

        def session() -> list[bytes]:
            pop = poplib.POP3(srv.host, srv.port, timeout=10)
            pop.user("alice")
            pop.pass_("secret")
            count, _ = pop.stat()
            got = []
            for n in range(1, count + 1):
                _, lines, octets = pop.retr(n)
                body = b"\r\n".join(lines) + b"\r\n"
                assert len(body) == octets  # poplib's octets count the CRLFs and final CRLF
                got.append(b"\n".join(lines) + b"\n")
                pop.dele(n)
            pop.quit()
            return got

        got = await asyncio.to_thread(session)
        assert [lf(m) for m in MESSAGES] == got
        assert 0 == remaining(srv)

    async def test_list_sizes_match_retr(self, srv: RunningServer) -> None:
        """Every LIST size equals the octets RETR sends before the terminator."""
        stored = [*MESSAGES, MESSAGES[0], MESSAGES[4]]
        for m in MESSAGES:
            srv.deliver("alice", m)
        for m in stored[len(MESSAGES) :]:
            srv.deliver("alice", m, sizes=False)  # sizes computed by reading the file

        def session() -> list[tuple[int, int]]:
            pop = poplib.POP3(srv.host, srv.port, timeout=10)
            pop.user("alice")
            pop.pass_("secret")
            _, listing, _ = pop.list()
            pairs = []
            for entry in listing:
                num, size = entry.split()
                _, lines, _ = pop.retr(int(num))
                wire = sum(len(x) + 2 for x in lines)  # poplib's lines are unstuffed
                if not stored[int(num) - 1].endswith(b"\n"):
                    wire -= 2  # the CRLF added before the terminator is not counted
                pairs.append((int(size), wire))
            pop.quit()
            return pairs

        pairs = await asyncio.to_thread(session)
        assert len(stored) == len(pairs)
        for size, wire in pairs:
            assert size == wire

    async def test_large_binary_message(self, srv: RunningServer) -> None:
        """A 5 MB 8-bit message (no NULs, lines within RFC 5322's 998) comes back unchanged."""
        rnd = random.Random(1939)
        octets = [b for b in range(1, 256) if b not in (10, 13)]
        lines = [bytes(rnd.choices(octets, k=rnd.randint(0, 998))) for _ in range(10_000)]
        message = b"Subject: big\n\n" + b"\n".join(lines) + b"\n"
        srv.deliver("alice", message)

        def session() -> bytes:
            pop = poplib.POP3(srv.host, srv.port, timeout=30)
            pop.user("alice")
            pop.pass_("secret")
            _, lines, _ = pop.retr(1)
            pop.quit()
            return b"\n".join(lines) + b"\n"

        got = await asyncio.to_thread(session)
        assert lf(message) == got

    async def test_uidl_stable_across_sessions(self, srv: RunningServer) -> None:
        """UIDLs are the same in two sessions and unique within one."""
        for m in MESSAGES:
            srv.deliver("alice", m)
        srv.deliver("alice", MESSAGES[0])  # a second copy needs its own UIDL

        def uidls() -> list[bytes]:
            pop = poplib.POP3(srv.host, srv.port, timeout=10)
            pop.user("alice")
            pop.pass_("secret")
            _, listing, _ = pop.uidl()
            pop.quit()
            return listing

        first = await asyncio.to_thread(uidls)
        second = await asyncio.to_thread(uidls)
        assert first == second
        ids = [x.split()[1] for x in first]
        assert len(MESSAGES) + 1 == len(set(ids))
        assert all(0 < len(i) <= 70 and all(0x21 <= b <= 0x7E for b in i) for i in ids)


@pytest.mark.external
class TestCurl:
    """curl's pop3:// support."""

    async def test_list_and_retrieve(self, srv: RunningServer) -> None:
        """curl lists the maildrop and retrieves each message unchanged."""
        curl = need("curl")
        for m in MESSAGES:
            srv.deliver("alice", m)
        url = f"pop3://{srv.host}:{srv.port}/"
        listing = await run(curl, "-sS", "--user", "alice:secret", url)
        sizes = [len(m) + m.count(b"\n") - m.count(b"\r\n") for m in MESSAGES]
        assert b"".join(b"%d %d\r\n" % (i, s) for i, s in enumerate(sizes, 1)) == listing
        for i, m in enumerate(MESSAGES, 1):
            got = await run(curl, "-sS", "--user", "alice:secret", f"{url}{i}")
            assert lf(m) == lf(got)

    async def test_wrong_password_fails(self, srv: RunningServer) -> None:
        """curl reports a login failure (exit 67) on a wrong password."""
        curl = need("curl")
        proc = await asyncio.create_subprocess_exec(
            curl, "-sS", "--user", "alice:nope", f"pop3://{srv.host}:{srv.port}/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await proc.communicate()
        assert 67 == proc.returncode


MDA = """\
import os, sys, time
data = sys.stdin.buffer.read()
name = os.path.join(sys.argv[1], f"{time.time_ns()}-{os.getpid()}.eml")
with open(name, "wb") as f:
    f.write(data)
"""


async def fetchmail_all(fetchmail: str, srv: RunningServer, tmp_path: Path) -> Path:
    """Run ``fetchmail`` once as alice (fetchall, no keep: it deletes what it fetched), each
    message handed to :data:`MDA`; return the folder the MDA wrote the messages into."""
    home = tmp_path / "fm-home"
    out = tmp_path / "fm-out"
    home.mkdir()
    out.mkdir()
    mda = tmp_path / "mda.py"
    mda.write_text(MDA)
    rc = home / ".fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f"poll {srv.host} with proto POP3 port {srv.port} uidl\n"
        f'  user "alice" there with password "secret" is "alice" here\n'
        f'  options fetchall no keep sslproto "" no sslcertck\n'
        f'  mda "{sys.executable} {mda} {out}"\n'
    )
    rc.chmod(0o600)
    await run(
        fetchmail, "-f", str(rc), "--nodetach", "--nosyslog", "--invisible",
        "--pidfile", str(home / "pid"),
        env={"HOME": str(home), "FETCHMAILHOME": str(home)},
    )  # fmt: skip
    return out


@pytest.mark.external
class TestFetchmail:
    """fetchmail, the classic retrieval client."""

    async def test_fetch_all_and_delete(self, srv: RunningServer, tmp_path: Path) -> None:
        """fetchmail downloads every message unchanged and deletes them from the server."""
        fetchmail = need("fetchmail")
        for m in MESSAGES:
            srv.deliver("alice", m)
        out = await fetchmail_all(fetchmail, srv, tmp_path)
        got = sorted(p.read_bytes() for p in out.iterdir())
        assert sorted(lf(m) for m in MESSAGES) == got
        assert 0 == remaining(srv)


@pytest.mark.external
class TestGetmail:
    """getmail6, the modern retrieval client."""

    async def test_fetch_into_maildir_and_delete(self, srv: RunningServer, tmp_path: Path) -> None:
        """getmail6 downloads into a Maildir unchanged and deletes on the server."""
        getmail = need("getmail")
        for m in MESSAGES:
            srv.deliver("alice", m)
        with searchable_tmpdir() as shared:
            await self._fetch(getmail, srv, tmp_path, shared / "gm-maildir")

    @staticmethod
    async def _fetch(getmail: str, srv: RunningServer, tmp_path: Path, dest: Path) -> None:
        # getmail refuses to deliver as root; as root it delivers as `user` (nobody).
        as_root = os.getuid() == 0
        for sub in ("cur", "new", "tmp"):
            (dest / sub).mkdir(parents=True)
            if as_root:
                os.chown(dest / sub, pwd.getpwnam("nobody").pw_uid, -1)
        gdir = tmp_path / "gm"
        gdir.mkdir()
        (gdir / "getmailrc").write_text(
            "[retriever]\n"
            "type = SimplePOP3Retriever\n"
            f"server = {srv.host}\n"
            f"port = {srv.port}\n"
            "username = alice\n"
            "password = secret\n"
            "[destination]\n"
            "type = Maildir\n"
            f"path = {dest}/\n" + ("user = nobody\n" if as_root else "") + "[options]\n"
            "delete = true\n"
            "received = false\n"
            "delivered_to = false\n"
            "read_all = true\n"
            "message_log_syslog = false\n"
        )
        await run(getmail, "--getmaildir", str(gdir), "--rcfile", "getmailrc", "--quiet")
        # getmail's Maildir destination always prepends the envelope sender, which POP3
        # does not carry: that one header is getmail's, everything after it must be ours.
        added = b"Return-Path: <unknown>\n"
        files = [p.read_bytes() for p in (dest / "new").iterdir()]
        assert all(f.startswith(added) for f in files)
        got = sorted(f[len(added) :] for f in files)
        assert sorted(lf(m) for m in MESSAGES) == got
        assert 0 == remaining(srv)
