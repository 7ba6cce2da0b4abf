"""The storage helper, spoken to frame by frame as a hostile serving process would.

The helper is a real root process (``python -m pobox.storage.privsep``); the maildirs belong
to real system users; whatever is refused is refused by the helper's checks or by the kernel,
which sees the owner's filesystem uid/gid.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from pobox.storage._safefs import Dir
from pobox.storage.maildir import _fs
from pobox.storage.maildir._fs import SessionLock, refresh_session_locks
from pobox.storage.privsep._fsid import become, owner_rights, thread_ids
from pobox.storage.privsep._wire import send_frame
from pobox.storage.spool import Spool
from tests.privsep.conftest import (
    ALICE_MESSAGE,
    BOB_SECRET,
    ROOT_SECRET,
    RawHelper,
    World,
    read_fd,
    settings,
    start_helper,
)

LOCK = "dovecot-pop3-session.lock"


def _deliver(
    helper: RawHelper, user: dict[str, Any], data: bytes, header: str = ""
) -> dict[str, Any]:
    """Send a deliver request with ``data`` as the body (a memory file); return the answer."""
    body = Spool.from_bytes(data)
    fd = body.export_fd()
    try:
        answer, _ = helper.request(
            "deliver",
            [fd],
            user=user,
            header=header,
            quota=None,
            wire_size=body.wire_size,
            digest=body.digest,
        )
    finally:
        os.close(fd)
    return answer


def _fetch_all(helper: RawHelper, handle: int, keys: list[str]) -> list[bytes | str]:
    """Fetch every key: the bytes, or the error kind."""
    out: list[bytes | str] = []
    for key in keys:
        answer, fds = helper.request("fetch", handle=handle, key=key)
        out.append(read_fd(fds[0]) if "ok" in answer else answer["error"]["kind"])
    return out


class TestOwnerChecks:
    """The helper finds the owner itself and refuses root and system uids, whatever it is told."""

    @pytest.mark.parametrize(("uid", "gid"), [(0, 0), (1, 1), (499, 1000), (1000, 0)])
    def test_low_ids_refused(self, helper: RawHelper, world: World, uid: int, gid: int) -> None:
        """uid 0, a system uid or gid 0 is refused before any file is touched, and logged."""
        before = sorted(os.listdir(world.maildir(world.alice)))
        answer, fds = helper.request(
            "open", user=world.user(world.alice, uid=uid, gid=gid), lock=True
        )
        assert [] == fds
        assert "refused" == answer["error"]["kind"]
        assert "not permitted (below first_valid_" in answer["error"]["message"]
        assert before == sorted(os.listdir(world.maildir(world.alice)))
        _, log = helper.stop()
        assert "refused a request: mail access for user" in log

    def test_no_owner_refused(self, helper: RawHelper, world: World) -> None:
        """A user without uid (no mail_uid set) is refused: the helper never uses its own root."""
        answer, _ = helper.request("usage", user=world.user(world.alice, uid=None, gid=None))
        assert "refused" == answer["error"]["kind"]
        assert "has no uid" in answer["error"]["message"]

    def test_deliver_as_root_refused(self, helper: RawHelper, world: World) -> None:
        """A delivery for uid 0 is refused and writes nothing."""
        answer = _deliver(helper, world.user(world.alice, uid=0, gid=0), b"Subject: x\n\nroot?\n")
        assert "refused" == answer["error"]["kind"]
        assert 1 == len(os.listdir(world.maildir(world.alice) / "new"))

    def test_mail_uid_for_users_without_uid(self, world: World) -> None:
        """With mail_uid in the settings, a user without uid is served as mail_uid."""
        running = start_helper(settings(mail_uid=world.alice.uid, mail_gid=world.alice.gid))
        try:
            ok, _ = running.ok("usage", user=world.user(world.alice, uid=None, gid=None))
        finally:
            running.stop()
        assert {"octets": len(ALICE_MESSAGE), "messages": 1} == ok

    def test_second_hello_refused(self, helper: RawHelper, world: World) -> None:
        """The settings come once, at start: a later hello (lowering the range) is refused."""
        answer, _ = helper.request("hello", settings=settings(first_valid_uid=0, first_valid_gid=0))
        assert "invalid" == answer["error"]["kind"]
        again, _ = helper.request("open", user=world.user(world.alice, uid=0, gid=0), lock=False)
        assert "refused" == again["error"]["kind"]


class TestKernelRefuses:
    """Files the owner cannot read are not served: the kernel says no to the helper's thread."""

    def _plant(self, world: World, target: str, name: str) -> None:
        """Hard-link ``target`` into alice's new/ (root can; alice could not read it anyway)."""
        os.link(target, world.maildir(world.alice) / "new" / name)

    @pytest.mark.parametrize("target", ["root-only file", "bob's message"])
    def test_hard_links_refused(self, helper: RawHelper, world: World, target: str) -> None:
        """A hard link in alice's new/ to a root-only file or to bob's 0600 message never
        yields its bytes: refused at open, or at its fetch; alice's own message is served."""
        if target == "root-only file":
            self._plant(world, str(world.secret), "1700000000.M1P1.planted,S=17,W=18")
        else:
            bob_new = world.maildir(world.bob) / "new"
            bob_file = bob_new / next(iter(os.listdir(bob_new)))
            bob_file.chmod(0o600)
            self._plant(world, str(bob_file), "1700000000.M2P2.planted,S=33,W=36")
        answer, _ = helper.request("open", user=world.user(world.alice), lock=False)
        if "error" in answer:  # refused at listing time: fine, nothing was read
            assert answer["error"]["kind"] in ("permanent", "temporary")
            return
        keys = [key for key, *_ in answer["ok"]["messages"]]
        fetched = _fetch_all(helper, answer["ok"]["handle"], keys)
        read = [item for item in fetched if isinstance(item, bytes)]
        assert [ALICE_MESSAGE] == read
        assert len(keys) - 1 == len(fetched) - len(read)
        assert all(BOB_SECRET not in item and ROOT_SECRET not in item for item in read)

    def test_own_file_without_read_permission(self, helper: RawHelper, world: World) -> None:
        """alice's own message made unreadable (mode 0000) is refused: root could read it."""
        message = next((world.maildir(world.alice) / "new").iterdir())
        message.chmod(0)
        ok, _ = helper.ok("open", user=world.user(world.alice), lock=False)
        [[key, *_]] = ok["messages"]
        answer, fds = helper.request("fetch", handle=ok["handle"], key=key)
        assert [] == fds
        assert "Permission denied" in answer["error"]["message"]

    def test_new_without_write_permission(self, helper: RawHelper, world: World) -> None:
        """alice's new/ made read-only (0555) stops a delivery: root could write there."""
        (world.maildir(world.alice) / "new").chmod(0o555)
        answer = _deliver(helper, world.user(world.alice), b"Subject: x\n\nx\n")
        assert "Permission denied" in answer["error"]["message"]
        assert 1 == len(os.listdir(world.maildir(world.alice) / "new"))

    def test_other_users_maildir_by_path(self, helper: RawHelper, world: World) -> None:
        """Asking for bob's maildir path with alice's uid gets nothing of bob's."""
        user = world.user(world.alice, mail=f"maildir:{world.maildir(world.bob)}")
        answer, _ = helper.request("open", user=user, lock=False)
        assert "error" in answer
        assert answer["error"]["kind"] in ("permanent", "temporary")
        assert "Permission denied" in answer["error"]["message"]


