"""The server side of a POP3 session, sans-IO: :class:`ServerConnection`.

Theory of operation
-------------------
The shell feeds every read to :meth:`ServerConnection.receive_data` and then calls
:meth:`ServerConnection.next_event` until it returns :data:`NEED_DATA` (read more),
:data:`PAUSED` (answer the last event with :meth:`ServerConnection.send` first) or
:data:`FLUSH` (write :meth:`ServerConnection.data_to_send` first: pipelined commands are
producing a lot of output).  Replies pile up in an internal buffer, emptied by
:meth:`data_to_send`; the greeting is there from the start.

Commands are handled one at a time and in order, so PIPELINING (RFC 2449 §6.6) needs nothing
special: a batch of commands in one read is answered in order, and no command is looked at
while the shell is still busy with the one before (checking a password, streaming a message).

Everything a command can do without I/O is done here; see :mod:`pobox.protocol._events` for
the rest.  State changes go through :data:`~pobox.protocol._state.TRANSITIONS` only.

May import: the standard library and :mod:`pobox.protocol`'s private modules.
"""

from __future__ import annotations

import base64
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

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
    _Sentinel,
)
from pobox.protocol._i18n import (
    DEFAULT_LANGUAGE,
    LANGUAGES,
    localize,
    lookup_language,
    saslprep,
    translate,
)
from pobox.protocol._parser import (
    LINE_TOO_LONG,
    MAX_COMMAND_LINE,
    Command,
    LineFramer,
    ParseFailure,
    Verb,
    parse_command,
    parse_number,
)
from pobox.protocol._replies import (
    CRLF,
    MAX_STATUS_LINE,
    ClientWorkarounds,
    MessageEncoder,
    TopFilter,
    WorkaroundEncoder,
    err,
    ok,
)
from pobox.protocol._sasl import (
    ALL_MECHANISMS,
    PLAINTEXT_MECHANISMS,
    Apop,
    Challenge,
    CheckPassword,
    CheckToken,
    Failed,
    Mechanism,
    NeedSecret,
    Step,
    Verified,
    b64decode_strict,
    new_mechanism,
)
from pobox.protocol._state import ALLOWED, TRANSITIONS, State, Trigger
from pobox.protocol.errors import LocalProtocolError

__all__ = ["ServerConnection", "SessionStats"]

#: Consecutive bad commands after which the session is closed.  Dovecot closes after 3 bad
#: commands before login and 20 after; one limit of 10 is as firm against a flood and still
#: forgiving to someone learning the protocol by typing in telnet.
DEFAULT_MAX_BAD_COMMANDS: Final = 10

#: Once this much output is waiting, ``next_event`` says FLUSH before reading another
#: pipelined command, so a batch of cheap commands with big answers cannot grow memory.
OUTPUT_HIGH_WATER: Final = 256 * 1024

#: RFC 5034 §4 lets SASL responses be longer than 255 octets ("the client MAY ... exceed
#: 255 octets"); 8 KiB holds any OAuth bearer token in practice and stays bounded.
MAX_SASL_LINE: Final = 8192

_NO_ARGS: Final = frozenset(
    {Verb.STAT, Verb.NOOP, Verb.RSET, Verb.QUIT, Verb.CAPA, Verb.STLS, Verb.UTF8}
)

#: The bare status line (NOOP, USER, TOP's): built once.
_OK: Final = ok()

#: How much of a bad argument a ``-ERR`` reply echoes back: enough to recognise it, and the
#: status line stays ASCII and far below RFC 2449's 512 octets whatever the client sent.
_MAX_ECHO: Final = 40


def _random_nonce() -> str:
    """Return a fresh SCRAM nonce / CRAM-MD5 challenge token: 144 random bits, URL-safe."""
    return secrets.token_urlsafe(18)


