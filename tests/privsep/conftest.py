"""Fixtures for the owner's-rights tests: system users, their maildirs, a raw storage helper."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pobox.storage.privsep._wire import (
    FrameAssembler,
    close_fds,
    receive_frame,
    send_frame,
    socket_pair,
)
from tests.helpers.accounts import (
    ALICE,
    BOB,
    Account,
    chown_tree,
    system_user,
)
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.maildir import deliver

#: What every test maildrop of alice's holds, and bob's secret.
ALICE_MESSAGE = b"Subject: for alice\n\nhello alice\n"
BOB_SECRET = b"Subject: for bob\n\nBOB-SECRET-1939\n"
ROOT_SECRET = b"ROOT-SECRET-2449\n"


@dataclass
class World:
    """Two system users with their maildirs, and a root-only file, under a searchable folder."""

    root: Path
    alice: Account
    bob: Account
    secret: Path

    def home(self, who: Account) -> Path:
        """The home directory (userdb ``home``) of ``who``."""
        return self.root / "home" / who.name

    def maildir(self, who: Account) -> Path:
        """``~/Maildir`` of ``who``."""
        return self.home(who) / "Maildir"

    def user(self, who: Account, **fields: Any) -> dict[str, Any]:
        """The user record of ``who`` as a request carries it."""
        record = {"name": who.name, "uid": who.uid, "gid": who.gid, "home": str(self.home(who))}
        record["mail"] = None
        record.update(fields)
        return record

    def passwd_line(self, who: Account, password: str = "secret") -> str:
        """A passwd-file line for ``who`` with its uid, gid and home."""
        return f"{who.name}:{{PLAIN}}{password}:{who.uid}:{who.gid}::{self.home(who)}::\n"


@pytest.fixture
def world() -> Iterator[World]:
    """alice and bob, each owning a maildir with one message (0700 homes), and a root file."""
    alice, bob = system_user(ALICE), system_user(BOB)
    with searchable_tmpdir() as root:
        secret = root / "root-only"
        secret.write_bytes(ROOT_SECRET)
        secret.chmod(0o600)
        made = World(root, alice, bob, secret)
        for who, data in ((alice, ALICE_MESSAGE), (bob, BOB_SECRET)):
            home = made.home(who)
            deliver(made.maildir(who), data)
            home.chmod(0o700)
            chown_tree(home, who)
        yield made


@dataclass
class RawHelper:
    """A storage helper process driven frame by frame, as a (possibly hostile) serving process."""

    process: subprocess.Popen[bytes]
    sock: socket.socket
    files: socket.socket
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    def send(self, frame: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send one frame."""
        send_frame(self.sock, frame, fds)

    def receive(self, sock: socket.socket | None = None) -> tuple[dict[str, Any], list[int]]:
        """Receive one frame (on the main socket by default)."""
        received = receive_frame(sock or self.sock, FrameAssembler(1 << 30))
        assert received is not None, "the helper closed the connection"
        return received

    def request(
        self, op: str, fds: Sequence[int] = (), **fields: Any
    ) -> tuple[dict[str, Any], list[int]]:
        """Send a request and return its answer."""
        request_id = next(self.ids)
        self.send({"id": request_id, "op": op, **fields}, fds)
        answer, received = self.receive()
        assert request_id == answer["id"]
        return answer, received

    def ok(
        self, op: str, fds: Sequence[int] = (), **fields: Any
    ) -> tuple[dict[str, Any], list[int]]:
        """Send a request that must succeed; return its ``ok`` fields and descriptors."""
        answer, received = self.request(op, fds, **fields)
        assert "ok" in answer, answer
        return answer["ok"], received

    def stop(self) -> tuple[int, str]:
        """Close the sockets; return the exit status and what the helper logged."""
        self.sock.close()
        self.files.close()
        _, err = self.process.communicate(timeout=30)
        return self.process.returncode, err.decode()


def settings(**changes: Any) -> dict[str, Any]:
    """The hello settings of a test helper (Dovecot's default ranges)."""
    values: dict[str, Any] = {
        "location": "maildir:~/Maildir",
        "mail_uid": None,
        "mail_gid": None,
        "first_valid_uid": 500,
        "last_valid_uid": 0,
        "first_valid_gid": 1,
        "last_valid_gid": 0,
        "files": {},
        "appends": {},
        "workers": 4,
    }
    values.update(changes)
    return values


def start_helper(hello: dict[str, Any] | None = None) -> RawHelper:
    """Start ``python -m pobox.storage.privsep`` as root; send ``hello`` settings if given."""
    ours, theirs = socket_pair()
    files_ours, files_theirs = socket_pair()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pobox.storage.privsep",
            str(theirs.fileno()),
            str(files_theirs.fileno()),
        ],
        pass_fds=(theirs.fileno(), files_theirs.fileno()),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    files_theirs.close()
    ours.settimeout(30)
    files_ours.settimeout(30)
    helper = RawHelper(process, ours, files_ours)
    if hello is not None:
        try:
            helper.send({"id": 1, "op": "hello", "settings": hello})
            answer, fds = helper.receive()
            close_fds(fds)
            assert {"id": 1, "ok": {"pid": process.pid}} == answer
        except BaseException:
            helper.stop()
            raise
    return helper


@pytest.fixture
def helper() -> Iterator[RawHelper]:
    """A storage helper with Dovecot's default ranges, stopped at the end."""
    running = start_helper(settings())
    yield running
    if running.process.poll() is None:
        running.stop()


def read_fd(fd: int) -> bytes:
    """Read a received descriptor to its end and close it."""
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