class TestServing:
    """What the helper does for a well-behaved serving process."""

    def test_open_fetch_read_only(self, helper: RawHelper, world: World) -> None:
        """open lists alice's message; fetch hands back a read-only descriptor of it."""
        ok, _ = helper.ok("open", user=world.user(world.alice), lock=True)
        [[key, size, *_]] = ok["messages"]
        fetched, fds = helper.ok("fetch", handle=ok["handle"], key=key)
        assert 1 == len(fds)
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.write(fds[0], b"x")
        data = read_fd(fds[0])
        assert ALICE_MESSAGE == data
        assert len(ALICE_MESSAGE) == fetched["size"]
        assert size == len(ALICE_MESSAGE) + ALICE_MESSAGE.count(b"\n")

    def test_session_lock_owned_by_user_and_released(self, helper: RawHelper, world: World) -> None:
        """The session lock is alice's file while the session lasts, gone after close."""
        lock = world.maildir(world.alice) / LOCK
        ok, _ = helper.ok("open", user=world.user(world.alice), lock=True)
        owner = lock.stat().st_uid
        second, _ = helper.request("open", user=world.user(world.alice), lock=True)
        helper.ok("close", handle=ok["handle"])
        assert world.alice.uid == owner
        assert "locked" == second["error"]["kind"]
        assert not lock.exists()

    def test_deliver_owned_by_user(self, helper: RawHelper, world: World) -> None:
        """A delivered file belongs to the user's uid and gid, mode 0600."""
        data = b"Subject: new\r\n\r\ndelivered\r\n"
        answer = _deliver(helper, world.user(world.alice), data, "Return-Path: <a@b>\n")
        path = world.maildir(world.alice) / "new" / answer["ok"]["key"]
        info = path.stat()
        assert (world.alice.uid, world.alice.gid) == (info.st_uid, info.st_gid)
        assert 0o600 == stat.S_IMODE(info.st_mode)
        assert b"Return-Path: <a@b>\nSubject: new\n\ndelivered\n" == path.read_bytes()

    def test_config_file_on_second_socket(self, world: World) -> None:
        """The file socket hands over configuration files the settings name, and no others."""
        running = start_helper(settings(files={"passwd_file": str(world.secret)}))
        try:
            send_frame(running.files, {"id": 5, "op": "file", "key": "passwd_file"})
            answer, fds = running.receive(running.files)
            send_frame(running.files, {"id": 6, "op": "file", "key": "/etc/shadow"})
            refused, none = running.receive(running.files)
            on_main, _ = running.request("file", key="passwd_file")
        finally:
            running.stop()
        assert {"id": 5, "ok": {}} == answer
        assert ROOT_SECRET == read_fd(fds[0])
        assert ("invalid", []) == (refused["error"]["kind"], none)
        assert "invalid" == on_main["error"]["kind"]


