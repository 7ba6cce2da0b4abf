"""The serving process's side of the storage helper: what a session sees, and what it leaves.

(The whole storage contract suite runs through the helper too: ``tests/storage``,
``maildir-helper``.)
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from pobox.config import build_config
from pobox.records import User
from pobox.storage.base import IncomingMessage, MaildropLocked, StorageTemporaryError
from pobox.storage.privsep import OwnerPolicy, StorageHelper
from pobox.storage.spool import Spool
from tests.privsep.conftest import World

LOCK = "dovecot-pop3-session.lock"


@pytest.fixture
async def helper(world: World) -> AsyncIterator[tuple[StorageHelper, list[str]]]:
    """A started storage helper for the world's maildirs, and the reasons it was lost."""
    config = build_config(
        {"mail_location": "maildir:~/Maildir", "passwd_file": str(world.root / "passwd")}
    )
    lost: list[str] = []
    started = await StorageHelper.start(
        config, OwnerPolicy.from_config(config, fallback=None), on_lost=lost.append
    )
    yield started, lost
    await started.aclose()


def _alice(world: World) -> User:
    return User(
        world.alice.name,
        uid=world.alice.uid,
        gid=world.alice.gid,
        home=str(world.home(world.alice)),
    )


async def _until(condition: object) -> None:
    async with asyncio.timeout(30):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


class TestCancelled:
    """A session that stops waiting (a timeout, a dropped client) leaves nothing behind."""

    async def test_cancelled_open_releases_the_lock(
        self, helper: tuple[StorageHelper, list[str]], world: World
    ) -> None:
        """An open cancelled while the helper works is closed again when its answer comes."""
        store = helper[0].store
        task = asyncio.create_task(store.open(_alice(world)))
        await asyncio.sleep(0)  # the request is on its way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The helper may still be opening it: the lock must go once its answer is in. (Left
        # behind, it would stay: the helper that holds it is alive.)
        async with asyncio.timeout(30):
            while True:
                try:
                    maildrop = await store.open(_alice(world))
                except MaildropLocked:
                    await asyncio.sleep(0.01)
                    continue
                break
        count = len(maildrop.messages)
        await maildrop.close()
        assert 1 == count
        assert not (world.maildir(world.alice) / LOCK).exists()

    async def test_cancelled_read_closes_the_descriptor(
        self, helper: tuple[StorageHelper, list[str]], world: World
    ) -> None:
        """A read abandoned half-way leaves no descriptor open in the serving process."""
        store = helper[0].store
        maildrop = await store.open(_alice(world))
        before = len(os.listdir("/proc/self/fd"))
        reader = maildrop.read_message(maildrop.messages[0].key)
        await reader.__anext__()
        await reader.aclose()
        after = len(os.listdir("/proc/self/fd"))
        await maildrop.close()
        assert before == after


class TestLarge:
    """Large messages cross as descriptors, both ways, never through the socket."""

    async def test_large_delivery_and_read(
        self, helper: tuple[StorageHelper, list[str]], world: World
    ) -> None:
        """A 3 MiB message (a spool on disk) is delivered and read back whole, in chunks."""
        store = helper[0].store
        data = b"Subject: big\n\n" + b"0123456789abcdef\n" * (3 * 65536)
        with Spool.from_bytes(data) as body:
            assert not body.in_memory
            await store.deliver(_alice(world), IncomingMessage(b"", body))
        maildrop = await store.open(_alice(world))
        [big] = [info for info in maildrop.messages if info.size > 1 << 20]
        chunks = [chunk async for chunk in maildrop.read_message(big.key)]
        await maildrop.close()
        assert data == b"".join(chunks)
        assert len(chunks) > 1


class TestHelperGone:
    """When the helper dies, every waiting call fails and the server is told."""

    async def test_calls_fail_and_on_lost_is_called(
        self, helper: tuple[StorageHelper, list[str]], world: World
    ) -> None:
        """After SIGKILL of the helper: on_lost hears of it, and calls get SYS/TEMP errors."""
        started, lost = helper
        os.kill(started.pid, signal.SIGKILL)
        await _until(lambda: lost)
        with pytest.raises(StorageTemporaryError, match=r"storage helper gone"):
            await started.store.usage(_alice(world))
        assert ["it closed the connection"] == lost
