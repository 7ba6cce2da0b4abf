"""The transport driver: one POP3 connection served from :class:`asyncio.Protocol` callbacks.

:meth:`Pop3Protocol.data_received` feeds the sans-IO core and answers at once every event
whose answer is at hand (the core answers STAT, LIST, UIDL, NOOP, DELE, RSET, CAPA itself; a
small RETR is read without a worker thread): its replies are written in the same callback,
with no task, no StreamReader and no sleep/wake of the event loop per command.  Only an answer
that must wait (a password check in a worker thread, a maildrop open, a registry query, a
large message streamed, UPDATE, the STLS handshake, the end of a logged-in session) starts
*one* task for that event; the task goes on answering the events after it and hands back to
the callbacks when the core needs data again.  Meanwhile reading is paused as soon as the
client pipelines more (and at once behind STLS), so a waiting answer costs no system call.

Flow control: when the transport says :meth:`~asyncio.BaseProtocol.pause_writing`, the driver
stops producing (and reading) until ``resume_writing``; a streamed message awaits it.  A
message file known to be in wire form goes out with ``sendfile`` on a plain connection
(:meth:`Pop3Protocol.send_file`, :mod:`pobox.server._sendfile`), waiting for the socket to
be writable under the same timeouts.

Every network wait has a timeout: before login ``login_timeout``, and ``login_deadline``
from the connection's start however busy the client keeps it; after login the RFC 1939
autologout ``idle_timeout``, on whose expiry the connection is closed without a reply and
without UPDATE (RFC 1939 §3), which also releases the maildrop lock.  One timer handle per
session enforces them (see :meth:`Pop3Protocol._wait_network`).

:meth:`Pop3Protocol.stop` (the end of a drain), :meth:`Pop3Protocol.kick` (the session
registry) and a lost maildrop lock end the session at its next wait for the client, with a
``-ERR [SYS/TEMP]`` line and without UPDATE; a command under way is answered first.

STLS (RFC 2595) uses the public ``loop.start_tls`` on the connection's own transport (any event
loop, uvloop included).  No plaintext byte pipelined behind STLS can reach the core after the
handshake (CVE-2011-0411): the core drops those it holds, and reading is paused in the same
callback that saw STLS, so nothing more is read as plaintext.

Behind HAProxy (``haproxy_trusted_networks``) a trusted peer's PROXY header is read here first,
never a byte past what the header parser asks for; the listener then admits the connection
(caps, drain) and the driver builds the connection record
(:class:`~pobox.server._connection.ConnectionInfo`) the session reads.

May import: the standard library, :mod:`pobox.protocol`, :mod:`pobox.proxy`,
:mod:`pobox._logevents`, :mod:`pobox.server._session`, :mod:`pobox.server._connection`,
:mod:`pobox.server._proxy`, :mod:`pobox.server._sendfile`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Callable
from typing import Final, Protocol, cast

from pobox import _logevents as events
from pobox.protocol import (
    FLUSH,
    NEED_DATA,
    PAUSED,
    AuthenticateUser,
    CommitDeletions,
    ConnectionClosed,
    Event,
    FetchSecret,
    LocalProtocolError,
    LoginFailed,
    OpenMaildrop,
    RetrieveMessage,
    StartTLS,
    State,
    Trace,
    VerifyToken,
)
from pobox.proxy import NEED_DATA as HEADER_NEEDS_DATA
from pobox.proxy import ProxyHeader, ProxyHeaderError, ProxyHeaderParser, starts_like_header
from pobox.server._connection import ConnectionInfo
from pobox.server._proxy import HeaderNotReceived, Origin, ProxyPolicy, log_header_failure
from pobox.server._sendfile import SENDFILE_MAX, cached, dup_pair, sendfile_owned
from pobox.server._session import Session, SessionContext

__all__ = ["Door", "Pop3Protocol"]

logger = logging.getLogger("pobox.server")

#: Seconds a closed connection may take to send what is still buffered before it is aborted.
CLOSE_TIMEOUT: Final = 5.0

#: How the core's close reasons read in the session's last log line.
_REASONS: Final = {
    "quit": "Logged out",
    "eof": "Connection closed",
    "too-many-bad-commands": "Too many invalid commands",
    "message-failed": "Message could not be read",
    "tls-failed": "TLS handshaking failed",
    "internal-error": "internal error",
    "proxy-refused": "PROXY header refused",
}

_SHUTTING_DOWN: Final = b"-ERR [SYS/TEMP] Server shutting down, no changes made; log in again.\r\n"
_KICKED: Final = b"-ERR [SYS/TEMP] Session ended by the administrator, no changes made.\r\n"
_LOCK_LOST: Final = b"-ERR [SYS/TEMP] Mailbox lock lost, no changes made; log in again.\r\n"
_INTERNAL_ERROR: Final = b"-ERR [SYS/TEMP] Internal server error.\r\n"
_PROXY_REFUSED: Final = b"-ERR PROXY protocol header refused.\r\n"


class Door(Protocol):
    """What the listener does for its connections (:class:`~pobox.server.Pop3Server`)."""

    proxy: ProxyPolicy
    ctx: SessionContext

    def admit(self, driver: Pop3Protocol, ip: str, *, counted: bool) -> bytes | None:
        """Count a connection from ``ip``; return the line refusing it, or ``None``."""

    def closed(self, driver: Pop3Protocol, ip: str | None) -> None:
        """Forget a connection (``ip``: where it was counted against the caps, if it was)."""


class Pop3Protocol(asyncio.Protocol):
    """Serve one client connection from its callbacks, from greeting (or PROXY header) to close.

    Args:
        door: the listener that accepted the connection.
        origin: what a trusted HAProxy's header said, when the listener read it already.
        counted: whether the listener counted the connection against the caps already.
    """

    def __init__(self, door: Door, origin: Origin | None = None, *, counted: bool = False) -> None:
        self._door = door
        self._ctx = door.ctx
        self._metrics = door.ctx.metrics
        self._origin = origin
        self._counted = counted
        self._loop = asyncio.get_running_loop()
        #: Resolved once the connection is closed and forgotten.
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self._ip: str | None = None  # counted against the caps from this address
        self._parser: ProxyHeaderParser | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._reading = True
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._tls = False
        #: Bytes decrypted before the STLS task took the new transport (None: no handshake).
        self._held: bytearray | None = None
        self._first = True
        self._eof = False
        self._lost = False
        #: The session has ended (its last line logged); the transport is closing.
        self._ended = False
        #: Why the session ends, when the driver ends it (the core's reason otherwise).
        self._reason: str | None = None
        self._kicked = self._lock_gone = self._stopping = False
        #: When the current wait for the network began (None: not waiting on the network).
        self._io_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self._login_by = 0.0
        self._forgotten = False
        self._closer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------- callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Wait for a trusted peer's PROXY header, or start the session at once."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast("asyncio.Transport", transport)
        proxy = self._door.proxy
        if self._origin is None and proxy.networks:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and proxy.trusts(str(peer[0])):
                self._parser = ProxyHeaderParser()
                self._header_timer = self._loop.call_later(proxy.timeout, self._header_late)
                return
        self._open()

    def data_received(self, data: bytes) -> None:
        """Feed the core and answer what can be answered now."""
        if self._parser is not None:
            self._header_bytes(self._parser, data)
            return
        session = self.session
        if session is None or self._ended:
            return
        if self._held is not None:  # TLS data before the core has heard that TLS is up
            self._held += data
            return
        if self._first:
            self._first = False
            if starts_like_header(data):
                self._refuse_header(session)
                return
        self._io_since = None
        session.conn.receive_data(data)
        if self._task is None:
            self._pump()
        else:  # pipelined behind an answer that waits: keep it, but read no more for now
            self._pause_reading()

    def eof_received(self) -> bool | None:
        """The client closed its side: the core hears it once it has answered what came."""
        if self._ended:  # a lingering close is over
            return None
        if self._parser is not None:
            self._header_failed(HeaderNotReceived(timed_out=False))
            return None
        self._eof = True
        if self.session is not None and self._task is None and not self._ended:
            self._pump()
        # Half-open until the last reply is out; TLS transports ignore (and warn about) True.
        return None if self._tls or self._ended else True

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: end the session (if it has not ended) and forget it."""
        self._lost = True
        self._stop_header()
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_exception(ConnectionResetError("connection lost"))
        if self.session is not None and not self._ended:
            self._eof = True
            if self._task is None:
                self._pump()
            return
        self._forget()
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        """The transport's buffer is full: stop producing (and reading) until it drains."""
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        """The transport's buffer drained: go on."""
        self._write_paused = False
        drained = self._drained
        if drained is not None:
            if not drained.done():
                drained.set_result(None)
            return
        if self.session is not None and self._task is None and not self._ended:
            self._io_since = None
            self._pump()

    # ----------------------------------------------------------------- PROXY header

    def _header_bytes(self, parser: ProxyHeaderParser, data: bytes) -> None:
        try:
            header = parser.feed(data)
        except ProxyHeaderError as exc:
            self._header_failed(exc)
            return
        if header is HEADER_NEEDS_DATA:
            return
        assert isinstance(header, ProxyHeader)
        self._stop_header()
        transport = self._transport
        assert transport is not None
        self._origin = Origin.of(
            header, transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        )
        self._open()
        if parser.rest and self.session is not None and not self._ended:
            self.data_received(parser.rest)

    def _header_late(self) -> None:
        self._header_timer = None
        self._header_failed(HeaderNotReceived(timed_out=True))

    def _header_failed(self, exc: ProxyHeaderError | HeaderNotReceived) -> None:
        self._stop_header()
        transport = self._transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        log_header_failure(logger, "pop3-login", exc, str(peer[0]))
        self._ended = True
        transport.close()

    def _stop_header(self) -> None:
        self._parser = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    # ----------------------------------------------------------------- the session

    def _open(self) -> None:
        """Admit the connection (caps, drain) and start its session with the greeting."""
        transport = self._transport
        assert transport is not None
        info = ConnectionInfo.of(transport, self._origin)
        refusal = self._door.admit(self, info.rip, counted=self._counted)
        if refusal is not None:
            self._ended = True
            transport.write(refusal)
            self._close_transport()
            return
        self._ip = info.rip
        self._tls = info.tls
        now = self._loop.time()
        self._login_by = now + self._ctx.config.login_deadline
        # Weakly: the session (and the registry, the store) must not keep this driver alive,
        # or every connection's objects would wait for the cyclic garbage collector.
        # Its age counts from the stamp its deadline does: the loop's clock (uvloop's is cached
        # per iteration, behind time.monotonic by what the iteration has run) never runs ahead
        # of time.monotonic, so a session ended by login_deadline is never logged as younger
        # than that ("no auth attempts in 0 secs ... after 1 secs").
        self.session = Session(
            self._ctx,
            info,
            kick=_weakly(self.kick),
            lock_lost=_weakly(self._lock_lost),
            started=now,
        )
        self._pump()

    def _pump(self) -> None:
        """Answer what can be answered now; start a task for the first answer that must wait."""
        try:
            event = self._advance()
        except Exception:
            self._internal_error()
            event = self._advance_after_error()
        if event is not None:
            # Reading goes on while the answer waits (no pause/resume system calls for a
            # client that waits for its reply), except behind STLS: no plaintext byte may be
            # read after it.  What a client pipelines meanwhile pauses reading then.
            if isinstance(event, StartTLS):
                self._pause_reading()
            self._task = self._loop.create_task(self._serve(event))
            self._task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        """End the session of a task cancelled (server shutdown) before its first step."""
        session = self.session
        if task.cancelled() and session is not None and not self._ended:
            self._task = self._loop.create_task(
                self._end_async(session, "Server shutting down", "shutdown")
            )

    def _advance(self) -> Event | None:
        """Answer the core's events until one must wait (returned) or the client must speak.

        Returns ``None`` when the driver waits for the network (the client, or a full write
        buffer) or the session has ended.
        """
        session = self.session
        assert session is not None
        conn = session.conn
        while not self._ended:
            if self._write_paused and conn.state is not State.CLOSED:
                self._wait_network()
                return None
            event = conn.next_event()
            if isinstance(event, RetrieveMessage) and session.retrieve_now(event):
                continue  # the most frequent event: answered here, its reply queued
            if event is NEED_DATA:
                if self._eof:
                    conn.receive_data(b"")
                    continue
                self._write_out()
                if session.clock is not None:  # metrics: the command under way is answered
                    session.clock.end()
                if self._kicked or self._lock_gone or self._stopping:
                    self._end_at_wait(session)
                    continue
                self._wait_network()
                self._resume_reading()
                return None
            if event is FLUSH:
                self._write_out()
            elif isinstance(event, Trace):
                events.trace(session.log, event.direction, event.line)
            elif isinstance(event, ConnectionClosed) and not session.needs_release:
                self._end(session, event)
            elif event is PAUSED:  # every event above is answered before looping
                raise LocalProtocolError("core paused with no event to answer")
            else:
                return cast("Event", event)
        return None

    def _advance_after_error(self) -> Event | None:
        try:
            return self._advance()
        except Exception:  # the end itself failed: close, whatever it left undone
            logger.exception("pop3: ending a session failed")
            self._finish_transport()
            return None

    async def _serve(self, event: Event) -> None:
        """Answer ``event``, and the events after it until the client must speak again."""
        session = self.session
        assert session is not None
        next_event: Event | None = event
        try:
            while next_event is not None:
                await self._answer(session, next_event)
                if self._write_paused and session.conn.state is not State.CLOSED:
                    await self._drain()
                next_event = self._advance()
        except (ConnectionError, TimeoutError):
            await self._end_async(session, "Connection closed", "eof")
        except asyncio.CancelledError:
            if self._expired:  # the timer (or a kick) ended a wait for the network
                self._expired = False
                await self._end_async(session, "Connection closed", "timeout")
            else:
                await self._end_async(session, "Server shutting down", "shutdown")
        except Exception:
            self._internal_error()
            await self._end_async(session, "internal error", "internal-error")
        finally:
            self._task = None

    async def _answer(self, session: Session, event: Event) -> None:
        """Answer one event that must wait."""
        if isinstance(
            event, AuthenticateUser | FetchSecret | VerifyToken | OpenMaildrop | LoginFailed
        ):
            await session.login(event)
        elif isinstance(event, RetrieveMessage):
            await session.retrieve(event, self._flush, self)
        elif isinstance(event, CommitDeletions):
            await session.commit(event)
        elif isinstance(event, StartTLS):
            await self._start_tls(session, event)
        elif isinstance(event, ConnectionClosed):
            # Release the lock before the last reply goes out (RFC 1939 §6: UPDATE,
            # release, then the reply): a client that logs in again as soon as it has
            # the +OK, here or on another node, must find the maildrop free, and its
            # session no longer counted toward the connection limits.
            await session.release()
            await session.unregister()
            self._end(session, event)
        else:  # pragma: no cover - the type checker rules this out
            raise LocalProtocolError(f"unexpected event {event!r}")

    async def _end_async(self, session: Session, reason: str, code: str) -> None:
        """End the session from a task (the connection failed, shutdown, internal error)."""
        if self._ended:
            return
        self._reason = self._reason or reason
        session.conn.close(code)
        try:
            await session.release()
            await session.unregister()
        finally:
            self._end(session, ConnectionClosed(code))

    def _end(self, session: Session, event: ConnectionClosed) -> None:
        """Write the last reply, close the connection, log the session's last line."""
        if self._ended:
            return
        self._ended = True
        self._write_out()
        self._finish_transport(linger=event.reason not in ("quit", "eof"))
        reason = self._reason or _REASONS.get(event.reason, event.reason)
        session.disconnected(reason)
        self._forget()
        if self._lost and not self.done.done():
            self.done.set_result(None)

    def _internal_error(self) -> None:
        session = self.session
        assert session is not None
        session.internal_error()
        self._reason = "internal error"
        self._write_raw(_INTERNAL_ERROR)

    # ----------------------------------------------------------------- writing

    def _write_out(self) -> None:
        """Write what the core has to send."""
        session = self.session
        assert session is not None
        data = session.conn.data_to_send()
        if data:
            self._write_raw(data)

    def _write_raw(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not self._lost and not transport.is_closing():
            transport.write(data)
            if self._metrics is not None:
                self._metrics.sent(len(data))

    async def _flush(self) -> None:
        """Write what the core has to send, and wait while the transport holds too much."""
        self._write_out()
        if self._write_paused:
            await self._drain()

    async def _drain(self) -> None:
        """Wait (under the session's timeout) for :meth:`resume_writing`."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        self._drained = self._loop.create_future()
        self._wait_network()
        try:
            await self._drained
        finally:
            self._drained = None
            self._io_since = None

    # ----------------------------------------------------------------- sendfile

    def sendfile_ready(self) -> bool:
        """Say whether a message file may go out with ``sendfile`` now.

        Only on a plain connection (the kernel does not encrypt here) whose transport has
        nothing queued and is not pushing back: the file's octets must follow what was
        written before them, not overtake it.
        """
        transport = self._transport
        return (
            transport is not None
            and not self._tls
            and not self._lost
            and not self._write_paused
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
            and transport.get_extra_info("socket") is not None
        )

    async def send_file(self, fd: int, offset: int, count: int) -> int:
        """Write what the core has queued, then ``count`` octets of ``fd`` from ``offset``.

        The queued bytes (the reply line) go through the transport; the file goes out with
        :func:`os.sendfile` on the socket once the transport's buffer is empty, at most
        :data:`SENDFILE_MAX` octets a call with a turn for other sessions in between; in the
        event loop's thread when the page cache holds the range (:func:`cached`), else in a
        worker thread on descriptors of its own.  While
        the socket is full, the driver waits for it to be writable on a duplicate of its
        descriptor (the transport owns the original in the event loop), as a network wait:
        the session's timeout, a kick or a shutdown end it as they end a drain.

        Returns:
            The octets of the file sent: fewer than ``count`` only if the file ended first.

        Raises:
            ConnectionError: the connection failed or was lost.
        """
        self._write_out()
        transport = self._transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is None:  # pragma: no cover - sendfile_ready() said there is one
            raise ConnectionResetError("no socket")
        out = sock.fileno()
        sent = 0
        waiter = -1
        try:
            while sent < count:
                if self._lost or transport.is_closing():
                    raise ConnectionResetError("connection lost")
                if transport.get_write_buffer_size() == 0:
                    at, size = offset + sent, min(count - sent, SENDFILE_MAX)
                    try:
                        if cached(fd, at, size):
                            done = os.sendfile(out, fd, at, size)
                        else:  # the disk would be read: not in the event loop's thread
                            done = await asyncio.to_thread(
                                sendfile_owned, *dup_pair(out, fd), at, size
                            )
                    except BlockingIOError:
                        done = -1
                    except OSError as exc:  # EPIPE, ECONNRESET; EIO reading the file
                        raise ConnectionResetError(f"sendfile: {exc.strerror}") from exc
                    if done == 0:
                        return sent  # the file ended before ``count``
                    if done > 0:
                        sent += done
                        if self._metrics is not None:
                            self._metrics.sent(done)
                        await asyncio.sleep(0)  # other sessions' turn
                        continue
                if waiter < 0:
                    waiter = os.dup(out)
                await self._writable(waiter)
        finally:
            if waiter >= 0:
                os.close(waiter)
        return sent

    async def _writable(self, fd: int) -> None:
        """Wait (under the session's timeout) until the socket ``fd`` is writable."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        waiter = self._drained = self._loop.create_future()
        self._loop.add_writer(fd, _wake_waiter, waiter)
        self._wait_network()
        try:
            await waiter
        finally:
            self._loop.remove_writer(fd)
            self._drained = None
            self._io_since = None

    def _pause_reading(self) -> None:
        if self._reading and self._transport is not None and not self._lost:
            self._reading = False
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self._transport is not None and not self._lost:
            self._reading = True
            self._transport.resume_reading()

    def _close_transport(self, *, linger: bool = True) -> None:
        """Close the connection once its last reply is sent, without losing that reply.

        ``linger``: a lingering close, as web servers do, for an end the client did not ask
        for: the sending side is shut first and what the client still sends is read and
        dropped until it closes (or ``CLOSE_TIMEOUT``), so the kernel never answers a
        pipelined command with a reset that would destroy the reply in the client's buffer.
        After QUIT or the client's own close, and on TLS (no half-close), a plain close.
        """
        transport = self._transport
        assert transport is not None
        # Closing already: after a failed STLS handshake start_tls has closed it (uvloop's
        # write_eof() then raises, asyncio's does nothing).
        if self._lost or transport.is_closing():
            return
        # After the client's EOF everything it sent has been read: nothing is left for a
        # reset to destroy, and no second EOF would end the linger.
        if linger and not self._eof and transport.can_write_eof():
            self._closer = self._loop.call_later(CLOSE_TIMEOUT, transport.abort)
            transport.write_eof()
            self._resume_reading()
            return
        unsent = transport.get_write_buffer_size()
        transport.close()
        if unsent:  # a client that does not read has CLOSE_TIMEOUT to take the rest
            self._closer = self._loop.call_later(CLOSE_TIMEOUT, transport.abort)

    def _finish_transport(self, *, linger: bool = True) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lost:
            self._close_transport(linger=linger)

    def _forget(self) -> None:
        """Tell the listener the connection is gone (once)."""
        if not self._forgotten:
            self._forgotten = True
            self._door.closed(self, self._ip)

    # ----------------------------------------------------------------- STLS

    async def _start_tls(self, session: Session, event: StartTLS) -> None:
        """Do the STLS handshake on this connection (RFC 2595 §4).

        Reading was paused in the callback that handed the core ``STLS`` (see :meth:`_pump`),
        and the core dropped what it held behind it: no plaintext byte can reach the core
        once TLS is up.
        """
        tls = self._ctx.tls
        assert tls is not None
        transport = self._transport
        assert transport is not None
        self._write_out()
        session.stls_discarded(event.discarded)
        self._held = bytearray()
        try:
            new = await self._loop.start_tls(
                transport,
                self,
                tls.context,
                server_side=True,
                ssl_handshake_timeout=self._ctx.config.login_timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._held = None
            self._count_handshake(exc, ok=False)
            session.tls_failed(exc)
            return
        held, self._held = self._held, None
        if new is None:  # the connection closed during the handshake
            self._count_handshake(None, ok=False)
            session.tls_failed(ConnectionResetError("connection closed"))
            return
        self._count_handshake(None, ok=True)
        self._transport = new
        self._tls = True
        self._reading = True  # the new transport reads (start_tls resumed the socket)
        ssl_object = new.get_extra_info("ssl_object")
        session.tls_started(
            new.get_extra_info("peercert"), ssl_object.version() if ssl_object else None
        )
        if held:  # what the client sent inside TLS as soon as the handshake ended
            session.conn.receive_data(bytes(held))

    def _count_handshake(self, exc: BaseException | None, *, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.tls_handshake("stls", exc, ok=ok)

    # ----------------------------------------------------------------- timeouts

    def _expiry(self, since: float) -> float:
        """Return when a wait on the network that began at ``since`` times out (loop time)."""
        cfg = self._ctx.config
        session = self.session
        assert session is not None
        if session.conn.state is State.TRANSACTION:
            return since + cfg.idle_timeout
        if session.maildrop is not None:  # after QUIT: the last reply's drain
            return since + cfg.login_timeout
        return min(since + cfg.login_timeout, self._login_by)

    def _timeout_reason(self) -> str:
        cfg = self._ctx.config
        session = self.session
        assert session is not None
        if session.conn.state is State.TRANSACTION:
            return f"Inactivity - no input for {cfg.idle_timeout:g} secs"
        if session.maildrop is None and self._loop.time() >= self._login_by:
            return f"Login time limit - not logged in after {cfg.login_deadline:g} secs"
        return f"Inactivity - no input for {cfg.login_timeout:g} secs"

    # One timer per session enforces the timeouts, instead of a timeout per read and drain.
    # A wait on the network only stamps its start; the timer, when it fires, checks whether
    # the wait under way has reached its expiry and otherwise sets itself again for the
    # moment it would.  Work that is not a wait on the network (a password check, a failure
    # delay) is never cut short: the deadline before login takes effect at the next wait.

    def _wait_network(self) -> None:
        """Note that a wait on the network begins now, and make sure the timer covers it."""
        now = self._loop.time()
        self._io_since = now
        deadline = self._expiry(now)
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        if self._ended:
            self._timer = None
            return
        since = self._io_since
        now = self._loop.time()
        if since is not None and now >= self._expiry(since):
            self._timer = None
            self._wake(timed_out=True)
            return
        self._timer = self._loop.call_at(self._expiry(since or now), self._check_deadline)

    def _wake(self, *, timed_out: bool = False) -> None:
        """End a wait on the network now: time out, or end the session (kick, stop, lock)."""
        session = self.session
        if session is None or self._ended or self._io_since is None:
            return
        if self._task is not None:  # a task waits for the transport to drain
            self._expired = True
            self._task.cancel()
            return
        if self._write_paused:  # a client that does not read its replies
            self._reason = "Connection closed"
            session.conn.close("timeout")
        elif timed_out:
            self._reason = self._timeout_reason()
            session.conn.close("timeout")
        self._pump()

    # ----------------------------------------------------------------- ending from outside

    def _end_at_wait(self, session: Session) -> None:
        """End the session at a wait for the client, with a line saying why (no UPDATE).

        ``[SYS/TEMP]`` (RFC 3206): whatever the client sends next reads this as its answer,
        and takes it as a temporary failure to retry later, not as a wrong password.
        """
        if self._kicked:
            session.kicked()
            self._reason = "Kicked by the administrator"
            session.conn.close("kicked")
            self._write_raw(_KICKED)
        elif self._lock_gone:
            session.lock_gone()
            self._reason = "Maildrop lock lost"
            session.conn.close("lock-lost")
            self._write_raw(_LOCK_LOST)
        else:
            self._reason = "Server shutting down"
            session.conn.close("shutdown")
            self._write_raw(_SHUTTING_DOWN)

    def _refuse_header(self, session: Session) -> None:
        """Close a connection whose client starts with a PROXY header, which it may not send."""
        session.proxy_header_refused()
        self._write_raw(_PROXY_REFUSED)
        self._pump()

    def _lock_lost(self) -> None:
        """The store lost the maildrop lock: end the session, without UPDATE, at once.

        A session waiting for the client ends now; one busy with a command ends when the
        command is answered, and QUIT then deletes nothing.
        """
        self._lock_gone = True
        if self.session is not None and self.session.ended_by is None:
            self.session.ended_by = "Maildrop lock lost"
        self._wake()

    def kick(self) -> None:
        """End the session, without UPDATE, at once: an administrator asked for it.

        As when the maildrop lock is lost: a session waiting for the client ends now; one
        busy with a command ends once it is answered, and a QUIT then deletes nothing.
        """
        self._kicked = True
        if self.session is not None:
            self.session.ended_by = "Kicked"
        self._wake()

    def stop(self) -> None:
        """End the session without UPDATE at its next wait for the client (drain deadline).

        A session waiting for the client ends at once with a ``-ERR [SYS/TEMP]`` line; one
        busy with a command (an UPDATE under way included) ends when it is answered; one
        stuck writing to a slow client is closed.
        """
        if self._stopping:
            return
        self._stopping = True
        self._wake()

    def shutdown(self) -> None:
        """End the connection now, without UPDATE and without a reply (server shutdown)."""
        if self.session is None or self._ended:
            self._stop_header()
            self._ended = True
            if self._transport is None:  # never connected
                self._forget()
                if not self.done.done():
                    self.done.set_result(None)
            elif not self._lost:
                self._transport.abort()
            return
        if self._task is not None:
            self._task.cancel()
            return
        self._reason = "Server shutting down"
        self.session.conn.close("shutdown")
        self._pump()


def _wake_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _weakly(method: Callable[[], None]) -> Callable[[], None]:
    """Return a callable that calls the bound ``method`` while its object lives, else nothing.

    A session ends in a reference cycle otherwise (driver → session → bound method →
    driver): each connection's objects (transport, session, core, maildrop) would then be
    freed only by a full cyclic collection, which thousands of idle sessions make rare, so
    memory would rise with every connection until one came (issue 13's soak).
    """
    # A weak reference to the object and the method's name (what WeakMethod does, without
    # its Python-level constructor: two of these are made per connection).  By name, not
    # ``__func__``: a method compiled by mypyc has none (bench/results/mypyc.md).
    ref = weakref.ref(method.__self__)  # type: ignore[attr-defined]
    name: str = method.__name__

    def call() -> None:
        owner = ref()
        if owner is not None:
            getattr(owner, name)()

    return call
