"""One POP3 connection: drive the sans-IO core with a stream, storage and a user database.

The session reads, feeds :class:`~pobox.protocol.ServerConnection`, and answers its events
with I/O: passwords via the :class:`~pobox.auth.base.Authenticator`, maildrops via the
:class:`~pobox.storage.base.MaildropStore`.  Exceptions from those are translated here into
``-ERR`` replies with RFC 3206 codes; nothing a client sends can make a traceback reach it.

Every network wait has a timeout: before login ``login_timeout``, and ``login_deadline``
from the connection's start however busy the client keeps it; after login the RFC 1939
autologout ``idle_timeout``, on whose expiry the connection is closed without a reply and
without UPDATE (RFC 1939 §3), which also releases the maildrop lock.

:meth:`Session.stop` (the end of a drain) and a lost maildrop lock end the session the same
way at its next wait for the client, with a ``-ERR [SYS/TEMP]`` line and without UPDATE; a
command under way is answered first.

Failed logins (:meth:`Session._failed`) are answered ``auth_failure_delay`` (or what the
throttle says) after the attempt *arrived*, not after its check ended: how long the check
took, a costly or a cheap hash, a known or an unknown user, does not show in the timing.

STLS (RFC 2595) goes through the public :meth:`asyncio.StreamWriter.start_tls` only, so it
works on any event loop (uvloop included); see :meth:`Session._start_tls` for how no
plaintext byte pipelined behind STLS can reach the core after the handshake.

A logged-in session is registered in the session registry (:mod:`pobox.server._cluster`)
within ``mail_max_userip_connections`` and ``mail_max_user_connections`` (over them:
``-ERR [IN-USE]``), unregistered at its end, and ended by :meth:`Session.kick` when someone
asks the registry to.

May import: the standard library, :mod:`pobox.protocol`, the storage and auth interfaces,
:mod:`pobox.state` (its interfaces), :mod:`pobox.config`, :mod:`pobox.log`, :mod:`pobox.tls`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from pobox.auth import schemes
from pobox.auth.base import Authenticator, AuthError, HashWorkers, TokenVerifier, User
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
    FetchSecret,
    LocalProtocolError,
    LoginAccepted,
    LoginFailed,
    LoginRejected,
    MessageData,
    MessageUnavailable,
    OpenMaildrop,
    RetrieveMessage,
    ScramKeys,
    Secret,
    SecretFound,
    ServerConnection,
    StartTLS,
    State,
    TlsStarted,
    Trace,
    VerifyToken,
)
from pobox.proxy import starts_like_header
from pobox.server._cluster import Cluster
from pobox.server._proxy import Origin, log_header_refused
from pobox.server._throttle import LoginThrottle
from pobox.state.base import SessionEntry
from pobox.storage.base import (
    Maildrop,
    MaildropLocked,
    MaildropStore,
    MessageGone,
    StorageError,
)
from pobox.tls import ServerTls, plaintext_auth_allowed

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
    #: TLS contexts when ``ssl_cert`` is set; :class:`~pobox.server.Pop3Server` fills it in.
    tls: ServerTls | None = None
    #: Failed-login bookkeeping shared by all sessions (none: only auth_failure_delay).
    throttle: LoginThrottle | None = None
    #: Checks OAuth bearer tokens for OAUTHBEARER / XOAUTH2 (none: tokens always fail).
    token_verifier: TokenVerifier | None = None
    #: Where SCRAM keys are derived (the authenticator's own workers, so one limit holds).
    workers: HashWorkers = field(default_factory=HashWorkers)
    #: The key SCRAM salts are derived from (``scram_secret_file``); empty without SCRAM.
    scram_secret: bytes = b""
    #: This node's sessions in the (cluster's) registry: limits, kicks (none: neither).
    cluster: Cluster | None = None


_T = TypeVar("_T")

_apop_counter = itertools.count()

#: The failure delay's sleep (a name of this module, so a test can see what it is asked).
_sleep = asyncio.sleep


@functools.cache
def _hostname() -> str:
    """Return this host's name, asked of the kernel once per process."""
    return socket.gethostname()


