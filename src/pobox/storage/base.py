"""The storage interface: what the POP3 shell needs from a maildrop, and nothing more.

A :class:`MaildropStore` opens one user's maildrop and (by default) locks it exclusively for
the life of the session (RFC 1939 §8: "the POP3 server then acquires an exclusive-access lock
on the maildrop").  The returned :class:`Maildrop` is a *snapshot*: its ``messages`` are fixed
at open, so message numbers never shift inside a session, and mail delivered meanwhile shows
up at the next open.  Deletion happens only through :meth:`Maildrop.delete`, which the shell
calls in the UPDATE state after QUIT (RFC 1939 §6); each message is removed atomically.

Delivery goes through the store too (:meth:`MaildropStore.deliver`, :meth:`MaildropStore.usage`),
so LMTP, SMTP and ``pobox deliver`` work the same on every backend: a message is durable (fsync,
COMMIT) when ``deliver`` returns, and the quota is enforced by the store, in the same step.

Everything that crosses this interface is plain data (strings, numbers, frozen records, and a
:class:`~pobox.storage.spool.Spool` whose content can be handed over as a file descriptor), so
a store can run on the other side of a process boundary.

Every backend passes the same contract suite (``tests/storage/test_contract.py``).

A store whose messages an IMAP server may read too (Maildir) also offers :class:`SeenFlags`:
the session marks the messages it sent with RETR as seen, as Dovecot's POP3 does.

A store that records when each message was first retrieved offers :class:`RetrievalTimes`
(every pobox store does): RFC 2449 EXPIRE (``pop3_expire_days``) deletes messages some days
after their first RETR.

A store that can keep deleted mail for a while (Maildir and PostgreSQL, with
``pop3_delete_retention``) offers
:class:`DeletedMailRetention`: ``pobox restore`` lists, restores and purges what it kept.

A store whose maildrops have folders besides the INBOX (Maildir++ ``.Junk/``, PostgreSQL's
``folder`` column) offers :class:`MaildropFolders`: a session opens the folders of
``pop3_folders`` merged into its one listing, and delivery can file a message into a folder.

``pobox import`` needs one more thing, which only stores that can keep another server's UIDLs
offer (PostgreSQL): :class:`MaildropImporter`, a separate protocol so that
:class:`MaildropStore` stays as it is.

May import: the standard library, :mod:`pobox.errors`, :mod:`pobox.names`,
:mod:`pobox.records` and :mod:`pobox.storage.spool`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pobox.errors import PoboxError
from pobox.names import INBOX, folder_name
from pobox.records import Quota
from pobox.storage.spool import Spool

__all__ = [
    "INBOX",
    "DeleteResult",
    "DeletedMailRetention",
    "DeletedMessage",
    "FolderNameError",
    "ImportedMessage",
    "IncomingMessage",
    "MailUser",
    "Maildrop",
    "MaildropFolders",
    "MaildropImporter",
    "MaildropLocked",
    "MaildropStore",
    "MessageFiles",
    "MessageGone",
    "MessageInfo",
    "OpenedMessage",
    "Quota",
    "QuotaExceeded",
    "RetrievalTimes",
    "SeenFlags",
    "StorageError",
    "StoragePermanentError",
    "StorageTemporaryError",
    "Usage",
    "check_folder",
    "is_unique_id",
    "restore_folder",
]

#: RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
MAX_UNIQUE_ID = 70


class StorageError(PoboxError):
    """A maildrop operation failed."""

    resp_code: str | None = "SYS/TEMP"


class StorageTemporaryError(StorageError):
    """A failure that may go away if the client retries later (RFC 3206 ``SYS/TEMP``)."""

    resp_code = "SYS/TEMP"


class StoragePermanentError(StorageError):
    """A failure that needs an administrator (RFC 3206 ``SYS/PERM``)."""

    resp_code = "SYS/PERM"


class MaildropLocked(StorageError):
    """Another session holds the maildrop's exclusive lock (RFC 2449 ``IN-USE``)."""

    resp_code = "IN-USE"


class QuotaExceeded(StoragePermanentError):
    """The message would take the maildrop over its quota (RFC 3463 ``5.2.2``)."""


class FolderNameError(StoragePermanentError):
    """A folder name that no store accepts (see :func:`check_folder`)."""


