"""Drive :class:`pobox.protocol.ServerConnection` with bytes only: no event loop, no socket.

Tests assert on the literal bytes these helpers return, never on constants of the core.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pobox.protocol import (
    FLUSH,
    NEED_DATA,
    PAUSED,
    AuthenticateUser,
    CommitDeletions,
    ConnectionClosed,
    DeletionsCommitted,
    EndOfMessage,
    LoginAccepted,
    LoginRejected,
    MessageData,
    RetrieveMessage,
    ServerConnection,
    State,
)

_STOP = (NEED_DATA, PAUSED, FLUSH)


@dataclass(frozen=True)
class Msg:
    """A snapshot entry: what storage's ``MessageInfo`` gives the core."""

    size: int
    uidl: str


def drain(conn: ServerConnection) -> list[object]:
    """Call ``next_event`` until NEED_DATA, PAUSED, FLUSH or ConnectionClosed; return them all."""
    events: list[object] = []
    while True:
        event = conn.next_event()
        events.append(event)
        if event in _STOP or isinstance(event, ConnectionClosed):
            return events


def run(conn: ServerConnection, data: bytes | None = None) -> tuple[list[object], bytes]:
    """Feed ``data`` (``b""`` is EOF, ``None`` feeds nothing), drain events, take the output."""
    if data is not None:
        conn.receive_data(data)
    events = drain(conn)
    return events, conn.data_to_send()


def logged_in(messages: Sequence[Msg] = (), **kwargs: Any) -> ServerConnection:
    """Return a connection in TRANSACTION on ``messages``, with all output so far drained."""
    conn = ServerConnection(**kwargs)
    run(conn, b"USER alice\r\nPASS secret\r\n")
    conn.send(LoginAccepted(messages))
    run(conn)
    assert conn.state is State.TRANSACTION
    return conn


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Split ``data`` at the offsets ``cuts`` (any order, duplicates and ends allowed)."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if a < b]


def retrieve(
    conn: ServerConnection, stored: bytes, cuts: Iterable[int] = ()
) -> tuple[list[object], bytes]:
    """Answer the pending RetrieveMessage with ``stored`` (split at ``cuts``) and EndOfMessage.

    Returns the events and output that follow, as :func:`run` does.
    """
    for piece in pieces(stored, cuts):
        conn.send(MessageData(piece))
    conn.send(EndOfMessage())
    return run(conn)


@dataclass
class Shell:
    """A scripted shell that answers every event at once, for whole-vs-split comparisons.

    ``password`` is the only accepted one; ``message`` is what every retrieval streams.
    """

    messages: Sequence[Msg] = ()
    password: bytes = b"secret"
    message: bytes = b"Subject: x\r\n\r\nbody\r\n"
    chunk: int = 7

    def answer(self, conn: ServerConnection, event: object) -> None:
        """Send the core the answer to ``event``, if it needs one."""
        if isinstance(event, AuthenticateUser):
            if event.password == self.password:
                conn.send(LoginAccepted(self.messages))
            else:
                conn.send(LoginRejected())
        elif isinstance(event, RetrieveMessage):
            for start in range(0, len(self.message), self.chunk):
                if not conn.wants_message_data:
                    break
                conn.send(MessageData(self.message[start : start + self.chunk]))
            conn.send(EndOfMessage())
        elif isinstance(event, CommitDeletions):
            conn.send(DeletionsCommitted())


def drive(
    conn: ServerConnection,
    chunks: Iterable[bytes],
    shell: Shell,
    *,
    eof: bool = True,
    on_idle: Callable[[ServerConnection], None] | None = None,
) -> tuple[list[object], bytes]:
    """Feed ``chunks`` one read at a time, answering as ``shell`` does; then EOF if ``eof``.

    Returns every non-sentinel event (ConnectionClosed once) and all the output, so that any
    two ways of splitting the same input can be compared.  ``on_idle`` runs at each
    NEED_DATA, e.g. to check the framer's buffer.
    """
    events: list[object] = []
    out: list[bytes] = []

    def pump() -> bool:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if on_idle is not None:
                    on_idle(conn)
                return True
            if event is FLUSH:
                out.append(conn.data_to_send())
                continue
            assert event is not PAUSED, "the scripted shell answers everything at once"
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return False
            shell.answer(conn, event)
            out.append(conn.data_to_send())

    open_ = pump()
    for chunk in chunks:
        if not open_:
            break
        if not chunk:  # b"" would mean EOF
            continue
        conn.receive_data(chunk)
        open_ = pump()
    if open_ and eof:
        conn.receive_data(b"")
        pump()
    out.append(conn.data_to_send())
    return events, b"".join(out)