def apop_timestamp() -> str:
    """Return a fresh RFC 1939 §7 timestamp, ``<pid.clock@hostname>``, never the same twice."""
    return f"<{os.getpid()}.{time.time_ns()}.{next(_apop_counter)}@{_hostname()}>"


#: Random bytes for session ids, taken from the kernel a few kilobytes at a time.  A forked
#: child (a worker) starts with none: it would hand out its parent's ids again, and an id
#: is the key of the session's row in the cluster's registry.
_id_pool = bytearray()
os.register_at_fork(after_in_child=_id_pool.clear)


def session_id() -> str:
    """Return a new session id for the logs: 72 random bits, URL-safe base64 (12 chars)."""
    if not _id_pool:
        _id_pool.extend(os.urandom(9 * 512))
    raw = bytes(_id_pool[-9:])
    del _id_pool[-9:]
    return base64.urlsafe_b64encode(raw).decode("ascii")


def secret_from_stored(stored: str) -> Secret:
    """Turn a stored ``{SCHEME}data`` password into what the SASL core can use."""
    scheme = schemes.identify_scheme(stored)
    data = stored[stored.find("}") + 1 :] if stored.startswith("{") else stored
    if scheme in ("PLAIN", "CLEAR", "CLEARTEXT"):
        return Secret(password=data.encode("utf-8", "surrogateescape"))
    scram = schemes.scram_credentials(stored)
    if scram is not None:
        return Secret(
            scram=ScramKeys(
                scram.hash_name, scram.iterations, scram.salt, scram.stored_key, scram.server_key
            )
        )
    return Secret(cram_md5_context=schemes.cram_md5_context(stored))


def client_identity(peercert: object) -> str | None:
    """Return the identity of a *verified* TLS client certificate, for SASL EXTERNAL.

    ``peercert`` is what ``SSLObject.getpeercert()`` gives: empty unless the TLS context asked
    for and verified a client certificate.  The identity is the subject's ``emailAddress``,
    else its ``commonName``.
    """
    if not isinstance(peercert, dict):
        return None
    fields = {key: value for rdn in peercert.get("subject", ()) for key, value in rdn}
    identity = fields.get("emailAddress") or fields.get("commonName")
    return identity if isinstance(identity, str) and identity else None


def _may_log_in(user: User | None) -> User | None:
    """Return ``user`` unless its passwd-file flags ``nologin``/``noauthenticate`` refuse it.

    The password checks refuse those users themselves; a certificate or token login, which
    only looks the user up, must too.
    """
    if user is None:
        return None
    for flag in ("nologin", "noauthenticate"):
        value = user.extra.get(flag)
        if value is not None and value.lower() not in ("n", "no", "false", "0"):
            return None
    return user


#: What :meth:`Session._verify` returns when it has already answered the core itself.
_ANSWERED: Final = object()