class MessageGone(StorageError):
    """The message vanished from the maildrop after the snapshot was taken."""

    resp_code = "SYS/TEMP"


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a maildrop snapshot.

    Attributes:
        key: the backend's own identifier of the message (opaque to everyone else).
        size: octets of the message as sent on the wire by RETR: every line ending CRLF,
            before byte-stuffing, without the terminating ``.CRLF`` (RFC 1939 §5, LIST).
        uidl: the RFC 1939 §7 unique-id: 1 to 70 octets in 0x21-0x7E, stable across
            sessions, never reused for another message of the same maildrop.
        header_end: whether the message has the empty line that ends its header (what
            ``pop3_client_workarounds = oe-ns-eoh`` needs to know), if the store knows it
            (the Maildir store caches it in its index when asked to); ``None``: not known,
            the caller reads the message to find out.
        folder: the folder the message is in (:data:`INBOX` unless the maildrop was opened
            with :meth:`MaildropFolders.open_folders`).
    """

    key: str
    size: int
    uidl: str
    header_end: bool | None = None
    folder: str = INBOX


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """What :meth:`Maildrop.delete` did: keys removed and keys that could not be removed.

    A message that was already gone counts as removed.
    """

    removed: tuple[str, ...]
    failed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    """What a maildrop holds, as the quota counts it.

    Attributes:
        octets: the stored size of all its messages.
        messages: how many messages it holds.
    """

    octets: int
    messages: int


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A message to store for one recipient.

    Attributes:
        header: lines put on top of the body for this recipient (``Return-Path``,
            ``Delivered-To``), each ending in LF.
        body: the message as received, in stored form; one spool serves every recipient
            of a transaction, so a store may keep one copy of it for all of them.
    """

    header: bytes
    body: Spool

    @property
    def size(self) -> int:
        """Octets of the stored message: header and body."""
        return len(self.header) + self.body.size


class MailUser(Protocol):
    """What a store needs to know about a user to find the maildrop.

    :class:`pobox.auth.base.User` satisfies it.
    """

    @property
    def name(self) -> str:
        """The login name (``%u``; ``%n`` and ``%d`` are its parts around ``@``)."""

    @property
    def home(self) -> str | None:
        """The home directory (``%h``, ``~``), if the user database has one."""

    @property
    def mail(self) -> str | None:
        """A per-user mail location overriding the store's template (``userdb_mail``)."""

    @property
    def uid(self) -> int | None:
        """The owner the user's mail is accessed and created with, if the database sets one."""

    @property
    def gid(self) -> int | None:
        """The group the user's mail is accessed and created with, if the database sets one."""


class Maildrop(Protocol):
    """One user's open maildrop: a snapshot plus the operations a POP3 session needs."""

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open, in message-number order (message 1 is index 0)."""

    def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield the stored bytes of one message in chunks.

        The bytes are as stored (line endings may be LF or CRLF); the protocol core turns
        them into wire form.

        Raises:
            MessageGone: the message is no longer in the maildrop.
            StorageTemporaryError: an I/O error that may pass.
        """

    def read_now(self, key: str) -> bytes | None:
        """Return the whole stored message if the backend can without waiting, else ``None``.

        A fast path for small messages on local storage; ``None`` means "use
        :meth:`read_message`", never "no such message".

        Raises:
            MessageGone: the message is no longer in the maildrop.
            StorageTemporaryError: an I/O error that may pass.
        """

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove messages for good; called only in the UPDATE state (RFC 1939 §6).

        Each removal is atomic: a message is either fully present or fully gone.
        """

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Have ``callback`` called, once, on the event loop, if the session lock is lost.

        A lock held in a database (PostgreSQL's advisory locks) dies with the connection
        that holds it; the session must then end without UPDATE (``-ERR [SYS/TEMP]``), since
        another node may already serve the maildrop, and :meth:`delete` refuses to run. A
        lock that cannot be lost (a file lock held by this process) never calls it.
        """

    async def close(self) -> None:
        """Release the lock and any resources; safe to call more than once."""