class TestConfigFileLinks:
    """A configuration file is read through a link only where only root can place one."""

    @staticmethod
    def _read(world: World, folder: Path) -> bytes | str:
        """Start a helper reading ``folder/passwd``; return its content or the error kind."""
        running = start_helper(settings(files={"passwd_file": str(folder / "passwd")}))
        try:
            send_frame(running.files, {"id": 5, "op": "file", "key": "passwd_file"})
            answer, fds = running.receive(running.files)
        finally:
            running.stop()
        return read_fd(fds[0]) if "ok" in answer else str(answer["error"]["kind"])

    @staticmethod
    def _folder(world: World, owner: int) -> Path:
        folder = world.root / "etc-pobox"
        folder.mkdir(mode=0o755)
        os.chown(folder, owner, owner)
        return folder

    @pytest.mark.parametrize("trap", ["symlink", "hardlink"])
    def test_link_in_a_directory_of_the_serving_user(self, world: World, trap: str) -> None:
        """In a directory another user can write to, a link to a root-only file is refused."""
        folder = self._folder(world, world.alice.uid)
        if trap == "symlink":
            (folder / "passwd").symlink_to(world.secret)
        else:
            os.link(world.secret, folder / "passwd")
        refused = self._read(world, folder)
        assert refused in ("invalid", "temporary")  # not a regular file, or ELOOP

    def test_plain_file_in_a_directory_of_the_serving_user(self, world: World) -> None:
        """A plain file there is read as before."""
        folder = self._folder(world, world.alice.uid)
        (folder / "passwd").write_bytes(b"alice:{PLAIN}x\n")
        assert b"alice:{PLAIN}x\n" == self._read(world, folder)

    def test_link_in_roots_directory_is_followed(self, world: World) -> None:
        """In a directory only root can change, a link is the admin's and is followed."""
        folder = self._folder(world, 0)
        (folder / "passwd").symlink_to(world.secret)
        assert ROOT_SECRET == self._read(world, folder)


class TestLogFile:
    """The log is reopened for appending in its own directory only, never through a link."""

    @staticmethod
    def _append(running: RawHelper, data: bytes) -> str | None:
        """Ask for the log file on the file socket; append ``data``; the error kind if refused."""
        send_frame(running.files, {"id": 7, "op": "file", "key": "log_path"})
        answer, fds = running.receive(running.files)
        if "error" in answer:
            return str(answer["error"]["kind"])
        try:
            os.write(fds[0], data)
        finally:
            os.close(fds[0])
        return None

    def _start(self, world: World) -> tuple[RawHelper, Path]:
        logs = world.root / "log"
        logs.mkdir()
        os.chown(logs, world.alice.uid, world.alice.gid)  # the serving user's directory
        log = logs / "pobox.log"
        return start_helper(settings(appends={"log_path": str(log)})), log

    def test_reopened_and_created(self, world: World) -> None:
        """The log is appended to, and created (mode 0640) after a rotation moved it away."""
        running, log = self._start(world)
        try:
            first = self._append(running, b"one\n")
            log.rename(log.with_suffix(".1"))
            second = self._append(running, b"two\n")
        finally:
            running.stop()
        assert (None, None) == (first, second)
        assert b"two\n" == log.read_bytes()
        assert 0o640 == stat.S_IMODE(log.stat().st_mode)

    @pytest.mark.parametrize("trap", ["symlink", "dangling", "hardlink"])
    def test_planted_link_refused(self, world: World, trap: str) -> None:
        """A link in place of the log reaches neither the root-only file nor a new one."""
        running, log = self._start(world)
        target = world.root / "created-by-root" if trap == "dangling" else world.secret
        if trap == "hardlink":
            os.link(world.secret, log)
        else:
            log.symlink_to(target)
        try:
            refused = self._append(running, b"root2::0:0::/root:/bin/sh\n")
        finally:
            running.stop()
        assert refused is not None
        assert ROOT_SECRET == world.secret.read_bytes()
        assert not (world.root / "created-by-root").exists()

    def test_directory_swapped_for_a_link(self, world: World) -> None:
        """The log's directory swapped for a link to a root-only one: nothing is made there."""
        running, log = self._start(world)
        elsewhere = world.root / "root-only-dir"
        elsewhere.mkdir(mode=0o700)
        try:
            log.parent.rename(world.root / "log.old")
            log.parent.symlink_to(elsewhere)
            self._append(running, b"line\n")
        finally:
            running.stop()
        assert [] == list(elsewhere.iterdir())


