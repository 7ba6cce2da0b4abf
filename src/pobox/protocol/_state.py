"""The POP3 session states and which commands each one accepts.

Theory of operation
-------------------
RFC 1939 §3 defines three states.  A session starts in AUTHORIZATION, moves to TRANSACTION
when the client proves its identity and the maildrop is opened and locked, and to UPDATE
when the client says QUIT in TRANSACTION; in UPDATE the server removes the messages marked
as deleted, answers, and closes.  QUIT in AUTHORIZATION closes without an UPDATE, and so does
a connection that drops or times out in any state (RFC 1939 §6: "the POP3 server does not
enter the UPDATE state").

The core adds bookkeeping states: AUTHENTICATING while the shell checks a password (no
further command is read until it answers), STARTING_TLS between ``+OK`` to STLS and the end
of the TLS handshake (RFC 2595 §4: nothing the client sent before the handshake counts), and
CLOSED once the session is over.

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
    #: RFC 5034: an AUTH exchange is under way; lines are SASL responses, not commands.
    SASL = "SASL"
    #: Credentials given (USER/PASS, APOP, a SASL step), the shell is verifying them or
    #: fetching what the core needs, and opening the maildrop.
    AUTHENTICATING = "AUTHENTICATING"
    #: RFC 2595 §4: STLS answered, the shell is doing the TLS handshake.
    STARTING_TLS = "STARTING_TLS"
    #: RFC 1939 §5: the maildrop is open and locked.
    TRANSACTION = "TRANSACTION"
    #: RFC 1939 §6: QUIT received, deletions being committed.
    UPDATE = "UPDATE"
    #: The session is over; the shell closes the connection.
    CLOSED = "CLOSED"

    #: Hashed by identity, in C, as :class:`~pobox.protocol._parser.Verb` is.
    __hash__ = object.__hash__


class Trigger(enum.Enum):
    """What moves a session from one state to another."""

    PASS = "PASS"
    #: AUTH with a known mechanism: the SASL exchange starts.
    AUTH = "AUTH"
    #: A SASL step needs the shell (password check, stored secret, token, maildrop).
    SASL_CHECK = "SASL_CHECK"
    #: The shell answered and the mechanism sends another challenge.
    SASL_CHALLENGE = "SASL_CHALLENGE"
    #: The client cancelled with ``*`` or sent a bad response: back to AUTHORIZATION.
    SASL_ABORT = "SASL_ABORT"
    LOGIN_ACCEPTED = "LOGIN_ACCEPTED"
    LOGIN_REJECTED = "LOGIN_REJECTED"
    QUIT = "QUIT"
    COMMITTED = "COMMITTED"
    CLOSE = "CLOSE"
    STLS = "STLS"
    TLS_STARTED = "TLS_STARTED"

    #: Hashed by identity, in C, as :class:`~pobox.protocol._parser.Verb` is.
    __hash__ = object.__hash__


#: Commands each state accepts.  STLS is only valid in AUTHORIZATION (RFC 2595 §4: "only
#: permitted in AUTHORIZATION state"), and so are APOP and AUTH (RFC 1939 §7, RFC 5034 §4)
#: and UTF8 (RFC 6856 §2); LANG is valid in both (RFC 6856 §3).
ALLOWED: Final[dict[State, frozenset[Verb]]] = {
    State.AUTHORIZATION: frozenset(
        {
            Verb.USER,
            Verb.PASS,
            Verb.APOP,
            Verb.AUTH,
            Verb.QUIT,
            Verb.CAPA,
            Verb.STLS,
            Verb.UTF8,
            Verb.LANG,
        }
    ),
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
            Verb.LANG,
        }
    ),
    State.SASL: frozenset(),
    State.AUTHENTICATING: frozenset(),
    State.STARTING_TLS: frozenset(),
    State.UPDATE: frozenset(),
    State.CLOSED: frozenset(),
}

#: The only legal state changes.  CLOSE (connection dropped, timeout, too many errors) is
#: legal from every state and never passes through UPDATE.
TRANSITIONS: Final[dict[tuple[State, Trigger], State]] = {
    # PASS also stands for APOP: both hand complete credentials to the shell.
    (State.AUTHORIZATION, Trigger.PASS): State.AUTHENTICATING,
    (State.AUTHORIZATION, Trigger.AUTH): State.SASL,
    (State.SASL, Trigger.SASL_CHECK): State.AUTHENTICATING,
    (State.SASL, Trigger.SASL_ABORT): State.AUTHORIZATION,
    (State.AUTHENTICATING, Trigger.SASL_CHALLENGE): State.SASL,
    (State.AUTHENTICATING, Trigger.LOGIN_ACCEPTED): State.TRANSACTION,
    (State.AUTHENTICATING, Trigger.LOGIN_REJECTED): State.AUTHORIZATION,
    (State.AUTHORIZATION, Trigger.QUIT): State.CLOSED,
    (State.AUTHORIZATION, Trigger.STLS): State.STARTING_TLS,
    (State.STARTING_TLS, Trigger.TLS_STARTED): State.AUTHORIZATION,
    (State.TRANSACTION, Trigger.QUIT): State.UPDATE,
    (State.UPDATE, Trigger.COMMITTED): State.CLOSED,
    **{(s, Trigger.CLOSE): State.CLOSED for s in State},
}