class MaildropStore(Protocol):
    """Opens maildrops."""

    async def open(self, user: MailUser, *, lock: bool = True) -> Maildrop:
        """Open ``user``'s maildrop, taking the exclusive session lock if ``lock``.

        A maildrop that does not exist yet is opened empty (and may be created).

        Raises:
            MaildropLocked: another session holds the lock.
            StorageTemporaryError: a failure that may pass.
            StoragePermanentError: a failure that needs an administrator.
        """

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Store ``message`` in ``user``'s maildrop; return the backend's key of it.

        The message is durable when this returns (fsynced, committed), and shows up at the
        next :meth:`open`, after every message delivered before. It never waits for a POP3
        session: delivery takes no session lock. The maildrop is created if it does not exist.

        Args:
            quota: limits the maildrop must stay within, this message included; checked
                and enforced in the same step as the store, so concurrent deliveries cannot
                together exceed it (as far as the backend can lock).

        Raises:
            QuotaExceeded: the message does not fit.
            StorageTemporaryError: a failure that may pass (disk full, database down, ...).
            StoragePermanentError: a failure that needs an administrator.
        """

    async def usage(self, user: MailUser) -> Usage:
        """Return what ``user``'s maildrop holds (empty if it does not exist).

        Raises:
            StorageTemporaryError: a failure that may pass.
            StoragePermanentError: a failure that needs an administrator.
        """

    async def aclose(self) -> None:
        """Release store-wide resources (connection pools); safe to call more than once."""


@runtime_checkable
class SeenFlags(Protocol):
    """A maildrop that keeps IMAP's ``\\Seen`` flag (Maildir's ``S``), and sets it for POP3.

    Stores without an IMAP side (PostgreSQL, memory) do not offer it.
    """

    async def mark_seen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Mark messages of the snapshot seen; their keys, UIDLs and sizes do not change.

        Called at the end of a session (UPDATE, or a session that ends without QUIT), with
        the messages sent whole by RETR and not deleted. A message that is seen already, or
        gone, needs nothing.

        Returns:
            The keys that could not be marked.

        Raises:
            StorageError: nothing could be marked.
        """


@runtime_checkable
class RetrievalTimes(Protocol):
    """A maildrop that records when each message was first retrieved (RFC 2449 §6.7 EXPIRE)."""

    async def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Record the first retrieval of messages of the snapshot, ``key → when``.

        ``when`` is seconds since the epoch.  A message that has a time already keeps it
        (it is the *first* RETR that counts); a key that is gone, or not in the snapshot, is
        skipped.

        Raises:
            StorageError: nothing could be recorded.
        """

    async def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the keys of the snapshot's messages first retrieved at or before ``when``.

        Raises:
            StorageError: the times could not be read.
        """


@dataclass(frozen=True, slots=True)
class OpenedMessage:
    """A message file opened for the caller (:meth:`MessageFiles.open_file`).

    Attributes:
        fd: the descriptor; the caller closes it.
        size: ``st_size`` at open: read (or send) at most that many octets.
        identity: what tells this file and its content apart from any other, as long as no
            one writes to it (device, inode, size, mtime and ctime in nanoseconds: a write
            moves the ctime, which only the kernel sets).
    """

    fd: int
    size: int
    identity: tuple[int, int, int, int, int]


@runtime_checkable
class MessageFiles(Protocol):
    """A maildrop whose messages are files the server may send with ``sendfile`` (Maildir)."""

    async def open_file(self, key: str) -> OpenedMessage:
        """Open message ``key`` as :meth:`Maildrop.read_message` would (same checks).

        Raises:
            MessageGone, StorageError: as :meth:`Maildrop.read_message`.
        """

    def read_file(self, opened: OpenedMessage, key: str) -> AsyncIterator[bytes]:
        """Yield ``opened``'s octets up to its size, in chunks (the descriptor stays open)."""

    def identity(self, opened: OpenedMessage) -> tuple[int, int, int, int, int]:
        """Return the file's identity now (``fstat``), to see whether it was written to.

        Raises:
            StorageError: ``fstat`` failed.
        """


@runtime_checkable
class MaildropFolders(Protocol):
    """A store whose maildrops have folders besides the INBOX (``pop3_folders``).

    Stores without folders (the storage helper, for now) do not offer it: a session of a user
    with ``pop3_folders`` then sees the INBOX only.
    """

    async def open_folders(
        self, user: MailUser, folders: Sequence[str], *, lock: bool = True
    ) -> Maildrop:
        """Open ``user``'s maildrop with the messages of ``folders`` merged into one listing.

        The listing is in arrival order across folders; :attr:`MessageInfo.folder` says where
        each message is. UIDLs are distinct across folders, and a message moved from one
        folder to another (by an IMAP client) keeps its UIDL, so a POP3 client does not
        download it twice. :meth:`Maildrop.delete` removes each message from the folder it is
        in. A folder that does not exist is empty (and is not created).

        Args:
            folders: folder names (:func:`check_folder`), :data:`INBOX` among them or not.

        Raises:
            FolderNameError: a folder name is not acceptable.
            MaildropLocked, StorageTemporaryError, StoragePermanentError: as :meth:`open`.
        """

    async def deliver_to_folder(
        self,
        user: MailUser,
        message: IncomingMessage,
        folder: str,
        *,
        quota: Quota | None = None,
    ) -> str:
        """Store ``message`` in ``folder`` of ``user``'s maildrop (created if missing).

        As :meth:`MaildropStore.deliver`; ``folder`` :data:`INBOX` is the same as it.

        Raises:
            FolderNameError: the folder name is not acceptable.
            QuotaExceeded, StorageTemporaryError, StoragePermanentError: as ``deliver``.
        """


