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
    LoginAccepted,
    LoginRejected,
    MessageData,
    MessageUnavailable,
    RetrieveMessage,
    SnapshotEntry,
    Trace,
    _Sentinel,
)
from pobox.protocol._parser import (
    LINE_TOO_LONG,
    Command,
    LineFramer,
    ParseFailure,
    Verb,
    parse_command,
    parse_number,
)
from pobox.protocol._replies import CRLF, MAX_STATUS_LINE, MessageEncoder, TopFilter, err, ok
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

_NO_ARGS: Final = frozenset({Verb.STAT, Verb.NOOP, Verb.RSET, Verb.QUIT, Verb.CAPA})

#: How much of a bad argument a ``-ERR`` reply echoes back: enough to recognise it, and the
#: status line stays ASCII and far below RFC 2449's 512 octets whatever the client sent.
_MAX_ECHO: Final = 40


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


class ServerConnection:
    """One POP3 session, server side.

    Args:
        greeting: text after ``+OK`` in the greeting (RFC 1939 §4).
        implementation: the CAPA ``IMPLEMENTATION`` value, or ``None`` to leave it out.
        max_bad_commands: consecutive bad commands before the session is closed.
        user_enabled: whether USER/PASS is offered (CAPA ``USER``); the shell turns it off
            where plaintext logins are not allowed.
        trace: emit :class:`~pobox.protocol.Trace` events for the ``--trace`` log.

    Raises:
        ValueError: the greeting would make a status line over 512 octets or holds CR/LF.
    """

    def __init__(
        self,
        *,
        greeting: str = "pobox ready.",
        implementation: str | None = "pobox",
        max_bad_commands: int = DEFAULT_MAX_BAD_COMMANDS,
        user_enabled: bool = True,
        trace: bool = False,
    ) -> None:
        if "\r" in greeting or "\n" in greeting or len(ok(greeting)) > MAX_STATUS_LINE:
            raise ValueError("greeting must be one line of at most 506 octets")
        self.state = State.AUTHORIZATION
        self.username: str | None = None
        self.stats = SessionStats()
        self.user_enabled = user_enabled
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
            if self.state in (State.AUTHENTICATING, State.UPDATE) or self._retr is not None:
                return PAUSED
            if self._out_len > OUTPUT_HIGH_WATER:
                return FLUSH
            line = self._framer.next_line()
            if line is None:
                if self._framer.at_eof:
                    self._close("eof")
                    continue
                return NEED_DATA
            if line is LINE_TOO_LONG:
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
        | EndOfMessage
        | MessageUnavailable
        | DeletionsCommitted,
    ) -> None:
        """Give the core the shell's answer to the last event.

        Raises:
            LocalProtocolError: the event does not answer what the core is waiting for.
        """
        if isinstance(event, MessageData | EndOfMessage | MessageUnavailable):
            self._send_message_event(event)
        elif isinstance(event, LoginAccepted):
            self._transition(Trigger.LOGIN_ACCEPTED)
            self.username = self._pending_user
            self._pending_user = None
            self._messages = event.messages
            self.stats.messages_at_login = len(event.messages)
            self.stats.size_at_login = sum(m.size for m in event.messages)
            self._reply(ok("Logged in."))
        elif isinstance(event, LoginRejected):
            self._transition(Trigger.LOGIN_REJECTED)
            self._pending_user = None
            self._reply(err(event.text, event.resp_code))
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

    def _close(self, reason: str) -> None:
        if self.state is not State.CLOSED:
            self._transition(Trigger.CLOSE)
            self.close_reason = reason
            # Work queued before the close must not run after it: a CommitDeletions left
            # over from a pipelined QUIT would be an UPDATE the session never reached.
            self._events = deque(e for e in self._events if isinstance(e, Trace))
            self._retr = None

    def _reply(self, line: bytes) -> None:
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

    def _bad_command(self, reason: str) -> None:
        self._bad += 1
        if self._bad >= self._max_bad:
            self._reply(err("Too many bad commands."))
            self._close("too-many-bad-commands")
        else:
            self._reply(err(reason))

    def _handle_line(self, line: bytes) -> None:
        parsed = parse_command(line)
        if self._trace:
            # Mask anything that looks like PASS, not just the well-formed command: a client
            # that separates with a TAB or adds a leading space must not get logged either.
            keyword_at = len(line) - len(line.lstrip())
            if line[keyword_at : keyword_at + 4].upper() == b"PASS" and line[keyword_at + 4 :]:
                line = line[: keyword_at + 4] + b" ***"
            self._trace_line("C", line.decode("utf-8", "replace"))
        if isinstance(parsed, ParseFailure):
            self._bad_command(parsed.reason)
            return
        if parsed.verb not in ALLOWED[self.state]:
            if self.state is State.TRANSACTION:
                self._bad_command("Already logged in.")
            elif parsed.verb in ALLOWED[State.TRANSACTION]:
                self._bad_command("Not logged in.")
            else:
                self._bad_command("Command not available.")
            return
        if parsed.verb in _NO_ARGS and parsed.args:
            self._bad_command("Too many arguments.")
            return
        bad_before = self._bad
        self._HANDLERS[parsed.verb](self, parsed)
        if self._bad == bad_before:  # a well-formed command ends a run of bad ones
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
        try:
            self._pending_user = cmd.args[0].decode("utf-8")
        except UnicodeDecodeError:
            self._bad_command("User name is not valid UTF-8.")
            return
        self._reply(ok())

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
        self._transition(Trigger.PASS)
        self._events.append(AuthenticateUser(self._pending_user, cmd.rest))

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
        if self._implementation:
            caps.append(b"IMPLEMENTATION " + self._implementation.encode())
        self._reply_lines(ok("Capability list follows"), [c + CRLF for c in caps])

    def _cmd_stat(self, _cmd: Command) -> None:
        count, size = self._totals()
        self._reply(ok(f"{count} {size}"))

    def _cmd_noop(self, _cmd: Command) -> None:
        self._reply(ok())

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

    _HANDLERS: Final[dict[Verb, Callable[[ServerConnection, Command], None]]] = {
        Verb.USER: _cmd_user,
        Verb.PASS: _cmd_pass,
        Verb.QUIT: _cmd_quit,
        Verb.CAPA: _cmd_capa,
        Verb.STAT: _cmd_stat,
        Verb.NOOP: _cmd_noop,
        Verb.RSET: _cmd_rset,
        Verb.LIST: _cmd_list,
        Verb.UIDL: _cmd_uidl,
        Verb.RETR: _cmd_retr,
        Verb.TOP: _cmd_top,
        Verb.DELE: _cmd_dele,
    }

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
            encoder=MessageEncoder(),
            top=TopFilter(top_lines) if top_lines is not None else None,
        )
        self._events.append(RetrieveMessage(index + 1, top_lines))

    def _send_message_event(self, event: MessageData | EndOfMessage | MessageUnavailable) -> None:
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
        if not retr.started:
            retr.started = True
            self._reply(ok() if retr.top else ok(f"{retr.size} octets"))
        encoder = retr.encoder
        if isinstance(event, MessageData):
            data = encoder.normalize(event.data)
            if retr.top is not None:
                data = retr.top.feed(data)
            data = encoder.stuff(data)
        else:
            # A CR held back at the end of the last chunk is message text: TOP must cut it
            # too when it has already seen all the lines it keeps.
            held = encoder.flush()
            if retr.top is not None:
                held = retr.top.feed(held)
            data = encoder.stuff(held) + encoder.finish()
            self._retr = None
            if retr.top is not None:
                self.stats.top_count += 1
                self.stats.top_bytes += retr.sent + len(data)
            else:
                self.stats.retr_count += 1
                self.stats.retr_bytes += retr.sent + len(data)
        if data:
            retr.sent += len(data)
            self._out.append(data)
            self._out_len += len(data)
