"""The ``pobox`` command: the composition root, the only place that picks backends.

Subcommands: ``serve`` (run the server), ``demo`` (a ready-made local folder with a user
and mail, then ``serve`` on it), ``user add`` / ``passwd`` / ``list`` / ``del`` (users of the
passwd-file or of the PostgreSQL userdb, whichever the configuration names), ``deliver`` (an
MDA like dovecot-lda: one message on stdin into a maildrop, sysexits codes), ``import`` /
``export`` (a Maildir into and out of the configured store, UIDLs kept), ``db upgrade`` /
``db status`` / ``db gc`` (the PostgreSQL schema and its upkeep), ``config check`` /
``config dump`` (the start-up checks without starting; the settings that differ from the
defaults, like ``doveconf -n``).
``serve`` also starts the LMTP/SMTP delivery listeners when ``lmtp_listen``/``smtp_listen``
are set, and the HTTP health check on ``health_listen``; ``SIGTERM`` drains it (:func:`drain`).
With ``workers`` > 1 it is a master (:func:`run_master`) that binds the listeners and runs that
many ``serve --worker`` processes (:mod:`pobox.server._workers`), each a :func:`run_server`.

May import: anything in pobox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import errno
import fnmatch
import functools
import gc
import getpass
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pobox import __version__
from pobox.auth.base import Authenticator, AuthTemporaryError, HashWorkers
from pobox.auth.oauth import JwtVerifier
from pobox.auth.passwdfile import (
    PasswdFileAuthenticator,
    add_user,
    delete_user,
    list_users,
    set_password,
)
from pobox.auth.schemes import SUPPORTED_SCHEMES, hash_password
from pobox.auth.secretfile import load_secret
from pobox.client.cli import add_fetch_parser
from pobox.config import (
    KEYS,
    Config,
    dump_config,
    keys_help,
    load_config,
    parse_duration,
    parse_folders,
    parse_listen,
    shared_state_backend,
)
from pobox.conformance import add_conformance_parser
from pobox.delivery import DeliveryServer, build_agent
from pobox.delivery.mda import deliver_stdin
from pobox.errors import ConfigError, ListenError, PoboxError
from pobox.log import reopen_logs, setup_logging
from pobox.metrics import (
    MULTIPROC_ENV,
    Metrics,
    make_directory,
    multiprocess_registry,
    remove_directory,
    worker_gone,
)
from pobox.names import DEFAULT_FORMAT, parse_format
from pobox.records import User, parse_size
from pobox.server import Pop3Server, SessionContext
from pobox.server._cluster import (
    LEASE_BEATS,
    Cluster,
    FallbackFailureCounters,
    FallbackRegistry,
    StoreHealth,
)
from pobox.server._control import (
    ControlServer,
    SessionControl,
    bind_control_socket,
    control_socket_path,
    kick_wait,
)
from pobox.server._health import HealthServer, probes_of
from pobox.server._limits import raise_open_file_limit
from pobox.server._metrics import MetricsServer
from pobox.server._privileges import MailAccess, PrivilegePlan, plan_privileges, switch_to
from pobox.server._systemd import Notifier, adopt_listen_fds, listen_fds
from pobox.server._throttle import LoginThrottle
from pobox.server._workers import (
    Supervisor,
    WorkerLogNames,
    WorkerSpec,
    bind_listeners,
    worker_count,
)
from pobox.state import (
    FailureCounters,
    MemoryFailureCounters,
    MemorySessionRegistry,
    SessionRegistry,
    StateUnavailable,
)
from pobox.state.remote import (
    RemoteDownloadCounters,
    RemoteFailureCounters,
    RemoteLoginTimes,
    RemoteSessionRegistry,
    RemoteState,
    StateService,
)
from pobox.storage.base import (
    INBOX,
    DeletedMailRetention,
    DeletedMessage,
    FolderNameError,
    IncomingMessage,
    MaildropImporter,
    MaildropLocked,
    MaildropStore,
    StorageError,
    StorageTemporaryError,
    check_folder,
)
from pobox.storage.maildir import MaildirStore, deliver_message
from pobox.storage.mbox import MboxStore
from pobox.storage.privsep import (
    Owner,
    OwnerPolicy,
    SameOwnerStore,
    StorageHelper,
    SwitchingStore,
    switch_process,
)
from pobox.storage.routed import FormatRouter
from pobox.storage.spool import Spool
from pobox.tls import ServerTls
from pobox.transfer import (
    ForkedMaildirSource,
    MaildirSource,
    TransferError,
    TransferReport,
    export_maildir,
    import_messages,
    known_uidls,
    maildir_owner,
    purge_maildrop,
)
from pobox.who import add_control_parsers

if TYPE_CHECKING:
    from pobox.auth.postgres import PostgresAuthenticator
    from pobox.storage.postgres import PostgresStore

__all__ = ["main"]

logger = logging.getLogger("pobox.cli")

#: sysexits.h codes, so init systems and cron can tell failures apart.
EX_USAGE, EX_DATAERR, EX_CONFIG, EX_UNAVAILABLE, EX_OSERR = 64, 65, 78, 69, 71
#: sysexits.h EX_TEMPFAIL: the MTA keeps the message and tries again.
EX_TEMPFAIL = 75

#: The default scram_secret_file, made next to the passwd-file.
SCRAM_SECRET_NAME = "pobox-scram.secret"


def scram_secret(config: Config) -> bytes:
    """Return the key SCRAM salts are derived from, if SCRAM is offered (made if missing)."""
    if not any(m.startswith("SCRAM-") for m in config.auth_mechanisms.upper().split()):
        return b""
    path = config.scram_secret_file or str(Path(config.passwd_file).parent / SCRAM_SECRET_NAME)
    return load_secret(path)


def build_authenticator(
    config: Config,
    workers: HashWorkers | None = None,
    *,
    opener: Callable[[], BinaryIO] | None = None,
    listen: bool = True,
) -> Authenticator:
    """Build the user database the configuration names (hash checks in ``workers``).

    Args:
        opener: opens the passwd-file for a process that may not open it by path.
        listen: a PostgreSQL userdb follows changes of its users table (a server does; a
            one-shot command need not).
    """
    if config.userdb == "postgresql":
        return postgres_userdb(config, workers, listen=listen)
    return PasswdFileAuthenticator(
        config.passwd_file,
        default_scheme=config.default_pass_scheme,
        workers=workers,
        opener=opener,
    )


def postgres_userdb(
    config: Config, workers: HashWorkers | None = None, *, listen: bool = True
) -> PostgresAuthenticator:
    """Build the PostgreSQL user database (psycopg is imported only when it is used)."""
    from pobox.auth.postgres import CustomQueries, PostgresAuthenticator  # noqa: PLC0415

    queries = (
        CustomQueries(
            config.postgresql_password_query,
            config.postgresql_user_query,
            config.postgresql_iterate_query,
        )
        if config.postgresql_password_query
        else None
    )
    return PostgresAuthenticator(
        config.postgresql_dsn,
        schema=config.postgresql_schema,
        queries=queries,
        default_scheme=config.default_pass_scheme,
        cache_ttl=config.postgresql_user_cache_ttl,
        pool_min=1,
        pool_max=config.postgresql_pool_max,
        timeout=config.postgresql_timeout,
        workers=workers,
        listen=listen,
    )


def build_store(config: Config, *, plan: PrivilegePlan | None = None) -> MaildropStore:
    """Build the mail store the configuration names, for mail accessed without a helper.

    Mail in PostgreSQL is no file of anyone's: the PostgreSQL store, whoever runs it.

    The store serves only users whose mail the process owns (:class:`SameOwnerStore`): the
    uid/gid of ``plan`` (mode 1 or 2 of :mod:`pobox.server._privileges`), by default the
    process's own, as in a server run in-process (a test); in a process that is root that is
    uid 0, refused unless ``first_valid_uid`` and ``first_valid_gid`` are 0.
    """
    if config.mail_location == "postgresql":
        return _postgres_store(config)
    files = _file_store(config)
    if plan is None:
        me = Owner(os.geteuid(), os.getegid())
        return SameOwnerStore(files, OwnerPolicy.from_config(config, fallback=me), me)
    assert plan.identity is not None
    return SameOwnerStore(files, plan.policy, plan.identity)


def _file_store(config: Config) -> FormatRouter:
    """Build the Maildir and mbox stores, the one ``mail_location`` names as the default.

    A user's ``userdb_mail`` may name the other format (:mod:`pobox.storage.routed`).
    """
    mbox_default = config.mail_location.startswith("mbox:")
    maildir = MaildirStore(
        "maildir:~/Maildir" if mbox_default else config.mail_location,
        inline_read_max=config.mail_inline_read_max,
        reuse_xuidl=config.pop3_reuse_xuidl,
        retention=parse_duration(config.pop3_delete_retention),
        header_ends="oe-ns-eoh" in config.pop3_client_workarounds,
    )
    mbox = MboxStore(
        config.mail_location if mbox_default else "mbox:/var/mail/%u",
        reuse_xuidl=config.pop3_reuse_xuidl,
    )
    return FormatRouter(mbox if mbox_default else maildir, maildir=maildir, mbox=mbox)


def _postgres_store(config: Config) -> PostgresStore:
    """Build the PostgreSQL store (psycopg is imported only when it is used)."""
    from pobox.storage.postgres import PostgresStore  # noqa: PLC0415

    return PostgresStore(
        config.postgresql_dsn,
        schema=config.postgresql_schema,
        pool_min=config.postgresql_pool_min,
        pool_max=config.postgresql_pool_max,
        lock_connections=config.postgresql_lock_connections,
        timeout=config.postgresql_timeout,
        lock_check_interval=config.postgresql_lock_check_interval,
        retention=parse_duration(config.pop3_delete_retention),
    )


async def check_store(store: MaildropStore | Authenticator) -> None:
    """Refuse to serve on a database schema this pobox does not know (store or userdb).

    Raises:
        PoboxError: the schema is missing, older or newer (saying what to run), or the
            database cannot be reached.
    """
    check = getattr(store, "check_schema", None)
    if check is not None:
        await check()


async def close_authenticator(authenticator: Authenticator) -> None:
    """Release what a user database holds (a PostgreSQL pool); nothing for a passwd-file."""
    close = getattr(authenticator, "aclose", None)
    if close is not None:
        await close()


def node_name(config: Config) -> str:
    """This node's name in the session registry: ``node_name``, else the host name."""
    import socket  # noqa: PLC0415 - only here

    return config.node_name or socket.gethostname()


