"""The in-memory storage backend: the reference implementation of the storage contract.

:class:`MemoryStore` keeps every maildrop in a dict. It is complete, not a mock: it passes the
same contract suite as the Maildir backend (``tests/storage/test_contract.py``), so tests of the
server can run against it and trust what they see. It lives and dies with the process.

* :meth:`MemoryStore.deliver` stores a message through the storage interface, as delivery
  does on every backend; :meth:`MemoryStore.add` is the same for tests, from bytes.
* Each maildrop has an exclusive lock, held from :meth:`MemoryStore.open` (``lock=True``)
  until :meth:`~MemoryMaildrop.close`, or until :meth:`MemoryStore.break_lock` takes it away
  as a lost database connection would (the session is told, and its UPDATE refused).
* UIDLs come from a per-maildrop counter that never goes back, so they are unique and never
  reused, even after deletion; two identical messages get different UIDLs.
* Sizes are wire sizes (:func:`pobox.storage._wire.wire_size`).
* Folders (:class:`~pobox.storage.base.MaildropFolders`): each message is in one folder
  (``INBOX`` unless delivered elsewhere); :meth:`MemoryStore.move` moves it as an IMAP client
  would, keeping its key and so its UIDL.

Everything runs on the event loop: there is no I/O to move off it.

May import: the standard library and :mod:`pobox.storage`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pobox.storage._wire import wire_size
from pobox.storage.base import (
    INBOX,
    DeleteResult,
    IncomingMessage,
    MaildropLocked,
    MailUser,
    MessageGone,
    MessageInfo,
    Quota,
    QuotaExceeded,
    StorageTemporaryError,
    Usage,
    check_folder,
)

__all__ = ["MemoryMaildrop", "MemoryStore"]

#: Size of the chunks :meth:`MemoryMaildrop.read_message` yields, so that consumers see
#: multi-chunk messages as they would from a file.
CHUNK_SIZE = 64 * 1024


@dataclass(slots=True)
class _Drop:
    """One user's maildrop: messages by key in delivery order, UID counter, lock holder."""

    messages: dict[str, bytes] = field(default_factory=dict)
    #: Key → when the message was first retrieved (RETR), for EXPIRE.
    retrieved: dict[str, float] = field(default_factory=dict)
    #: The folder of each message not in the INBOX, by key.
    folders: dict[str, str] = field(default_factory=dict)
    next_uid: int = 1
    holder: MemoryMaildrop | None = None


class MemoryStore:
    """Maildrops held in memory; satisfies :class:`pobox.storage.base.MaildropStore`."""

    def __init__(self) -> None:
        self._drops: dict[str, _Drop] = {}

    def add(self, username: str, data: bytes) -> str:
        """Add a message, stored as it is, to ``username``'s maildrop and return its key.

        The message is invisible to sessions already open (they work on a snapshot) and
        shows up at the next :meth:`open`.
        """
        drop = self._drops.setdefault(username, _Drop())
        key = str(drop.next_uid)
        drop.next_uid += 1
        drop.messages[key] = bytes(data)
        return key

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Store ``message`` for ``user`` within ``quota``; return its key.

        Raises:
            QuotaExceeded: the message does not fit.
        """
        if quota is not None and not quota.unlimited:
            usage = await self.usage(user)
            if quota.max_messages and usage.messages + 1 > quota.max_messages:
                msg = f"quota exceeded: {usage.messages} messages of at most {quota.max_messages}"
                raise QuotaExceeded(msg)
            if quota.max_bytes and usage.octets + message.size > quota.max_bytes:
                msg = (
                    f"quota exceeded: {usage.octets} + {message.size} octets over {quota.max_bytes}"
                )
                raise QuotaExceeded(msg)
        return self.add(user.name, message.header + message.body.getvalue())

    async def deliver_to_folder(
        self,
        user: MailUser,
        message: IncomingMessage,
        folder: str,
        *,
        quota: Quota | None = None,
    ) -> str:
        """Store ``message`` in ``folder`` of ``user``'s maildrop within ``quota``.

        Raises:
            FolderNameError: the folder name is not acceptable.
            QuotaExceeded: the message does not fit.
        """
        folder = check_folder(folder)
        key = await self.deliver(user, message, quota=quota)
        self.move(user.name, key, folder)
        return key

    def move(self, username: str, key: str, folder: str) -> None:
        """Move message ``key`` of ``username`` into ``folder``, as an IMAP client's MOVE."""
        drop = self._drops[username]
        folder = check_folder(folder)
        if folder == INBOX:
            drop.folders.pop(key, None)
        else:
            drop.folders[key] = folder

    async def open_folders(
        self, user: MailUser, folders: Sequence[str], *, lock: bool = True
    ) -> MemoryMaildrop:
        """Open ``user.name``'s maildrop with the messages of ``folders``, in arrival order.

        Raises:
            FolderNameError: a folder name is not acceptable.
            MaildropLocked: another session holds the lock and ``lock`` is true.
        """
        return await self.open(user, lock=lock, folders=frozenset(map(check_folder, folders)))

    async def usage(self, user: MailUser) -> Usage:
        """Return the stored octets and number of messages of ``user``'s maildrop."""
        drop = self._drops.get(user.name)
        if drop is None:
            return Usage(octets=0, messages=0)
        return Usage(
            octets=sum(len(data) for data in drop.messages.values()),
            messages=len(drop.messages),
        )

    def stored(self, username: str) -> dict[str, bytes]:
        """Return a copy of the messages currently stored for ``username``, by key."""
        drop = self._drops.get(username)
        return {} if drop is None else dict(drop.messages)

    def is_locked(self, username: str) -> bool:
        """Tell whether a session holds ``username``'s maildrop lock."""
        drop = self._drops.get(username)
        return drop is not None and drop.holder is not None

    def break_lock(self, username: str) -> bool:
        """Take ``username``'s lock from the session holding it, as a lost lock connection would.

        The session is told (:meth:`MemoryMaildrop.on_lock_lost`) and its :meth:`delete`
        refused; the maildrop can be locked again at once. Returns whether a lock was held.
        """
        drop = self._drops.get(username)
        holder = None if drop is None else drop.holder
        if drop is None or holder is None:
            return False
        drop.holder = None
        holder.lose_lock()
        return True

    async def open(
        self,
        user: MailUser,
        *,
        lock: bool = True,
        folders: frozenset[str] = frozenset((INBOX,)),
    ) -> MemoryMaildrop:
        """Open ``user.name``'s maildrop (empty if nothing was delivered yet).

        Only the messages of ``folders`` are in the snapshot (the INBOX's by default).

        Raises:
            MaildropLocked: another session holds the lock and ``lock`` is true.
        """
        drop = self._drops.setdefault(user.name, _Drop())
        if lock and drop.holder is not None:
            msg = f"maildrop of {user.name!r} is locked by another session"
            raise MaildropLocked(msg)
        snapshot = tuple(
            MessageInfo(key=key, size=wire_size(data), uidl=f"{int(key):08x}", folder=folder)
            for key, data in drop.messages.items()
            if (folder := drop.folders.get(key, INBOX)) in folders
        )
        maildrop = MemoryMaildrop(drop, snapshot)
        if lock:
            drop.holder = maildrop
        return maildrop

    async def aclose(self) -> None:
        """Do nothing: the store holds no resources beyond memory."""


