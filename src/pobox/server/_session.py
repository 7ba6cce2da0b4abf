"""What a POP3 session does with the core's events: logins, maildrops, UPDATE, and its logs.

:class:`Session` answers the events of :class:`~pobox.protocol.ServerConnection` that need
the :class:`~pobox.auth.base.Authenticator`, the :class:`~pobox.storage.base.MaildropStore`
or the session registry, and writes every log line of a session.  It does no network I/O:
the transport driver (:mod:`pobox.server._driver`) feeds the core, writes its replies, keeps
the timeouts and does STLS, and asks the handlers here only for what they answer.  Exceptions
from the backends are translated here into ``-ERR`` replies with RFC 3206 codes; nothing a
client sends can make a traceback reach it.

Failed logins (:meth:`Session._failed`) are answered ``auth_failure_delay`` (or what the
throttle says) after the attempt *arrived*, not after its check ended: how long the check
took, a costly or a cheap hash, a known or an unknown user, does not show in the timing.

A logged-in session is registered in the session registry (:mod:`pobox.server._cluster`)
within ``mail_max_userip_connections`` and ``mail_max_user_connections`` (over them:
``-ERR [IN-USE]``), unregistered at its end, and ended (through the driver) when someone asks
the registry to.

May import: the standard library, :mod:`pobox.protocol`, the storage and auth interfaces,
:mod:`pobox.state` (its interfaces), :mod:`pobox.config`, :mod:`pobox.names`, :mod:`pobox.log`,
:mod:`pobox._logevents`, :mod:`pobox.tls`, :mod:`pobox.metrics`, :mod:`pobox.server._connection`,
:mod:`pobox.errors` and :mod:`pobox.storage.marks` (folder marks).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from pobox import _logevents as events
from pobox.auth import schemes
from pobox.auth.base import Authenticator, AuthError, HashWorkers, TokenVerifier, User
from pobox.config import Config, parse_expire_days, parse_folders
from pobox.errors import ConfigError
from pobox.log import SessionLog
from pobox.metrics import CommandClock, Metrics
from pobox.names import parse_format
from pobox.protocol import (
    AuthenticateUser,
    ClientWorkarounds,
    CommitDeletions,
    DeletionsCommitted,
    EndOfMessage,
    FetchSecret,
    HeaderEnd,
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
    SnapshotEntry,
    TlsStarted,
    VerifyToken,
    WireData,
)
from pobox.records import parse_size
from pobox.server._cluster import THROTTLED, Cluster
from pobox.server._connection import ConnectionInfo, client_identity
from pobox.server._sendfile import FileSender, WireReadyFiles
from pobox.server._throttle import LoginThrottle, address_key
from pobox.state.base import SessionEntry, StateUnavailable
from pobox.storage.base import (
    INBOX,
    Maildrop,
    MaildropFolders,
    MaildropLocked,
    MaildropStore,
    MessageFiles,
    MessageGone,
    MessageInfo,
    OpenedMessage,
    RetrievalTimes,
    SeenFlags,
    StorageError,
    StorageTemporaryError,
)
from pobox.storage.marks import mark_folders
from pobox.tls import ServerTls, plaintext_auth_allowed

__all__ = ["Session", "SessionContext", "client_identity"]

logger = logging.getLogger("pobox.session")

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
    #: What the sessions count for ``metrics_listen`` (none: nothing is counted).
    metrics: Metrics | None = None
    #: The wall clock, seconds since the epoch: when messages were retrieved, for EXPIRE
    #: (injectable for tests, which cannot wait days).
    clock: Callable[[], float] = time.time
    #: The message files seen to be in wire form, sent with ``sendfile`` on plain connections.
    wire_ready: WireReadyFiles = field(default_factory=WireReadyFiles)


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
    """Return a new session id for the logs: 72 random bits, URL-safe base64 (12 chars).

    Never with a leading ``-`` (``_`` instead): an admin pastes the id into ``pobox kick ID``,
    where ``-…`` would be read as an option.
    """
    if not _id_pool:
        _id_pool.extend(os.urandom(9 * 512))
    raw = bytes(_id_pool[-9:])
    del _id_pool[-9:]
    text = base64.urlsafe_b64encode(raw).decode("ascii")
    return "_" + text[1:] if text.startswith("-") else text


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


#: ``pop3_client_workarounds`` names → the core's flags.
_WORKAROUNDS: Final = {
    "outlook-no-nuls": ClientWorkarounds.OUTLOOK_NO_NULS,
    "oe-ns-eoh": ClientWorkarounds.OE_NS_EOH,
}


def client_workarounds(names: tuple[str, ...]) -> ClientWorkarounds:
    """Return the core's flags for the ``pop3_client_workarounds`` names (checked already)."""
    flags = ClientWorkarounds.NONE
    for name in names:
        flags |= _WORKAROUNDS[name]
    return flags