async def _report_octets(remote: RemoteState, sent: dict[str, int]) -> None:
    """Tell the master what this worker's sessions have sent (with each heartbeat)."""
    await remote.notify("octets", sent=sent)


def build_shared_state(
    config: Config, remote: RemoteState | None = None
) -> tuple[FailureCounters, Cluster]:
    """Build the failed-login counters and the node's place in the session registry.

    In memory for one node (the master's, reached over ``remote``, in a worker); in
    PostgreSQL (``shared_state``) for a cluster, each call falling back to this process's
    memory while the database (or the master) is slow or down.
    """
    node = node_name(config)
    local_counters = MemoryFailureCounters(config.auth_failure_window)
    local_registry = MemorySessionRegistry(node)
    cluster = functools.partial(
        Cluster,
        heartbeat=config.shared_state_heartbeat,
        max_user=config.mail_max_user_connections,
        max_userip=config.mail_max_userip_connections,
        # A worker tells its master what its sessions sent, for the master's `pobox who`.
        report=None if remote is None else functools.partial(_report_octets, remote),
    )
    if shared_state_backend(config) == "memory":
        if remote is None:
            return local_counters, cluster(local_registry)
        master = StoreHealth()
        return FallbackFailureCounters(
            RemoteFailureCounters(remote), local_counters, master
        ), cluster(
            FallbackRegistry(RemoteSessionRegistry(remote, node), local_registry, master),
            downloads=RemoteDownloadCounters(remote),
            logins=RemoteLoginTimes(remote),
        )
    from pobox.state.postgres import (  # noqa: PLC0415 - psycopg only when used
        PostgresDownloadCounters,
        PostgresFailureCounters,
        PostgresLoginTimes,
        PostgresSessionRegistry,
        PostgresState,
    )

    state = PostgresState(
        config.postgresql_dsn,
        schema=config.postgresql_schema,
        timeout=config.shared_state_timeout,
        pool_max=min(config.postgresql_pool_max, 8),
    )
    health = StoreHealth()
    shared_counters = PostgresFailureCounters(state, config.auth_failure_window)
    shared_registry = PostgresSessionRegistry(
        state,
        node,
        lease=LEASE_BEATS * config.shared_state_heartbeat,
        failure_window=config.auth_failure_window,
    )

    async def upkeep() -> None:
        expired, surplus = await shared_counters.upkeep()
        dead, gone = await shared_registry.purge()
        if surplus or dead or gone:
            logger.info(
                "master: shared state upkeep: %d expired and %d surplus failure counters, "
                "%d sessions of dead nodes and %d nodes deleted",
                expired,
                surplus,
                dead,
                gone,
            )

    return FallbackFailureCounters(shared_counters, local_counters, health), cluster(
        FallbackRegistry(shared_registry, local_registry, health),
        upkeep=upkeep,
        on_close=state.aclose,
        store="postgresql",
        check=state.check_schema,
        downloads=PostgresDownloadCounters(state),
        logins=PostgresLoginTimes(state),
    )


def build_control(
    config: Config,
    plan: PrivilegePlan,
    registry: SessionRegistry,
    octets: Callable[[], dict[str, int]],
    end_here: Callable[[set[str]], int] | None = None,
) -> ControlServer | None:
    """Bind the control socket of ``pobox who`` / ``kick`` (``control_socket``), if any.

    Made while still root, owned by the service user (``user``), who may then ask too.  With
    ``control_socket = auto`` a socket that cannot be made is logged and done without.

    Raises:
        ConfigError: the socket cannot be made, or another server answers on it.
    """
    path = control_socket_path(config)
    if path is None:
        logger.info(
            "master: no control socket (control_socket is auto, not root and XDG_RUNTIME_DIR "
            "unset): pobox who and pobox kick cannot reach this server"
        )
        return None
    owner = plan.serve_as if os.geteuid() == 0 else None
    try:
        sock = bind_control_socket(
            path,
            uid=None if owner is None else owner.uid,
            gid=None if owner is None else owner.gid,
            group=bool(config.group),
        )
    except ConfigError as exc:
        if config.control_socket != "auto":
            raise
        # The default place may be taken (a second server on the host) or not writable (a
        # read-only /run): serve without it rather than not at all, and say what to set.
        logger.warning(
            "master: no control socket (%s): set control_socket to a path of this server's",
            exc,
        )
        return None
    # A kick by user matches the name as logins register it (auth_username_format).
    control = SessionControl(
        registry,
        octets=octets,
        end_here=end_here,
        wait=kick_wait(config),
        normalise=parse_format(config.auth_username_format),
    )
    allowed = frozenset() if owner is None else frozenset({owner.uid})
    return ControlServer(sock, path, control, allowed=allowed, node=node_name(config))


def build_context(
    config: Config,
    *,
    authenticator: Authenticator | None = None,
    store: MaildropStore | None = None,
    tls: ServerTls | None = None,
    workers: HashWorkers | None = None,
    remote: RemoteState | None = None,
    metrics: Metrics | None = None,
) -> SessionContext:
    """Build the server's backends from the configuration (or use those given).

    ``workers`` must be the ones ``authenticator`` checks hashes in, so that one limit
    holds for password checks and SCRAM key derivation together.  ``remote``: the
    connection to the master, in a worker process (``workers`` > 1 in the configuration).
    """
    workers = workers or HashWorkers()
    counters, cluster = build_shared_state(config, remote)
    return SessionContext(
        config=config,
        authenticator=authenticator or build_authenticator(config, workers),
        store=store or build_store(config),
        tls=tls,
        throttle=LoginThrottle(
            counters,
            delay=config.auth_failure_delay,
            delay_max=config.auth_failure_delay_max,
            per_ip=config.auth_failures_per_ip,
            per_user=config.auth_failures_per_user,
            window=config.auth_failure_window,
        ),
        token_verifier=JwtVerifier(config.oauth_jwt_key_file)
        if config.oauth_jwt_key_file
        else None,
        workers=workers,
        scram_secret=scram_secret(config),
        cluster=cluster,
        metrics=metrics,
    )


def _reopen_logs(helper: StorageHelper | None = None) -> None:
    """Reopen the log file (SIGUSR1, SIGHUP); on failure keep the old one and say so.

    In mode 3 the storage helper opens it (the serving process may not create files where
    the log is).
    """
    opener = None if helper is None else functools.partial(helper.files.open, "log_path")
    try:
        if reopen_logs(opener):
            logger.info("master: log file reopened")
    except (OSError, StorageError) as exc:
        logger.error("master: cannot reopen the log file, still writing the old one: %s", exc)


def _on_sighup(server: Pop3Server, helper: StorageHelper | None = None) -> None:
    """Reopen the log, then reload the TLS certificates (so that line is in the new log)."""
    _reopen_logs(helper)
    server.reload_tls()


def _helper_opener(helper: StorageHelper) -> Callable[[], BinaryIO]:
    """Open the passwd-file through the storage helper (the serving process is not root)."""

    def opener() -> BinaryIO:
        try:
            return os.fdopen(helper.files.open("passwd_file"), "rb")
        except StorageError as exc:
            raise OSError(errno.EIO, str(exc)) from None

    return opener


