"""Folder marks (``pop3_folder_mark``): how a POP3 client tells Junk from INBOX mail.

A maildrop opened with folders merged in (:class:`~pobox.storage.base.MaildropFolders`) lists
messages of ``Junk`` among those of the INBOX; a client's filter can sort them only by what is
in the message. :func:`mark_folders` wraps such a maildrop so that every message of a folder
other than the INBOX carries its folder name:

* ``"header"``: the line ``X-Folder: <folder>`` (CRLF) on top of the header. It comes before
  anything a sender wrote, so a filter on the first ``X-Folder`` field cannot be fooled by
  a spammer's own ``X-Folder: INBOX``.
* ``"subject"``: ``[<folder>] `` at the start of the first ``Subject:`` field's body (after
  the colon and the blanks after it), or, if the header has no ``Subject:`` within its first
  :data:`HEAD_MAX` octets, the line ``Subject: [<folder>]`` (CRLF) on top of the header.
  Finding the field reads the head of each marked message once, at open.
* ``"none"`` (the default): nothing; :func:`mark_folders` returns the maildrop as it is.

The sizes in the snapshot grow by exactly the octets inserted (CRLF line ends and no LF:
the wire form adds nothing), so STAT, LIST and RETR's octet count stay exact (RFC 1939 §5);
TOP sends the marked header. Folder names are checked names
(:func:`~pobox.storage.base.check_folder`): no control characters, nothing that breaks a
header line.

May import: the standard library and :mod:`pobox.storage`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace

from pobox.storage.base import (
    INBOX,
    DeleteResult,
    Maildrop,
    MessageInfo,
    RetrievalTimes,
    SeenFlags,
    StorageError,
)

__all__ = [
    "FOLDER_MARKS",
    "HEAD_MAX",
    "MarkedMaildrop",
    "MarkedTimedMaildrop",
    "mark_folders",
    "subject_offset",
]

#: The values of ``pop3_folder_mark``.
FOLDER_MARKS = ("none", "header", "subject")
#: Octets of a message's head searched for its ``Subject:`` field (``"subject"`` marks).
HEAD_MAX = 64 * 1024


def subject_offset(head: bytes) -> int | None:
    """Return where ``[folder] `` goes in the first ``Subject:`` field of ``head``, or ``None``.

    ``head`` is the start of a stored message; only the header (up to the first empty line)
    is searched, and only complete field names: the offset is after ``Subject:`` and the
    spaces and tabs that follow it.
    """
    start = 0
    size = len(head)
    while start < size:
        end = head.find(b"\n", start)
        line = head[start:] if end < 0 else head[start:end]
        if line in (b"", b"\r"):
            return None  # the end of the header
        if line[:8].lower() == b"subject:":
            offset = start + 8
            while offset < size and head[offset] in b" \t":
                offset += 1
            return offset
        if end < 0:
            return None
        start = end + 1
    return None


async def _head(maildrop: Maildrop, key: str) -> bytes:
    """Read up to :data:`HEAD_MAX` octets of message ``key``."""
    data = maildrop.read_now(key)
    if data is not None:
        return data[:HEAD_MAX]
    parts: list[bytes] = []
    got = 0
    chunks = maildrop.read_message(key)
    try:
        async for chunk in chunks:
            parts.append(chunk)
            got += len(chunk)
            if got >= HEAD_MAX:
                break
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return b"".join(parts)[:HEAD_MAX]


async def mark_folders(maildrop: Maildrop, mark: str) -> Maildrop:
    """Return ``maildrop`` with its non-INBOX messages marked as ``mark`` says.

    A message whose head cannot be read (``"subject"``) is left unmarked: RETR will fail on
    it anyway.

    Raises:
        ValueError: ``mark`` is not one of :data:`FOLDER_MARKS`.
    """
    if mark not in FOLDER_MARKS:
        msg = f"pop3_folder_mark must be one of {', '.join(FOLDER_MARKS)}, not {mark!r}"
        raise ValueError(msg)
    if mark == "none" or all(info.folder == INBOX for info in maildrop.messages):
        return maildrop
    inserts: dict[str, tuple[int, bytes]] = {}
    for info in maildrop.messages:
        if info.folder == INBOX:
            continue
        tag = info.folder.encode("ascii")
        if mark == "header":
            inserts[info.key] = (0, b"X-Folder: " + tag + b"\r\n")
            continue
        try:
            offset = subject_offset(await _head(maildrop, info.key))
        except StorageError:
            continue
        if offset is None:
            inserts[info.key] = (0, b"Subject: [" + tag + b"]\r\n")
        else:
            inserts[info.key] = (offset, b"[" + tag + b"] ")
    if isinstance(maildrop, RetrievalTimes):
        return MarkedTimedMaildrop(maildrop, inserts)
    return MarkedMaildrop(maildrop, inserts)


class MarkedMaildrop:
    """A maildrop whose messages get octets inserted when read; satisfies ``Maildrop``.

    Also ``SeenFlags``: :meth:`mark_seen` passes on to the wrapped maildrop, and does nothing
    for one without seen flags.
    """

    def __init__(self, inner: Maildrop, inserts: dict[str, tuple[int, bytes]]) -> None:
        """Wrap ``inner``; ``inserts`` maps a key to (offset in the stored bytes, octets)."""
        self._inner = inner
        self._inserts = inserts
        self._messages = tuple(
            replace(info, size=info.size + len(inserts[info.key][1]))
            if info.key in inserts
            else info
            for info in inner.messages
        )

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The wrapped snapshot, with the sizes of marked messages grown by their mark."""
        return self._messages

    async def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield message ``key`` as stored, with its mark inserted."""
        insert = self._inserts.get(key)
        chunks = self._inner.read_message(key)
        try:
            if insert is None:
                async for chunk in chunks:
                    yield chunk
                return
            offset, octets = insert
            position = 0
            done = False
            async for chunk in chunks:
                if not done and position + len(chunk) >= offset:
                    cut = offset - position
                    yield chunk[:cut] + octets + chunk[cut:]
                    done = True
                else:
                    yield chunk
                position += len(chunk)
            if not done:
                yield octets  # the message is shorter than it was at open
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def read_now(self, key: str) -> bytes | None:
        """Return message ``key`` with its mark if the wrapped maildrop has it at hand."""
        data = self._inner.read_now(key)
        insert = self._inserts.get(key)
        if data is None or insert is None:
            return data
        offset, octets = insert
        return data[:offset] + octets + data[offset:]

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove messages (the wrapped maildrop's :meth:`delete`)."""
        return await self._inner.delete(keys)

    async def mark_seen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Mark messages seen in the wrapped maildrop, if it keeps seen flags."""
        if isinstance(self._inner, SeenFlags):
            return await self._inner.mark_seen(keys)
        return ()

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Pass ``callback`` on to the wrapped maildrop."""
        self._inner.on_lock_lost(callback)

    async def close(self) -> None:
        """Close the wrapped maildrop."""
        await self._inner.close()


class MarkedTimedMaildrop(MarkedMaildrop):
    """A :class:`MarkedMaildrop` of a maildrop that keeps retrieval times (EXPIRE).

    Also ``RetrievalTimes``, passed on to the wrapped maildrop (keys are the same).
    """

    def __init__(self, inner: Maildrop, inserts: dict[str, tuple[int, bytes]]) -> None:
        """Wrap ``inner``, which must offer ``RetrievalTimes``."""
        assert isinstance(inner, RetrievalTimes)
        super().__init__(inner, inserts)
        self._timed = inner

    async def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Record first retrievals in the wrapped maildrop."""
        await self._timed.note_retrieved(times)

    async def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the wrapped maildrop's keys first retrieved at or before ``when``."""
        return await self._timed.retrieved_before(when)
