"""The sans-IO POP3 protocol core: bytes in, events and bytes out, no I/O.

Public API: :class:`ServerConnection`, the events of :mod:`pobox.protocol._events`, the
sentinels :data:`NEED_DATA`, :data:`PAUSED`, :data:`FLUSH`, and the errors.

May import: the standard library only (no asyncio, socket, ssl, os, time, logging or other
``pobox`` packages); ``tests/protocol/test_boundary.py`` checks it.
"""

from __future__ import annotations

from pobox.protocol._events import (
    FLUSH,
    NEED_DATA,
    PAUSED,
    AuthenticateUser,
    CommitDeletions,
    ConnectionClosed,
    DeletionsCommitted,
    EndOfMessage,
    Event,
    FetchSecret,
    LoginAccepted,
    LoginFailed,
    LoginRejected,
    MessageData,
    MessageUnavailable,
    OpenMaildrop,
    RetrieveMessage,
    SecretFound,
    SnapshotEntry,
    StartTLS,
    TlsStarted,
    Trace,
    VerifyToken,
    WireData,
)
from pobox.protocol._parser import MAX_COMMAND_LINE, Verb
from pobox.protocol._replies import ClientWorkarounds, HeaderEnd, MessageEncoder
from pobox.protocol._sasl import ALL_MECHANISMS, PLAINTEXT_MECHANISMS, ScramKeys, Secret
from pobox.protocol._server import ServerConnection, SessionStats
from pobox.protocol._state import State
from pobox.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "ALL_MECHANISMS",
    "FLUSH",
    "MAX_COMMAND_LINE",
    "NEED_DATA",
    "PAUSED",
    "PLAINTEXT_MECHANISMS",
    "AuthenticateUser",
    "ClientWorkarounds",
    "CommitDeletions",
    "ConnectionClosed",
    "DeletionsCommitted",
    "EndOfMessage",
    "Event",
    "FetchSecret",
    "HeaderEnd",
    "LocalProtocolError",
    "LoginAccepted",
    "LoginFailed",
    "LoginRejected",
    "MessageData",
    "MessageEncoder",
    "MessageUnavailable",
    "OpenMaildrop",
    "ProtocolError",
    "RemoteProtocolError",
    "RetrieveMessage",
    "ScramKeys",
    "Secret",
    "SecretFound",
    "ServerConnection",
    "SessionStats",
    "SnapshotEntry",
    "StartTLS",
    "State",
    "TlsStarted",
    "Trace",
    "Verb",
    "VerifyToken",
    "WireData",
]