class MemoryMaildrop:
    """One open in-memory maildrop; satisfies :class:`pobox.storage.base.Maildrop`."""

    def __init__(self, drop: _Drop, messages: tuple[MessageInfo, ...]) -> None:
        self._drop = drop
        self._messages = messages
        self._keys = frozenset(info.key for info in messages)
        self._closed = False
        self._lost = False
        self._callbacks: list[Callable[[], object]] = []

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open, in delivery order."""
        return self._messages

    async def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield the stored bytes of message ``key`` in chunks.

        Raises:
            MessageGone: the message was deleted since the snapshot, or ``key`` is not in it.
        """
        data = self._data(key)
        for start in range(0, len(data), CHUNK_SIZE):
            yield data[start : start + CHUNK_SIZE]

    def read_now(self, key: str) -> bytes | None:
        """Return message ``key`` if it fits in one chunk, else ``None``.

        Raises:
            MessageGone: the message was deleted since the snapshot, or ``key`` is not in it.
        """
        data = self._data(key)
        return data if len(data) <= CHUNK_SIZE else None

    def _data(self, key: str) -> bytes:
        self._check_open()
        data = self._drop.messages.get(key) if key in self._keys else None
        if data is None:
            msg = f"message {key!r} is no longer in the maildrop"
            raise MessageGone(msg)
        return data

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove messages of the snapshot; an already removed one counts as removed.

        Keys that are not in this session's snapshot are reported as failed: a session
        never deletes mail it has not seen.
        """
        self._check_open()
        if self._lost:
            msg = "the maildrop lock was lost: nothing deleted"
            raise StorageTemporaryError(msg)
        removed: list[str] = []
        failed: list[str] = []
        for key in keys:
            if key in self._keys:
                self._drop.messages.pop(key, None)
                self._drop.retrieved.pop(key, None)
                self._drop.folders.pop(key, None)
                removed.append(key)
            else:
                failed.append(key)
        return DeleteResult(removed=tuple(removed), failed=tuple(failed))

    async def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Record first retrievals of messages of the snapshot (a time kept stays)."""
        self._check_open()
        drop = self._drop
        for key, when in times.items():
            if key in self._keys and key in drop.messages:
                drop.retrieved.setdefault(key, when)

    async def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the snapshot's messages first retrieved at or before ``when``."""
        self._check_open()
        retrieved = self._drop.retrieved
        return tuple(
            info.key
            for info in self._messages
            if info.key in retrieved and retrieved[info.key] <= when
        )

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` soon if :meth:`MemoryStore.break_lock` takes this session's lock."""
        if self._lost:
            asyncio.get_running_loop().call_soon(callback)
        else:
            self._callbacks.append(callback)

    def lose_lock(self) -> None:
        """The lock was taken away: refuse UPDATE and tell whoever asked, on the event loop."""
        self._lost = True
        callbacks, self._callbacks = self._callbacks, []
        loop = asyncio.get_running_loop()
        for callback in callbacks:
            loop.call_soon(callback)

    async def close(self) -> None:
        """Release the lock if this session holds it; safe to call more than once."""
        self._closed = True
        if self._drop.holder is self:
            self._drop.holder = None

    def _check_open(self) -> None:
        """Refuse to work on a closed maildrop: its lock may belong to another session now."""
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)
