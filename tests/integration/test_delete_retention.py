"""``pop3_delete_retention`` end to end: a real client deletes, ``pobox restore`` brings it back.

The "my client deleted everything" case: poplib deletes with DELE and QUIT, the messages are
gone from LIST, ``pobox restore`` (the real command, in a process of its own) lists them and
brings them back, and the next session lists them with the same UIDLs, sizes and bytes, so a
client that leaves mail on the server and remembers UIDLs does not fetch them twice. The first
test runs on PostgreSQL too (``mail_location = "postgresql"`` on the throwaway cluster), with
Junk listed (``pop3_folders``): a Junk message deleted is kept too, and comes back into Junk.
"""

from __future__ import annotations

import asyncio
import poplib
import subprocess
import sys
from pathlib import Path

import pytest

from pobox.testing import RunningServer, running_server

MESSAGES = [
    b"Subject: one\r\n\r\nfirst body\r\n",
    b"Subject: two\r\n\r\nsecond\r\n..dot-stuffed line\r\n",
    b"Subject: three\r\n\r\nthird\r\n",
]
SPAM = b"Subject: cheap pills\r\n\r\nbuy now\r\n"


def _session(srv: RunningServer, delete: tuple[int, ...] = ()) -> list[tuple[str, int, bytes]]:
    """Log in, return (UIDL, size, RETR bytes) of every message, DELE ``delete``, QUIT."""
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    client.user("alice")
    client.pass_("secret")
    _, uidl_lines, _ = client.uidl()
    _, list_lines, _ = client.list()
    out = []
    for uidl_line, list_line in zip(uidl_lines, list_lines, strict=True):
        number, uidl = uidl_line.decode().split()
        size = int(list_line.split()[1])
        _, lines, _ = client.retr(int(number))
        out.append((uidl, size, b"\r\n".join(lines)))
    for number in delete:
        client.dele(number)
    client.quit()
    return out


def _config(srv: RunningServer) -> Path:
    """Write the running server's configuration, as an admin's TOML file would have it."""
    path = srv.root / "pobox.toml"
    database = f'postgresql_dsn = "{srv.config.postgresql_dsn}"\n' if srv.in_database else ""
    folders = ", ".join(f'"{name}"' for name in srv.config.pop3_folders)
    path.write_text(
        database + f'mail_location = "{srv.config.mail_location}"\n'
        f"pop3_folders = [{folders}]\n"
        f'passwd_file = "{srv.config.passwd_file}"\n'
        'pop3_delete_retention = "7d"\n'
        # The test server serves mail as root (this process): the owner of the mail, which
        # ``pobox restore`` started as root becomes, is root too (never do that in production).
        "mail_uid = 0\nmail_gid = 0\n"
        "first_valid_uid = 0\n"
        "first_valid_gid = 0\n"
    )
    return path


def _restore(config: Path, *args: str) -> list[str]:
    """Run ``pobox restore alice ARGS -c CONFIG``; return its output lines."""
    done = subprocess.run(
        [sys.executable, "-m", "pobox", "restore", "alice", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (0, "") == (done.returncode, done.stderr)
    return done.stdout.splitlines()


@pytest.mark.parametrize("where", ["maildir", "postgresql"])
async def test_deleted_by_client_restored_with_same_uidls(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    """DELE + QUIT, gone from LIST; ``pobox restore`` brings back UIDL, size and bytes, the
    Junk message into Junk."""
    store: dict[str, object] = {}
    if where == "postgresql":
        store = {"mail_location": "postgresql", "postgresql_dsn": request.getfixturevalue("pg_dsn")}
    async with running_server(
        tmp_path, pop3_delete_retention="7d", pop3_folders=["INBOX", "Junk"], **store
    ) as srv:
        for data in MESSAGES:
            srv.deliver("alice", data)
        srv.deliver_to_folder("alice", "Junk", SPAM)
        before = await asyncio.to_thread(_session, srv, (1, 3, 4))
        after_delete = await asyncio.to_thread(_session, srv)
        junk_after_delete = srv.count_folder("alice", "Junk")
        config = _config(srv)
        listed = await asyncio.to_thread(_restore, config, "--list")
        restored = await asyncio.to_thread(_restore, config)
        after_restore = await asyncio.to_thread(_session, srv)
        junk_after_restore = srv.count_folder("alice", "Junk")
    assert [before[1]] == after_delete
    assert (0, 1) == (junk_after_delete, junk_after_restore)
    deleted = [before[0], before[2], before[3]]
    assert sorted(m[0] for m in deleted) == sorted(line.split()[0] for line in listed)
    assert sorted(str(m[1]) for m in deleted) == sorted(line.split()[1] for line in listed)
    assert [["Junk"]] == [line.split()[3:] for line in listed if len(line.split()) > 3]
    assert "restored 3 message(s) into the maildrop of alice" == restored[-1]
    assert sorted(before) == sorted(after_restore)


async def test_restore_one_uidl_leaves_the_rest_kept(tmp_path: Path) -> None:
    """``--uidl`` restores only that message; ``--list`` still shows the other."""
    async with running_server(tmp_path, pop3_delete_retention="7d") as srv:
        for data in MESSAGES[:2]:
            srv.deliver("alice", data)
        before = await asyncio.to_thread(_session, srv, (1, 2))
        config = _config(srv)
        await asyncio.to_thread(_restore, config, "--uidl", before[1][0])
        after = await asyncio.to_thread(_session, srv)
        listed = await asyncio.to_thread(_restore, config, "--list")
    assert [before[1]] == after
    assert [before[0][0]] == [line.split()[0] for line in listed]


async def test_without_retention_deleted_mail_is_gone(tmp_path: Path) -> None:
    """Off by default: nothing is kept, and ``pobox restore`` says the key is needed."""
    async with running_server(tmp_path) as srv:
        srv.deliver("alice", MESSAGES[0])
        await asyncio.to_thread(_session, srv, (1,))
        assert not (srv.maildir("alice") / ".pobox-deleted").exists()
        config = _config(srv)
        config.write_text(config.read_text().replace('"7d"', '"0"'))
        done = subprocess.run(
            [sys.executable, "-m", "pobox", "restore", "alice", "-c", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    assert 0 != done.returncode
    assert "pop3_delete_retention" in done.stderr
    assert "Traceback" not in done.stderr


async def test_since_picks_by_deletion_time(tmp_path: Path) -> None:
    """``--since`` a future date restores nothing; ``--since 1h`` (a duration ago) all."""
    async with running_server(tmp_path, pop3_delete_retention="7d") as srv:
        srv.deliver("alice", MESSAGES[0])
        before = await asyncio.to_thread(_session, srv, (1,))
        config = _config(srv)
        future = await asyncio.to_thread(_restore, config, "--since", "2099-01-01T00:00")
        recent = await asyncio.to_thread(_restore, config, "--since", "1h")
        after = await asyncio.to_thread(_session, srv)
    assert ["restored 0 message(s) into the maildrop of alice"] == future
    assert "restored 1 message(s) into the maildrop of alice" == recent[-1]
    assert before == after
