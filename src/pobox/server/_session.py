"""One POP3 connection: drive the sans-IO core with a stream, storage and a user database.

The session reads, feeds :class:`~pobox.protocol.ServerConnection`, and answers its events
with I/O: passwords via the :class:`~pobox.auth.base.Authenticator`, maildrops via the
:class:`~pobox.storage.base.MaildropStore`.  Exceptions from those are translated here into
``-ERR`` replies with RFC 3206 codes; nothing a client sends can make a traceback reach it.

Every network wait has a timeout: before login ``login_timeout``; after it the RFC 1939
autologout ``idle_timeout``, on whose expiry the connection is closed without a reply and
without UPDATE (RFC 1939 §3), which also releases the maildrop lock.

May import: the standard library, :mod:`pobox.protocol`, the storage and auth interfaces,
:mod:`pobox.config`, :mod:`pobox.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Final

from pobox.auth.base import Authenticator, AuthError
from pobox.config import Config
from pobox.log import SessionLog
from pobox.protocol import (
    FLUSH,
    NEED_DATA,
    AuthenticateUser,
    CommitDeletions,
    ConnectionClosed,
    DeletionsCommitted,
    EndOfMessage,
    LocalProtocolError,
    LoginAccepted,
    LoginRejected,
    MessageData,
    MessageUnavailable,
    RetrieveMessage,
    ServerConnection,
    State,
    Trace,
)
from pobox.storage.base import (
    Maildrop,
    MaildropLocked,
    MaildropStore,
    MessageGone,
    StorageError,
)

__all__ = ["Session", "SessionContext"]

logger = logging.getLogger("pobox.session")

#: Bytes asked of the socket per read: a whole pipelined batch of commands fits.
READ_SIZE: Final = 64 * 1024

#: Write to the socket once this much of a message is waiting, so a big RETR streams
#: instead of piling up in memory (the transport's own high-water mark then pushes back).
STREAM_FLUSH: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What every session of a server shares."""

    config: Config
    authenticator: Authenticator
    store: MaildropStore


