"""What the LMTP and SMTP listeners share: aiosmtpd's SMTP with pobox's DATA, deadlines, replies.

**DATA** (:meth:`DeliveryProtocol.smtp_DATA`) replaces aiosmtpd's, which gathers the whole
message in memory: the lines go through a :class:`~pobox.delivery._data.DataDecoder` into a
:class:`~pobox.storage.spool.Spool` as they arrive, so a connection holds one line, one
64 KiB batch and the spool's first 256 KiB in memory, and a larger message is in a nameless
file in ``mail_temp_dir``. Then the handler's ``handle_DATA`` gets the envelope and the
spool, and its reply is sent; the spool is freed whatever happens, a client gone mid-DATA
included (nothing is delivered then). RFC 5321 §4.5.2 dot-unstuffing, the ``max_message_size``
limit (``552 5.3.4``) and the line-length limit (``500 5.5.2``) are the decoder's; for LMTP
such a reply is sent once per recipient (RFC 2033 §4.2).

**Deadlines**, one timer per connection (:class:`DeliveryLimits`):

- a command must come within ``delivery_timeout`` of the previous reply (RFC 5321
  §4.5.3.2.7: 5 minutes);
- a connection must reach DATA within twice that of connecting or of its previous message,
  so commands that deliver nothing (``NOOP`` every few minutes) cannot hold it forever;
- in DATA, each line must come within ``delivery_timeout``, and the whole message within
  ``delivery_timeout`` plus one second per ``delivery_min_data_rate`` octets received (up to
  ``max_message_size``), as Postfix's ``smtpd_min_data_rate``: a slow writer is cut off
  after at most ``delivery_timeout + max_message_size / delivery_min_data_rate`` seconds.

When one passes the client gets ``421 4.4.2`` and the connection is closed. While the
handler delivers, no deadline runs: the client waits for pobox then. aiosmtpd's own timer,
which only commands reset (it would cut a long DATA), is set far beyond these.

aiosmtpd answers a few situations with its own texts; pobox gives them RFC 3463 enhanced
status codes by rewriting the reply in :meth:`DeliveryProtocol.push`, the method every
reply goes through.

May import: the standard library, aiosmtpd and :mod:`pobox.delivery`, :mod:`pobox.config`,
:mod:`pobox._logevents` and :mod:`pobox.storage.spool`.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, AnyStr, Final, Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from pobox import _logevents as events
from pobox.config import Config
from pobox.delivery._agent import Outcome
from pobox.delivery._data import DataDecoder
from pobox.storage.spool import Spool

__all__ = ["LINE_LENGTH_LIMIT", "DeliveryLimits", "DeliveryProtocol", "MessageHandler"]

logger = logging.getLogger(__name__)

#: RFC 5321 §4.5.3.1.6 allows 1000 octets per line, but real mail breaks that and MTAs pass
#: it on (Dovecot's LMTP and Postfix take any length); a line is held in memory while read.
LINE_LENGTH_LIMIT = 64 * 1024

#: aiosmtpd's reply → pobox's.
_REWRITES: Final[dict[str, str]] = {
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
}

#: A connection must reach DATA within this many ``delivery_timeout`` of connecting or of
#: its previous message.
SESSION_WINDOW: Final = 2

#: aiosmtpd's own idle timer (a year): it would cut a long DATA, and the deadlines of
#: :class:`DeliveryProtocol` always come first.
_LIBRARY_TIMEOUT: Final = 365 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class DeliveryLimits:
    """How long a delivery client may take, and where large messages are spooled."""

    #: Seconds to wait for a command, or for the next line of DATA.
    timeout: float = 300.0
    #: Octets per second a client must keep up in DATA, after ``timeout`` of grace.
    min_data_rate: int = 2048
    #: Where the spool files of large messages go (``None``: the system's temporary dir).
    spool_dir: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> DeliveryLimits:
        """Return the limits ``config`` sets."""
        return cls(
            timeout=config.delivery_timeout,
            min_data_rate=config.delivery_min_data_rate,
            spool_dir=config.mail_temp_dir or None,
        )


class MessageHandler(Protocol):
    """What :class:`DeliveryProtocol` calls when a message has arrived."""

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope, body: Spool
    ) -> str:
        """Deliver ``body`` to ``envelope``'s recipients; return the reply (CRLF-joined lines)."""


