"""Frames between the serving process and the storage helper: JSON and file descriptors.

The two processes share one ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair, which keeps message
boundaries and carries file descriptors (``SCM_RIGHTS``, ``unix(7)``). A *frame* is one JSON
object (UTF-8, ``json`` of the standard library: plain data only, never ``pickle``), sent as
one or more *datagrams* of at most :data:`MAX_DATAGRAM` octets, each starting with one flag
octet: ``1`` when more datagrams of the frame follow, ``0`` on the last. File descriptors
ride on the first datagram of a frame only, at most :data:`MAX_FDS` of them.

Every limit is checked on receipt, before anything is kept: a datagram that was truncated
(``MSG_TRUNC``), descriptors beyond the limit (``MSG_CTRUNC``: the kernel closes those) or on a
later datagram, a frame longer than the receiver allows, a flag octet other than 0 or 1, bytes
that are not a JSON object, all raise :class:`WireError`, and the descriptors received with the
bad datagram are closed. Received descriptors have ``O_CLOEXEC`` (``MSG_CMSG_CLOEXEC``).

May import: the standard library only.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from collections.abc import Sequence
from typing import Any, Final

__all__ = [
    "MAX_DATAGRAM",
    "MAX_FDS",
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "FrameAssembler",
    "WireError",
    "close_fds",
    "decode",
    "encode",
    "receive_datagram",
    "receive_frame",
    "send_frame",
    "socket_pair",
    "split",
]

#: Octets of one datagram, the flag octet included: well under the default socket buffer
#: (``net.core.wmem_default``, 208 KiB), which bounds a ``SOCK_SEQPACKET`` message.
MAX_DATAGRAM: Final = 64 * 1024
#: The longest request the helper accepts: requests carry a user record, a few keys or a
#: trace header (a message body travels as a descriptor), so 1 MiB is generous.
MAX_REQUEST: Final = 1024 * 1024
#: The longest response the serving process accepts: the snapshot of a maildrop is about
#: 100 octets a message, so 64 MiB holds over half a million messages.
MAX_RESPONSE: Final = 64 * 1024 * 1024
#: Descriptors one frame may carry: a message file, a spooled body or a configuration file.
MAX_FDS: Final = 2

_MORE, _LAST = 1, 0
_FD_SIZE = array.array("i").itemsize


class WireError(Exception):
    """The peer broke the framing rules; the connection cannot be trusted any more."""


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Return a connected pair of ``SOCK_SEQPACKET`` Unix sockets (close-on-exec)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def encode(message: dict[str, Any]) -> bytes:
    """Return the JSON text of ``message`` (ASCII: lone surrogates of file names survive)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii")


def decode(payload: bytes) -> dict[str, Any]:
    """Return the JSON object in ``payload``.

    Raises:
        WireError: not UTF-8 JSON, nested too deeply, or not an object.
    """
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        msg = f"not a JSON frame: {exc}"
        raise WireError(msg) from None
    if not isinstance(value, dict):
        msg = f"a frame must be a JSON object, not {type(value).__name__}"
        raise WireError(msg)
    return value


def split(payload: bytes) -> list[bytes]:
    """Cut ``payload`` into datagrams, each with its flag octet."""
    step = MAX_DATAGRAM - 1
    pieces = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
    flags = [_MORE] * (len(pieces) - 1) + [_LAST]
    return [bytes((flag,)) + piece for flag, piece in zip(flags, pieces, strict=True)]


def close_fds(fds: Sequence[int]) -> None:
    """Close descriptors that were received but will not be used."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def receive_datagram(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """Receive one datagram and the descriptors it carries; ``None`` at end of file.

    Raises:
        WireError: the datagram or its descriptors broke the limits (those are closed).
        BlockingIOError: a non-blocking socket has nothing to read.
    """
    data, ancillary, flags, _ = sock.recvmsg(
        MAX_DATAGRAM, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, cdata in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % _FD_SIZE
            fds.extend(array.array("i", cdata[:usable]))
    if not data and not fds and not ancillary:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        msg = "a datagram or its descriptors were over the limits"
        raise WireError(msg)
    return data, fds


class FrameAssembler:
    """Joins received datagrams into frames, within a size limit.

    Feed each datagram with :meth:`feed`; it returns ``(payload, fds)`` when a frame is
    complete, else ``None``.
    """

    def __init__(self, limit: int) -> None:
        """Accept frames of at most ``limit`` octets."""
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._fds: list[int] = []

    def feed(self, datagram: bytes, fds: list[int]) -> tuple[bytes, list[int]] | None:
        """Add one datagram; return the frame it completes, if it does.

        Raises:
            WireError: a bad flag, descriptors on a later datagram, or a frame over the
                limit (every descriptor held is closed).
        """
        if not datagram or datagram[0] not in (_MORE, _LAST) or (fds and self._parts):
            close_fds(fds)
            self.reset()
            msg = "malformed datagram (flag octet, or descriptors after the first datagram)"
            raise WireError(msg)
        self._size += len(datagram) - 1
        if self._size > self._limit:
            close_fds(fds)
            self.reset()
            msg = f"frame over {self._limit} octets"
            raise WireError(msg)
        self._parts.append(datagram[1:])
        self._fds.extend(fds)
        if datagram[0] == _MORE:
            return None
        payload, held = b"".join(self._parts), self._fds
        self._parts, self._size, self._fds = [], 0, []
        return payload, held

    def reset(self) -> None:
        """Drop a partial frame, closing its descriptors."""
        close_fds(self._fds)
        self._parts, self._size, self._fds = [], 0, []


def receive_frame(
    sock: socket.socket, assembler: FrameAssembler
) -> tuple[dict[str, Any], list[int]] | None:
    """Receive the next whole frame on a blocking socket: the object and its descriptors.

    Returns ``None`` at end of file (a partial frame is dropped).

    Raises:
        WireError: the framing was broken (the descriptors received are closed).
    """
    while True:
        datagram = receive_datagram(sock)
        if datagram is None:
            assembler.reset()
            return None
        frame = assembler.feed(*datagram)
        if frame is not None:
            payload, fds = frame
            try:
                return decode(payload), fds
            except WireError:
                close_fds(fds)
                raise


def send_frame(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send ``message`` (and ``fds`` with its first datagram) on a blocking socket.

    The caller serializes concurrent senders: the datagrams of one frame must not interleave
    with another's.

    Raises:
        OSError: the peer is gone.
    """
    datagrams = split(encode(message))
    if fds:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([datagrams[0]], rights)
        datagrams = datagrams[1:]
    for datagram in datagrams:
        sock.sendmsg([datagram])  # a SOCK_SEQPACKET datagram goes whole or not at all
