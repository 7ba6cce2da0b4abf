"""A session whose maildrop lock is lost ends at once, with ``-ERR [SYS/TEMP]``, deleting nothing.

The memory store's :meth:`~pobox.storage.memory.MemoryStore.break_lock` takes a lock away as
a lost PostgreSQL lock connection does; ``test_postgres.py`` does it for real with
``pg_terminate_backend``.
"""

from __future__ import annotations

from pathlib import Path

from pobox.storage.memory import MemoryStore
from pobox.testing import running_server
from tests.integration.wire import Wire


class TestLockLost:
    """The shell's side of the lock-lost signal (``Maildrop.on_lock_lost``)."""

    async def test_idle_session_is_ended(self, tmp_path: Path) -> None:
        """A session waiting for a command is told at once and closed."""
        store = MemoryStore()
        store.add("alice", b"kept\n")
        async with running_server(tmp_path, store=store) as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.login()
            assert store.break_lock("alice")
            expected = b"-ERR [SYS/TEMP] Mailbox lock lost, no changes made; log in again.\r\n"
            assert expected == await wire.read_all()

    async def test_quit_after_loss_deletes_nothing(self, tmp_path: Path) -> None:
        """DELE then QUIT, pipelined behind the loss: nothing is deleted."""
        store = MemoryStore()
        store.add("alice", b"kept\n")
        async with running_server(tmp_path, store=store) as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.login()
            assert (await wire.command(b"DELE 1")).startswith(b"+OK")
            store.break_lock("alice")
            await wire.send(b"QUIT\r\n")
            reply = await wire.read_all()
            assert (True, [b"kept\n"]) == (
                reply.startswith(b"-ERR [SYS/TEMP]"),
                list(store.stored("alice").values()),
            )

    async def test_user_logs_in_again_after_loss(self, tmp_path: Path) -> None:
        """The lost lock is free: a new session of the same user gets in."""
        store = MemoryStore()
        async with running_server(tmp_path, store=store) as srv:
            first = await Wire.connect(srv.host, srv.port)
            await first.login()
            store.break_lock("alice")
            await first.read_all()
            second = await Wire.connect(srv.host, srv.port)
            await second.login()
            assert b"+OK" == (await second.command(b"STAT"))[:3]