class DeliveryProtocol(SMTP):
    """aiosmtpd's SMTP with pobox's DATA, deadlines and reply texts."""

    line_length_limit = LINE_LENGTH_LIMIT
    #: RFC 2033 §4.2: LMTP answers DATA once per recipient.
    per_recipient_data_replies = False
    #: The protocol's name in log lines.
    name = "smtp"

    def __init__(
        self,
        handler: MessageHandler,
        *,
        limits: DeliveryLimits,
        **kwargs: Any,  # noqa: ANN401 - aiosmtpd's keyword arguments
    ) -> None:
        """Serve one connection for ``handler`` under ``limits``; ``kwargs`` go to aiosmtpd."""
        super().__init__(handler, timeout=_LIBRARY_TIMEOUT, **kwargs)
        self.limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._due: Callable[[], float] | None = None
        #: When the current connection must have reached DATA.
        self._window_ends = 0.0

    # --- deadlines ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the connection's window to reach DATA, then aiosmtpd's session."""
        self._window_ends = self.loop.time() + SESSION_WINDOW * self.limits.timeout
        super().connection_made(transport)

    def eof_received(self) -> bool | None:
        """End the session at the client's end of stream, and close the connection.

        aiosmtpd cancels its session task here and leaves closing the transport to that
        task.  A task cancelled before it first ran never does: the end of stream came in
        the same read as a PROXY header (HAProxy passing on a client that left at once, a
        probe), before the greeting, and the connection would keep its slot (and hold up a
        drain) until aiosmtpd's own timeout.  No reply can follow aiosmtpd's cancel, so
        closing at once loses nothing.
        """
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        """Stop the deadline timer, then let aiosmtpd end the session."""
        self._disarm()
        super().connection_lost(error)

    def _arm(self, when: float, due: Callable[[], float] | None = None) -> None:
        """Close the connection with ``421 4.4.2`` at loop time ``when`` (replacing any).

        Args:
            due: the deadline as it stands when the timer fires, if it moves (DATA): the
                timer is then set again for it instead.
        """
        if self._deadline is not None:
            self._deadline.cancel()
        self._due = due
        self._deadline = self.loop.call_at(when, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._due = None

    def _expired(self) -> None:
        """Say ``421 4.4.2`` and close; abort if the client does not even read that."""
        self._deadline = None
        if self._due is not None:
            when = self._due()
            if when > self.loop.time():
                self._deadline = self.loop.call_at(when, self._expired)
                return
        transport = cast("asyncio.Transport | None", self.transport)
        if transport is None or transport.is_closing():
            return
        peer = self.session.peer if self.session is not None else None
        events.delivery_timeout(logger, self.name, _address(peer))
        transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _command_deadline(self) -> float:
        return min(self.loop.time() + self.limits.timeout, self._window_ends)

    async def push(self, status: AnyStr) -> None:
        """Send a reply (rewriting aiosmtpd's texts); the next command is due from now on."""
        if self.transport is not None:
            self._arm(self._command_deadline())
        if isinstance(status, str):
            await super().push(_REWRITES.get(status, status))
        else:
            await super().push(status)

    # --- DATA --------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """Receive a message into a spool and hand it to the handler (module docs)."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        assert self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        with Spool(directory=self.limits.spool_dir) as body:
            reply = await self._receive(body)
            if reply is None:
                self._disarm()  # the client waits for us now
                handler: MessageHandler = self.event_handler
                reply = await handler.handle_DATA(self, self.session, self.envelope, body)
        self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state
        self._window_ends = self.loop.time() + SESSION_WINDOW * self.limits.timeout
        await self.push(reply)

    async def _receive(self, body: Spool) -> str | None:
        """Read the message into ``body``; return ``None``, or the reply refusing it."""
        limits = self.limits
        max_size = self.data_size_limit
        decoder = DataDecoder(max_size=max_size, max_line=self.line_length_limit)
        reader = self._reader
        loop = self.loop
        started = last = loop.time()

        def due() -> float:
            """The DATA deadline: a line per timeout, and the minimum rate overall."""
            counted = min(decoder.received, max_size) if max_size else decoder.received
            allowed = started + limits.timeout + counted / limits.min_data_rate
            return min(last + limits.timeout, allowed)

        self._arm(started + limits.timeout, due)
        failure: OSError | None = None
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:  # part of an over-long line
                line = await reader.read(exc.consumed)
            except asyncio.IncompleteReadError:  # the client is gone (aiosmtpd cancels first)
                raise asyncio.CancelledError from None
            last = loop.time()
            if decoder.feed(line):
                break
            batch = decoder.take()
            if batch and failure is None:
                try:
                    body.write(batch)
                except OSError as exc:  # disk full: read on, answer 451 at the end
                    failure = exc
        self._disarm()
        if decoder.error is not None:
            events.message_refused(
                logger,
                self.name,
                decoder.error.reply,
                _address(self.session.peer if self.session else None),
            )
            return self._data_reply(decoder.error.reply)
        if failure is None:
            try:
                body.write(decoder.take(0))
                body.finish()
            except OSError as exc:
                failure = exc
        if failure is not None:
            where = limits.spool_dir or tempfile.gettempdir()
            logger.error("%s: cannot spool a message in %s: %s", self.name, where, failure)
            return self._data_reply(Outcome.TEMPORARY.reply)
        return None

    def _data_reply(self, reply: str) -> str:
        """Return ``reply`` as the answer to DATA: once, or once per recipient for LMTP."""
        count = 1
        if self.per_recipient_data_replies and self.envelope is not None:
            count = max(1, len(self.envelope.rcpt_tos))
        return "\r\n".join([reply] * count)


def _address(peer: object) -> str:
    """Return the client's address for a log line (``local`` for a Unix socket)."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"