def _echo(arg: bytes) -> str:
    """Return ``arg`` fit to quote in a reply: printable ASCII only, at most _MAX_ECHO long."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in arg[:_MAX_ECHO])


@dataclass(slots=True)
class SessionStats:
    """Counters for the end-of-session log line (Dovecot's ``pop3_logout_format``)."""

    top_count: int = 0
    top_bytes: int = 0
    retr_count: int = 0
    retr_bytes: int = 0
    deleted_count: int = 0
    deleted_bytes: int = 0
    messages_at_login: int = 0
    size_at_login: int = 0


@dataclass(slots=True)
class _Retrieval:
    number: int
    size: int
    encoder: MessageEncoder
    top: TopFilter | None
    started: bool = False
    sent: int = 0


def _check_policy(expire: str | None, login_delay: int | None, error: type[Exception]) -> None:
    """Refuse an EXPIRE or LOGIN-DELAY argument RFC 2449 §6.5/§6.7 does not allow."""
    if expire is not None and expire != "NEVER" and not (expire.isascii() and expire.isdigit()):
        raise error(f"EXPIRE must be digits or NEVER, not {expire!r}")
    if login_delay is not None and login_delay < 0:
        raise error(f"LOGIN-DELAY must not be negative, not {login_delay!r}")


class ServerConnection:
    """One POP3 session, server side.

    Args:
        greeting: text after ``+OK`` in the greeting (RFC 1939 §4).
        implementation: the CAPA ``IMPLEMENTATION`` value, or ``None`` to leave it out.
        max_bad_commands: consecutive bad commands before the session is closed.
        user_enabled: whether plaintext logins (USER/PASS, CAPA ``USER``) are allowed on this
            connection now; the shell turns it off on unencrypted connections where the
            ``disable_plaintext_auth`` policy forbids them.
        tls_available: whether the shell can do STLS (RFC 2595): CAPA shows ``STLS`` and
            the command is accepted while the connection is not yet encrypted.
        secure: whether the connection is already encrypted (implicit TLS, RFC 8314).
        trace: emit :class:`~pobox.protocol.Trace` events for the ``--trace`` log.
        sasl_mechanisms: the SASL mechanisms AUTH offers (RFC 5034), upper case; none means
            AUTH is not available.
        apop_timestamp: the RFC 1939 §7 ``<...>`` timestamp to end the greeting with and
            enable APOP, or ``None`` for no APOP.
        sasl_nonce: return a fresh random token (printable ASCII, no ``,``) for the SCRAM
            server nonce and the CRAM-MD5 challenge; injectable so tests replay RFC vectors.
        hostname: the host name in the CRAM-MD5 challenge.
        username_format: the shell's ``auth_username_format``: a SASL authorization identity
            names the user when both come out of it the same (``Alice`` and ``alice``).
        on_command: called with each command line's keyword as the core takes it up (the
            :class:`Verb` value, ``"other"`` for a line that is no command), before it is
            answered; SASL responses and over-long lines are no commands.  For the shell's
            metrics; ``None``: nothing is called.
        utf8: offer RFC 6856 §2 UTF8 (CAPA ``UTF8 USER`` and the command): after it, user
            names and passwords are UTF-8 and prepared with SASLprep (RFC 4013).
        lang: offer RFC 6856 §3 LANG (CAPA ``LANG`` and the command) to switch the
            language of reply texts.
        language: the server's default language (a tag of ``LANGUAGES``): the reply texts
            from the greeting on, what ``LANG *`` picks and what STLS goes back to.
        workarounds: Dovecot's ``pop3_client_workarounds`` applied to RETR and TOP.  With
            ``OE_NS_EOH`` the shell adds 2 to the size of each message without a header end
            (:class:`HeaderEnd`) in the snapshot it sends, so LIST, STAT and RETR's octet
            count say what RETR sends.
        expire: the RFC 2449 §6.7 EXPIRE argument CAPA shows before login (digits or
            ``NEVER``), or ``None`` to show none; after login CAPA shows the user's value,
            from :class:`LoginAccepted`.
        login_delay: the RFC 2449 §6.5 LOGIN-DELAY seconds CAPA shows before login, or
            ``None`` to show none; after login, the user's value as for ``expire``.
        policy_per_user: the shell may apply other EXPIRE and LOGIN-DELAY values to some
            users: CAPA adds ``USER`` to both before login (RFC 2449 §6.5, §6.7), telling the
            client to ask again once logged in.

    Raises:
        ValueError: the greeting would make a status line over 512 octets or holds CR/LF,
            a SASL mechanism is unknown, or ``language`` is not offered.
    """

    def __init__(
        self,
        *,
        greeting: str = "pobox ready.",
        implementation: str | None = "pobox",
        max_bad_commands: int = DEFAULT_MAX_BAD_COMMANDS,
        user_enabled: bool = True,
        tls_available: bool = False,
        secure: bool = False,
        trace: bool = False,
        sasl_mechanisms: Sequence[str] = (),
        apop_timestamp: str | None = None,
        sasl_nonce: Callable[[], str] | None = None,
        hostname: str = "localhost",
        username_format: Callable[[str], str] = str,
        on_command: Callable[[str], None] | None = None,
        utf8: bool = False,
        lang: bool = False,
        language: str = DEFAULT_LANGUAGE,
        workarounds: ClientWorkarounds = ClientWorkarounds.NONE,
        expire: str | None = None,
        login_delay: int | None = None,
        policy_per_user: bool = False,
    ) -> None:
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {sorted(LANGUAGES)}, not {language!r}")
        if apop_timestamp is not None:
            greeting = f"{greeting} {apop_timestamp}"
        if "\r" in greeting or "\n" in greeting or len(ok(greeting)) > MAX_STATUS_LINE:
            raise ValueError("greeting must be one line of at most 506 octets")
        self.state = State.AUTHORIZATION
        self.username: str | None = None
        self.stats = SessionStats()
        self.user_enabled = user_enabled
        self.tls_available = tls_available
        self.secure = secure
        self.close_reason: str | None = None
        self._implementation = implementation
        self._max_bad = max_bad_commands
        self._trace = trace
        self._framer = LineFramer()
        self._out: list[bytes] = []
        self._out_len = 0
        self._events: deque[Event] = deque()
        self._pending_user: str | None = None
        self._messages: Sequence[SnapshotEntry] = ()
        self._deleted: set[int] = set()
        self._retr: _Retrieval | None = None
        self._bad = 0
        self.sasl_mechanisms = tuple(m.upper() for m in sasl_mechanisms)
        unknown = set(self.sasl_mechanisms) - set(ALL_MECHANISMS)
        if unknown:
            raise ValueError(f"unknown SASL mechanisms: {sorted(unknown)}")
        #: The identity of a verified TLS client certificate, for SASL EXTERNAL; set by the
        #: shell once the handshake is done.
        self.external_identity: str | None = None
        self._apop_timestamp = apop_timestamp
        self._sasl_nonce = sasl_nonce or _random_nonce
        self._username_format = username_format
        self._hostname = hostname
        self._on_command = on_command
        self._workarounds = workarounds
        self._sasl: Mechanism | None = None
        self._sasl_rejection: LoginRejected | None = None
        self._utf8_offered = utf8
        self._lang_offered = lang
        #: Whether the client sent UTF8 (RFC 6856 §2): credentials are SASLprep'd from then on.
        self.utf8_mode = False
        self._default_language = language
        #: The language of reply texts (RFC 6856 §3), a tag of ``LANGUAGES``.
        self.language = language
        _check_policy(expire, login_delay, ValueError)
        #: CAPA's EXPIRE and LOGIN-DELAY arguments: the server's before login, then the
        #: user's (from LoginAccepted).
        self._expire = expire
        self._login_delay = login_delay
        self._policy_suffix = b" USER" if policy_per_user else b""
        self._reply(ok(greeting))

    # ------------------------------------------------------------------ public API

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` when the client closed its side."""
        if self.state is not State.CLOSED:
            self._framer.feed(data)

    def next_event(self) -> Event | _Sentinel:
        """Handle buffered commands until one needs the shell.

        Returns:
            an event for the shell, or :data:`NEED_DATA`, :data:`PAUSED`, :data:`FLUSH`.
        """
        while True:
            if self._events:
                return self._events.popleft()
            if self.state is State.CLOSED:
                return ConnectionClosed(self.close_reason or "closed")
            if (
                self.state in (State.AUTHENTICATING, State.STARTING_TLS, State.UPDATE)
                or self._retr is not None
            ):
                return PAUSED
            if self._out_len > OUTPUT_HIGH_WATER:
                return FLUSH
            line = self._framer.next_line()
            if line is None:
                if self._framer.at_eof:
                    self._close("eof")
                    continue
                return NEED_DATA
            if self.state is State.SASL:
                self._sasl_line(line)
            elif line is LINE_TOO_LONG:
                self._trace_line("C", "<line too long, discarded>")
                self._bad_command("Line too long.")
            else:
                assert isinstance(line, bytes)
                self._handle_line(line)

    def send(
        self,
        event: LoginAccepted
        | LoginRejected
        | MessageData
        | WireData
        | EndOfMessage
        | MessageUnavailable
        | DeletionsCommitted
        | TlsStarted
        | SecretFound,
    ) -> None:
        """Give the core the shell's answer to the last event.

        Raises:
            LocalProtocolError: the event does not answer what the core is waiting for.
        """
        if isinstance(event, MessageData | WireData | EndOfMessage | MessageUnavailable):
            self._send_message_event(event)
        elif isinstance(event, LoginAccepted):
            _check_policy(event.expire, event.login_delay, LocalProtocolError)
            self._transition(Trigger.LOGIN_ACCEPTED)
            self.username = self._pending_user
            self._pending_user = None
            self._sasl = None
            self._bad = 0
            self._messages = event.messages
            self._expire = event.expire
            self._login_delay = event.login_delay
            self._policy_suffix = b""
            self.stats.messages_at_login = len(event.messages)
            self.stats.size_at_login = sum(m.size for m in event.messages)
            self._reply(ok("Logged in."))
        elif isinstance(event, LoginRejected):
            last = self._sasl.rejected() if self._sasl is not None else None
            if last is not None:
                # RFC 7628 §3.2.2: an error challenge first; the -ERR follows the client's
                # acknowledgement.
                self._sasl_rejection = event
                self._transition(Trigger.SASL_CHALLENGE)
                self._challenge(last.data)
                return
            self._transition(Trigger.LOGIN_REJECTED)
            self._pending_user = None
            self._sasl = None
            self._reply(err(event.text, event.resp_code))
        elif isinstance(event, SecretFound):
            if self._sasl is None or self.state is not State.AUTHENTICATING:
                raise LocalProtocolError("SecretFound without a FetchSecret")
            self._sasl_step(self._sasl.secret(event.secret))
        elif isinstance(event, TlsStarted):
            self._transition(Trigger.TLS_STARTED)
            # RFC 2595 §4: the client "MUST discard cached information about server
            # capabilities", and the server forgets what came before the handshake: a USER
            # given in plaintext, and any bytes that slipped in (fed here by mistake).
            self._framer.discard_buffered()
            self._pending_user = None
            self._bad = 0
            # UTF8 and LANG sent in plaintext might be an attacker's: start over (RFC 2595 §4).
            self.utf8_mode = False
            self.language = self._default_language
            self.secure = True
            self.user_enabled = event.user_enabled
        elif isinstance(event, DeletionsCommitted):
            self._transition(Trigger.COMMITTED)
            if event.failed:
                self._reply(
                    err(
                        f"Logging out, but {event.failed} message(s) could not be deleted.",
                        "SYS/TEMP",
                    )
                )
            else:
                self._reply(ok("Logging out."))
            self.close_reason = "quit"
        else:  # pragma: no cover - the type checker rules this out
            raise LocalProtocolError(f"unknown event {event!r}")

    def data_to_send(self) -> bytes:
        """Return and forget the bytes to write to the client."""
        data = b"".join(self._out)
        self._out.clear()
        self._out_len = 0
        return data

    @property
    def output_size(self) -> int:
        """How many bytes :meth:`data_to_send` would return now."""
        return self._out_len

    @property
    def wants_message_data(self) -> bool:
        """Whether the message being retrieved still needs data (TOP may be done early)."""
        return self._retr is not None and not (self._retr.top is not None and self._retr.top.done)

    @property
    def deleted(self) -> frozenset[int]:
        """Message numbers (1-based) marked as deleted."""
        return frozenset(i + 1 for i in self._deleted)

    def close(self, reason: str) -> None:
        """End the session now, without UPDATE (timeout, shutdown, dropped connection)."""
        self._close(reason)

    # ------------------------------------------------------------------ internals

    def _transition(self, trigger: Trigger) -> None:
        try:
            self.state = TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise LocalProtocolError(
                f"{trigger.value} is not expected in state {self.state.value}"
            ) from None
        self._framer.max_line = MAX_SASL_LINE if self.state is State.SASL else MAX_COMMAND_LINE

    def _close(self, reason: str) -> None:
        if self.state is not State.CLOSED:
            self._transition(Trigger.CLOSE)
            self.close_reason = reason
            # Work queued before the close must not run after it: a CommitDeletions left
            # over from a pipelined QUIT would be an UPDATE the session never reached.
            self._events = deque(e for e in self._events if isinstance(e, Trace))
            self._retr = None

    def _reply(self, line: bytes) -> None:
        if self.language != DEFAULT_LANGUAGE:
            line = translate(line, self.language)
        self._out.append(line)
        self._out_len += len(line)
        if self._trace:
            self._trace_line("S", line[:-2].decode("utf-8", "replace"))

    def _reply_lines(self, status: bytes, lines: list[bytes]) -> None:
        self._reply(status)
        body = b"".join(lines) + b"." + CRLF
        self._out.append(body)
        self._out_len += len(body)

    def _trace_line(self, direction: str, text: str) -> None:
        if self._trace:
            self._events.append(Trace(direction, text))

    def _bad_command(self, reason: str, resp_code: str | None = None) -> None:
        self._bad += 1
        if self._bad >= self._max_bad:
            self._reply(err("Too many bad commands."))
            self._close("too-many-bad-commands")
        else:
            self._reply(err(reason, resp_code))

    def _handle_line(self, line: bytes) -> None:
        parsed = parse_command(line)
        if self._on_command is not None:
            self._on_command(parsed.verb.value if isinstance(parsed, Command) else "other")
        if self._trace:
            # Mask anything that looks like PASS, not just the well-formed command: a client
            # that separates with a TAB or adds a leading space must not get logged either.
            keyword_at = len(line) - len(line.lstrip())
            if line[keyword_at : keyword_at + 4].upper() == b"PASS" and line[keyword_at + 4 :]:
                line = line[: keyword_at + 4] + b" ***"
            elif line[keyword_at : keyword_at + 4].upper() == b"AUTH" and len(line.split()) > 2:
                line = b" ".join(line.split()[:2]) + b" ***"  # an initial response
            self._trace_line("C", line.decode("utf-8", "replace"))
        if isinstance(parsed, ParseFailure):
            self._bad_command(parsed.reason)
            return
        verb = parsed.verb
        handler = _COMMANDS[self.state].get(verb)
        if handler is None:
            # Lines reach here in AUTHORIZATION and TRANSACTION only, and every verb is
            # allowed in one of the two: a refused verb belongs to the other state.
            if self.state is State.TRANSACTION:
                self._bad_command("Already logged in.")
            else:
                self._bad_command("Not logged in.")
            return
        if parsed.args and verb in _NO_ARGS:
            self._bad_command("Too many arguments.")
            return
        bad_before = self._bad
        handler(self, parsed)
        # A well-formed command ends a run of bad ones; AUTH does not, or "AUTH" followed by
        # a garbage response, over and over, would never reach max_bad_commands.
        if bad_before and self._bad == bad_before and verb is not Verb.AUTH:
            self._bad = 0

    def _cmd_user(self, cmd: Command) -> None:
        if not self.user_enabled:
            self._reply(
                err("Plaintext authentication disallowed on non-secure connections.", "AUTH")
            )
            return
        if len(cmd.args) != 1:
            self._bad_command("USER takes exactly one argument: a user name.")
            return
        user = self._user_name(cmd.args[0])
        if user is None:
            return
        self._pending_user = user
        self._reply(_OK)

    def _user_name(self, arg: bytes) -> str | None:
        """Decode a user name argument; in UTF8 mode, prepare it (RFC 6856 §2, RFC 4013).

        Before UTF8 a name is decoded as UTF-8 too (what pobox always did), unprepared.
        Replies ``-ERR`` and returns ``None`` when it cannot be used.
        """
        try:
            user = arg.decode("utf-8")
        except UnicodeDecodeError:
            self._bad_command("User name is not valid UTF-8.")
            return None
        if self.utf8_mode:
            try:
                return saslprep(user)
            except ValueError:
                # RFC 3206 AUTH: a problem with the credentials, not a server fault.
                self._bad_command("User name not allowed by SASLprep (RFC 4013).", "AUTH")
                return None
        return user

    def _cmd_pass(self, cmd: Command) -> None:
        if not self.user_enabled:
            self._reply(
                err("Plaintext authentication disallowed on non-secure connections.", "AUTH")
            )
            return
        if self._pending_user is None:
            self._reply(err("No user name given; send USER first."))
            return
        if not cmd.rest:
            self._bad_command("PASS takes one argument: the password.")
            return
        password = cmd.rest
        if self.utf8_mode:
            # RFC 6856 §2: SASLprep the PASS argument as a query string.
            try:
                password = saslprep(password.decode("utf-8")).encode()
            except UnicodeDecodeError:
                self._bad_command("Password is not valid UTF-8.")
                return
            except ValueError:
                self._bad_command("Password not allowed by SASLprep (RFC 4013).", "AUTH")
                return
        self._transition(Trigger.PASS)
        self._events.append(AuthenticateUser(self._pending_user, password))

    def _cmd_stls(self, _cmd: Command) -> None:
        if self.secure:
            self._reply(err("Already using TLS."))
            return
        if not self.tls_available:
            self._bad_command("Command not available.")
            return
        self._reply(ok("Begin TLS negotiation now."))
        self._transition(Trigger.STLS)
        # CVE-2011-0411: commands pipelined behind STLS were sent in plaintext, where anyone
        # on the path could have added them; executing them inside TLS would lend them the
        # TLS session's trust.  RFC 2595 §4 has the client wait for this reply anyway.
        discarded = self._framer.discard_buffered()
        if discarded:
            self._trace_line("C", f"<{discarded} bytes after STLS, discarded>")
        self._events.append(StartTLS(discarded))

    # ------------------------------------------------------------------ AUTH and APOP

    def _cmd_auth(self, cmd: Command) -> None:
        if not self.sasl_mechanisms:
            self._bad_command("Command not available.")
            return
        if not cmd.args:  # RFC 5034 §4 leaves it open; the seeds' servers list mechanisms
            self._reply_lines(ok(), [m.encode() + CRLF for m in self.sasl_mechanisms])
            return
        if len(cmd.args) > 2:
            self._bad_command("AUTH takes a mechanism and an optional initial response.")
            return
        name = cmd.args[0].decode("ascii", "replace").upper()
        if name not in self.sasl_mechanisms:
            self._reply(err("Unsupported authentication mechanism."))
            return
        if name in PLAINTEXT_MECHANISMS and not self.user_enabled:
            self._reply(
                err("Plaintext authentication disallowed on non-secure connections.", "AUTH")
            )
            return
        initial: bytes | None = None
        if len(cmd.args) == 2:
            # RFC 5034 §4: "=" is an empty initial response.
            initial = b"" if cmd.args[1] == b"=" else b64decode_strict(cmd.args[1])
            if initial is None:
                self._bad_command("Invalid base64 data in initial response.")
                return
        nonce = self._sasl_nonce()
        mechanism = new_mechanism(
            name,
            nonce=nonce,
            challenge=f"<{nonce}@{self._hostname}>".encode(),
            external_identity=self.external_identity,
            name_format=self._username_format,
        )
        self._sasl = mechanism
        self._transition(Trigger.AUTH)
        self._sasl_step(mechanism.start(initial))

    def _cmd_apop(self, cmd: Command) -> None:
        if self._apop_timestamp is None:
            self._bad_command("Command not available.")
            return
        if len(cmd.args) != 2 or len(cmd.args[1]) != 32:
            self._bad_command("APOP takes two arguments: a user name and an MD5 digest.")
            return
        user = self._user_name(cmd.args[0])
        if user is None:
            return
        self._sasl = Apop(self._apop_timestamp.encode(), user, cmd.args[1])
        self._transition(Trigger.PASS)
        self._sasl_step(self._sasl.start(None))

    def _challenge(self, data: bytes) -> None:
        self._reply(b"+ " + base64.b64encode(data) + CRLF)

    def _sasl_line(self, line: bytes | object) -> None:
        """Take one client response of an AUTH exchange (RFC 5034 §4)."""
        mechanism = self._sasl
        assert mechanism is not None
        self._trace_line("C", "<SASL response>")
        if line is LINE_TOO_LONG:
            self._sasl_abort("Authentication response too long.", bad=True)
            return
        assert isinstance(line, bytes)
        rejection = self._sasl_rejection
        if rejection is not None:  # the failure was counted when the shell rejected it
            self._sasl_rejection = None
            self._sasl_end(rejection.text, rejection.resp_code)
            return
        if line == b"*":
            self._sasl_abort("Authentication aborted by client.")
            return
        response = b64decode_strict(line)
        if response is None:
            self._sasl_abort("Invalid base64 data in continued response.", bad=True)
            return
        self._sasl_step(mechanism.step(response))

    def _sasl_abort(self, text: str, *, bad: bool = False) -> None:
        """End an exchange the client broke off (``*``) or spoilt (a malformed response).

        Once the client has named a user, that is a failed login like a wrong password: the
        shell counts it, logs it and delays the answer.  Otherwise aborting after SCRAM's
        first step would be a free way to learn salts and make the server derive keys.
        """
        assert self._sasl is not None
        user = self._sasl.authcid
        if user is not None:
            self._sasl_step(Failed(user, text))
        else:
            self._sasl_end(text, bad=bad)

    def _sasl_end(self, text: str, resp_code: str | None = None, *, bad: bool = False) -> None:
        self._sasl = None
        self._transition(Trigger.SASL_ABORT)
        if bad:  # garbage counts towards max_bad_commands, like a bad command line
            self._bad_command(text)
        else:
            self._reply(err(text, resp_code))

    def _sasl_step(self, step: Step) -> None:
        """Act on what the mechanism asks for: a challenge, or the shell's help."""
        mechanism = self._sasl
        assert mechanism is not None
        if isinstance(step, Challenge):
            if self.state is State.AUTHENTICATING:
                self._transition(Trigger.SASL_CHALLENGE)
            self._challenge(step.data)
            return
        if self.state is State.SASL:
            self._transition(Trigger.SASL_CHECK)
        name = mechanism.name
        self._pending_user = step.authcid
        if isinstance(step, CheckPassword):
            self._events.append(AuthenticateUser(step.authcid, step.password, name))
        elif isinstance(step, NeedSecret):
            self._events.append(FetchSecret(step.authcid, name))
        elif isinstance(step, CheckToken):
            self._events.append(VerifyToken(step.authcid, step.token, name))
        elif isinstance(step, Verified):
            self._events.append(OpenMaildrop(step.authcid, name))
        else:
            self._events.append(LoginFailed(step.authcid, name, step.reason))

    def _cmd_quit(self, _cmd: Command) -> None:
        if self.state is State.AUTHORIZATION:
            self._reply(ok("Logging out."))
            self._close("quit")
        else:
            self._transition(Trigger.QUIT)
            self._events.append(CommitDeletions(tuple(sorted(i + 1 for i in self._deleted))))

    def _cmd_capa(self, _cmd: Command) -> None:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.user_enabled and self.state is State.AUTHORIZATION:
            caps.append(b"USER")
        if self.sasl_mechanisms and self.state is State.AUTHORIZATION:
            offered = [
                m
                for m in self.sasl_mechanisms
                if self.user_enabled or m not in PLAINTEXT_MECHANISMS
            ]
            if offered:
                caps.append(" ".join(["SASL", *offered]).encode())
        if self.tls_available and not self.secure and self.state is State.AUTHORIZATION:
            caps.append(b"STLS")
        if self._utf8_offered:
            caps.append(b"UTF8 USER")
        if self._lang_offered:
            caps.append(b"LANG")
        if self._expire is not None:
            caps.append(b"EXPIRE " + self._expire.encode("ascii") + self._policy_suffix)
        if self._login_delay is not None:
            caps.append(b"LOGIN-DELAY %d" % self._login_delay + self._policy_suffix)
        if self._implementation:
            caps.append(b"IMPLEMENTATION " + self._implementation.encode())
        self._reply_lines(ok("Capability list follows"), [c + CRLF for c in caps])

    def _cmd_utf8(self, _cmd: Command) -> None:
        """RFC 6856 §2: from now on user names and passwords are UTF-8, SASLprep'd."""
        if not self._utf8_offered:
            self._bad_command("Command not available.")
            return
        self.utf8_mode = True
        self._reply(ok("UTF-8 mode on."))

    def _cmd_lang(self, cmd: Command) -> None:
        """RFC 6856 §3: list the languages, or switch the language of reply texts."""
        if not self._lang_offered:
            self._bad_command("Command not available.")
            return
        if not cmd.args:
            self._reply_lines(
                ok("Language listing follows"),
                [f"{tag} {name}".encode() + CRLF for tag, name in LANGUAGES.items()],
            )
            return
        if len(cmd.args) > 1:
            self._bad_command("Too many arguments.")
            return
        tag = lookup_language(cmd.args[0], self._default_language)
        if tag is None:
            # RFC 6856 §3: -ERR, and the language stays what it was.
            self._reply(err(f"Unsupported language: {_echo(cmd.args[0])}"))
            return
        self.language = tag
        # "+OK" then the tag chosen, then text in that language (RFC 6856 §3's example).
        self._reply(ok(f"{tag} {localize('Language changed.', tag)}"))

    def _cmd_stat(self, _cmd: Command) -> None:
        self._reply(b"+OK %d %d\r\n" % self._totals())

    def _cmd_noop(self, _cmd: Command) -> None:
        self._reply(_OK)

    def _cmd_rset(self, _cmd: Command) -> None:
        self._deleted.clear()
        self.stats.deleted_count = self.stats.deleted_bytes = 0
        count, size = self._totals()
        self._reply(ok(f"maildrop has {count} messages ({size} octets)"))

    def _cmd_list(self, cmd: Command) -> None:
        self._listing(cmd, lambda i: str(self._messages[i].size).encode())

    def _cmd_uidl(self, cmd: Command) -> None:
        self._listing(cmd, lambda i: self._messages[i].uidl.encode())

    def _listing(self, cmd: Command, value: Callable[[int], bytes]) -> None:
        if len(cmd.args) > 1:
            self._bad_command("Too many arguments.")
            return
        if cmd.args:
            index = self._message_index(cmd.args[0])
            if index is None:
                return
            self._reply(b"+OK %d %s\r\n" % (index + 1, value(index)))
            return
        deleted = self._deleted
        lines = [
            b"%d %s\r\n" % (i + 1, value(i)) for i in range(len(self._messages)) if i not in deleted
        ]
        if cmd.verb is Verb.LIST:
            count, size = self._totals()
            status = ok(f"{count} messages ({size} octets)")
        else:
            status = ok()
        self._reply_lines(status, lines)

    def _cmd_retr(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            self._bad_command("RETR takes one argument: a message number.")
            return
        index = self._message_index(cmd.args[0])
        if index is None:
            return
        self._start_retrieval(index, None)

    def _cmd_top(self, cmd: Command) -> None:
        if len(cmd.args) != 2:
            self._bad_command("TOP takes two arguments: a message number and a line count.")
            return
        lines = parse_number(cmd.args[1])
        if lines is None:
            self._bad_command("Invalid line count.")
            return
        index = self._message_index(cmd.args[0])
        if index is None:
            return
        self._start_retrieval(index, lines if lines >= 0 else 1 << 62)

    def _cmd_dele(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            self._bad_command("DELE takes one argument: a message number.")
            return
        index = self._message_index(cmd.args[0])
        if index is None:
            return
        self._deleted.add(index)
        self.stats.deleted_count += 1
        self.stats.deleted_bytes += self._messages[index].size
        self._reply(ok(f"Message {index + 1} marked to be deleted."))

    def _totals(self) -> tuple[int, int]:
        deleted = self._deleted
        msgs = self._messages
        if not deleted:
            return len(msgs), self.stats.size_at_login
        return len(msgs) - len(deleted), self.stats.size_at_login - sum(
            msgs[i].size for i in deleted
        )

    def _message_index(self, arg: bytes) -> int | None:
        """Validate a message-number argument; reply ``-ERR`` and return None if bad."""
        number = parse_number(arg)
        if number is None:
            self._bad_command(f"Invalid message number: {_echo(arg)}")
            return None
        if number < 1 or number > len(self._messages):
            shown = arg.decode("ascii") if number else "0"
            self._reply(err(f"There's no message {shown}."))
            return None
        if number - 1 in self._deleted:
            self._reply(err(f"Message {number} is deleted."))
            return None
        return number - 1

    def _start_retrieval(self, index: int, top_lines: int | None) -> None:
        self._retr = _Retrieval(
            number=index + 1,
            size=self._messages[index].size,
            encoder=WorkaroundEncoder(self._workarounds) if self._workarounds else MessageEncoder(),
            top=TopFilter(top_lines) if top_lines is not None else None,
        )
        self._events.append(RetrieveMessage(index + 1, top_lines))

    def _send_message_event(
        self, event: MessageData | WireData | EndOfMessage | MessageUnavailable
    ) -> None:
        retr = self._retr
        if retr is None:
            raise LocalProtocolError(f"{type(event).__name__} without a RetrieveMessage")
        if isinstance(event, MessageUnavailable):
            self._retr = None
            if retr.started:  # the client has half a message: the only honest end is to close
                self._close("message-failed")
            else:
                self._reply(err(event.text, event.resp_code))
            return
        encoder = retr.encoder
        top = retr.top
        if isinstance(event, WireData):
            if (
                top is not None
                or type(encoder) is not MessageEncoder
                or not encoder.sent_as_stored(ends_line=event.ends_line)
            ):
                raise LocalProtocolError("WireData: only for RETR without workarounds, no CR held")
            self._start_message(retr)
            retr.sent += event.octets  # sent by the shell, after what is queued now
            return
        self._start_message(retr)
        if isinstance(event, MessageData):
            if top is None:
                data = encoder.encode(event.data)
            else:
                data = encoder.stuff(top.feed(encoder.normalize(event.data)))
            if not event.last:
                self._message_out(retr, data)
                return
        else:  # EndOfMessage
            data = b""
        # The end: EndOfMessage, or the last chunk.  A CR held back at the end of the last
        # chunk is message text: TOP must cut it too when it has already seen all the lines
        # it keeps (``finish`` sends it, stuffed, for RETR).
        if top is not None:
            data += encoder.stuff(top.feed(encoder.flush()))
        tail = encoder.finish()
        retr.sent += len(data) + len(tail)
        self._out += (data, tail)
        self._out_len += len(data) + len(tail)
        self._retr = None
        if top is not None:
            self.stats.top_count += 1
            self.stats.top_bytes += retr.sent
        else:
            self.stats.retr_count += 1
            self.stats.retr_bytes += retr.sent

    def _start_message(self, retr: _Retrieval) -> None:
        """Queue the status line before the first octets of the message."""
        if not retr.started:
            retr.started = True
            self._reply(_OK if retr.top else b"+OK %d octets\r\n" % retr.size)

    def _message_out(self, retr: _Retrieval, data: bytes) -> None:
        """Queue octets of the message in wire form."""
        if data:
            retr.sent += len(data)
            self._out.append(data)
            self._out_len += len(data)


#: Each verb's handler.  Built after the class, not in its body: compiled by mypyc
#: (bench/results/mypyc.md), the methods are not plain functions there.
_HANDLERS: Final[dict[Verb, Callable[[ServerConnection, Command], None]]] = {
    Verb.USER: ServerConnection._cmd_user,
    Verb.PASS: ServerConnection._cmd_pass,
    Verb.AUTH: ServerConnection._cmd_auth,
    Verb.APOP: ServerConnection._cmd_apop,
    Verb.QUIT: ServerConnection._cmd_quit,
    Verb.CAPA: ServerConnection._cmd_capa,
    Verb.STLS: ServerConnection._cmd_stls,
    Verb.STAT: ServerConnection._cmd_stat,
    Verb.NOOP: ServerConnection._cmd_noop,
    Verb.RSET: ServerConnection._cmd_rset,
    Verb.LIST: ServerConnection._cmd_list,
    Verb.UIDL: ServerConnection._cmd_uidl,
    Verb.RETR: ServerConnection._cmd_retr,
    Verb.TOP: ServerConnection._cmd_top,
    Verb.DELE: ServerConnection._cmd_dele,
    Verb.UTF8: ServerConnection._cmd_utf8,
    Verb.LANG: ServerConnection._cmd_lang,
}


#: The commands each state takes (:data:`ALLOWED`), verb to handler: one lookup per line
#: both checks the verb against the state and finds what handles it.
_COMMANDS: Final[dict[State, dict[Verb, Callable[[ServerConnection, Command], None]]]] = {
    state: {verb: _HANDLERS[verb] for verb in verbs} for state, verbs in ALLOWED.items()
}
