"""The POP3 session states and which commands each one accepts.

Theory of operation
-------------------
RFC 1939 §3 defines three states.  A session starts in AUTHORIZATION, moves to TRANSACTION
when the client proves its identity and the maildrop is opened and locked, and to UPDATE
when the client says QUIT in TRANSACTION; in UPDATE the server removes the messages marked
as deleted, answers, and closes.  QUIT in AUTHORIZATION closes without an UPDATE, and so does
a connection that drops or times out in any state (RFC 1939 §6: "the POP3 server does not
enter the UPDATE state").

The core adds two bookkeeping states: AUTHENTICATING while the shell checks a password (no
further command is read until it answers), and CLOSED once the session is over.

Everything that decides *which command is allowed where* and *which state follows which* is
in the two tables below; :mod:`pobox.protocol._server` only looks them up.  A (state, verb)
pair that is not in :data:`ALLOWED` gets a ``-ERR`` reply, never an exception.

May import: the standard library and :mod:`pobox.protocol._parser`.
"""

from __future__ import annotations

import enum
from typing import Final

from pobox.protocol._parser import Verb

__all__ = ["ALLOWED", "TRANSITIONS", "State", "Trigger"]


class State(enum.Enum):
    """Where a session is."""

    #: RFC 1939 §4: the client must identify itself.
    AUTHORIZATION = "AUTHORIZATION"
    #: USER/PASS given, the shell is verifying them and opening the maildrop.
    AUTHENTICATING = "AUTHENTICATING"
    #: RFC 1939 §5: the maildrop is open and locked.
    TRANSACTION = "TRANSACTION"
    #: RFC 1939 §6: QUIT received, deletions being committed.
    UPDATE = "UPDATE"
    #: The session is over; the shell closes the connection.
    CLOSED = "CLOSED"


class Trigger(enum.Enum):
    """What moves a session from one state to another."""

    PASS = "PASS"
    LOGIN_ACCEPTED = "LOGIN_ACCEPTED"
    LOGIN_REJECTED = "LOGIN_REJECTED"
    QUIT = "QUIT"
    COMMITTED = "COMMITTED"
    CLOSE = "CLOSE"


#: Commands each state accepts.  APOP, AUTH and STLS slot into AUTHORIZATION.
ALLOWED: Final[dict[State, frozenset[Verb]]] = {
    State.AUTHORIZATION: frozenset({Verb.USER, Verb.PASS, Verb.QUIT, Verb.CAPA}),
    State.TRANSACTION: frozenset(
        {
            Verb.STAT,
            Verb.LIST,
            Verb.RETR,
            Verb.DELE,
            Verb.NOOP,
            Verb.RSET,
            Verb.TOP,
            Verb.UIDL,
            Verb.QUIT,
            Verb.CAPA,
        }
    ),
    State.AUTHENTICATING: frozenset(),
    State.UPDATE: frozenset(),
    State.CLOSED: frozenset(),
}

#: The only legal state changes.  CLOSE (connection dropped, timeout, too many errors) is
#: legal from every state and never passes through UPDATE.
TRANSITIONS: Final[dict[tuple[State, Trigger], State]] = {
    (State.AUTHORIZATION, Trigger.PASS): State.AUTHENTICATING,
    (State.AUTHENTICATING, Trigger.LOGIN_ACCEPTED): State.TRANSACTION,
    (State.AUTHENTICATING, Trigger.LOGIN_REJECTED): State.AUTHORIZATION,
    (State.AUTHORIZATION, Trigger.QUIT): State.CLOSED,
    (State.TRANSACTION, Trigger.QUIT): State.UPDATE,
    (State.UPDATE, Trigger.COMMITTED): State.CLOSED,
    **{(s, Trigger.CLOSE): State.CLOSED for s in State},
}