@dataclass(frozen=True, slots=True)
class _Sized:
    """A snapshot entry whose size counts the header end ``oe-ns-eoh`` adds."""

    size: int
    uidl: str


async def _header_end_sizes(maildrop: Maildrop) -> list[SnapshotEntry]:
    """Return the snapshot with 2 octets more for each message that has no header end.

    ``oe-ns-eoh`` sends a CRLF more for those (:class:`pobox.protocol.HeaderEnd` decides,
    as the encoder does), so LIST, STAT and RETR's octet count must say so.  What the store
    knows (:attr:`MessageInfo.header_end`: the Maildir store keeps it in its index) is taken
    as it is; any other message is read up to the end of its header, at every login (the
    PostgreSQL store).  A message that cannot be read keeps its size: RETR will fail on it
    anyway.
    """
    entries: list[SnapshotEntry] = []
    for info in maildrop.messages:
        if info.header_end is not None:
            entries.append(info if info.header_end else _Sized(info.size + 2, info.uidl))
            continue
        finder = HeaderEnd()
        try:
            data = maildrop.read_now(info.key)
            if data is not None:
                finder.feed_stored(data)
            else:
                chunks = maildrop.read_message(info.key)
                try:
                    async for chunk in chunks:
                        finder.feed_stored(chunk)
                        if finder.found:
                            break
                finally:
                    aclose = getattr(chunks, "aclose", None)
                    if aclose is not None:
                        await aclose()
        except StorageError:
            finder.found = True
        entries.append(info if finder.found else _Sized(info.size + 2, info.uidl))
    return entries


def user_folders(user: User, default: tuple[str, ...], log: SessionLog) -> tuple[str, ...]:
    """Return the folders ``user``'s POP3 listing merges: the userdb field, else ``default``."""
    value = user.extra.get("pop3_folders")
    if value is None:
        return default
    try:
        return parse_folders("pop3_folders", value)
    except ConfigError:
        log.warning(
            "userdb: user %s: bad pop3_folders ignored: %s",
            user.name,
            value,
            event="bad_user_field",
        )
        return default


def pop3_disabled(user: User) -> bool:
    """Tell whether the userdb field ``nopop3`` turns POP3 off for ``user``.

    Set as the passwd-file's ``nologin`` is: present with no value or any value but
    ``n``/``no``/``false``/``0`` (a PostgreSQL ``boolean`` column reads ``True``/``False``).
    """
    value = user.extra.get("nopop3")
    return value is not None and value.lower() not in ("n", "no", "false", "0")


def download_limit(user: User, default: int, log: SessionLog) -> int:
    """Return ``user``'s daily download cap: the userdb field, else ``default`` (0: none)."""
    value = user.extra.get("pop3_daily_download_bytes")
    if value is None:
        return default
    try:
        return parse_size(value)
    except ValueError:
        log.warning(
            "userdb: user %s: bad pop3_daily_download_bytes ignored: %s",
            user.name,
            value,
            event="bad_user_field",
        )
        return default


def expire_days(user: User, default: str, log: SessionLog) -> str:
    """Return ``user``'s EXPIRE: the userdb field, else ``default`` (digits, ``NEVER``, ``""``)."""
    value = user.extra.get("pop3_expire_days")
    if value is None:
        return default
    parsed = parse_expire_days(value)
    if parsed is None:
        log.warning(
            "userdb: user %s: bad pop3_expire_days ignored: %s",
            user.name,
            value,
            event="bad_user_field",
        )
        return default
    return parsed


def login_delay(user: User, default: int, log: SessionLog) -> int:
    """Return ``user``'s LOGIN-DELAY seconds: the userdb field, else ``default`` (0: none)."""
    value = user.extra.get("pop3_login_delay")
    if value is None:
        return default
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        log.warning(
            "userdb: user %s: bad pop3_login_delay ignored: %s",
            user.name,
            value,
            event="bad_user_field",
        )
        return default
    return int(text)


#: Seconds in a day, for EXPIRE's days.
DAY: Final = 86_400

#: The parsed ``auth_username_format`` (checked when the configuration was read).
_username_format = functools.lru_cache(maxsize=8)(parse_format)


#: What :meth:`Session._verify` returns when it has already answered the core itself.
_ANSWERED: Final = object()