def check_folder(name: str) -> str:
    """Return the folder name ``name`` in its canonical form (``INBOX`` in any case is ``INBOX``).

    Raises:
        FolderNameError: ``name`` is not a folder name a maildrop can have: empty, over 100
            characters, with a ``/``, a control or non-ASCII character, a leading or trailing
            dot or space, or ``..``.
    """
    canonical = folder_name(name)
    if canonical is None:
        msg = f"{name!r} is not an acceptable folder name (letters, digits, _+-.&, and spaces)"
        raise FolderNameError(msg)
    return canonical


def restore_folder(folder: str, folders: Sequence[str] | None) -> str:
    """Return where a kept message deleted from ``folder`` is restored (``restore_deleted``).

    Its own folder if ``folders`` (the user's ``pop3_folders``) lists it or is ``None``, else
    the INBOX: a restore brings mail back where POP3 sees it.
    """
    if folders is None or folder == INBOX or folder in folders:
        return folder
    return INBOX


def is_unique_id(uidl: str) -> bool:
    """Tell whether ``uidl`` is a valid RFC 1939 §7 unique-id (1-70 octets, 0x21-0x7E)."""
    return 0 < len(uidl) <= MAX_UNIQUE_ID and all("\x21" <= char <= "\x7e" for char in uidl)


@dataclass(frozen=True, slots=True)
class ImportedMessage:
    """A message moved in from another server, with what that server told its clients.

    Attributes:
        uidl: the unique-id the old server answered UIDL with (kept, so clients that leave
            mail on the server do not fetch it all again).
        size: the size the old server answered LIST with (kept as the wire size).
        data: the stored message, as it was in the old store.
    """

    uidl: str
    size: int
    data: bytes


@runtime_checkable
class MaildropImporter(Protocol):
    """A store that takes messages with their UIDL and size kept (``pobox import``)."""

    async def import_messages(self, user: MailUser, messages: Sequence[ImportedMessage]) -> int:
        """Store ``messages`` in ``user``'s maildrop, after its messages, in the given order.

        Idempotent by UIDL: a message whose UIDL the maildrop already has is skipped. Either
        every new message of the call is stored (durably, when it returns) or none is.

        Returns:
            How many were stored.

        Raises:
            StoragePermanentError: a UIDL is not a valid unique-id.
            StorageTemporaryError: a failure that may pass (nothing of the call stored).
        """


@dataclass(frozen=True, slots=True)
class DeletedMessage:
    """A message deleted over POP3 and kept for restore.

    Attributes:
        uidl: the UIDL it had, and gets again when restored.
        size: the wire size it had (LIST), and has again.
        deleted: when it was deleted (Unix seconds).
        folder: the folder it was deleted from (:data:`INBOX` but for ``pop3_folders``), and
            is restored into.
    """

    uidl: str
    size: int
    deleted: int
    folder: str = INBOX


@runtime_checkable
class DeletedMailRetention(Protocol):
    """A store that keeps messages deleted over POP3 for a while (``pop3_delete_retention``).

    Kept messages are invisible to POP3 (never in a snapshot) and not counted by
    :meth:`MaildropStore.usage`. The memory store does not offer it.
    """

    async def deleted_messages(self, user: MailUser) -> tuple[DeletedMessage, ...]:
        """Return the messages kept for ``user``, oldest deletion first."""

    async def restore_deleted(
        self,
        user: MailUser,
        *,
        since: int | None = None,
        uidls: Sequence[str] = (),
        folders: Sequence[str] | None = None,
    ) -> tuple[DeletedMessage, ...]:
        """Bring kept messages back into the maildrop with their UIDL and size; return them.

        Each message goes back into the folder it was deleted from (a Junk message into Junk,
        with the UIDL it had there), or into the INBOX if ``folders`` does not list that
        folder; the :class:`DeletedMessage` returned says where.

        Args:
            since: only messages deleted at or after this time (Unix seconds).
            uidls: only messages with these UIDLs (all if empty).
            folders: the folders the user's POP3 lists (``pop3_folders``); ``None``: every
                message back into its own folder.

        Raises:
            StorageTemporaryError: a failure that may pass (nothing restored, or some).
        """

    async def purge_deleted(self, user: MailUser, *, now: int | None = None) -> int:
        """Remove for good what was kept longer than the retention; return how many."""
