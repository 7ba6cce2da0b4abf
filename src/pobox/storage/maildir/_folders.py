"""Maildir++ folders merged into one POP3 listing (``pop3_folders``): :class:`FolderMaildrop`.

A Maildir++ folder is a maildir of its own inside the user's maildir: ``.Junk/`` with
``cur/``, ``new/`` and ``tmp/``, as Dovecot, Courier and every IMAP client filing spam there
use it. Each folder is opened as a maildir of its own (its own ``pobox-uidlist`` index for the
sizes, as Dovecot keeps a ``dovecot-uidlist`` there), reached from the maildir root by
descriptor and never through a link (:class:`~pobox.storage._safefs.FolderPath`); the session
lock is the INBOX's alone. A folder that does not exist is empty and is not created; one that
is not a directory of the owner (a link, a FIFO) is left out, with a warning, and the rest is
served.

*Order.* The listing is in arrival order across folders: each folder's own order (the INBOX's
UID order) is kept, and the folders are merged by the delivery time at the start of each
message's Maildir file name (``<seconds>.M<usec>P<pid>.<host>``, :func:`arrival`),
which every MDA writes and IMAP servers keep when they move a message between folders. Not the
file's mtime: a flag change or a copy rewrites that, a name does not.

*UIDLs.* A message of the INBOX has the UIDL the INBOX's index gives it (the one it had
before ``pop3_folders`` was set). A message first seen in another folder gets
``sha256(base name)`` in hex, the UIDL of the index-less mode: 64 characters, so distinct from
the index's 16. The base name is what an IMAP move keeps (Dovecot's ``MOVE`` renames the file
into the other folder), so the UIDL moves with the message through the map
``pobox-folder-uidls`` in the maildir root: one line ``<identity> <UIDL>`` per message of the
last merged listing, read at each open, written again (atomically) when it changed. A message
that moves from ``.Junk`` to the INBOX, or back, between two sessions keeps its UIDL, so a
client leaving mail on the server does not download it twice. The identity is the base name,
except where Dovecot's ``dovecot-uidlist`` (of the INBOX or the folder) gives the file a GUID
of its own (``G`` field): Dovecot moves a message under a new name when the old one is still
in its uidlist, and keeps the old base name as the GUID (found with its own ``doveadm move``);
that GUID is then the identity (and what ``sha256`` is taken of). One base name found in two
folders (a broken copy) is listed once, from the first folder of ``pop3_folders``; a UIDL the
map gives twice is given once. The map holds what the user may write (it is in their maildir),
so it is read as everything there is: bounded, every UIDL checked; the worst a forged map does
is have the user's own client download their own mail again.

*Deletion* (UPDATE) unlinks each message in the folder it is in, as in the INBOX. With
``pop3_delete_retention``, a folder's deleted messages are kept in the maildir's one
``.pobox-deleted/`` with their folder and merged UIDL noted (:mod:`._retain`), and ``pobox
restore`` puts them back into that folder, their UIDL added to ``pobox-folder-uidls``
(:func:`add_folder_uidls`); the quota and ``usage`` count the INBOX only, as before.

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.storage`.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pobox.storage._safefs import Dir, FolderPath, UnsafeFile
from pobox.storage.base import (
    INBOX,
    DeleteResult,
    MessageGone,
    MessageInfo,
    StorageError,
    check_folder,
)
from pobox.storage.maildir._access import MaildirAccess, MaildirHandle
from pobox.storage.maildir._index import DOVECOT_UIDLIST_NAME, INDEX_MAX, dovecot_record
from pobox.storage.maildir._names import base_name

__all__ = [
    "FOLDER_UIDLS_NAME",
    "FolderHandle",
    "FolderMaildrop",
    "folder_uidl",
    "merge_listing",
    "open_folder",
    "open_folder_handle",
    "read_folder_uidls",
    "remember_uidls",
    "write_folder_uidls",
]

logger = logging.getLogger(__name__)

#: The map of base names to UIDLs of the last merged listing, in the maildir root.
FOLDER_UIDLS_NAME = "pobox-folder-uidls"
#: Bound of the map when read: 16 MiB, some 150,000 messages.
FOLDER_UIDLS_MAX = 16 * 1024 * 1024


#: A line of ``pobox-folder-uidls``: a base name (no ``/``, no blank), a space, a UIDL
#: (RFC 1939 §7: 1 to 70 characters in 0x21-0x7E).
_MAP_LINE = re.compile(r"([^\s/]+) ([!-~]{1,70})")
#: The delivery time at the start of a Maildir name: seconds, then the ``M<usec>`` of the
#: unique part (as :func:`._names.delivery_sort_key` reads it, in one regular expression).
_ARRIVAL = re.compile(r"(\d+)(?:\.[^.M]*M(\d*))?")


def arrival(base: str) -> tuple[int, int]:
    """Return the delivery time of a Maildir base name: (seconds, microseconds); 0 if none."""
    found = _ARRIVAL.match(base)
    if found is None:
        return 0, 0
    return int(found[1]), int(found[2] or 0)


def folder_uidl(base: str) -> str:
    """Return the UIDL of a message first seen in a folder other than the INBOX."""
    return hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()


def folder_key(folder: str, base: str) -> str:
    """Return the key of a message in the merged listing (an INBOX key is its base name)."""
    return base if folder == INBOX else f"{folder}/{base}"


def read_folder_uidls(root: Dir) -> dict[str, str]:
    """Read ``pobox-folder-uidls``: base name → UIDL; lines that do not parse are ignored.

    Raises:
        StorageError: the file is not a regular file of the owner, too large, or unreadable.
    """
    raw = root.read_file(FOLDER_UIDLS_NAME, FOLDER_UIDLS_MAX)
    if raw is None:
        return {}
    out: dict[str, str] = {}
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        entry = _MAP_LINE.fullmatch(line)
        if entry is not None:
            out.setdefault(entry[1], entry[2])
    return out


def dovecot_guids(directory: Dir) -> dict[str, str]:
    """Map base names to the GUID ``dovecot-uidlist`` of ``directory`` gives them, if other.

    Dovecot copies (and so moves) a message under a new file name when the old one is in
    the way, and keeps its GUID, the old base name, in a ``G`` field of its uidlist line:
    that GUID, not the new name, is what moved with the message. Nothing if the file is
    missing, unusable (a link, too large) or has no such field.
    """
    try:
        raw = directory.read_file(DOVECOT_UIDLIST_NAME, INDEX_MAX)
    except StorageError:
        return {}
    if raw is None or b" G" not in raw:
        return {}
    lines = raw.decode("utf-8", "surrogateescape").split("\n")
    if not lines[0].startswith("3 "):
        return {}
    out: dict[str, str] = {}
    for line in lines[1:]:
        record = dovecot_record(line)
        if record is None:
            continue
        _, fields, name = record
        base, guid = base_name(name), fields.get("G")
        if guid and guid != base and "/" not in guid:
            out[base] = base_name(guid)
    return out


def write_folder_uidls(root: Dir, uidls: Mapping[str, str]) -> None:
    """Replace ``pobox-folder-uidls`` by ``uidls`` (atomically, :meth:`Dir.replace`)."""
    text = "".join(f"{base} {uidl}\n" for base, uidl in uidls.items())
    root.replace(FOLDER_UIDLS_NAME, text.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True, slots=True)
class Merged:
    """A merged listing: the messages, where each one is, and the map to remember."""

    messages: tuple[MessageInfo, ...]
    #: key → (folder, the key in that folder's maildrop).
    where: dict[str, tuple[str, str]]
    uidls: dict[str, str]


def merge_listing(
    parts: Sequence[tuple[str, Sequence[MessageInfo]]],
    remembered: Mapping[str, str],
    identities: Mapping[str, str] | None = None,
) -> Merged:
    """Merge the snapshots of folders into one listing (see the module doc).

    Args:
        parts: (folder, its snapshot) in the order of ``pop3_folders``; keys are base names.
        remembered: the map read from ``pobox-folder-uidls``: identity → UIDL.
        identities: base name → what identifies the message across folders, where that is
            not the base name (Dovecot's GUID, :func:`dovecot_guids`).
    """
    identities = identities or {}
    seen_bases: set[str] = set()
    used: set[str] = set()
    remember: dict[str, str] = {}
    picked: list[list[tuple[tuple[int, int], MessageInfo]]] = []
    for folder, infos in parts:
        chosen: list[tuple[tuple[int, int], MessageInfo]] = []
        for info in infos:
            base = info.key
            if base in seen_bases:
                continue  # the same message in two folders: listed once
            identity = identities.get(base, base)
            own = info.uidl if folder == INBOX else folder_uidl(identity)
            uidl = remembered.get(identity, own)
            if uidl in used:
                uidl = info.uidl if folder == INBOX else folder_uidl(base)
            if uidl in used:
                continue  # only a forged map or uidlist gets here: the user's own doing
            seen_bases.add(base)
            used.add(uidl)
            remember.setdefault(identity, uidl)
            chosen.append(
                (
                    arrival(base),
                    MessageInfo(
                        key=folder_key(folder, base),
                        size=info.size,
                        uidl=uidl,
                        header_end=info.header_end,
                        folder=folder,
                    ),
                )
            )
        picked.append(chosen)
    # heapq.merge keeps each folder's own order and interleaves by delivery time; on a tie
    # the earlier folder of ``pop3_folders`` comes first.
    merged = [info for _, info in heapq.merge(*picked, key=lambda item: item[0])]
    where = {info.key: (info.folder, info.key.rpartition("/")[2]) for info in merged}
    return Merged(tuple(merged), where, remember)


def group_keys(
    where: Mapping[str, tuple[str, str]], parts: Mapping[str, object], keys: Sequence[str]
) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """Group ``keys`` by folder; return unknown keys and (key, inner key) pairs per folder."""
    unknown: list[str] = []
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        found = where.get(key)
        if found is None or found[0] not in parts:
            unknown.append(key)
        else:
            groups.setdefault(found[0], []).append((key, found[1]))
    return unknown, groups


@dataclass(frozen=True, slots=True)
class _MergeEntry:
    """The last merged listing of a maildir, and what it was made from."""

    #: The folders' snapshots (the very objects: the snapshot cache hands out the same
    #: tuple while a folder is unchanged, and holding them here keeps their ids unique).
    listed: tuple[tuple[str, Sequence[MessageInfo]], ...]
    #: (st_ino, st_mtime_ns, st_size) of ``pobox-folder-uidls`` as merged and written.
    map_key: tuple[int, int, int]
    #: The identities the merge used (:func:`dovecot_guids`).
    identities: Mapping[str, str]
    merged: Merged


class MergeCache:
    """The last merged listing of the most recently opened maildirs (thread-safe).

    A session of unchanged folders reuses it: no map parsed, no listing merged (a merge
    costs a few microseconds per message, a thousand times the cached INBOX open).
    """

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, _MergeEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self,
        root: str,
        listed: Sequence[tuple[str, Sequence[MessageInfo]]],
        map_key: object,
        identities: Mapping[str, str],
    ) -> Merged | None:
        """Return the merge of ``listed`` if it was the last one of ``root``, with the same
        identities, and the map file is the one it wrote or read."""
        with self._lock:
            entry = self._entries.get(root)
            if (
                entry is None
                or entry.map_key != map_key
                or len(entry.listed) != len(listed)
                or entry.identities != identities
            ):
                return None
            for (folder, messages), (was_folder, was) in zip(listed, entry.listed, strict=True):
                if folder != was_folder or messages is not was:
                    return None
            self._entries.move_to_end(root)
            return entry.merged

    def put(
        self,
        root: str,
        listed: Sequence[tuple[str, Sequence[MessageInfo]]],
        map_key: tuple[int, int, int],
        identities: Mapping[str, str],
        merged: Merged,
    ) -> None:
        """Remember ``merged`` for ``root``."""
        with self._lock:
            self._entries[root] = _MergeEntry(tuple(listed), map_key, identities, merged)
            self._entries.move_to_end(root)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


#: The merges of this process (every store and the storage helper share it: the entries are
#: keyed by the maildir's path and checked against what is on disk).
_MERGES = MergeCache()


def _map_key(directory: Dir) -> tuple[int, int, int] | None:
    st = directory.stat(FOLDER_UIDLS_NAME)
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)


def _identities(root: Dir, folders: Sequence[str]) -> dict[str, str]:
    """Collect :func:`dovecot_guids` of the INBOX and the folders (those that can be opened)."""
    out = dovecot_guids(root) if INBOX in folders else {}
    for folder in folders:
        if folder != INBOX:
            try:
                with root.sub(f".{folder}") as directory:
                    out.update(dovecot_guids(directory))
            except StorageError:
                continue
    return out


def remember_uidls(
    root: str, owner: int, listed: Sequence[tuple[str, Sequence[MessageInfo]]]
) -> Merged:
    """Merge ``listed`` with the UIDLs ``pobox-folder-uidls`` remembers; update the file.

    A map that cannot be read (not a regular file of the owner, too large) counts as empty
    and is replaced; one that cannot be written is left as it is (the UIDLs of messages
    moved since are then not kept). Unchanged folders and map: the last merge, from memory.

    Raises:
        StorageError: the maildir root cannot be opened.
    """
    with Dir.open_root(root, owner) as directory:
        identities = _identities(directory, [folder for folder, _ in listed])
        before = _map_key(directory)
        cached = _MERGES.get(root, listed, before, identities) if before is not None else None
        if cached is not None:
            return cached
        try:
            known = read_folder_uidls(directory)
        except StorageError as exc:
            logger.warning("ignoring %s of %s: %s", FOLDER_UIDLS_NAME, root, exc)
            known = {}
        merged = merge_listing(listed, known, identities)
        if merged.uidls != known:
            try:
                write_folder_uidls(directory, merged.uidls)
            except StorageError as exc:
                logger.warning("cannot write %s of %s: %s", FOLDER_UIDLS_NAME, root, exc)
                return merged
        after = _map_key(directory)
        if after is not None:
            _MERGES.put(root, listed, after, identities, merged)
    return merged


def open_folder_handle(
    access: MaildirAccess, root: str, folders: Sequence[str], *, owner: int, lock: bool
) -> FolderHandle:
    """Open the maildir ``root`` with ``folders`` merged in, synchronously (storage helper).

    As :meth:`~pobox.storage.maildir.MaildirStore.open_folders`, in one thread that may wait
    for the index locks (up to the core's ``lock_timeout`` each).

    Raises:
        FolderNameError: a folder name is not acceptable.
        MaildropLocked, StorageError: as :meth:`MaildirAccess.open_path`.
    """
    names = list(dict.fromkeys(check_folder(name) for name in folders))
    parts: dict[str, MaildirHandle] = {INBOX: access.open_path(root, owner=owner, lock=lock)}
    try:
        for name in names:
            if name != INBOX:
                handle = open_folder(access, root, name, owner=owner, lock_timeout=None)
                if handle is not None:
                    parts[name] = handle
        merged = remember_uidls(root, owner, [(n, parts[n].messages) for n in names if n in parts])
        keep_merged_uidls(parts, merged)
    except BaseException:
        for handle in reversed(parts.values()):
            handle.close()
        raise
    return FolderHandle(parts, merged)


def open_folder(
    access: MaildirAccess, root: str, name: str, *, owner: int, lock_timeout: float | None
) -> MaildirHandle | None:
    """Open the folder ``.<name>`` of the maildir ``root``, unlocked; ``None`` if missing.

    Never created. A folder that is not a directory of the owner (a link, a FIFO, another
    user's) is left out with a warning: the user's own doing, which must not stop their
    session. With a retention, deleted messages of a folder are kept in the maildir's
    ``.pobox-deleted/`` with the folder noted (:mod:`._retain`), as the INBOX's are.

    Raises:
        LockBusy: the folder's index lock is busy (``lock_timeout`` 0).
        StorageError: it cannot be opened.
    """
    path = FolderPath(root, f".{name}")
    with Dir.open_root(root, owner) as directory:
        if directory.stat(path.folder) is None:
            return None
    try:
        handle = access.open_path(path, owner=owner, lock=False, lock_timeout=lock_timeout)
    except UnsafeFile as exc:
        logger.warning("folder %s left out: %s", path, exc)
        return None
    handle.kept_in = (root, name)
    return handle


def keep_merged_uidls(handles: Mapping[str, MaildirHandle], merged: Merged) -> None:
    """Tell each folder's handle the UIDLs of the merged listing, kept with deleted mail."""
    for info in merged.messages:
        folder, inner = merged.where[info.key]
        handle = handles.get(folder)
        if handle is not None:
            handle.kept_uidls[inner] = info.uidl


def add_folder_uidls(root: Dir, uidls: Mapping[str, str]) -> None:
    """Add base name → UIDL lines to ``pobox-folder-uidls`` (a restore into a folder).

    An unreadable map counts as empty, as in :func:`remember_uidls`.

    Raises:
        StorageError: the map cannot be written.
    """
    try:
        known = read_folder_uidls(root)
    except StorageError:
        known = {}
    write_folder_uidls(root, {**known, **uidls})


class FolderHandle:
    """The folders of one maildir as one :class:`MaildirHandle` (the storage helper's view).

    Each call goes to the folder's own handle; the INBOX's holds the session lock and is
    closed last. Not thread-safe, as a :class:`MaildirHandle`.
    """

    def __init__(self, parts: Mapping[str, MaildirHandle], merged: Merged) -> None:
        self._parts = dict(parts)
        self._merged = merged
        #: The merged snapshot, in arrival order.
        self.messages = merged.messages
        #: The maildir's path.
        self.root = self._parts[INBOX].root

    def open_message(self, key: str) -> tuple[int, int]:
        """Open message ``key`` in its folder (:meth:`MaildirHandle.open_message`)."""
        where = self._merged.where.get(key)
        part = None if where is None else self._parts.get(where[0])
        if where is None or part is None:
            msg = f"message {key!r} is not in the maildrop snapshot of {self.root}"
            raise MessageGone(msg)
        return part.open_message(where[1])

    def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove each message from the folder it is in (:meth:`MaildirHandle.delete`)."""
        unknown, groups = group_keys(self._merged.where, self._parts, keys)
        removed: list[str] = []
        failed = list(unknown)
        for folder, pairs in groups.items():
            back = {inner: key for key, inner in pairs}
            result = self._parts[folder].delete([inner for _, inner in pairs])
            removed.extend(back[inner] for inner in result.removed if inner in back)
            failed.extend(back[inner] for inner in result.failed if inner in back)
        return DeleteResult(removed=tuple(removed), failed=tuple(failed))

    def mark_seen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Give messages the ``S`` flag in their folders; return the keys not marked."""
        unknown, groups = group_keys(self._merged.where, self._parts, keys)
        failed = list(unknown)
        for folder, pairs in groups.items():
            back = {inner: key for key, inner in pairs}
            try:
                not_marked = self._parts[folder].mark_seen([inner for _, inner in pairs])
            except StorageError:
                failed.extend(key for key, _ in pairs)
                continue
            failed.extend(back[inner] for inner in not_marked if inner in back)
        return tuple(failed)

    def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Record first retrievals in each folder's ``pobox-retrieved`` (EXPIRE)."""
        _, groups = group_keys(self._merged.where, self._parts, list(times))
        for folder, pairs in groups.items():
            self._parts[folder].note_retrieved({inner: times[key] for key, inner in pairs})

    def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the keys first retrieved at or before ``when``, in the merged order."""
        found: set[str] = set()
        for folder, part in self._parts.items():
            found.update(folder_key(folder, inner) for inner in part.retrieved_before(when))
        return tuple(info.key for info in self.messages if info.key in found)

    def close(self) -> None:
        """Close every folder, the INBOX (and with it the session lock) last."""
        for folder, part in self._parts.items():
            if folder != INBOX:
                part.close()
        self._parts[INBOX].close()


class _Part(Protocol):
    """What :class:`FolderMaildrop` needs of each folder's open maildrop (a MaildirMaildrop)."""

    def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield the message's stored bytes."""

    def read_now(self, key: str) -> bytes | None:
        """Return a small message whole, else ``None``."""

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove messages."""

    async def mark_seen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Give messages the ``S`` flag."""

    async def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Record first retrievals."""

    async def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the keys first retrieved at or before ``when``."""

    async def close(self) -> None:
        """Close it."""


class FolderMaildrop:
    """The folders of one maildir as one maildrop; satisfies ``Maildrop`` and ``SeenFlags``.

    Each call goes to the folder's own maildrop; the INBOX's holds the session lock and is
    closed last.
    """

    def __init__(self, parts: Mapping[str, _Part], merged: Merged) -> None:
        self._parts = dict(parts)
        self._merged = merged

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The merged snapshot, in arrival order."""
        return self._merged.messages

    def _find(self, key: str) -> tuple[_Part, str]:
        where = self._merged.where.get(key)
        part = None if where is None else self._parts.get(where[0])
        if where is None or part is None:
            msg = f"message {key!r} is not in the maildrop snapshot"
            raise MessageGone(msg)
        return part, where[1]

    async def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield message ``key`` from its folder (as :meth:`MaildirMaildrop.read_message`)."""
        part, inner = self._find(key)
        chunks = part.read_message(inner)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def read_now(self, key: str) -> bytes | None:
        """Return message ``key`` from its folder if it is small (:meth:`read_now`)."""
        part, inner = self._find(key)
        return part.read_now(inner)

    def _group(self, keys: Sequence[str]) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
        """Group ``keys`` by folder (:func:`group_keys`)."""
        return group_keys(self._merged.where, self._parts, keys)

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove each message from the folder it is in (UPDATE, RFC 1939 §6)."""
        unknown, groups = self._group(keys)
        removed: list[str] = []
        failed = list(unknown)
        for folder, pairs in groups.items():
            back = {inner: key for key, inner in pairs}
            try:
                result = await self._parts[folder].delete([inner for _, inner in pairs])
            except StorageError as exc:
                logger.warning("cannot delete messages of folder %s: %s", folder, exc)
                failed.extend(key for key, _ in pairs)
                continue
            removed.extend(back[inner] for inner in result.removed if inner in back)
            failed.extend(back[inner] for inner in result.failed if inner in back)
        return DeleteResult(removed=tuple(removed), failed=tuple(failed))

    async def mark_seen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Give messages the ``S`` flag in the folder each is in; return those not marked."""
        unknown, groups = self._group(keys)
        failed = list(unknown)
        for folder, pairs in groups.items():
            back = {inner: key for key, inner in pairs}
            try:
                not_marked = await self._parts[folder].mark_seen([inner for _, inner in pairs])
            except StorageError:
                failed.extend(key for key, _ in pairs)
                continue
            failed.extend(back[inner] for inner in not_marked if inner in back)
        return tuple(failed)

    async def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Record first retrievals in each folder's ``pobox-retrieved`` (EXPIRE).

        Raises:
            StorageError: the times of a folder could not be recorded.
        """
        _, groups = self._group(list(times))
        for folder, pairs in groups.items():
            await self._parts[folder].note_retrieved({inner: times[key] for key, inner in pairs})

    async def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the keys first retrieved at or before ``when``, in the merged order.

        Raises:
            StorageError: a folder's ``pobox-retrieved`` cannot be read.
        """
        found: set[str] = set()
        for folder, part in self._parts.items():
            found.update(folder_key(folder, inner) for inner in await part.retrieved_before(when))
        return tuple(info.key for info in self.messages if info.key in found)

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Do nothing: the INBOX's lock file is lost only with the process."""

    async def close(self) -> None:
        """Close every folder, the INBOX (and with it the session lock) last."""
        for folder, part in self._parts.items():
            if folder != INBOX:
                with contextlib.suppress(StorageError):
                    await part.close()
        inbox = self._parts.get(INBOX)
        if inbox is not None:
            await inbox.close()