async def _start_helper(
    config: Config, plan: PrivilegePlan, on_lost: Callable[[str], None], workers: HashWorkers
) -> tuple[StorageHelper, Authenticator, MaildropStore, ServerTls | None]:
    """Start the storage helper (mode 3) and the backends that go through it."""
    try:
        helper = await StorageHelper.start(config, plan.policy, on_lost=on_lost)
    except StorageError as exc:
        raise PoboxError(str(exc)) from None
    try:
        authenticator = build_authenticator(config, workers, opener=_helper_opener(helper))
        tls = ServerTls(config, read_file=helper.files.read) if config.ssl_cert else None
    except BaseException:
        await helper.aclose()
        raise
    return helper, authenticator, helper.store, tls


def _switch(config: Config, plan: PrivilegePlan) -> None:
    """Become the serving user the plan names, and check what it must still read."""
    if plan.serve_as is None:
        return
    switch_to(plan.serve_as, plan.serve_name)
    if config.userdb == "passwd-file" and plan.access in (MailAccess.MAIL_UID, MailAccess.DATABASE):
        # No helper in these modes: the passwd-file is read again, by path, as this user.
        try:
            Path(config.passwd_file).open("rb").close()
        except OSError as exc:
            who = "mail_uid" if plan.access is MailAccess.MAIL_UID else "user"
            msg = (
                f"passwd_file: {config.passwd_file} is not readable by {who} "
                f"{plan.serve_name} (uid {plan.serve_as.uid}: {exc.strerror}); make it "
                "readable by that user's group"
            )
            raise ConfigError(msg) from None


def preflight(config: Config, *, tls: bool = False) -> tuple[PrivilegePlan, list[str]]:
    """Run the start-up checks that need no port, no database and no change to anything.

    ``pobox serve`` runs them before it binds, ``pobox config check`` alone (with ``tls``:
    the certificates loaded as the server loads them), so both say the same.

    Returns:
        the privilege plan, and the warnings of the privilege checks.

    Raises:
        ConfigError: a setting that cannot work (a missing passwd-file, an unknown user...).
    """
    if config.userdb == "passwd-file" and not Path(config.passwd_file).is_file():
        raise ConfigError(f"passwd_file: {config.passwd_file} does not exist")
    _check_log_path(config)
    plan = plan_privileges(config)
    if config.event_loop == "uvloop":
        _uvloop(config)
    if tls and config.ssl_cert:
        ServerTls(config)
    return plan, list(plan.warnings)


def _log_path_error(path: str, exc: OSError) -> ConfigError:
    return ConfigError(f"log_path: cannot open {path}: {exc.strerror or exc}")


def _check_log_path(config: Config) -> None:
    """Check that the log file can be opened for appending, creating nothing.

    Raises:
        ConfigError: with the message :func:`start_logging` gives when it cannot.
    """
    if not config.log_path:
        return
    path = Path(config.log_path)
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
        elif not path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        elif not os.access(path.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise _log_path_error(config.log_path, exc) from None


def start_logging(config: Config) -> logging.Handler:
    """Set up logging (:func:`setup_logging`), naming ``log_path`` if it cannot be opened."""
    try:
        return setup_logging(config)
    except OSError as exc:
        raise _log_path_error(config.log_path, exc) from None


async def run_server(
    config: Config, worker: WorkerSpec | None = None, notifier: Notifier | None = None
) -> int:
    """Run the server until SIGTERM or SIGINT, then shut down cleanly; return the status.

    ``notifier`` tells systemd (``Type=notify``) when it is ready, reloading and stopping,
    and pings its watchdog from the event loop.

    The status is 0, or :data:`EX_UNAVAILABLE` when the storage helper went away (the
    server stops rather than go on without it), or in a ``worker`` when the master did
    (it stops at once, as on a second SIGTERM).
    """
    remote: RemoteState | None = None
    if worker is not None:  # the master bound the listeners; state and health are its
        remote = RemoteState(worker.adopt(), timeout=max(1.0, config.shared_state_timeout))
        config = dataclasses.replace(config, health_listen="")
        if shared_state_backend(config) == "postgresql":
            # Each worker renews a lease of its own in the registry, and forgets at its
            # heartbeat only its own lost sessions: to the cluster it is a node (NAME-wN).
            name = f"{node_name(config)}-w{worker.index}"
            config = dataclasses.replace(config, node_name=name)
    plan, warnings = preflight(config)
    for warning in warnings if worker is None else ():  # a master logged them once
        logger.warning("config: %s", warning)
    raise_open_file_limit(config)  # while still root: the hard limit may rise too
    stop = asyncio.Event()
    now = asyncio.Event()
    lost: list[str] = []

    def helper_lost(reason: str) -> None:
        logger.error("master: the storage helper is gone (%s); stopping", reason)
        lost.append(reason)
        stop.set()

    def master_lost() -> None:
        logger.error("master: the master process is gone; stopping at once, without UPDATE")
        lost.append("master")
        stop.set()
        now.set()

    if remote is not None:
        remote.on_lost = master_lost
        await remote.start()

    # The counts (metrics_listen): a worker's go to the files of the master's directory
    # (PROMETHEUS_MULTIPROC_DIR), made now, while the process may still be root.
    metrics = Metrics() if config.metrics_listen else None
    helper: StorageHelper | None = None
    tls: ServerTls | None = None
    workers = HashWorkers()
    if plan.access is MailAccess.HELPER:
        helper, authenticator, store, tls = await _start_helper(config, plan, helper_lost, workers)
        stores: list[MaildropStore | Authenticator] = [authenticator]
    else:
        authenticator = build_authenticator(config, workers)
        store = build_store(config, plan=plan)
        stores = [store, authenticator]
    try:
        for checked in stores:
            await check_store(checked)
    except BaseException:
        await store.aclose()
        await close_authenticator(authenticator)
        if helper is not None:
            await helper.aclose()
        raise
    server = Pop3Server(
        build_context(
            config,
            authenticator=authenticator,
            store=store,
            tls=tls,
            workers=workers,
            remote=remote,
            metrics=metrics,
        )
    )
    if remote is not None and server.ctx.cluster is not None:  # pobox kick, from the master
        remote.on_kick = server.ctx.cluster.kick_here
    agent = build_agent(config, authenticator, store)
    agent.metrics = metrics
    delivery = DeliveryServer(config, agent)
    health = (
        HealthServer(parse_listen(config.health_listen, key="health_listen"), probes_of(stores))
        if config.health_listen
        else None
    )
    control: ControlServer | None = None
    metrics_server = (  # a worker's counts are the master's to answer
        MetricsServer(parse_listen(config.metrics_listen, key="metrics_listen"), metrics.registry)
        if metrics is not None and worker is None
        else None
    )
    try:  # the ports are bound and the TLS key read: root is no longer needed
        if server.ctx.cluster is not None:
            await server.ctx.cluster.check_schema()
        await server.start()
        await delivery.start()
        if health is not None:
            await health.start()
        cluster = server.ctx.cluster
        if worker is None and cluster is not None:  # a master answers for its workers
            control = build_control(
                config, plan, cluster.registry, cluster.octets, cluster.kick_here
            )
            if control is not None:
                await control.start()
        if metrics_server is not None:
            await metrics_server.start()
        # Start the thread pool (and import its modules) first: the interpreter may live
        # where the unprivileged user cannot read (a pyenv under /root).
        await asyncio.to_thread(int)
        _switch(config, plan)
    except BaseException:
        if control is not None:
            await control.aclose()
        if metrics_server is not None:
            await metrics_server.aclose()
        if health is not None:
            await health.aclose()
        await delivery.aclose()
        await server.aclose()  # the store and the userdb too
        if helper is not None:
            await helper.aclose()
        raise
    _log_mode(plan, helper)
    loop = asyncio.get_running_loop()

    def stop_signal(name: str) -> None:
        if not stop.is_set():
            stop.set()
        elif not now.is_set():
            logger.warning("master: %s again: stopping at once, without UPDATE", name)
            now.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_signal, sig.name)
    # SIGHUP: let go of a rotated log and re-read the certificates; SIGUSR1: the log only
    # (what logrotate's postrotate sends, see contrib/logrotate/pobox).
    addresses = ", ".join(f"{h}:{p}" for h, p in server.addresses + server.ssl_addresses)
    notify = notifier or Notifier(None)

    def on_sighup() -> None:
        notify.reloading()
        _on_sighup(server, helper)
        notify.ready(f"serving on {addresses}")

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    loop.add_signal_handler(signal.SIGUSR1, _reopen_logs, helper)
    loop_name = type(loop).__module__.split(".")[0]  # "uvloop" or "asyncio"
    logger.info(
        "master: pobox %s started, listening on %s (event loop %s)",
        __version__,
        addresses,
        loop_name,
    )
    notify.ready(f"serving on {addresses}")
    watchdog = loop.create_task(
        notify.watchdog(lambda: f"serving on {addresses}, {server.session_count} sessions")
    )
    # Everything allocated so far (modules, config, the passwd-file) lives as long as the
    # process: keep it out of the cyclic garbage collector's full passes.
    gc.freeze()
    if remote is not None and worker is not None:
        with contextlib.suppress(StateUnavailable):
            await remote.call("ready", index=worker.index, pid=os.getpid())
    await stop.wait()
    notify.stopping(f"draining, {server.session_count} sessions open")
    if not lost or now.is_set():
        await drain(config, server, delivery, health, now)
    watchdog.cancel()
    logger.info("master: shutting down (%d sessions open)", server.session_count)
    if control is not None:
        await control.aclose()
    if metrics_server is not None:
        await metrics_server.aclose()
    if health is not None:
        await health.aclose()
    await delivery.aclose()
    await server.aclose()  # the store and the userdb too
    if helper is not None:
        await helper.aclose()
    if remote is not None:
        await remote.aclose()
    logger.info("master: stopped")
    return EX_UNAVAILABLE if lost else 0