class Session:
    """Answer one connection's core events that need storage, a user database or a registry.

    The handlers here do no network I/O: each answers one event of the core
    (:meth:`login`, :meth:`retrieve`, :meth:`commit`) by :meth:`ServerConnection.send`, and
    the transport driver (:class:`pobox.server._driver.Pop3Protocol`) writes what the core
    then has to send.  Every log line of a session is written here.

    Args:
        ctx: what all sessions share.
        info: the connection record the listener built.
        kick: what ends the session when the registry asks (see :meth:`Cluster.admit`).
        lock_lost: what ends the session when the store loses the maildrop lock.
        started: when the session began, on the clock its deadlines count from (the loop's;
            it never runs ahead of ``time.monotonic``, which its age is read from at the end).
    """

    def __init__(
        self,
        ctx: SessionContext,
        info: ConnectionInfo,
        *,
        kick: Callable[[], None],
        lock_lost: Callable[[], None],
        started: float,
    ) -> None:
        self.ctx = ctx
        self.info = info
        self.id = session_id()
        self.log = SessionLog(
            logger,
            self.id,
            rip=info.rip,
            lip=info.lip,
            tls_version=(info.tls_version or "") if info.secure else None,
            tls_by="haproxy" if info.secure and not info.tls else "",
        )
        self.rip, self.lip = info.rip, info.lip
        self.maildrop: Maildrop | None = None
        #: The user's ``pop3_daily_download_bytes`` (0: none), set at login.
        self.download_limit = 0
        #: The maildrop is closed (its lock released), or there never was one.
        self.released = True
        self.auth_failures = 0
        #: Logins with the right credentials that were refused (locked, limits, throttle).
        self.refused_logins = 0
        #: Why the STLS handshake failed, for the session's last line.
        self.tls_failure: str | None = None
        self.last_user: str | None = None
        self.last_method = "PLAIN"
        self.delete_failures = 0
        #: Keys of the messages sent whole by RETR (not TOP), to be marked seen at the end.
        self.retrieved: set[str] = set()
        #: Key → when RETR first sent it whole in this session (TOP: never), for EXPIRE.
        self.fetched: dict[str, float] = {}
        #: The user's EXPIRE (``pop3_expire_days``), set at login: digits, ``NEVER``, ``""``.
        self.expire = ""
        self.started = started
        self.secure = info.secure
        self._kick = kick
        self._lock_lost = lock_lost
        #: Whoever asked that the session end without UPDATE (checked at UPDATE).
        self.ended_by: str | None = None
        cfg = ctx.config
        metrics = ctx.metrics
        #: Times the commands (metrics on), ended by the driver when it waits for the client.
        self.clock: CommandClock | None = None
        #: The state the metrics count the session in (``None``: not counted).
        self._counted_as: str | None = None
        if metrics is not None:
            self.clock = metrics.clock()
            self._count_as("authorization")
        self.conn = ServerConnection(
            user_enabled=self.plaintext_allowed(),
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
            username_format=_username_format(cfg.auth_username_format),
            on_command=None if self.clock is None else self.clock.begin,
            utf8=cfg.pop3_utf8,  # RFC 6856 §2
            lang=cfg.pop3_lang,  # RFC 6856 §3
            language=cfg.pop3_language,
            workarounds=client_workarounds(cfg.pop3_client_workarounds),
            expire=cfg.pop3_expire_days or None,
            login_delay=self._advertised_delay(cfg.pop3_login_delay, set_globally=False),
            policy_per_user=True,  # any user may have their own (userdb fields)
        )
        self.conn.external_identity = info.external_identity
        origin = info.origin
        if origin is not None:
            events.proxy_connected(
                self.log, origin.describe(), health_check=origin.header.command == "LOCAL"
            )

    def _advertised_delay(self, delay: int, *, set_globally: bool) -> int | None:
        """Return the LOGIN-DELAY for CAPA: ``None`` when none is set, or none is enforced.

        Logins are timed where the cluster keeps its state; without one, none is enforced.
        After login (``set_globally``: the server has one) a user's 0 is shown as 0.
        """
        if self.ctx.cluster is None or not (delay or set_globally):
            return None
        return delay

    def plaintext_allowed(self) -> bool:
        """Whether USER/PASS and plaintext SASL are allowed on this connection now."""
        cfg = self.ctx.config
        return plaintext_auth_allowed(
            cfg.disable_plaintext_auth,
            self.rip,
            cfg.login_trusted_networks,
            secure=self.secure,
        )

    def _count_as(self, state: str | None) -> None:
        """Move the session to ``state`` in the metrics (``None``: ended)."""
        metrics = self.ctx.metrics
        if metrics is not None and state != self._counted_as:
            metrics.session_state(self._counted_as, state)
            self._counted_as = state

    def _count_login(self, mechanism: str, result: str) -> None:
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.login(mechanism, result)

    def _count_storage_error(self, operation: str) -> None:
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.storage_error(operation)

    @property
    def needs_release(self) -> bool:
        """Whether ending the session has asynchronous work: a lock or a registry entry."""
        return not self.released or self.ctx.cluster is not None

    # ----------------------------------------------------------------- TLS

    def tls_started(self, peercert: object, version: str | None = None) -> None:
        """Tell the core TLS is up (RFC 2595 §4).

        Args:
            peercert: the client's certificate.
            version: the TLS version (``TLSv1.3``), for the log lines.
        """
        self.secure = True
        self.log.tls_started(version)
        self.conn.send(TlsStarted(user_enabled=self.plaintext_allowed()))
        self.conn.external_identity = client_identity(peercert)

    def tls_failed(self, exc: BaseException) -> None:
        """End the session after a failed STLS handshake (its last line says why)."""
        self.tls_failure = events.tls_failure_reason(exc)
        self.conn.close("tls-failed")

    def stls_discarded(self, discarded: int) -> None:
        """Log the plaintext bytes pipelined behind STLS that were thrown away."""
        if discarded:
            events.stls_discarded(self.log, discarded)

    # ----------------------------------------------------------------- login

    async def login(
        self, event: AuthenticateUser | FetchSecret | VerifyToken | OpenMaildrop | LoginFailed
    ) -> None:
        """Answer a login step: check, fetch, or open the maildrop (USER/PASS, APOP, AUTH)."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        if event.username is not None:
            # auth_username_format first: the throttle, the registry, the logs and the user
            # database all see the one name (``Alice`` is ``alice`` with Dovecot's %Lu).
            name_format = _username_format(self.ctx.config.auth_username_format)
            username = name_format(event.username)
            if username != event.username:  # (the default %Lu: most names are lowercase)
                event = dataclasses.replace(event, username=username)
        throttle = self.ctx.throttle
        # None: not asked yet; the registration asks (see _throttle), or a failure does.
        failures: int | None = 0
        if throttle is not None:
            cluster = self.ctx.cluster
            if cluster is not None and cluster.checks_failures and not throttle.suspect(self.rip):
                failures = None
            else:
                failures = await self._ask_throttle(throttle, event.username, event.mechanism)
                if failures is None:
                    return
        try:
            user = await self._verify(event)
        except AuthError as exc:
            self._refused(event.username, event.mechanism)
            events.auth_backend_failed(self.log, event.username, exc)
            self._count_login(event.mechanism, "error")
            self.conn.send(LoginRejected("Temporary authentication failure.", exc.resp_code))
            return
        if user is _ANSWERED:
            return
        if not isinstance(user, User):
            # Not asked before the password: refused now as it would have been then.
            if (
                throttle is not None
                and failures is None
                and await self._ask_throttle(throttle, event.username, event.mechanism) is None
            ):
                return
            await self._failed(event.username, event.mechanism, arrived)
            return
        await self._open(user, event.mechanism, failures)

    async def _ask_throttle(
        self, throttle: LoginThrottle, username: str | None, mechanism: str
    ) -> int | None:
        """Ask the throttle about the client's address: its failures, or ``None`` if they
        refuse the login (then answered)."""
        failures = await throttle.failures(self.rip)
        if throttle.refuses(failures):
            self._throttled(username, mechanism)
            return None
        return failures

    def _throttled(self, username: str | None, mechanism: str) -> None:
        """Refuse a login from an address with too many failures (the throttle)."""
        self._refused(username, mechanism)
        events.login_throttled(self.log, username, mechanism)
        self._count_login(mechanism, "throttled")
        self.conn.send(LoginRejected(THROTTLED, "LOGIN-DELAY"))

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
        self.log.debug("SASL %s failed: %s", event.mechanism, event.reason, event="sasl_failed")
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
        self._count_login(method, "failed")
        events.auth_failed(self.log, username, method)
        throttle = self.ctx.throttle
        delay = (
            await throttle.failed(self.rip, username)
            if throttle is not None
            else cfg.auth_failure_delay
        )
        wait = delay - (asyncio.get_running_loop().time() - arrived)
        if wait > 0:
            await _sleep(wait)
        self.conn.send(LoginRejected())
        if self.auth_failures >= cfg.max_auth_failures:
            # Dovecot too closes after a few failures: a brute-forcer must reconnect.
            self.conn.close("too-many-auth-failures")

    async def _admit(self, user: User, method: str, failures: int | None) -> int | None:
        """Register the session in the registry within the per-user limits.

        ``failures``: the address's failures (``None``: not asked yet, the registration
        asks, or failing that this does).

        Returns:
            the address's failures if admitted (and not throttled), ``None`` if refused
            (answered).
        """
        cluster = self.ctx.cluster
        throttle = self.ctx.throttle
        if cluster is None:
            return failures or 0
        entry = SessionEntry(
            self.id, user.name, cluster.node, self.rip, time.time(), self.secure, method
        )
        check = None
        if failures is None and throttle is not None:
            check = (address_key(self.rip), throttle.per_ip)
        admission, refusal = await cluster.admit(entry, self._kick, self._octets_sent, check)
        if throttle is not None and failures is None:
            if admission.failures is not None:
                failures = admission.failures
                throttle.found(self.rip, failures)
            else:  # registered where the failures could not be checked: ask now
                failures = await throttle.failures(self.rip)
                if refusal is None and throttle.refuses(failures):
                    await self.unregister()
                    refusal = THROTTLED
        if refusal == THROTTLED:
            self._throttled(user.name, method)
            return None
        if refusal is None:
            return failures or 0
        self._refused(user.name, method)
        events.login_over_limit(
            self.log,
            refusal,
            user.name,
            method,
            sessions=admission.user_sessions,
            from_address=admission.userip_sessions,
        )
        self._count_login(method, "limit")
        self.conn.send(LoginRejected(refusal + ".", "IN-USE"))
        return None

    async def _open(self, user: User, method: str, failures: int | None) -> None:
        delay = login_delay(user, self.ctx.config.pop3_login_delay, self.log)
        throttle = self.ctx.throttle
        if failures is None and throttle is not None and (delay or pop3_disabled(user)):
            # These answers come before the registration (which would check the address):
            # the throttle's comes first, as when it was asked before the password, and a
            # login time is recorded only for a login it lets in.
            failures = await self._ask_throttle(throttle, user.name, method)
            if failures is None:
                return
        if pop3_disabled(user):
            # RFC 3206 §4: [SYS/PERM] — the credentials are right (checked first, so only
            # their holder learns this), and no retry or other password will help; [AUTH]
            # would make clients ask for the password again.
            self._refused(user.name, method)
            events.pop3_disabled(self.log, user.name, method)
            self._count_login(method, "disabled")
            self.conn.send(LoginRejected("POP3 access is disabled for this account.", "SYS/PERM"))
            return
        if delay and not await self._login_delay_passed(user, method, delay):
            return
        admitted = await self._admit(user, method, failures)
        if admitted is None:
            return
        failures = admitted
        try:
            self.maildrop = await self._open_maildrop(user, method)
        finally:
            if self.maildrop is None:  # not logged in after all: not counted either
                await self.unregister()
        if self.maildrop is None:
            return
        self.released = False
        if self.ctx.throttle is not None:
            await self.ctx.throttle.succeeded(self.rip, failures)
        events.login(self.log, user.name, method)
        self.log.user = user.name
        self._count_login(method, "ok")
        self._count_as("transaction")
        self.maildrop.on_lock_lost(self._lock_lost)
        self.download_limit = download_limit(
            user, self.ctx.config.pop3_daily_download_bytes, self.log
        )
        cfg = self.ctx.config
        self.expire = expire_days(user, cfg.pop3_expire_days, self.log)
        if self.expire not in ("", "0", "NEVER") and not isinstance(self.maildrop, RetrievalTimes):
            self.log.warning(
                "EXPIRE %s not enforced: this store keeps no retrieval times",
                self.expire,
                event="expire_unsupported",
            )
            self.expire = ""
        messages: Sequence[SnapshotEntry] = self.maildrop.messages
        if "oe-ns-eoh" in cfg.pop3_client_workarounds:
            messages = await _header_end_sizes(self.maildrop)
        self.conn.send(
            LoginAccepted(
                messages,
                expire=self.expire or None,
                login_delay=self._advertised_delay(delay, set_globally=bool(cfg.pop3_login_delay)),
            )
        )

    async def _login_delay_passed(self, user: User, method: str, delay: int) -> bool:
        """Record this login unless the user's last is under ``delay`` s ago; answer if so.

        RFC 2449 §8.1.1: ``-ERR [LOGIN-DELAY]``.  Asked after the password was checked, so
        only its holder learns of it.  When the shared state does not answer, the login goes
        on (lenient, as the other policies are when their state is down).
        """
        cluster = self.ctx.cluster
        if cluster is None:
            return True
        try:
            admitted = await cluster.logins.admit(user.name, delay)
        except StateUnavailable as exc:
            self.log.warning(
                "Login times unavailable, LOGIN-DELAY not checked: %s",
                exc,
                event="login_delay_failed",
            )
            return True
        if admitted:
            return True
        self._refused(user.name, method)
        self.log.info(
            "Login refused, under LOGIN-DELAY of %d s since the last: user=<%s>, method=%s",
            delay,
            user.name,
            method,
            event="login_delay",
        )
        self._count_login(method, "delay")
        self.conn.send(
            LoginRejected(f"Wait {delay} seconds between logins, try later.", "LOGIN-DELAY")
        )
        return False

    def _refused(self, user: str | None, method: str) -> None:
        """Count a login refused for what it was (not a failure, not "no auth attempts")."""
        self.refused_logins += 1
        self.last_user = user
        self.last_method = method

    async def _open_maildrop(self, user: User, method: str) -> Maildrop | None:
        """Open and lock the user's maildrop; ``None`` (answered) if it cannot be."""
        cfg = self.ctx.config
        store = self.ctx.store
        folders = user_folders(user, cfg.pop3_folders, self.log)
        try:
            if folders == (INBOX,) or not isinstance(store, MaildropFolders):
                return await store.open(user, lock=cfg.pop3_lock_session)
            maildrop = await store.open_folders(user, folders, lock=cfg.pop3_lock_session)
            try:
                return await mark_folders(maildrop, cfg.pop3_folder_mark)
            except BaseException:
                await maildrop.close()
                raise
        except MaildropLocked:
            self._refused(user.name, method)
            events.maildrop_locked(self.log, user.name, method)
            self._count_login(method, "locked")
            self.conn.send(
                LoginRejected("Mailbox is locked by another POP3 session, try later.", "IN-USE")
            )
            return None
        except StorageError as exc:
            self._refused(user.name, method)
            events.maildrop_open_failed(self.log, user.name, exc)
            self._count_login(method, "error")
            self._count_storage_error("open")
            self.conn.send(LoginRejected("Cannot open the mailbox, try later.", exc.resp_code))
            return None

    # ----------------------------------------------------------------- messages

    def retrieve_now(self, event: RetrieveMessage) -> bool:
        """Answer a RETR/TOP at once if the store has the message at hand; say if it did.

        A small message is read without a worker thread (:meth:`Maildrop.read_now`), and
        the reply line, the message and its terminator leave in one write.
        """
        assert self.maildrop is not None
        if self.download_limit:
            return False  # the counter is asked first, which may wait: see retrieve
        info = self.maildrop.messages[event.number - 1]
        try:
            data = self.maildrop.read_now(info.key)
        except StorageError as exc:
            self._unavailable(event, info.key, exc)
            return True
        if data is None:
            return False
        self.conn.send(MessageData(data, last=True))
        self._sent(event, info.key)
        return True

    async def retrieve(
        self,
        event: RetrieveMessage,
        flush: Callable[[], Awaitable[None]],
        sender: FileSender | None = None,
    ) -> None:
        """Stream a message too large for :meth:`retrieve_now` (or any, under a download cap).

        ``sender``: the driver, on a connection where a file may go out with ``sendfile``.
        """
        assert self.maildrop is not None
        info = self.maildrop.messages[event.number - 1]
        conn = self.conn
        if self.download_limit:
            if not await self._charge(event, info.size):
                return
            if event.body_lines is not None:
                # TOP is charged the whole message first, then refunded what it did not send.
                before = conn.stats.top_bytes
                try:
                    await self._stream(event, info, flush)
                finally:
                    unsent = info.size - (conn.stats.top_bytes - before)
                    if unsent > 0:
                        await self._charge(event, -unsent)
                return
        await self._stream(event, info, flush, sender)

    async def _charge(self, event: RetrieveMessage, octets: int) -> bool:
        """Charge the day's download count; answer the core and say so if over the cap.

        When the shared state does not answer, the download goes on uncounted (lenient, as
        the other policies are when their state is down).
        """
        cluster = self.ctx.cluster
        user = self.log.user
        if cluster is None or user is None:
            return True
        try:
            allowed = await cluster.downloads.charge(user, octets, self.download_limit)
        except StateUnavailable as exc:
            self.log.warning(
                "Daily download count unavailable, not counted: %s",
                exc,
                event="download_count_failed",
            )
            return True
        if not allowed:
            self.log.info(
                "Download refused, daily limit of %d octets reached: user=<%s>, message %d",
                self.download_limit,
                user,
                event.number,
                event="download_limit",
            )
            self.conn.send(MessageUnavailable("daily download limit reached", "SYS/TEMP"))
        return allowed

    async def _stream(
        self,
        event: RetrieveMessage,
        info: MessageInfo,
        flush: Callable[[], Awaitable[None]],
        sender: FileSender | None = None,
    ) -> None:
        maildrop = self.maildrop
        assert maildrop is not None
        if (
            sender is not None
            and event.body_lines is None
            and isinstance(maildrop, MessageFiles)
            and not self.ctx.config.pop3_client_workarounds
            # Large files only (a small one is read whole in the event loop, one write), and
            # never on network storage (mail_inline_read_max = 0).
            and info.size > self.ctx.config.mail_inline_read_max > 0
        ):
            await self._stream_file(event, info, maildrop, flush, sender)
            return
        await self._send_chunks(event, info.key, maildrop.read_message(info.key), flush)

    async def _send_chunks(
        self,
        event: RetrieveMessage,
        key: str,
        chunks: AsyncIterator[bytes],
        flush: Callable[[], Awaitable[None]],
    ) -> bool:
        """Send a message's chunks through the core, then its end; say whether all went.

        A chunk that cannot be read ends it with the core told (:meth:`_unavailable`).
        """
        conn = self.conn
        try:
            async for chunk in chunks:
                conn.send(MessageData(chunk))
                if not conn.wants_message_data:
                    break
                if conn.output_size >= STREAM_FLUSH:
                    await flush()
        except StorageError as exc:
            self._unavailable(event, key, exc)
            return False
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        conn.send(EndOfMessage())
        self._sent(event, key)
        return True

    async def _stream_file(
        self,
        event: RetrieveMessage,
        info: MessageInfo,
        maildrop: MessageFiles,
        flush: Callable[[], Awaitable[None]],
        sender: FileSender,
    ) -> None:
        """RETR of a Maildir file: with ``sendfile`` if it is known to be wire-ready, else
        through the encoder, learning whether it is (see :mod:`pobox.server._sendfile`)."""
        conn = self.conn
        try:
            opened = await maildrop.open_file(info.key)
        except StorageError as exc:
            self._unavailable(event, info.key, exc)
            return
        try:
            known = self.ctx.wire_ready
            if opened.size == info.size and opened.identity in known and sender.sendfile_ready():
                conn.send(WireData(opened.size, ends_line=True))
                sent = await sender.send_file(opened.fd, 0, opened.size)
                if sent == opened.size and self._unchanged(maildrop, opened):
                    conn.send(EndOfMessage())
                    self._sent(event, info.key)
                    return
                # Short, or written to while it went out: no terminator, the session ends.
                known.discard(opened.identity)
                problem = StorageTemporaryError(f"the file changed while sent ({sent} octets)")
                self._unavailable(event, info.key, problem)
                return
            before = conn.stats.retr_bytes
            chunks = maildrop.read_file(opened, info.key)
            if not await self._send_chunks(event, info.key, chunks, flush):
                return
            # Sent as stored plus ".CRLF": nothing stuffed, no line end added or changed.
            if (
                conn.stats.retr_bytes - before == opened.size + 3
                and opened.size == info.size
                and self._unchanged(maildrop, opened)
            ):
                known.add(opened.identity)
        finally:
            os.close(opened.fd)

    @staticmethod
    def _unchanged(maildrop: MessageFiles, opened: OpenedMessage) -> bool:
        """Say whether the file is as it was at open (no write to it since)."""
        try:
            return maildrop.identity(opened) == opened.identity
        except StorageError:
            return False

    def _sent(self, event: RetrieveMessage, key: str) -> None:
        """Note a message sent whole by RETR: to mark it seen, and for EXPIRE, at the end."""
        if event.body_lines is None:
            if self.expire.isdigit():  # EXPIRE 0 or n: NEVER and none need no record
                self.fetched.setdefault(key, self.ctx.clock())
            if not self.ctx.config.pop3_no_flag_updates:
                self.retrieved.add(key)

    def _unavailable(self, event: RetrieveMessage, key: str, exc: StorageError) -> None:
        """Log why a message cannot be read and tell the core."""
        if isinstance(exc, MessageGone):
            self.log.warning(
                "Message %d (%s) vanished from the maildrop",
                event.number,
                key,
                event="message_gone",
            )
            self.conn.send(
                MessageUnavailable("Message was removed by another process.", "SYS/PERM")
            )
        else:
            self.log.error(
                "Cannot read message %d (%s): %s", event.number, key, exc, event="read_failed"
            )
            self._count_storage_error("read")
            self.conn.send(MessageUnavailable("Cannot read the message, try later.", exc.resp_code))

    async def commit(self, event: CommitDeletions) -> None:
        """Answer QUIT in TRANSACTION: delete what was marked (RFC 1939 §6), release the lock."""
        assert self.maildrop is not None
        self._count_as("update")
        failed = 0
        keys: list[str] = []
        marked: set[str] = set()
        if self.ended_by is not None:
            if event.numbers:
                self.log.error(
                    "%s, %d deletions not made",
                    self.ended_by,
                    len(event.numbers),
                    event="delete_failed",
                )
                failed = self.delete_failures = len(event.numbers)
        else:
            keys = [self.maildrop.messages[n - 1].key for n in event.numbers]
            marked = set(keys)
            keys += await self._expired(self.maildrop, marked)
        if keys:
            try:
                result = await self.maildrop.delete(keys)
                failures = set(result.failed)
            except StorageError as exc:
                self.log.error(
                    "Deleting %d messages failed: %s", len(keys), exc, event="delete_failed"
                )
                failures = set(keys)
            # The reply (and the session's last line) count what the client marked with
            # DELE; what EXPIRE adds is logged on its own.
            failed = self.delete_failures = len(failures & marked)
            self.retrieved.difference_update(keys)
            if failures:
                self._count_storage_error("delete")
                self.log.error(
                    "%d of %d messages could not be deleted",
                    len(failures),
                    len(keys),
                    event="delete_failed",
                )
            expired = len(keys) - len(marked) - len(failures - marked)
            if expired:
                self.log.info(
                    "EXPIRE %s: %d retrieved messages deleted without DELE",
                    self.expire,
                    expired,
                    event="expired",
                )
        # UPDATE ends the session: the lock goes before the client hears +OK, so a client
        # that logs in again at once finds the maildrop free (through the storage helper,
        # releasing it is a round trip).
        await self.release()
        self.conn.send(DeletionsCommitted(failed=failed))

    async def _expired(self, maildrop: Maildrop, marked: set[str]) -> list[str]:
        """Return what EXPIRE deletes at this UPDATE besides ``marked`` (RFC 2449 §6.7).

        ``EXPIRE 0``: the messages this session sent whole by RETR (not TOP), which the
        client need not DELE.  ``EXPIRE n``: the snapshot's messages first retrieved ``n``
        days ago or more (this session's retrievals recorded first).  A store that cannot
        say keeps everything (logged).
        """
        if self.expire == "0":
            fetched = self.fetched
            return [i.key for i in maildrop.messages if i.key in fetched and i.key not in marked]
        if not self.expire.isdigit() or not isinstance(maildrop, RetrievalTimes):
            return []
        await self._note_fetched(maildrop)
        cutoff = self.ctx.clock() - int(self.expire) * DAY
        try:
            expired = await maildrop.retrieved_before(cutoff)
        except StorageError as exc:
            self.log.error("EXPIRE: reading retrieval times failed: %s", exc, event="expire_failed")
            return []
        return [key for key in expired if key not in marked]

    async def _note_fetched(self, maildrop: Maildrop) -> None:
        """Record the first retrievals of this session in the store, for ``EXPIRE n``."""
        times, self.fetched = self.fetched, {}
        if (
            not times
            or self.ended_by is not None
            or not self.expire.isdigit()
            or self.expire == "0"
            or not isinstance(maildrop, RetrievalTimes)
        ):
            return
        try:
            await maildrop.note_retrieved(times)
        except StorageError as exc:
            self.log.error(
                "EXPIRE: recording %d retrievals failed: %s",
                len(times),
                exc,
                event="expire_failed",
            )

    # ----------------------------------------------------------------- the end

    async def release(self) -> None:
        """Close the maildrop (releasing its lock); safe to call more than once.

        First the messages sent by RETR and not deleted are marked seen, under the session
        lock, whether the session ends with QUIT or not (as Dovecot keeps a dropped
        session's flag changes): the client has them.
        """
        if self.maildrop is not None and not self.released:
            await self._note_fetched(self.maildrop)
            await self._mark_seen(self.maildrop)
            self.released = True
            try:
                await self.maildrop.close()
            except Exception:
                self.log.exception("Closing the maildrop failed")

    async def _mark_seen(self, maildrop: Maildrop) -> None:
        """Mark the messages sent by RETR seen, if the store keeps flags; log failures."""
        keys, self.retrieved = sorted(self.retrieved), set()
        if not keys or self.ended_by is not None or not isinstance(maildrop, SeenFlags):
            return
        try:
            failed = len(await maildrop.mark_seen(keys))
        except StorageError as exc:
            self.log.error(
                "Marking %d messages seen failed: %s", len(keys), exc, event="flags_failed"
            )
            return
        if failed:
            self.log.error(
                "%d of %d messages could not be marked seen",
                failed,
                len(keys),
                event="flags_failed",
            )

    async def unregister(self) -> None:
        """Take the session out of the registry; safe to call more than once."""
        if self.ctx.cluster is not None:
            try:
                await self.ctx.cluster.release(self.id)
            except Exception:
                self.log.exception("Unregistering the session failed")

    def internal_error(self) -> None:
        """Log an unexpected exception (the caller's) and end the session."""
        self.log.exception("Internal error, closing the session", event="internal_error")
        self.conn.close("internal-error")

    def proxy_header_refused(self) -> None:
        """Log a PROXY header from a client that may not send one, and end the session.

        A trusted HAProxy's header has been read before the session began; one here comes
        from a client (or from behind HAProxy) and is never believed.
        """
        events.proxy_header_refused(
            logger, self.log.prefix.rstrip(":"), self.rip, self.lip, self.id
        )
        self.conn.close("proxy-refused")

    def _octets_sent(self) -> int:
        """Return the octets of mail sent so far (RETR and TOP), for ``pobox who``."""
        stats = self.conn.stats
        return stats.retr_bytes + stats.top_bytes

    def kicked(self) -> None:
        """Log that the registry ended the session."""
        events.kicked(self.log)

    def lock_gone(self) -> None:
        """Log that the store lost the maildrop lock."""
        events.lock_lost(self.log)

    def disconnected(self, reason: str) -> None:
        """Write the session's last log line (its formats are read by fail2ban filters)."""
        if self.clock is not None:
            self.clock.end()
        self._count_as(None)
        s = self.conn.stats
        if self.log.user is not None:
            quit_ = self.conn.close_reason == "quit"
            events.disconnected(
                self.log,
                reason,
                top=(s.top_count, s.top_bytes),
                retr=(s.retr_count, s.retr_bytes),
                deleted=s.deleted_count - self.delete_failures if quit_ else 0,
                messages=s.messages_at_login,
                size=s.size_at_login,
            )
            return
        events.disconnected_before_login(
            self.log,
            secs=int(time.monotonic() - self.started),
            reason=self.tls_failure or reason,
            failures=self.auth_failures,
            refusals=self.refused_logins,
            user=self.last_user,
            method=self.last_method,
        )