class Session:
    """Serve one client connection from greeting to close."""

    def __init__(
        self,
        ctx: SessionContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        origin: Origin | None = None,
    ) -> None:
        self.ctx = ctx
        self.reader = reader
        self.writer = writer
        self.id = session_id()
        self.log = SessionLog(logger, self.id)
        peer = writer.get_extra_info("peername") or ("unknown", 0)
        sock = writer.get_extra_info("sockname") or ("unknown", 0)
        self.rip, self.lip = str(peer[0]), str(sock[0])
        #: Who HAProxy relays the connection for (a PROXY header from a trusted network).
        self.origin = origin
        if origin is not None:
            self.rip, self.lip = origin.rip, origin.lip
        self.maildrop: Maildrop | None = None
        self.auth_failures = 0
        self.last_user: str | None = None
        self.last_method = "PLAIN"
        self.delete_failures = 0
        self.started = time.monotonic()
        cfg = ctx.config
        self.secure = writer.get_extra_info("ssl_object") is not None or (
            origin is not None and origin.secure
        )
        self.conn = ServerConnection(
            user_enabled=self._plaintext_allowed(),
            tls_available=ctx.tls is not None,
            secure=self.secure,
            greeting=cfg.login_greeting,
            max_bad_commands=cfg.max_bad_commands,
            trace=cfg.trace,
            sasl_mechanisms=[
                m
                for m in cfg.auth_mechanisms.upper().split()
                if m not in ("OAUTHBEARER", "XOAUTH2") or ctx.token_verifier is not None
            ],
            apop_timestamp=apop_timestamp() if cfg.apop else None,
            hostname=_hostname(),
        )
        # SASL EXTERNAL: when HAProxy did the TLS, only the certificate name it vouches for
        # counts (a certificate on pobox's own TLS hop would be HAProxy's); else pobox's own.
        self.conn.external_identity = (
            client_identity(writer.get_extra_info("peercert"))
            if origin is None or not origin.secure
            else origin.tls_identity
        )
        if origin is not None:
            log = self.log.debug if origin.header.command == "LOCAL" else self.log.info
            log("haproxy: Client connected: %s, session=<%s>", origin.describe(), self.id)
        self._loop = asyncio.get_running_loop()
        #: Loop time by which the client must have logged in (``login_deadline``).
        self._login_by = self._loop.time() + cfg.login_deadline
        self._transport = writer.transport
        #: When the current wait for the network began (None: not waiting on the network).
        self._io_since: float | None = None
        self._expired = False
        #: The store lost the maildrop lock (another node may serve the maildrop now).
        self._lock_gone = False
        #: Someone asked (through the session registry) for this session to end.
        self._kicked = False
        #: The server is draining and its deadline passed: end at the next wait, no UPDATE.
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Serve the connection; never raises (errors are logged and end the session)."""
        reason = "internal error"
        self._task = asyncio.current_task()
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
            try:
                await self._finish(reason)
            finally:
                if self._timer is not None:
                    self._timer.cancel()

    # ----------------------------------------------------------------- the loop

    async def _serve(self) -> str:
        conn = self.conn
        first = True
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                await self._flush()
                data = (
                    None
                    if self._lock_gone or self._kicked or self._stopping
                    else await self._read()
                )
                if self._kicked:
                    return self._end_kicked()
                if self._lock_gone:
                    return self._end_lock_lost()
                if self._stopping:
                    return self._end_stopped()
                if data is None:
                    reason = self._timeout_reason()
                    conn.close("timeout")
                    return reason
                if first:
                    first = False
                    if starts_like_header(data):
                        return self._refuse_proxy_header()
                conn.receive_data(data)
            elif event is FLUSH:
                await self._flush()
            elif isinstance(event, Trace):
                self.log.info("%s: %s", event.direction, event.line)
            elif isinstance(
                event, AuthenticateUser | FetchSecret | VerifyToken | OpenMaildrop | LoginFailed
            ):
                await self._login(event)
            elif isinstance(event, RetrieveMessage):
                await self._retrieve(event)
            elif isinstance(event, CommitDeletions):
                await self._commit(event)
            elif isinstance(event, StartTLS):
                await self._start_tls(event)
            elif isinstance(event, ConnectionClosed):
                # Release the lock before the last reply goes out (RFC 1939 §6: UPDATE,
                # release, then the reply): a client that logs in again as soon as it has
                # the +OK, here or on another node, must find the maildrop free, and its
                # session no longer counted toward the connection limits.
                await self._release()
                await self._unregister()
                await self._flush()
                return {
                    "quit": "Logged out",
                    "eof": "Connection closed",
                    "too-many-bad-commands": "Too many invalid commands",
                    "message-failed": "Message could not be read",
                    "tls-failed": "TLS handshaking failed",
                }.get(event.reason, event.reason)
            else:  # PAUSED: every event above is answered before looping
                raise LocalProtocolError(f"core paused on {event!r}")

    def _refuse_proxy_header(self) -> str:
        """Close a connection whose client starts with a PROXY header, which it may not send.

        A trusted HAProxy's header has been read before the session began; one here comes
        from a client (or from behind HAProxy) and is never believed.
        """
        log_header_refused(logger, self.log.prefix.rstrip(":"), self.rip, self.lip)
        self.writer.write(b"-ERR PROXY protocol header refused.\r\n")
        self.conn.close("proxy-refused")
        return "PROXY header refused"

    def _plaintext_allowed(self) -> bool:
        cfg = self.ctx.config
        return plaintext_auth_allowed(
            cfg.disable_plaintext_auth,
            self.rip,
            cfg.login_trusted_networks,
            secure=self.secure,
        )

    async def _start_tls(self, event: StartTLS) -> None:
        """Answer STLS and do the handshake on this connection (RFC 2595 §4).

        No plaintext byte sent after ``STLS`` may reach the core once TLS is up
        (CVE-2011-0411).  The core dropped those it had; bytes still buffered in the
        StreamReader are taken and dropped here; and between that and ``start_tls``
        pausing the transport there is no ``await`` that could yield to the event loop
        (``StreamWriter.start_tls`` only drains, which does not yield for one short line),
        so nothing new can be buffered as plaintext.
        """
        assert self.ctx.tls is not None
        self.writer.write(self.conn.data_to_send())
        discarded = event.discarded + len(_take_buffered(self.reader))
        if discarded:
            self.log.warning("Discarded %d bytes pipelined after STLS", discarded)
        try:
            await self.writer.start_tls(
                self.ctx.tls.context, ssl_handshake_timeout=self.ctx.config.login_timeout
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.log.info("TLS handshake failed: %s, rip=%s", exc, self.rip)
            self.conn.close("tls-failed")
            return
        self.secure = True
        self.conn.send(TlsStarted(user_enabled=self._plaintext_allowed()))
        self.conn.external_identity = client_identity(self.writer.get_extra_info("peercert"))

    def _expiry(self, since: float) -> float:
        """Return when a wait on the network that began at ``since`` times out (loop time)."""
        cfg = self.ctx.config
        if self.conn.state is State.TRANSACTION:
            return since + cfg.idle_timeout
        if self.maildrop is not None:  # after QUIT: the last reply's drain
            return since + cfg.login_timeout
        return min(since + cfg.login_timeout, self._login_by)

    def _timeout_reason(self) -> str:
        cfg = self.ctx.config
        if self.conn.state is State.TRANSACTION:
            return f"Inactivity - no input for {cfg.idle_timeout:g} secs"
        if self.maildrop is None and self._loop.time() >= self._login_by:
            return f"Login time limit - not logged in after {cfg.login_deadline:g} secs"
        return f"Inactivity - no input for {cfg.login_timeout:g} secs"

    # One timer per session enforces the timeouts, instead of a timeout context around each
    # read and drain: those cost a timer handle and a current_task() lookup per command, a
    # tenth of a mail session's CPU in the benchmark profile.  Here a wait on the network
    # only stamps its start; the timer, when it fires, checks whether the wait under way has
    # reached its expiry and otherwise sets itself again for the moment it would.  Work that
    # is not a wait on the network (a password check, a failure delay) is never cut short:
    # the deadline before login takes effect at the next wait.

    def _network_wait(self) -> None:
        """Note that a wait on the network begins now, and make sure the timer covers it."""
        now = self._loop.time()
        self._io_since = now
        deadline = self._expiry(now)
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def _lock_lost(self) -> None:
        """The store lost the maildrop lock: end the session, without UPDATE, at once.

        A session waiting for the client is woken (as the timer does); one busy with a
        command ends when the command is answered, and QUIT then deletes nothing.
        """
        self._lock_gone = True
        if self._io_since is not None and self._task is not None:
            self._expired = True
            self._task.cancel()

    def kick(self) -> None:
        """End the session, without UPDATE, at once: an administrator asked for it.

        As when the maildrop lock is lost: a session waiting for the client is woken; one
        busy with a command ends once it is answered, and a QUIT then deletes nothing.
        """
        self._kicked = True
        if self._io_since is not None and self._task is not None:
            self._expired = True
            self._task.cancel()

    def stop(self) -> None:
        """End the session without UPDATE at its next wait for the client (drain deadline).

        A session waiting for the client ends at once with a ``-ERR [SYS/TEMP]`` line; one
        busy with a command (an UPDATE under way included) ends when it is answered; one
        stuck writing to a slow client is closed.
        """
        if self._stopping:
            return
        self._stopping = True
        if self._io_since is not None and self._task is not None:
            self._expired = True
            self._task.cancel()

    def _end_kicked(self) -> str:
        """Tell the client the session ends without UPDATE; return the reason to log.

        ``[SYS/TEMP]`` (RFC 3206): whatever the client sends next reads this as its answer,
        and takes it as a temporary failure to retry later, not as a wrong password.
        """
        self.log.info("Kicked by the administrator, ending the session without UPDATE")
        self.conn.close("kicked")
        self.writer.write(
            b"-ERR [SYS/TEMP] Session ended by the administrator, no changes made.\r\n"
        )
        return "Kicked by the administrator"

    def _end_stopped(self) -> str:
        """Tell the client the server is going away and nothing was changed."""
        self.conn.close("shutdown")
        self.writer.write(
            b"-ERR [SYS/TEMP] Server shutting down, no changes made; log in again.\r\n"
        )
        return "Server shutting down"

    def _end_lock_lost(self) -> str:
        """Tell the client the session ends without UPDATE; return the reason to log."""
        self.log.error("Maildrop lock lost, ending the session without UPDATE")
        self.conn.close("lock-lost")
        self.writer.write(b"-ERR [SYS/TEMP] Mailbox lock lost, no changes made; log in again.\r\n")
        return "Maildrop lock lost"

    def _check_deadline(self) -> None:
        since = self._io_since
        now = self._loop.time()
        if since is not None and now >= self._expiry(since):
            self._timer = None
            self._expired = True
            if self._task is not None:
                self._task.cancel()
            return
        self._timer = self._loop.call_at(self._expiry(since or now), self._check_deadline)

    async def _on_network(self, waiting: Awaitable[_T]) -> _T:
        """Await a read or a drain under the session's timeout.

        Raises:
            TimeoutError: the timer cancelled the wait (the cancellation is taken back).
        """
        self._network_wait()
        try:
            return await waiting
        except asyncio.CancelledError:
            if not self._expired or self._task is None:
                raise
            self._expired = False
            self._task.uncancel()
            raise TimeoutError from None
        finally:
            self._io_since = None

    async def _read(self) -> bytes | None:
        """Read what the client sent; ``None`` on the inactivity timeout."""
        try:
            return await self._on_network(self.reader.read(READ_SIZE))
        except TimeoutError:
            return None

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if not data:
            return
        self.writer.write(data)
        # Drain only when the transport holds data back: most replies leave at once.
        if self._transport.get_write_buffer_size():
            await self._on_network(self.writer.drain())

    # ----------------------------------------------------------------- events

    async def _login(
        self, event: AuthenticateUser | FetchSecret | VerifyToken | OpenMaildrop | LoginFailed
    ) -> None:
        """Answer a login step: check, fetch, or open the maildrop (USER/PASS, APOP, AUTH)."""
        arrived = self._loop.time()
        throttle = self.ctx.throttle
        failures = 0
        if throttle is not None:
            failures = await throttle.failures(self.rip)
            if throttle.refuses(failures):
                self.log.info(
                    "Login refused, too many failures: user=<%s>, method=%s, rip=%s, lip=%s, "
                    "session=<%s>",
                    event.username or "",
                    event.mechanism,
                    self.rip,
                    self.lip,
                    self.id,
                )
                self.conn.send(
                    LoginRejected("Too many failed logins, try again later.", "LOGIN-DELAY")
                )
                return
        try:
            user = await self._verify(event)
        except AuthError as exc:
            self.log.error("Authentication backend failure for user=<%s>: %s", event.username, exc)
            self.conn.send(LoginRejected("Temporary authentication failure.", exc.resp_code))
            return
        if user is _ANSWERED:
            return
        if not isinstance(user, User):
            await self._failed(event.username, event.mechanism, arrived)
            return
        await self._open(user, event.mechanism, failures)

    async def _verify(
        self, event: AuthenticateUser | FetchSecret | VerifyToken | OpenMaildrop | LoginFailed
    ) -> User | object | None:
        """Return the user the event proves, ``None`` if it proves nothing, or _ANSWERED."""
        auth = self.ctx.authenticator
        if isinstance(event, AuthenticateUser):
            return await auth.authenticate(event.username, event.password)
        if isinstance(event, FetchSecret):
            stored = await auth.credentials(event.username)
            if event.mechanism.startswith("SCRAM-"):
                secret: Secret | None = await self._scram_secret(event, stored)
            else:
                secret = None if stored is None else secret_from_stored(stored)
            self.conn.send(SecretFound(secret))
            return _ANSWERED
        if isinstance(event, VerifyToken):
            verifier = self.ctx.token_verifier
            if verifier is None or not await verifier.verify_token(event.username, event.token):
                return None
            return _may_log_in(await auth.lookup(event.username))
        if isinstance(event, OpenMaildrop):
            return _may_log_in(await auth.lookup(event.username))
        self.log.debug("SASL %s failed: %s", event.mechanism, event.reason)
        return None

    async def _scram_secret(self, event: FetchSecret, stored: str | None) -> Secret:
        """Return the SCRAM keys for ``event``'s user: real ones, or decoys for anyone else.

        The salt of names without stored keys comes from ``scram_secret``: stable, and the
        same kind for unknown names as for known ones.  The PBKDF2 (one, whoever the name
        is) runs in a worker thread, never in the event loop.
        """
        salt = schemes.scram_salt(self.ctx.scram_secret, event.mechanism, event.username)
        keys = await self.ctx.workers.run(schemes.scram_server_keys, stored, event.mechanism, salt)
        return Secret(
            scram=ScramKeys(
                keys.hash_name, keys.iterations, keys.salt, keys.stored_key, keys.server_key
            )
        )

    async def _failed(self, username: str | None, method: str, arrived: float) -> None:
        """Count, log and answer a failed login, ``delay`` seconds after it ``arrived``."""
        cfg = self.ctx.config
        self.auth_failures += 1
        self.last_user = username
        self.last_method = method
        self.log.info(
            "Authentication failed: user=<%s>, method=%s, rip=%s, lip=%s, session=<%s>",
            username or "",
            method,
            self.rip,
            self.lip,
            self.id,
        )
        throttle = self.ctx.throttle
        delay = (
            await throttle.failed(self.rip, username)
            if throttle is not None
            else cfg.auth_failure_delay
        )
        wait = delay - (self._loop.time() - arrived)
        if wait > 0:
            await _sleep(wait)
        self.conn.send(LoginRejected())
        if self.auth_failures >= cfg.max_auth_failures:
            # Dovecot too closes after a few failures: a brute-forcer must reconnect.
            self.conn.close("too-many-auth-failures")

    async def _admit(self, user: User, method: str) -> bool:
        """Register the session in the registry within the per-user limits; say if admitted."""
        cluster = self.ctx.cluster
        if cluster is None:
            return True
        entry = SessionEntry(
            self.id, user.name, cluster.node, self.rip, time.time(), self.secure, method
        )
        admission, refusal = await cluster.admit(entry, self.kick)
        if refusal is None:
            return True
        self.log.info(
            "Login refused, %s: user=<%s>, method=%s, rip=%s, lip=%s, session=<%s>, "
            "sessions=%d, from this address=%d",
            refusal,
            user.name,
            method,
            self.rip,
            self.lip,
            self.id,
            admission.user_sessions,
            admission.userip_sessions,
        )
        self.conn.send(LoginRejected(refusal + ".", "IN-USE"))
        return False

    async def _open(self, user: User, method: str, failures: int) -> None:
        if not await self._admit(user, method):
            return
        try:
            self.maildrop = await self._open_maildrop(user)
        finally:
            if self.maildrop is None:  # not logged in after all: not counted either
                await self._unregister()
        if self.maildrop is None:
            return
        if self.ctx.throttle is not None:
            await self.ctx.throttle.succeeded(self.rip, failures)
        self.log.info(
            "Login: user=<%s>, method=%s, rip=%s, lip=%s, session=<%s>",
            user.name,
            method,
            self.rip,
            self.lip,
            self.id,
        )
        self.log.user = user.name
        self.maildrop.on_lock_lost(self._lock_lost)
        self.conn.send(LoginAccepted(self.maildrop.messages))

    async def _open_maildrop(self, user: User) -> Maildrop | None:
        """Open and lock the user's maildrop; ``None`` (answered) if it cannot be."""
        cfg = self.ctx.config
        try:
            return await self.ctx.store.open(user, lock=cfg.pop3_lock_session)
        except MaildropLocked:
            self.log.info("Login refused, maildrop locked: user=<%s>, rip=%s", user.name, self.rip)
            self.conn.send(
                LoginRejected("Mailbox is locked by another POP3 session, try later.", "IN-USE")
            )
            return None
        except StorageError as exc:
            self.log.error("Cannot open maildrop of user=<%s>: %s", user.name, exc)
            self.conn.send(LoginRejected("Cannot open the mailbox, try later.", exc.resp_code))
            return None

    async def _retrieve(self, event: RetrieveMessage) -> None:
        assert self.maildrop is not None
        info = self.maildrop.messages[event.number - 1]
        conn = self.conn
        try:
            data = self.maildrop.read_now(info.key)
        except StorageError as exc:
            self._unavailable(event, info.key, exc)
            return
        if data is not None:  # a small message, read without a worker thread
            conn.send(MessageData(data))
            conn.send(EndOfMessage())
            return
        chunks = self.maildrop.read_message(info.key)
        try:
            async for chunk in chunks:
                conn.send(MessageData(chunk))
                if not conn.wants_message_data:
                    break
                if conn.output_size >= STREAM_FLUSH:
                    await self._flush()
        except StorageError as exc:
            self._unavailable(event, info.key, exc)
            return
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        conn.send(EndOfMessage())

    def _unavailable(self, event: RetrieveMessage, key: str, exc: StorageError) -> None:
        """Log why a message cannot be read and tell the core."""
        if isinstance(exc, MessageGone):
            self.log.warning("Message %d (%s) vanished from the maildrop", event.number, key)
            self.conn.send(
                MessageUnavailable("Message was removed by another process.", "SYS/PERM")
            )
        else:
            self.log.error("Cannot read message %d (%s): %s", event.number, key, exc)
            self.conn.send(MessageUnavailable("Cannot read the message, try later.", exc.resp_code))

    async def _commit(self, event: CommitDeletions) -> None:
        assert self.maildrop is not None
        failed = 0
        if event.numbers and (self._lock_gone or self._kicked):
            why = "Kicked" if self._kicked else "Maildrop lock lost"
            self.log.error("%s, %d deletions not made", why, len(event.numbers))
            failed = self.delete_failures = len(event.numbers)
        elif event.numbers:
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
        # UPDATE ends the session: the lock goes before the client hears +OK, so a client
        # that logs in again at once finds the maildrop free (through the storage helper,
        # releasing it is a round trip). _finish closes it again, which does nothing.
        try:
            await self.maildrop.close()
        except Exception:
            self.log.exception("Closing the maildrop failed")
        self.conn.send(DeletionsCommitted(failed=failed))

    # ----------------------------------------------------------------- the end

    async def _release(self) -> None:
        """Close the maildrop (releasing its lock); safe to call more than once."""
        if self.maildrop is not None:
            try:
                await self.maildrop.close()
            except Exception:
                self.log.exception("Closing the maildrop failed")
            except asyncio.CancelledError:  # shutdown while a store released its lock
                self.writer.close()
                raise

    async def _unregister(self) -> None:
        """Take the session out of the registry; safe to call more than once."""
        if self.ctx.cluster is not None:
            try:
                await self.ctx.cluster.release(self.id)
            except Exception:
                self.log.exception("Unregistering the session failed")

    async def _finish(self, reason: str) -> None:
        await self._release()
        with contextlib.suppress(Exception):
            await self._flush()
        # close() sends what is still buffered before closing; wait (a while) only then.
        unsent = self._transport.get_write_buffer_size()
        self.writer.close()
        if unsent:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.writer.wait_closed()
        await self._unregister()  # after the close: the socket goes whatever happens here
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
                "Disconnected (auth failed, %d attempts in %d secs): user=<%s>, method=%s, "
                "rip=%s, lip=%s, session=<%s>",
                self.auth_failures,
                int(time.monotonic() - self.started),
                self.last_user or "",
                self.last_method,
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


def _take_buffered(reader: asyncio.StreamReader) -> bytes:
    """Return what ``reader`` holds already, without waiting and without yielding.

    ``StreamReader.read`` returns buffered bytes without suspending; when the buffer is empty
    it would suspend, so the coroutine is stepped once by hand and, if it suspends, closed.
    """
    taken = bytearray()
    while True:
        coro = reader.read(READ_SIZE)
        try:
            coro.send(None)
        except StopIteration as done:
            if not done.value:  # end of file
                return bytes(taken)
            taken += done.value
            continue
        coro.close()
        return bytes(taken)