class TestSessionLockRights:
    """The helper's session locks are touched and released with their owner's ids, not root's."""

    def test_refresher_touches_with_the_owners_rights(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A lock in a maildir its owner can no longer reach (home 0000) is left untouched."""
        monkeypatch.setattr(_fs, "_thread_rights", None)  # this process's setting, restored
        _fs.use_thread_rights(thread_ids, lambda ids: owner_rights(*cast("tuple[int, int]", ids)))
        alice, maildir = world.alice, world.maildir(world.alice)
        taken: list[SessionLock | None] = []

        def take() -> None:  # a worker thread of the helper: the owner's ids, then the lock
            become(alice.uid, alice.gid)
            with Dir.open_root(maildir, alice.uid) as root:
                taken.append(SessionLock.take_if_free(root, LOCK))

        worker = threading.Thread(target=take)
        worker.start()
        worker.join()
        lock = maildir / LOCK
        old = int(time.time()) - 1000
        os.utime(lock, (old, old))
        world.home(alice).chmod(0)  # root would still get through; alice cannot
        try:
            refresh_session_locks()
            mtime = lock.stat().st_mtime
        finally:
            world.home(alice).chmod(0o700)
        held = taken[0]
        assert held is not None
        held.release()  # with alice's ids, from this (root) thread: it can now
        assert (old, False) == (mtime, lock.exists())


class TestEndings:
    """Whatever ends the conversation, the helper releases every lock it holds, then exits."""

    def test_end_of_file_releases_locks(self, helper: RawHelper, world: World) -> None:
        """Closing the socket (the serving process died) removes the session lock; exit 0."""
        lock = world.maildir(world.alice) / LOCK
        helper.ok("open", user=world.user(world.alice), lock=True)
        held = lock.exists()
        status, _ = helper.stop()
        assert held
        assert 0 == status
        assert not lock.exists()

    def test_broken_framing_releases_locks(self, helper: RawHelper, world: World) -> None:
        """A datagram breaking the framing ends the helper (76) after releasing the locks."""
        lock = world.maildir(world.alice) / LOCK
        helper.ok("open", user=world.user(world.alice), lock=True)
        helper.sock.send(b"\x09garbage")
        helper.process.wait(30)
        status, log = helper.stop()
        assert 76 == status
        assert "broke the protocol" in log
        assert not lock.exists()

    def test_invalid_request_answered_and_serving_goes_on(
        self, helper: RawHelper, world: World
    ) -> None:
        """A malformed request gets an "invalid" answer; the next request is served."""
        helper.send({"id": 9, "op": "open", "user": "alice", "lock": True})
        answer, _ = helper.receive()
        ok, _ = helper.ok("usage", user=world.user(world.alice))
        assert (9, "invalid") == (answer["id"], answer["error"]["kind"])
        assert 1 == ok["messages"]

    def test_unknown_handle(self, helper: RawHelper) -> None:
        """A handle the helper never gave out is refused."""
        answer, _ = helper.request("fetch", handle=12345, key="k")
        assert ("invalid", "no open maildrop 12345") == (
            answer["error"]["kind"],
            answer["error"]["message"],
        )

    def test_no_hello(self, world: World) -> None:
        """Without a hello first, the helper refuses to serve and exits (76)."""
        running = start_helper()
        running.send({"id": 1, "op": "usage", "user": world.user(world.alice)})
        deadline = time.monotonic() + 30
        while running.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        status, log = running.stop()
        assert 76 == status
        assert "the first request must be hello" in log