def _master_control(
    config: Config, plan: PrivilegePlan, service: StateService
) -> tuple[ControlServer | None, Callable[[], Coroutine[Any, Any, None]] | None]:
    """The master's control socket, over its memory registry or the cluster's PostgreSQL one.

    Returns:
        the control server (if any), and what closes the registry's pool (if any).
    """
    if shared_state_backend(config) == "memory":
        control = build_control(config, plan, service.registry, service.octets, service.push_kicks)
        return control, None
    from pobox.state.postgres import (  # noqa: PLC0415 - psycopg only when used
        PostgresSessionRegistry,
        PostgresState,
    )

    # Only listing and kicking: the master has no sessions of its own, and no lease.
    state = PostgresState(
        config.postgresql_dsn,
        schema=config.postgresql_schema,
        timeout=max(config.shared_state_timeout, 2.0),
        pool_max=1,
    )
    registry = PostgresSessionRegistry(
        state, node_name(config), lease=LEASE_BEATS * config.shared_state_heartbeat
    )
    return build_control(config, plan, registry, service.octets, service.push_kicks), state.aclose


async def run_master(
    config: Config, command: list[str], count: int, notifier: Notifier | None = None
) -> int:
    """Run ``count`` workers on listeners bound here until SIGTERM or SIGINT; return the status.

    The master (``workers`` > 1, :mod:`pobox.server._workers`) binds the listeners, holds the
    node's memory state and the health check, passes signals on, and starts again a worker
    that dies.  The status is 0, or that of a worker that failed before it first served.

    Args:
        command: a worker's command line (this ``pobox serve``, without ``--worker``).
    """
    plan, warnings = preflight(config)  # its errors now, once, rather than in every worker
    for warning in warnings:
        logger.warning("config: %s", warning)
    listeners = bind_listeners(config)
    service = StateService(config.auth_failure_window, node_name(config))
    # metrics_listen: the workers count into files of a private directory made for this run
    # (0700, the serving user's), which the master sums at each scrape (pobox.metrics).
    metrics_dir: Path | None = None
    env: dict[str, str] | None = None
    metrics_server: MetricsServer | None = None
    if config.metrics_listen:
        serve_as = plan.serve_as if os.geteuid() == 0 else None
        metrics_dir = make_directory(None if serve_as is None else (serve_as.uid, serve_as.gid))
        env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
        metrics_server = MetricsServer(
            parse_listen(config.metrics_listen, key="metrics_listen"),
            multiprocess_registry(metrics_dir),
        )
    supervisor = Supervisor(
        command,
        listeners,
        count,
        service.attach,
        env=env,
        on_exit=None if metrics_dir is None else functools.partial(worker_gone, metrics_dir),
    )
    service.on_ready = supervisor.ready
    try:
        control, close_registry = _master_control(config, plan, service)
    except BaseException:
        listeners.close()
        listeners.remove_paths()
        raise

    async def workers_serving() -> None:
        if not supervisor.serving:
            raise PoboxError("no worker process is serving")

    # The health check's own view of the databases the workers use (a Maildir and a
    # passwd-file need none).
    probed: list[PostgresStore | PostgresAuthenticator] = []
    if config.health_listen and config.mail_location == "postgresql":
        probed.append(_postgres_store(config))
    if config.health_listen and config.userdb == "postgresql":
        probed.append(postgres_userdb(config, listen=False))
    health = (
        HealthServer(
            parse_listen(config.health_listen, key="health_listen"),
            [("workers", workers_serving), *probes_of(probed)],
        )
        if config.health_listen
        else None
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def stop_signal(name: str) -> None:
        if not stop.is_set():
            stop.set()
        else:
            logger.warning("master: %s again: stopping every worker at once, without UPDATE", name)
            supervisor.send(signal.SIGTERM)

    notify = notifier or Notifier(None)

    def pass_on(sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            notify.reloading()
        _reopen_logs()
        supervisor.send(sig)
        if sig == signal.SIGHUP:
            notify.ready(f"{count} workers serving")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_signal, sig.name)
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        loop.add_signal_handler(sig, pass_on, sig)
    status = 0
    try:
        if control is not None:
            await control.start()
        if health is not None:
            await health.start()
        if metrics_server is not None:
            await metrics_server.start()
        supervisor.start()
        ready = loop.create_task(supervisor.wait_ready())
        stopping = loop.create_task(stop.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if ready.done() and supervisor.failed is None:
            ready_line = ", ".join(listeners.addresses())
            logger.info(
                "master: pobox %s started, listening on %s (event loop %s, %d workers: pids %s)",
                __version__,
                ready_line,
                type(loop).__module__.split(".")[0],
                count,
                " ".join(str(pid) for pid in supervisor.pids),
            )
            notify.ready(f"serving on {ready_line}, {count} workers")
            watchdog = loop.create_task(
                notify.watchdog(lambda: f"serving on {ready_line}, {count} workers")
            )
            await stop.wait()
            watchdog.cancel()
        notify.stopping("draining the workers")
        ready.cancel()
        status = supervisor.failed or 0
        if health is not None:
            health.drain()
        listeners.close()  # the workers close theirs as they drain: the ports are then free
        logger.info("master: stopping %d workers", len(supervisor.pids))
        supervisor.stop(signal.SIGTERM)
        await supervisor.wait_gone()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        if health is not None:
            await health.aclose()
        if metrics_server is not None:
            await metrics_server.aclose()
        if metrics_dir is not None:
            remove_directory(metrics_dir)
        for store in probed:
            await store.aclose()
        if control is not None:
            await control.aclose()
        if close_registry is not None:
            await close_registry()
        await service.aclose()
        listeners.close()
        listeners.remove_paths()
    logger.info("master: stopped")
    return status


#: Seconds between the drain's log lines about sessions still open.
DRAIN_LOG_EVERY = 10.0
#: Seconds sessions get, after the drain deadline, to finish the command under way (an
#: UPDATE runs to its end: ``postgresql_timeout`` bounds it); then they are cancelled.
DRAIN_GRACE = 10.0
#: The same after a second SIGTERM/SIGINT: only long enough to say goodbye.
STOP_GRACE = 0.5


async def drain(
    config: Config,
    server: Pop3Server,
    delivery: DeliveryServer,
    health: HealthServer | None,
    now: asyncio.Event,
) -> None:
    """Drain the node (SIGTERM): refuse new work, let open work finish, end the rest.

    The health check answers 503 and the listeners close at once; POP3 sessions may go on
    (QUIT and UPDATE as usual) and messages being delivered finish, for ``drain_timeout``
    seconds or until ``now`` is set (a second signal); then sessions end without UPDATE with
    ``-ERR [SYS/TEMP]``. Delivery connections still open at the end (idle ones an MTA keeps,
    or one still delivering at the deadline) get ``421 4.3.2``.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    if health is not None:
        health.drain()
    server.stop_accepting()
    delivery.stop_accepting()

    def open_work() -> int:
        return server.session_count + delivery.busy_count

    logger.info(
        "master: draining: no new connections; %d POP3 sessions and %d deliveries in "
        "progress, waiting up to %g s for them",
        server.session_count,
        delivery.busy_count,
        config.drain_timeout,
    )
    deadline = started + config.drain_timeout
    next_log = started + DRAIN_LOG_EVERY
    while open_work() and not now.is_set() and loop.time() < deadline:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(0.1, max(0.0, deadline - loop.time()))):
                await now.wait()
        if loop.time() >= next_log and open_work():
            next_log += DRAIN_LOG_EVERY
            logger.info(
                "master: draining: %d POP3 sessions and %d deliveries still in progress, "
                "%.0f s left",
                server.session_count,
                delivery.busy_count,
                max(0.0, deadline - loop.time()),
            )
    left = server.session_count
    if open_work():
        logger.warning(
            "master: drain %s: closing %d POP3 sessions without UPDATE and %d deliveries with 421",
            "cut short" if now.is_set() else "deadline reached",
            left,
            delivery.busy_count,
        )
        server.stop_sessions()
        delivery.stop_connections()
        grace = STOP_GRACE if now.is_set() else DRAIN_GRACE
        waiting = loop.create_task(server.wait_sessions(grace))
        interrupt = loop.create_task(now.wait())
        await asyncio.wait({waiting, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            await server.wait_sessions(STOP_GRACE)
        for task in (waiting, interrupt):
            task.cancel()
    idle = delivery.connection_count
    if idle:  # an MTA's cached connections: tell it to go elsewhere
        logger.info("master: closing %d idle delivery connections with 421", idle)
        delivery.stop_connections()
    logger.info(
        "master: drained in %.1f s (%d sessions ended by the deadline)",
        loop.time() - started,
        left,
    )


def _log_mode(plan: PrivilegePlan, helper: StorageHelper | None) -> None:
    """Say at start whom the server runs as and how it reaches mail."""
    uid, gid = os.getuid(), os.getgid()
    if plan.access is MailAccess.HELPER:
        assert helper is not None
        logger.info(
            "master: running as user %s (uid %d, gid %d); mail accessed through the storage "
            "helper (pid %d) with each user's uid/gid",
            plan.serve_name,
            uid,
            gid,
            helper.pid,
        )
    elif plan.access is MailAccess.MAIL_UID:
        logger.info(
            "master: running as mail_uid %s (uid %d, gid %d); serving only its mail",
            plan.serve_name,
            uid,
            gid,
        )
    elif plan.access is MailAccess.DATABASE:
        logger.info("master: running as uid %d, gid %d; mail in PostgreSQL", uid, gid)
    else:
        logger.info("master: not started as root; mail accessed as uid %d, gid %d", uid, gid)


def add_key_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Add a ``--NAME`` option for each of the configuration keys ``names``.

    Its help is the first sentence of the key's, its choices the key's: see :func:`key`.
    """
    for name in names:
        spec = KEYS[name]
        first = spec.doc.replace("`", "").replace("%", "%%").split(". ")[0].rstrip(".")
        option = "--" + name.replace("_", "-")
        if spec.toml[0] is bool:
            parser.add_argument(option, action="store_true", help=first)
        elif spec.toml[0] is list:
            parser.add_argument(option, action="append", help=f"{first} (repeat)")
        else:
            parser.add_argument(option, choices=spec.choices or None, help=first)


#: The configuration keys that are also ``pobox serve`` options (``flag=True``).
SERVE_FLAGS = tuple(name for name, spec in KEYS.items() if spec.flag)


def _overrides(args: argparse.Namespace, names: Sequence[str] = SERVE_FLAGS) -> dict[str, Any]:
    """The keys given as options (:func:`add_key_flags`), which beat the file."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None)}


async def _discard(main: Coroutine[Any, Any, int]) -> None:
    await main


def _uvloop(config: Config) -> Any:  # noqa: ANN401 - the uvloop module, if any
    """Return the uvloop module if ``event_loop`` allows it and it is installed, else None.

    Raises:
        ConfigError: ``event_loop`` is ``uvloop`` and it is not installed.
    """
    if config.event_loop == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional: only the server's loop uses it
    except ImportError:
        if config.event_loop == "uvloop":
            raise ConfigError("event_loop: uvloop is not installed") from None
        return None
    return uvloop


def run_loop(config: Config, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when ``event_loop`` allows and it is installed, else asyncio."""
    uvloop = _uvloop(config)
    if uvloop is not None:
        uvloop.run(main)
    else:
        asyncio.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the POP3 server: one process, or a master and its workers (``workers``)."""
    config = load_config(args.config, _overrides(args))
    handler = start_logging(config)
    worker = WorkerSpec.decode(args.worker) if args.worker else None
    if worker is not None:
        handler.addFilter(WorkerLogNames(worker.index))
    else:
        for warning in config.warnings:
            logger.warning("config: %s", warning)
    count = 1 if worker is not None else worker_count(config)
    status: list[int] = []
    # systemd: the notify socket and the sockets it bound are the started process's only.
    notifier = Notifier.from_environ() if worker is None else None
    if worker is None:
        passed = adopt_listen_fds(config, listen_fds())
        if passed:
            logger.info("master: socket activation: systemd passed %s", ", ".join(passed))

    async def serve() -> None:
        if count > 1:
            argv = getattr(args, "argv", None) or sys.argv[1:]
            command = [sys.executable, "-m", "pobox", *argv]
            status.append(await run_master(config, command, count, notifier))
        else:
            status.append(await run_server(config, worker, notifier))

    run_loop(config, serve())
    return status[0] if status else 0


def cmd_deliver(args: argparse.Namespace) -> int:
    """Deliver one message from standard input (an MDA, like dovecot-lda); sysexits status."""
    overrides = _overrides(args, _DELIVER_FLAGS)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        # A broken setup must not bounce mail: the MTA keeps it and tries again, and logs
        # this line for the admin. Not EX_CONFIG (78): Postfix maps it to 5.3.5, a bounce;
        # dovecot-lda and doveconf exit 75 for the same reason.
        print(f"pobox deliver: configuration error: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    try:
        folder = check_folder(args.mailbox)
    except FolderNameError as exc:  # a setup error as above: tempfail, never a bounce
        print(f"pobox deliver: -m: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    try:
        status, message = asyncio.run(_deliver_stdin(config, args.user, args.sender, folder=folder))
    except Exception as exc:  # an MDA must tempfail, never crash into a bounce
        status, message = EX_TEMPFAIL, f"internal error: {exc!r}"
    if status:
        print(f"pobox deliver: {message}", file=sys.stderr)
    return status


#: The configuration keys that are also ``pobox deliver`` options.
_DELIVER_FLAGS = ("mail_location", "passwd_file")


def build_deliver_store(config: Config) -> MaildropStore:
    """Build the store of ``pobox deliver``.

    Started as root, the process becomes the owner of the recipient's mail (uid/gid from the
    userdb, else ``mail_uid``/``mail_gid``; never root unless ``first_valid_uid`` is 0) before
    it touches the maildir (:class:`SwitchingStore`); otherwise it delivers only to users whose
    mail it owns.
    """
    if os.geteuid() != 0 or config.mail_location == "postgresql":
        return build_store(config)
    return SwitchingStore(_file_store(config), OwnerPolicy.from_config(config, fallback=None))


async def _deliver_stdin(
    config: Config, user: str, sender: str | None, *, folder: str = INBOX
) -> tuple[int, str]:
    """Deliver standard input to ``user`` (into ``folder``) with ``pobox deliver``'s store."""
    store = build_deliver_store(config)
    authenticator = build_authenticator(config, listen=False)
    try:
        agent = build_agent(config, authenticator, store)
        return await deliver_stdin(
            agent,
            user,
            sender,
            sys.stdin.buffer,
            limit=config.max_message_size,
            spool_dir=config.mail_temp_dir or None,
            folder=folder,
        )
    finally:
        await store.aclose()
        await close_authenticator(authenticator)


# --------------------------------------------------------------------------- config


def cmd_config_check(args: argparse.Namespace) -> int:
    """Check a configuration file as ``pobox serve`` does before it binds; print ok."""
    config = load_config(args.config)
    _, warnings = preflight(config, tls=True)
    for warning in (*config.warnings, *warnings):
        print(f"pobox: warning: config: {warning}", file=sys.stderr)
    print(f"{args.config}: ok")
    return 0


def cmd_config_dump(args: argparse.Namespace) -> int:
    """Print the effective settings that differ from the defaults (``--all``: every key)."""
    config = load_config(args.config)
    what = "every setting" if args.all else "the settings that differ from the defaults"
    print(f"# pobox {__version__}: {what} of {args.config}")
    print(dump_config(config, every=args.all, secrets=args.secrets), end="")
    return 0


# --------------------------------------------------------------------------- database


def cmd_db(args: argparse.Namespace) -> int:
    """Create or migrate the PostgreSQL schema, report it, or sweep unused bodies."""
    from pobox.storage.postgres import _admin  # noqa: PLC0415 - psycopg only when used

    config = load_config(args.config)
    if (
        config.mail_location != "postgresql"
        and config.userdb != "postgresql"
        and shared_state_backend(config) != "postgresql"
    ):
        raise ConfigError(
            'mail_location, userdb, shared_state: "pobox db" needs mail_location = '
            '"postgresql", userdb = "postgresql" or shared_state = "postgresql"'
        )
    dsn, schema, timeout = (
        config.postgresql_dsn,
        config.postgresql_schema,
        config.postgresql_timeout,
    )
    current = True
    try:
        if args.db_command == "upgrade":
            lines = asyncio.run(_admin.db_upgrade(dsn, schema, timeout=timeout))
        elif args.db_command == "status":
            current, lines = asyncio.run(_admin.db_status(dsn, schema, timeout=timeout))
        else:
            lines = asyncio.run(_admin.db_gc(_postgres_store(config)))
    except _admin.DatabaseError as exc:
        print(f"pobox db {args.db_command}: database error: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    for line in lines:
        print(line)
    return 0 if current else EX_UNAVAILABLE


# --------------------------------------------------------------------------- demo

_DEMO_MESSAGES = [
    b"Return-path: <user@client.thm>\n"
    b"From: user@client.thm\n"
    b"To: demo@pobox.test\n"
    b"Subject: Welcome to pobox\n"
    b"Date: Thu, 27 Jun 2024 16:19:35 +0000\n"
    b"Message-ID: <welcome@pobox.test>\n"
    b"\n"
    b"Hello! This mailbox is served by pobox over POP3.\n"
    b"Try STAT, LIST, UIDL, TOP 1 0, RETR 2, DELE 3 and QUIT.\n",
    b"From: Mail Server <postmaster@pobox.test>\n"
    b"To: Demo <demo@pobox.test>\n"
    b"Subject: Sending email with Telnet\n"
    b"Date: Wed, 15 Sep 2021 11:05:34 +0300\n"
    b"Message-ID: <telnet@pobox.test>\n"
    b"\n"
    b"Hello Demo,\n"
    b"I am just writing to say hi!\n"
    b".A line starting with a dot is sent as '..' and read back as '.'.\n",
    b"Return-path: <user@client.thm>\n"
    b"Envelope-to: demo@pobox.test\n"
    b"Delivery-date: Thu, 27 Jun 2024 16:19:35 +0000\n"
    b"From: user@client.thm\n"
    b"To: demo@pobox.test\n"
    b"Subject: Telnet email\n"
    b"Message-ID: <telnet-email@pobox.test>\n"
    b"\n"
    b"Hello. I am using telnet to send you an email!\n",
]

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"  # the documented password of the local demo user


def _deliver_demo(maildir: Path, data: bytes) -> None:
    with Spool.from_bytes(data) as body:
        deliver_message(maildir, IncomingMessage(b"", body))


#: The demo run by root: its mail is root's, which only these settings allow (see README,
#: "Security model"); a server for real users never accesses mail as root.
_DEMO_AS_ROOT = (
    "# Started as root: the demo's mail belongs to root, which pobox refuses unless told.\n"
    "# Never in production: there, mail belongs to its users (or one mail_uid).\n"
    'mail_uid = "0"\nmail_gid = "0"\nfirst_valid_uid = 0\nfirst_valid_gid = 0\n'
)


def make_demo(folder: Path, port: int, *, reset: bool = False) -> Path:
    """Create (or reuse) a demo folder: passwd-file, a user with mail, a config file.

    Returns:
        the path of the config file.
    """
    folder = folder.resolve()
    config_path = folder / "pobox.toml"
    maildir = folder / "mail" / DEMO_USER
    passwd = folder / "passwd"
    if reset or not passwd.exists():
        folder.mkdir(parents=True, exist_ok=True)
        if passwd.exists():
            passwd.unlink()
        add_user(passwd, DEMO_USER, DEMO_PASSWORD.encode(), scheme="ARGON2ID")
    if reset or not maildir.exists():
        for sub in ("cur", "new"):
            if (maildir / sub).exists():
                for f in (maildir / sub).iterdir():
                    f.unlink()
        for msg in _DEMO_MESSAGES:
            _deliver_demo(maildir, msg)
    config_path.write_text(
        "# pobox demo configuration: every key is explained in README.md\n"
        f'listen = ["127.0.0.1:{port}"]\n'
        f'mail_location = "maildir:{folder}/mail/%u"\n'
        f'passwd_file = "{passwd}"\n'
        'login_greeting = "pobox ready."\n' + (_DEMO_AS_ROOT if os.geteuid() == 0 else "")
    )
    return config_path


def cmd_demo(args: argparse.Namespace) -> int:
    """Set up the demo folder and serve it."""
    config_path = make_demo(Path(args.dir), args.port, reset=args.reset)
    overrides = {"trace": True} if args.trace else {}
    config = load_config(config_path, overrides)
    setup_logging(config)
    print(
        f"pobox demo: folder {config_path.parent}\n"
        f"  user {DEMO_USER!r}, password {DEMO_PASSWORD!r}, 3 messages\n"
        f"  try:  telnet localhost {args.port}   (USER demo, PASS demo, STAT, LIST, RETR 1,"
        " DELE 1, QUIT)\n"
        "  stop with Ctrl-C",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(config, _discard(run_server(config)))
    return 0


# --------------------------------------------------------------------------- users


def _read_password(args: argparse.Namespace) -> bytes:
    if args.password_file:
        data = Path(args.password_file).read_bytes()
        return data.rstrip(b"\r\n")
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.buffer.readline().rstrip(b"\r\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise PoboxError("the two passwords differ")
    return first.encode()


def cmd_user(args: argparse.Namespace) -> int:
    """Add, re-password, list or remove users of the passwd-file or PostgreSQL userdb.

    ``-f PASSWD_FILE`` edits that passwd-file; ``-c CONFIG`` edits whichever userdb the
    configuration names (``userdb``).
    """
    config = load_config(args.config) if args.config else None
    password = b""
    if args.user_command in ("add", "passwd"):
        password = _read_password(args)
        if not password:
            raise PoboxError("empty password refused")
    if args.user_command == "add":
        _warn_unreachable(args.name, config)
    if config is not None and config.userdb == "postgresql":
        return asyncio.run(_user_postgres(args, config, password))
    path = Path(args.passwd_file or (config.passwd_file if config else ""))
    if args.user_command == "list":
        _print_names(list_users(path), args.pattern)
        return 0
    if args.user_command == "add":
        add_user(
            path,
            args.name,
            password,
            scheme=args.scheme,
            home=args.home,
            mail=args.mail,
            uid=args.uid,
            gid=args.gid,
            extra=_extra_fields(args),
        )
        print(f"added user {args.name} to {path}")
        return 0
    if args.user_command == "passwd":
        if not set_password(path, args.name, password, scheme=args.scheme, create=False):
            print(f"pobox: no user {args.name} in {path}", file=sys.stderr)
            return EX_DATAERR
        print(f"changed the password of {args.name} in {path}")
        return 0
    return asyncio.run(_user_delete(args, config, path=path))


def _warn_unreachable(name: str, config: Config | None) -> None:
    """Warn when ``auth_username_format`` turns ``name`` into another: nobody reaches it."""
    template = config.auth_username_format if config else DEFAULT_FORMAT
    looked_up = parse_format(template)(name)
    if looked_up != name:
        print(
            f"pobox: warning: with auth_username_format = {template!r}, logins and mail for "
            f"{name!r} look up {looked_up!r}; add {looked_up!r} instead, or set "
            "auth_username_format",
            file=sys.stderr,
        )


def _extra_fields(args: argparse.Namespace) -> list[str]:
    """The passwd-file extra fields of ``user add``'s quota and nologin options."""
    out = []
    if args.quota_bytes is not None:
        out.append(f"quota_bytes={args.quota_bytes}")
    if args.quota_messages is not None:
        out.append(f"quota_messages={args.quota_messages}")
    if args.nologin:
        out.append("nologin")
    return out


def _print_names(names: list[str], pattern: str | None) -> None:
    """Print the names (already sorted), those matching the shell ``pattern`` if given."""
    for name in names:
        if pattern is None or fnmatch.fnmatchcase(name, pattern):
            print(name)


async def _user_postgres(args: argparse.Namespace, config: Config, password: bytes) -> int:
    """Run ``pobox user`` on the PostgreSQL userdb."""
    userdb = postgres_userdb(config, listen=False)
    where = f"the PostgreSQL userdb (schema {config.postgresql_schema})"
    try:
        if args.user_command == "list":
            _print_names(await userdb.names(), args.pattern)
            return 0
        if args.user_command == "del":
            return await _user_delete(args, config, userdb=userdb)
        stored = await asyncio.to_thread(hash_password, password, args.scheme, username=args.name)
        if args.user_command == "add":
            await userdb.add_user(
                args.name,
                stored,
                uid=_numeric_id(args.uid, "--uid"),
                gid=_numeric_id(args.gid, "--gid"),
                home=args.home,
                mail=args.mail,
                quota_bytes=None if args.quota_bytes is None else parse_size(args.quota_bytes),
                quota_messages=None
                if args.quota_messages is None
                else _numeric_id(args.quota_messages, "--quota-messages"),
                nologin=args.nologin,
            )
            print(f"added user {args.name} to {where}")
            return 0
        if not await userdb.set_password(args.name, stored):
            print(f"pobox: no user {args.name} in {where}", file=sys.stderr)
            return EX_DATAERR
        print(f"changed the password of {args.name} in {where}")
        return 0
    except AuthTemporaryError as exc:
        print(f"pobox user {args.user_command}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    finally:
        await userdb.aclose()


def _numeric_id(value: str | None, option: str) -> int | None:
    """Return a number given on the command line (a PostgreSQL userdb stores numbers)."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise PoboxError(f"{option}: {value!r} is not a non-negative number")
    return int(value)


async def _user_delete(
    args: argparse.Namespace,
    config: Config | None,
    *,
    path: Path | None = None,
    userdb: PostgresAuthenticator | None = None,
) -> int:
    """Remove a user; with ``--purge`` also every message of theirs in the configured store.

    The mail is removed first (under the maildrop lock, as an UPDATE would), then the user,
    then once more whatever was delivered in between: no mail is left for a user that no
    longer exists, and no user is left without the mail they had if the purge fails.
    """
    name = args.name
    store: MaildropStore | None = None
    user = None
    if args.purge:
        if config is None:
            raise PoboxError("--purge needs -c CONFIG (to know where the mail is)")
        authenticator = userdb or build_authenticator(config, listen=False)
        user = await authenticator.lookup(name)
        if user is None:
            print(f"pobox: no user {name}", file=sys.stderr)
            return EX_DATAERR
        store = build_store(config)
    try:
        removed = 0
        if store is not None and user is not None:
            removed += await purge_maildrop(store, user)
        found = await userdb.delete_user(name) if userdb else delete_user(path or "", name)
        if not found:
            print(f"pobox: no user {name}", file=sys.stderr)
            return EX_DATAERR
        if store is not None and user is not None:
            removed += await purge_maildrop(store, user)
            print(f"removed user {name} and their {removed} messages")
        else:
            print(f"removed user {name} (their mail is left where it is; --purge removes it)")
        return 0
    finally:
        if store is not None:
            await store.aclose()


# --------------------------------------------------------------------------- restore


def _since(text: str, now: float) -> int:
    """Read ``--since``: an ISO date/time (UTC unless it has an offset) or a duration ago."""
    try:
        return int(now) - parse_duration(text, key="--since")
    except ConfigError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        msg = f'--since: {text!r} is neither a date/time ("2026-12-07T09:30") nor a duration'
        raise PoboxError(msg) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp())


def _restore_line(message: DeletedMessage) -> str:
    when = datetime.datetime.fromtimestamp(message.deleted, datetime.UTC)
    line = f"{message.uidl} {message.size} {when:%Y-%m-%dT%H:%M:%SZ}"
    return line if message.folder == INBOX else f"{line} {message.folder}"


def _listed_folders(config: Config, user: User) -> tuple[str, ...]:
    """The folders ``user``'s POP3 lists (``pop3_folders``, the userdb field first)."""
    value = user.extra.get("pop3_folders")
    if value is not None:
        try:
            return parse_folders("pop3_folders", value)
        except ConfigError as exc:
            print(f"pobox: note: userdb field ignored: {exc}", file=sys.stderr)
    return config.pop3_folders


async def _restore_run(config: Config, args: argparse.Namespace) -> list[str]:
    retention = parse_duration(config.pop3_delete_retention)
    if not retention:
        msg = 'pobox restore needs pop3_delete_retention set (not "0")'
        raise PoboxError(msg)
    user = await _transfer_user(config, args.user)
    if config.mail_location == "postgresql":
        database = _postgres_store(config)
        try:
            return await _restore_with(database, user, args, config)
        finally:
            await database.aclose()
    if os.geteuid() == 0:
        # As dovecot-lda: become the owner of the mail (never root unless first_valid_uid
        # is 0) before any file of the maildir is touched; one user per run.
        switch_process(OwnerPolicy.from_config(config, fallback=None).owner_of(user))
    store = MaildirStore(
        config.mail_location, reuse_xuidl=config.pop3_reuse_xuidl, retention=retention
    )
    return await _restore_with(store, user, args, config)


async def _restore_with(
    store: DeletedMailRetention, user: User, args: argparse.Namespace, config: Config
) -> list[str]:
    """List, purge or restore ``user``'s kept mail, as ``args`` says."""
    if args.list:
        return [_restore_line(m) for m in await store.deleted_messages(user)]
    if args.purge:
        return [f"purged {await store.purge_deleted(user)} message(s) of {user.name}"]
    since = None if args.since is None else _since(args.since, time.time())
    restored = await store.restore_deleted(
        user, since=since, uidls=tuple(args.uidl), folders=_listed_folders(config, user)
    )
    lines = [f"restored {_restore_line(m)}" for m in restored]
    lines.append(f"restored {len(restored)} message(s) into the maildrop of {user.name}")
    return lines


def cmd_restore(args: argparse.Namespace) -> int:
    """List, restore or purge the messages pop3_delete_retention keeps for a user."""
    config = load_config(args.config)
    try:
        lines = asyncio.run(_restore_run(config, args))
    except (StorageTemporaryError, MaildropLocked, AuthTemporaryError) as exc:
        print(f"pobox restore: {exc} (run it again)", file=sys.stderr)
        return EX_TEMPFAIL
    for line in lines:
        print(line)
    return 0


# --------------------------------------------------------------------------- import/export


class _TransferBar:
    """A rich progress bar on standard error while messages are copied."""

    def __init__(self, what: str) -> None:
        from rich.console import Console  # noqa: PLC0415 - only on a terminal
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._what = what
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task: Any = None

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(self._what, total=total)

    def advance(self, messages: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, messages)

    def stop(self) -> None:
        self._progress.stop()


def _transfer_bar(what: str) -> _TransferBar | None:
    """A progress bar if standard error is a terminal, else none."""
    return _TransferBar(what) if sys.stderr.isatty() else None


def _maildir_argument(text: str, option: str) -> Path:
    kind, colon, path = text.partition(":")
    if kind != "maildir" or not colon or not path:
        raise PoboxError(f"{option}: expected maildir:PATH, got {text!r}")
    return Path(path)


async def _transfer_user(config: Config, name: str) -> User:
    """The user record of ``name`` from the userdb, or a bare record if it has none."""
    authenticator = build_authenticator(config, listen=False)
    try:
        user = await authenticator.lookup(name)
    finally:
        await close_authenticator(authenticator)
    if user is None:
        print(f"pobox: note: {name} is not in the userdb; using the name alone", file=sys.stderr)
        return User(name=name)
    return user


async def _import_prepare(config: Config, name: str) -> tuple[User, frozenset[str]]:
    store = build_store(config)
    try:
        if not isinstance(store, MaildropImporter):
            raise TransferError(
                "pobox import needs a store that keeps the UIDLs it is given "
                '(mail_location = "postgresql"); a Maildir is moved by copying it with its '
                "dovecot-uidlist or pobox-uidlist"
            )
        user = await _transfer_user(config, name)
        return user, await known_uidls(store, user)
    finally:
        await store.aclose()


async def _import_run(
    config: Config,
    user: User,
    source: MaildirSource | ForkedMaildirSource,
    known: frozenset[str],
) -> TransferReport:
    store = build_store(config)
    bar = _transfer_bar(f"import {user.name}")
    try:
        return await import_messages(source, store, user, known=known, progress=bar)
    finally:
        if bar is not None:
            bar.stop()
        await store.aclose()


def cmd_import(args: argparse.Namespace) -> int:
    """Import a Maildir into the configured store, keeping its UIDLs and sizes."""
    config = load_config(args.config)
    path = _maildir_argument(args.source, "--from")
    try:
        # The store is asked first, and the reader forked before any thread or loop runs.
        user, known = asyncio.run(_import_prepare(config, args.user))
        owner = maildir_owner(path)
        source: MaildirSource | ForkedMaildirSource
        if owner is None:
            source = MaildirSource(path, user.name, reuse_xuidl=config.pop3_reuse_xuidl)
        else:
            source = ForkedMaildirSource(
                path, user.name, owner, reuse_xuidl=config.pop3_reuse_xuidl
            )
            source.start(known)
        report = asyncio.run(_import_run(config, user, source, known))
    except (StorageTemporaryError, MaildropLocked, AuthTemporaryError) as exc:
        print(f"pobox import: {exc} (run it again: nothing is imported twice)", file=sys.stderr)
        return EX_TEMPFAIL
    print(report.summary(f"imported into {user.name}:"))
    return 0


async def _export_run(config: Config, name: str, target: Path) -> TransferReport:
    store = build_store(config)
    bar = _transfer_bar(f"export {name}")
    try:
        user = await _transfer_user(config, name)
        return await export_maildir(store, user, target, progress=bar)
    finally:
        if bar is not None:
            bar.stop()
        await store.aclose()


def cmd_export(args: argparse.Namespace) -> int:
    """Write a user's maildrop to a Maildir that pobox and Dovecot serve with the same UIDLs."""
    config = load_config(args.config)
    target = _maildir_argument(args.target, "--to")
    try:
        report = asyncio.run(_export_run(config, args.user, target))
    except (StorageTemporaryError, MaildropLocked, AuthTemporaryError) as exc:
        print(f"pobox export: {exc} (run it again: what was written is kept)", file=sys.stderr)
        return EX_TEMPFAIL
    print(report.summary(f"exported {args.user} to {target}:"))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser."""
    parser = argparse.ArgumentParser(prog="pobox", description="pobox POP3 server")
    parser.add_argument("--version", action="version", version=f"pobox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    keys = keys_help()
    serve = sub.add_parser(
        "serve",
        help="run the POP3 server",
        description="Run the POP3 server. Options beat the configuration file."
        f"\n\nConfiguration keys (TOML), with their defaults:\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", "-c", help="TOML configuration file")
    add_key_flags(serve, SERVE_FLAGS)
    # Set by the master for each of its workers (pobox.server._workers), never by hand.
    serve.add_argument("--worker", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="serve a demo mailbox for telnet, like the seeds")
    demo.add_argument("--dir", default="pobox-demo", help="demo folder (default ./pobox-demo)")
    demo.add_argument("--port", type=int, default=1110, help="port on 127.0.0.1 (1110)")
    demo.add_argument("--reset", action="store_true", help="recreate the user and the mail")
    demo.add_argument("--trace", action="store_true", help="log the C:/S: dialogue")
    demo.set_defaults(func=cmd_demo)

    deliver = sub.add_parser(
        "deliver",
        help="deliver a message from stdin to a user (MDA, like dovecot-lda)",
        description="Read one message on standard input and store it in USER's maildrop. "
        "Exit status (sysexits.h): 0 delivered, 65 bad input, 67 unknown user, 73 over quota "
        "or cannot create, 75 temporary failure (a configuration error too: the MTA keeps "
        "the message).",
    )
    deliver.add_argument("--user", "-u", "-d", required=True, help="recipient user or address")
    deliver.add_argument("--sender", "-f", help="envelope sender (Return-Path)")
    deliver.add_argument(
        "--mailbox",
        "-m",
        default="INBOX",
        help="folder to file the message into (as dovecot-lda -m): Maildir++ .NAME, or the "
        "PostgreSQL folder column; default INBOX",
    )
    deliver.add_argument("--config", "-c", help="TOML configuration file")
    add_key_flags(deliver, _DELIVER_FLAGS)
    deliver.set_defaults(func=cmd_deliver)

    user = sub.add_parser(
        "user",
        help="manage users (passwd-file or PostgreSQL)",
        description="-c CONFIG works on the userdb the configuration names (passwd-file or "
        "postgresql); -f PASSWD_FILE on that passwd-file.",
    )
    user_sub = user.add_subparsers(dest="user_command", required=True)
    for name, help_text in (
        ("add", "add a user"),
        ("passwd", "change a user's password"),
        ("list", "print the users, one per line, sorted"),
        ("del", "remove a user (their mail stays unless --purge)"),
    ):
        p = user_sub.add_parser(name, help=help_text)
        if name == "list":
            p.add_argument("pattern", nargs="?", help="only names matching this shell pattern")
        else:
            p.add_argument("name")
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", "-c", help="TOML configuration file (its userdb)")
        where.add_argument("--passwd-file", "-f", help="a Dovecot-format passwd-file")
        if name in ("add", "passwd"):
            p.add_argument(
                "--scheme",
                default="ARGON2ID",
                type=str.upper,
                choices=sorted(SUPPORTED_SCHEMES),
                help="password scheme (ARGON2ID)",
            )
            p.add_argument("--password-file", help="read the password from this file")
            p.add_argument("--password-stdin", action="store_true", help="read it from stdin")
        if name == "add":
            p.add_argument("--home", help="home directory (%%h, ~ in mail_location)")
            p.add_argument("--mail", help="per-user mail location (userdb_mail)")
            p.add_argument("--uid", help="owner of the user's mail: a user name or number")
            p.add_argument("--gid", help="group of the user's mail: a group name or number")
            p.add_argument("--quota-bytes", help="the user's quota, e.g. 100M (0: none)")
            p.add_argument("--quota-messages", help="the user's most messages (0: none)")
            p.add_argument("--nologin", action="store_true", help="receives mail, may not log in")
        if name == "del":
            p.add_argument(
                "--purge",
                action="store_true",
                help="also remove every message of the user from the configured store (needs -c)",
            )
        p.set_defaults(func=cmd_user)
    imp = sub.add_parser(
        "import",
        help="import a Maildir into the configured store, keeping UIDLs and sizes",
        description="Copy the messages of a Maildir into USER's maildrop in the configured "
        'store (mail_location = "postgresql"), each with the UIDL and size that pobox - or '
        "Dovecot, whose dovecot-uidlist pobox reads - answered for that Maildir, so POP3 "
        "clients that leave mail on the server do not download it again. Safe to interrupt "
        "and run again: messages already there (same UIDL) are skipped. Exit 75: try again.",
    )
    imp.add_argument("--from", dest="source", required=True, metavar="maildir:PATH")
    imp.add_argument("--user", "-u", required=True, help="the user whose maildrop gets the mail")
    imp.add_argument("--config", "-c", required=True, help="TOML configuration file")
    imp.set_defaults(func=cmd_import)
    exp = sub.add_parser(
        "export",
        help="write a user's maildrop to a Maildir, UIDLs kept for pobox and Dovecot",
        description="Write every message of USER's maildrop in the configured store to a "
        "Maildir, with a dovecot-uidlist that makes Dovecot and pobox answer UIDL and LIST "
        "exactly as this store does. Safe to interrupt and run again. Exit 75: try again.",
    )
    exp.add_argument("--user", "-u", required=True, help="the user whose mail is written")
    exp.add_argument("--to", dest="target", required=True, metavar="maildir:PATH")
    exp.add_argument("--config", "-c", required=True, help="TOML configuration file")
    exp.set_defaults(func=cmd_export)
    res = sub.add_parser(
        "restore",
        help="bring back messages deleted over POP3 (pop3_delete_retention), UIDLs kept",
        description="With pop3_delete_retention set, messages deleted over POP3 are kept for "
        "that long (in the hidden Maildir folder .pobox-deleted/, or with PostgreSQL in the "
        "table deleted_message). This brings them back into "
        "USER's maildrop with the UIDL and size they had (all of them, or those deleted since "
        "TIME, or those with the given UIDLs); --list shows what is kept, --purge removes "
        "what was kept longer than the retention. Run it as the mail's owner or as root. "
        "Exit 75: try again.",
    )
    res.add_argument("user", metavar="USER", help="the user whose deleted mail is restored")
    res.add_argument(
        "--since",
        metavar="TIME",
        help='only messages deleted since TIME: "2026-12-07", "2026-12-07T09:30" (UTC unless '
        'it says otherwise) or a duration ago ("2h", "3d")',
    )
    res.add_argument(
        "--uidl", action="append", default=[], metavar="UIDL", help="only this UIDL (repeatable)"
    )
    mode = res.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="list what can be restored")
    mode.add_argument("--purge", action="store_true", help="purge what is past the retention")
    res.add_argument("--config", "-c", required=True, help="TOML configuration file")
    res.set_defaults(func=cmd_restore)
    db = sub.add_parser(
        "db",
        help="the PostgreSQL schema: upgrade, status, gc",
        description='For mail_location = "postgresql". upgrade: create or migrate the schema '
        "(idempotent, safe on every deploy and from several nodes at once); status: what is "
        "applied and pending (exit 69 if the schema is not the one this pobox needs); gc: drop "
        "message bodies no message uses.",
    )
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, help_text in (
        ("upgrade", "create or migrate the schema"),
        ("status", "show the schema version and the migrations applied or pending"),
        ("gc", "drop unused message bodies"),
    ):
        p = db_sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", required=True, help="TOML configuration file")
        p.set_defaults(func=cmd_db)
    config = sub.add_parser(
        "config",
        help="check a configuration file, or print its settings",
        description="check: run the checks pobox serve runs at start-up, without binding "
        "anything; exit 0 (ok, and any warnings) or 78 with the same messages. dump: print "
        "the settings that differ from the defaults as TOML that reads back to the same "
        "configuration (like doveconf -n); --all: every key.",
    )
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="check a configuration file as serve would")
    check.add_argument("--config", "-c", required=True, help="TOML configuration file")
    check.set_defaults(func=cmd_config_check)
    dump = config_sub.add_parser("dump", help="print the settings that differ from the defaults")
    dump.add_argument("--config", "-c", required=True, help="TOML configuration file")
    dump.add_argument("--all", action="store_true", help="print every key, defaults too")
    dump.add_argument(
        "--secrets",
        "-P",
        action="store_true",
        help="print a postgresql_dsn that holds a password (hidden by default)",
    )
    dump.set_defaults(func=cmd_config_dump)
    add_fetch_parser(sub)
    add_control_parsers(sub)
    add_conformance_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pobox`` command; return its exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # a master's workers run it
    try:
        return int(args.func(args))
    except ListenError as exc:  # a port in use (71), or one this host cannot have (78)
        print(f"pobox: {exc}", file=sys.stderr)
        return EX_OSERR if exc.in_use else EX_CONFIG
    except ConfigError as exc:
        print(f"pobox: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except PoboxError as exc:
        print(f"pobox: {exc}", file=sys.stderr)
        return EX_DATAERR
    except OSError as exc:
        print(f"pobox: {exc}", file=sys.stderr)
        return EX_OSERR