class Session:
    """Serve one client connection from greeting to close."""

    def __init__(
        self,
        ctx: SessionContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.ctx = ctx
        self.reader = reader
        self.writer = writer
        self.id = secrets.token_urlsafe(9)
        self.log = SessionLog(logger, self.id)
        peer = writer.get_extra_info("peername") or ("unknown", 0)
        sock = writer.get_extra_info("sockname") or ("unknown", 0)
        self.rip, self.lip = str(peer[0]), str(sock[0])
        self.maildrop: Maildrop | None = None
        self.auth_failures = 0
        self.last_user: str | None = None
        self.delete_failures = 0
        self.started = time.monotonic()
        cfg = ctx.config
        self.conn = ServerConnection(
            greeting=cfg.login_greeting,
            max_bad_commands=cfg.max_bad_commands,
            trace=cfg.trace,
        )

    async def run(self) -> None:
        """Serve the connection; never raises (errors are logged and end the session)."""
        reason = "internal error"
        try:
            reason = await self._serve()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            reason = "Connection closed"
        except asyncio.CancelledError:
            reason = "Server shutting down"
            self.conn.close("shutdown")
            raise
        except Exception:
            self.log.exception("Internal error, closing the session")
            self.conn.close("internal-error")
            with contextlib.suppress(Exception):
                self.writer.write(b"-ERR [SYS/TEMP] Internal server error.\r\n")
        finally:
            await self._finish(reason)

    # ----------------------------------------------------------------- the loop

    async def _serve(self) -> str:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                await self._flush()
                data = await self._read()
                if data is None:
                    conn.close("timeout")
                    return self._timeout_reason()
                conn.receive_data(data)
            elif event is FLUSH:
                await self._flush()
            elif isinstance(event, Trace):
                self.log.info("%s: %s", event.direction, event.line)
            elif isinstance(event, AuthenticateUser):
                await self._login(event)
            elif isinstance(event, RetrieveMessage):
                await self._retrieve(event)
            elif isinstance(event, CommitDeletions):
                await self._commit(event)
            elif isinstance(event, ConnectionClosed):
                await self._flush()
                return {
                    "quit": "Logged out",
                    "eof": "Connection closed",
                    "too-many-bad-commands": "Too many invalid commands",
                    "message-failed": "Message could not be read",
                }.get(event.reason, event.reason)
            else:  # PAUSED: every event above is answered before looping
                raise LocalProtocolError(f"core paused on {event!r}")

    def _timeout(self) -> float:
        cfg = self.ctx.config
        return cfg.idle_timeout if self.conn.state is State.TRANSACTION else cfg.login_timeout

    def _timeout_reason(self) -> str:
        return f"Inactivity - no input for {self._timeout():g} secs"

    async def _read(self) -> bytes | None:
        """Read what the client sent; ``None`` on the inactivity timeout."""
        try:
            return await asyncio.wait_for(self.reader.read(READ_SIZE), self._timeout())
        except TimeoutError:
            return None

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self._timeout())

    # ----------------------------------------------------------------- events

    async def _login(self, event: AuthenticateUser) -> None:
        cfg = self.ctx.config
        try:
            user = await self.ctx.authenticator.authenticate(event.username, event.password)
        except AuthError as exc:
            self.log.error("Authentication backend failure for user=<%s>: %s", event.username, exc)
            self.conn.send(LoginRejected("Temporary authentication failure.", exc.resp_code))
            return
        if user is None:
            self.auth_failures += 1
            self.last_user = event.username
            self.log.info(
                "Authentication failed: user=<%s>, method=PLAIN, rip=%s, lip=%s, session=<%s>",
                event.username,
                self.rip,
                self.lip,
                self.id,
            )
            await asyncio.sleep(cfg.auth_failure_delay)
            self.conn.send(LoginRejected())
            return
        try:
            self.maildrop = await self.ctx.store.open(user, lock=cfg.pop3_lock_session)
        except MaildropLocked:
            self.log.info("Login refused, maildrop locked: user=<%s>, rip=%s", user.name, self.rip)
            self.conn.send(
                LoginRejected("Mailbox is locked by another POP3 session, try later.", "IN-USE")
            )
            return
        except StorageError as exc:
            self.log.error("Cannot open maildrop of user=<%s>: %s", user.name, exc)
            self.conn.send(LoginRejected("Cannot open the mailbox, try later.", exc.resp_code))
            return
        self.log.info(
            "Login: user=<%s>, method=PLAIN, rip=%s, lip=%s, session=<%s>",
            user.name,
            self.rip,
            self.lip,
            self.id,
        )
        self.log.user = user.name
        self.conn.send(LoginAccepted(self.maildrop.messages))

    async def _retrieve(self, event: RetrieveMessage) -> None:
        assert self.maildrop is not None
        info = self.maildrop.messages[event.number - 1]
        conn = self.conn
        chunks = self.maildrop.read_message(info.key)
        try:
            async for chunk in chunks:
                conn.send(MessageData(chunk))
                if not conn.wants_message_data:
                    break
                await self._flush()
        except MessageGone:
            self.log.warning("Message %d (%s) vanished from the maildrop", event.number, info.key)
            conn.send(MessageUnavailable("Message was removed by another process.", "SYS/PERM"))
            return
        except StorageError as exc:
            self.log.error("Cannot read message %d (%s): %s", event.number, info.key, exc)
            conn.send(MessageUnavailable("Cannot read the message, try later.", exc.resp_code))
            return
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        conn.send(EndOfMessage())

    async def _commit(self, event: CommitDeletions) -> None:
        assert self.maildrop is not None
        failed = 0
        if event.numbers:
            keys = [self.maildrop.messages[n - 1].key for n in event.numbers]
            try:
                result = await self.maildrop.delete(keys)
                failed = len(result.failed)
            except StorageError as exc:
                self.log.error("Deleting %d messages failed: %s", len(keys), exc)
                failed = len(keys)
            self.delete_failures = failed
            if failed:
                self.log.error("%d of %d messages could not be deleted", failed, len(keys))
        self.conn.send(DeletionsCommitted(failed=failed))

    # ----------------------------------------------------------------- the end

    async def _finish(self, reason: str) -> None:
        if self.maildrop is not None:
            try:
                await self.maildrop.close()
            except Exception:
                self.log.exception("Closing the maildrop failed")
        with contextlib.suppress(Exception):
            await self._flush()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        s = self.conn.stats
        if self.log.user is not None:
            self.log.info(
                "Disconnected: %s top=%d/%d, retr=%d/%d, del=%d/%d, size=%d",
                reason,
                s.top_count,
                s.top_bytes,
                s.retr_count,
                s.retr_bytes,
                s.deleted_count - self.delete_failures if self.conn.close_reason == "quit" else 0,
                s.messages_at_login,
                s.size_at_login,
            )
        elif self.auth_failures:
            self.log.info(
                "Disconnected (auth failed, %d attempts in %d secs): user=<%s>, method=PLAIN, "
                "rip=%s, lip=%s, session=<%s>",
                self.auth_failures,
                int(time.monotonic() - self.started),
                self.last_user,
                self.rip,
                self.lip,
                self.id,
            )
        else:
            self.log.info(
                "Disconnected (no auth attempts in %d secs): %s, rip=%s, lip=%s, session=<%s>",
                int(time.monotonic() - self.started),
                reason,
                self.rip,
                self.lip,
                self.id,
            )
