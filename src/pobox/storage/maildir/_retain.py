"""Deleted mail you can get back: the hidden ``.pobox-deleted/`` folder of a Maildir.

With ``pop3_delete_retention`` set, a message deleted over POP3 (UPDATE) is not unlinked but
renamed, file name unchanged, into ``<maildir>/.pobox-deleted/cur/``: a Maildir++-style folder
(``cur/``, ``new/``, ``tmp/``) on the same filesystem, so each move is one atomic ``rename(2)``.
POP3 never lists it (a snapshot reads only the maildir's own ``new/`` and ``cur/``), and the
quota does not count it (:func:`~._deliver.maildir_usage` neither): kept mail is bounded by
the retention instead, and purged after it, at the maildrop's next UPDATE or by
``pobox restore USER --purge``.

What a restore needs to give a message its UIDL and size back is kept in
``.pobox-deleted/pobox-deleted-list``::

    pobox-deleted 1
    1765000000 W2310 P0000002a6553f100 :1700000012.M88P7.mx,S=2270,W=2310:2,S

one line per kept message: the time it was deleted (Unix seconds), ``W`` its wire size, ``P``
its UIDL (always written out, so that a later change of the maildir's UIDVALIDITY does not
change it), ``F`` and the folder it was deleted from if that is not the INBOX (a Junk message
of a ``pop3_folders`` session: ``... P<uidl> FJunk :<name>``), then `` :`` and its file name
in ``.pobox-deleted/cur/``. Every folder's deleted mail is kept in the maildir's one
``.pobox-deleted/`` (same filesystem: a rename). The list is written
before the files move (a crash between leaves a line without a file, which is ignored and
dropped), under the maildir's index lock, which restores take too.

A restore adds an index entry that carries the old UIDL (``P``) and size (``W``) under a new
UID, then renames the file back to ``cur/``: a client that leaves mail on the server and
remembers the UIDL does not download it again, the others see it as it was. A crash between the
two leaves an index entry without a file (dropped at the next open) and the message still kept.
A message kept from a folder goes back into that folder's ``cur/`` (the INBOX if the folder is
no longer listed or no longer there), its UIDL remembered in ``pobox-folder-uidls`` first (a
callback of the caller: the map belongs to :mod:`._folders`).

Every file operation goes through :class:`~pobox.storage._safefs.Dir`: nothing of the user's
is followed (links are refused), and only regular files of the owner move.

May import: the standard library, :mod:`pobox.storage` and the maildir modules below it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from pobox.names import folder_name
from pobox.storage._safefs import Dir, flocked
from pobox.storage.base import INBOX, StorageError, restore_folder
from pobox.storage.maildir._deliver import INDEX_LOCK_NAME
from pobox.storage.maildir._index import (
    INDEX_MAX,
    INDEX_NAME,
    IndexEntry,
    UidList,
    format_pobox_uidlist,
    is_valid_uidl,
    parse_pobox_uidlist,
)
from pobox.storage.maildir._names import base_name

__all__ = [
    "DELETED_FOLDER",
    "DELETED_LIST",
    "Kept",
    "keep_messages",
    "kept_messages",
    "purge_kept",
    "restore_kept",
]

#: The hidden folder, inside the maildir.
DELETED_FOLDER = ".pobox-deleted"
#: The list of kept messages, inside :data:`DELETED_FOLDER`.
DELETED_LIST = "pobox-deleted-list"
_HEADER = "pobox-deleted 1\n"
_LINE = re.compile(
    r"([0-9]{1,12}) W([0-9]{1,15}) P([\x21-\x7e]{1,70})(?: F([^/:\n]{1,100}))? :([^/\n]+)"
)


@dataclass(frozen=True, slots=True)
class Kept:
    """One deleted message kept for restore.

    Attributes:
        deleted: when it was deleted (Unix seconds).
        size: its wire size (what LIST said).
        uidl: its UIDL (what UIDL said).
        name: its file name in ``.pobox-deleted/cur/``.
        folder: the folder it was deleted from (and is restored into).
    """

    deleted: int
    size: int
    uidl: str
    name: str
    folder: str = INBOX


def _parse(raw: bytes | None) -> list[Kept]:
    """Parse the list; lines that do not parse are dropped (the user may have written them)."""
    if not raw:
        return []
    text = raw.decode("utf-8", "surrogateescape")
    out: list[Kept] = []
    seen: set[str] = set()
    for line in text.split("\n")[1:]:
        match = _LINE.fullmatch(line)
        if match is None or match.group(5) in seen or match.group(5) in {".", ".."}:
            continue
        folder = INBOX if match.group(4) is None else folder_name(match.group(4))
        if folder is None:
            continue
        seen.add(match.group(5))
        out.append(
            Kept(int(match.group(1)), int(match.group(2)), match.group(3), match.group(5), folder)
        )
    return out


def _format(kept: Sequence[Kept]) -> bytes:
    lines = [_HEADER] + [
        f"{k.deleted} W{k.size} P{k.uidl}{'' if k.folder == INBOX else ' F' + k.folder} :{k.name}\n"
        for k in kept
    ]
    return "".join(lines).encode("utf-8", "surrogateescape")


def _folder(root: Dir) -> Dir | None:
    """Open ``.pobox-deleted``; ``None`` if there is none."""
    if root.stat(DELETED_FOLDER) is None:
        return None
    return root.sub(DELETED_FOLDER)


def _made_folder(root: Dir) -> Dir:
    """Open ``.pobox-deleted``, made with ``cur/``, ``new/`` and ``tmp/`` if missing."""
    folder = root.sub(DELETED_FOLDER, create=True)
    try:
        for name in ("cur", "new", "tmp"):
            folder.make_dir(name)
    except BaseException:
        folder.close()
        raise
    return folder


def _present(cur: Dir, kept: Sequence[Kept]) -> list[Kept]:
    """The entries whose file is a regular file of the owner in ``cur/``."""
    out = []
    for entry in kept:
        st = cur.stat(entry.name)
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_uid == cur.owner:
            out.append(entry)
    return out


def keep_messages(
    root: Dir,
    moves: Sequence[tuple[str, str, str, int, str]],
    *,
    retention: int,
    lock_timeout: float,
    now: int | None = None,
    origin: Dir | None = None,
    from_folder: str = INBOX,
) -> list[str]:
    """Move deleted messages into ``.pobox-deleted/cur/`` instead of unlinking them.

    Also purges what was kept longer than ``retention`` seconds.

    Args:
        root: the maildir (where ``.pobox-deleted`` and the index lock are).
        moves: per message: its key, the directory (``new``/``cur``) and file name it has,
            its wire size and its UIDL.
        origin: the folder the messages are in (its ``new``/``cur``), if not ``root``.
        from_folder: that folder's name, written in the list (:func:`restore_kept`).

    Returns:
        The keys whose file is no longer in the maildrop (moved, or gone already).

    Raises:
        LockBusy: the index lock stayed busy for ``lock_timeout`` seconds (nothing moved).
        StorageError: the folder or its list could not be written (nothing moved).
    """
    stamp = int(time.time()) if now is None else now
    moved: list[str] = []
    with (
        flocked(root, INDEX_LOCK_NAME, timeout=lock_timeout),
        _made_folder(root) as folder,
        folder.sub("cur") as kept_cur,
    ):
        listed = _parse(folder.read_file(DELETED_LIST, INDEX_MAX))
        kept = [k for k in listed if k.deleted + retention > stamp]
        taken = {k.name for k in kept}
        new = [
            Kept(stamp, size, uidl, name, from_folder)
            for _, _, name, size, uidl in moves
            if name not in taken and is_valid_uidl(uidl)
        ]
        folder.replace(DELETED_LIST, _format(kept + new))  # the list first, then the files
        sources: dict[str, Dir] = {}
        try:
            for key, directory, name, _, _ in moves:
                source = sources.get(directory)
                if source is None:
                    source = sources[directory] = (root if origin is None else origin).sub(
                        directory
                    )
                if _move(source, name, kept_cur, key):
                    moved.append(key)
            for source in sources.values():
                source.fsync()
            kept_cur.fsync()
        finally:
            for source in sources.values():
                source.close()
        expired = {k.name for k in listed} - {k.name for k in kept}
        _purge_files(kept_cur, {k.name for k in kept + new}, expired, retention, stamp)
    return moved


def _move(source: Dir, name: str, target: Dir, key: str) -> bool:
    """Rename one message file into ``target``; tell whether it left the maildrop."""
    st = source.stat(name)
    if st is None:
        found = _find(source, key)
        if found is None:
            return True  # gone already (expunged by another program)
        name, st = found
    if not stat.S_ISREG(st.st_mode) or st.st_uid != source.owner:
        return False
    if target.stat(name) is not None:
        return False  # never over a kept file
    try:
        source.rename(name, target, name)
    except StorageError:
        return False
    return True


def _find(source: Dir, key: str) -> tuple[str, os.stat_result] | None:
    """Find the file of base name ``key`` in ``source`` (its flags changed since)."""
    for entry in source.scandir():
        if base_name(entry.name) == key:
            st = source.stat(entry.name)
            if st is not None:
                return entry.name, st
    return None


def _purge_files(cur: Dir, listed: set[str], expired: set[str], retention: int, now: int) -> int:
    """Unlink the files of ``expired``, and those of ``cur`` in no list and as old.

    A file in no list (``listed`` and ``expired`` are the lines kept and dropped): its line
    was dropped before (a crash), or it never had one (put there by an IMAP client): it goes
    once as old as the retention, by the time it was last moved (``ctime``).

    Returns:
        How many files were unlinked.
    """
    removed = 0
    for entry in list(cur.scandir()):
        name = entry.name
        if name in listed:
            continue
        st = cur.stat(name)
        if st is None or not stat.S_ISREG(st.st_mode):
            continue
        if name in expired or st.st_ctime + retention <= now:
            with contextlib.suppress(StorageError):
                removed += cur.unlink(name)
    if removed:
        cur.fsync()
    return removed


def kept_messages(root: Dir) -> list[Kept]:
    """Return what ``.pobox-deleted`` holds, oldest deletion first."""
    folder = _folder(root)
    if folder is None:
        return []
    with folder, folder.sub("cur") as cur:
        present = _present(cur, _parse(folder.read_file(DELETED_LIST, INDEX_MAX)))
    return sorted(present, key=lambda k: k.deleted)


def purge_kept(root: Dir, *, retention: int, lock_timeout: float, now: int | None = None) -> int:
    """Unlink kept messages deleted ``retention`` seconds ago or earlier; return how many."""
    stamp = int(time.time()) if now is None else now
    folder = _folder(root)
    if folder is None:
        return 0
    with flocked(root, INDEX_LOCK_NAME, timeout=lock_timeout), folder, folder.sub("cur") as cur:
        kept = _parse(folder.read_file(DELETED_LIST, INDEX_MAX))
        keep = [k for k in kept if k.deleted + retention > stamp]
        folder.replace(DELETED_LIST, _format(keep))
        expired = {k.name for k in kept} - {k.name for k in keep}
        return _purge_files(cur, {k.name for k in keep}, expired, retention, stamp)


def _index_restored(
    root: Dir, chosen: list[Kept], fresh_index: Callable[[Dir], UidList]
) -> list[Kept]:
    """Add index entries with the old UIDLs and sizes, under new UIDs (none is reused).

    Written before the files move: a crash before the renames leaves entries without files
    (dropped at the next open) and the messages still kept. A message whose base name the
    index has already (a file of that name put back by hand) is left out: its entry, and the
    UIDL of the message there, are not touched.

    Returns:
        The messages indexed, to be moved back.
    """
    raw = root.read_file(INDEX_NAME, INDEX_MAX)
    parsed = parse_pobox_uidlist(raw.decode("utf-8", "surrogateescape")) if raw else None
    uidlist = parsed[0] if parsed is not None else fresh_index(root)
    chosen = [entry for entry in chosen if base_name(entry.name) not in uidlist.entries]
    if not chosen:
        return []
    for entry in chosen:
        uidlist.entries[base_name(entry.name)] = IndexEntry(
            uid=uidlist.next_uid, size=entry.size, uidl=entry.uidl
        )
        uidlist.next_uid += 1
    root.replace(INDEX_NAME, format_pobox_uidlist(uidlist).encode("utf-8", "surrogateescape"))
    return chosen


def _target(root: Dir, entry: Kept, folders: Sequence[str] | None) -> str:
    """Where ``entry`` goes back: its folder if listed and there (a directory), else INBOX."""
    folder = restore_folder(entry.folder, folders)
    if folder != INBOX:
        st = root.stat(f".{folder}")
        if st is None or not stat.S_ISDIR(st.st_mode):
            return INBOX
    return folder


def restore_kept(
    root: Dir,
    select: Callable[[Kept], bool],
    *,
    lock_timeout: float,
    fresh_index: Callable[[Dir], UidList] | None,
    folders: Sequence[str] | None = None,
    remember: Callable[[Dir, Mapping[str, str]], None] | None = None,
) -> list[Kept]:
    """Move the kept messages ``select`` picks back with their UIDL and size.

    A message deleted from the INBOX goes back into ``cur/``; one deleted from a folder into
    that folder's ``cur/``, or into the INBOX if ``folders`` does not list it
    (:func:`~pobox.storage.base.restore_folder`) or it is gone.

    Args:
        fresh_index: makes a new index when there is none; ``None`` for a maildir served
            without an index (its UIDLs come from the file names, which do not change).
        folders: the user's ``pop3_folders``; ``None``: each into its own folder.
        remember: records base name → UIDL of messages put back into folders (the
            ``pobox-folder-uidls`` map), before they move.

    Returns:
        The messages restored, each with the folder it went into. One whose name is taken
        where it goes stays kept.

    Raises:
        LockBusy: the index lock stayed busy for ``lock_timeout`` seconds.
        StorageError: the index or the list could not be written.
    """
    folder = _folder(root)
    if folder is None:
        return []
    restored: list[Kept] = []
    with (
        flocked(root, INDEX_LOCK_NAME, timeout=lock_timeout),
        folder,
        folder.sub("cur") as kept_cur,
        contextlib.ExitStack() as stack,
    ):
        curs: dict[str, Dir] = {INBOX: stack.enter_context(root.sub("cur"))}

        def cur_of(target: str) -> Dir | None:
            if target not in curs:
                try:
                    sub = stack.enter_context(root.sub(f".{target}"))
                    curs[target] = stack.enter_context(sub.sub("cur", create=True))
                except StorageError:
                    return None
            return curs[target]

        kept = _parse(folder.read_file(DELETED_LIST, INDEX_MAX))
        chosen: list[tuple[Kept, str]] = []
        targets: dict[str, str] = {}  # the folder deleted from → where it goes back
        for entry in _present(kept_cur, kept):
            if not select(entry):
                continue
            target = targets.get(entry.folder)
            if target is None:
                target = _target(root, entry, folders)
                if cur_of(target) is None:
                    target = INBOX
                targets[entry.folder] = target
            cur = cur_of(target)
            if cur is not None and cur.stat(entry.name) is None:
                chosen.append((entry, target))
        if not chosen:
            return []
        inbox = [entry for entry, target in chosen if target == INBOX]
        if fresh_index is not None and inbox:
            indexed = {k.name for k in _index_restored(root, inbox, fresh_index)}
            chosen = [(e, t) for e, t in chosen if t != INBOX or e.name in indexed]
        into_folders = {base_name(e.name): e.uidl for e, t in chosen if t != INBOX}
        if into_folders and remember is not None:
            remember(root, into_folders)
        for entry, target in chosen:
            cur = curs[target]
            try:
                kept_cur.rename(entry.name, cur, entry.name)
            except StorageError:
                continue
            restored.append(replace(entry, folder=target))
        for cur in curs.values():
            cur.fsync()
        kept_cur.fsync()
        done = {k.name for k in restored}
        folder.replace(DELETED_LIST, _format([k for k in kept if k.name not in done]))
    return restored
