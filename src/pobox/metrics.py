"""Prometheus metrics (``metrics_listen``): what is counted, and how one process counts it.

:class:`Metrics` holds every metric pobox exports (all named ``pobox_*``; the README's table
documents each) as prometheus-client objects, with the children of every label value made
once at start, so that counting is one call on an object at hand: no label lookup, no string
formatting, no per-byte work on the command path.  Where metrics are off the server holds
``None`` instead, and each place that counts checks for it: that is all they cost then.

Labels are bounded sets fixed here (command names, mechanisms, listener kinds, results,
reason classes): nothing a client sends becomes a label value, never a user name or an
address; what is not in a set counts as ``other``.

**Several processes** (``workers`` > 1): the workers count, the master answers the scrape.
prometheus-client's multiprocess mode does the sums: each worker writes its values into
memory-mapped files of its own (named by pid) in a private directory the master makes
(:func:`make_directory`: mode 0700, owned by the user the workers become) and names to the
workers in ``PROMETHEUS_MULTIPROC_DIR`` before they start; the master reads every file at each
scrape (:func:`multiprocess_registry`).  Counters and histograms of a worker that died stay
counted (the totals never go down); its gauges are removed when the master reaps it
(:func:`worker_gone`), so the gauges (``livesum``) sum the live workers only.

**Command latency** (:class:`CommandClock`): a command's time runs from the moment the core
takes it up until the next command is taken up, or until the session waits for the client
again, so it covers the answer's work (a password check and a failed login's delay
included, a message read, UPDATE) up to the reply being handed to the transport.

May import: the standard library and prometheus-client.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
import time
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess

__all__ = [
    "COMMANDS",
    "CONTENT_TYPE",
    "MECHANISMS",
    "METRIC_NAMES",
    "MULTIPROC_ENV",
    "CommandClock",
    "Metrics",
    "make_directory",
    "multiprocess_registry",
    "remove_directory",
    "render",
    "tls_failure_class",
    "worker_gone",
]

#: The environment variable prometheus-client's multiprocess mode reads in the workers.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: The exposition format's media type: Prometheus text format 0.0.4, which every Prometheus
#: reads (pobox's names are all plain ``[a-z_]``, so the 1.0.0 format would say the same).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: POP3 commands with a label of their own (RFC 1939, 2449, 2595, 5034, 6856); others: ``other``.
COMMANDS: Final = (
    "USER",
    "PASS",
    "APOP",
    "AUTH",
    "STLS",
    "CAPA",
    "QUIT",
    "STAT",
    "LIST",
    "RETR",
    "DELE",
    "NOOP",
    "RSET",
    "TOP",
    "UIDL",
    "UTF8",
    "LANG",
    "other",
)

#: Login mechanisms with a label of their own (USER/PASS counts as ``PLAIN``, as in the log).
MECHANISMS: Final = (
    "PLAIN",
    "LOGIN",
    "APOP",
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
    "EXTERNAL",
    "OAUTHBEARER",
    "XOAUTH2",
    "other",
)

#: How a login ends: logged in, a wrong password (or unknown user), refused by the throttle
#: (``[LOGIN-DELAY]``), over the per-user connection limits (``[IN-USE]``), the maildrop
#: locked by another session (``[IN-USE]``), a backend failure (``[SYS/TEMP]``), POP3
#: disabled for the user (``nopop3``, ``[SYS/PERM]``), or too soon after the user's last
#: login (``pop3_login_delay``, ``[LOGIN-DELAY]``).
LOGIN_RESULTS: Final = (
    "ok",
    "failed",
    "throttled",
    "limit",
    "locked",
    "error",
    "disabled",
    "delay",
)

#: Login refusals counted on their own: the throttle, the connection limits, the lock, the
#: user's ``nopop3``, LOGIN-DELAY.
REFUSALS: Final = ("throttled", "limit", "locked", "disabled", "delay")

#: The listener kinds connections are counted by.
LISTENERS: Final = ("pop3", "pop3s", "lmtp", "smtp")

#: The session states counted (RFC 1939 §3).
STATES: Final = ("authorization", "transaction", "update")

#: Delivery protocols served by the server (``pobox deliver`` runs outside it: not counted).
DELIVERY_PROTOCOLS: Final = ("lmtp", "smtp")

#: How a delivery to one recipient ends: stored, or a 4xx or 5xx reply.
DELIVERY_RESULTS: Final = ("ok", "tempfail", "permfail")

#: What the storage was doing when it failed.
STORAGE_OPERATIONS: Final = ("open", "read", "delete", "deliver")

#: Where TLS starts: an implicit-TLS listener (RFC 8314) or STLS (RFC 2595).
TLS_KINDS: Final = ("pop3s", "stls")

#: Why a TLS handshake failed, by class (see :func:`tls_failure_class`).
TLS_FAILURES: Final = ("timeout", "closed", "protocol", "certificate", "other")

#: Upper bounds (seconds) of the command latency buckets: from a STAT answered in tens of
#: microseconds to a large RETR or a failed login's delay of seconds.
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Every metric family pobox exports (the README's table and the Grafana dashboard use
#: exactly these; a histogram's series add ``_bucket``, ``_sum`` and ``_count``).
METRIC_NAMES: Final = (
    "pobox_connections_total",
    "pobox_connections_open",
    "pobox_sessions",
    "pobox_logins_total",
    "pobox_login_refusals_total",
    "pobox_pop3_command_duration_seconds",
    "pobox_pop3_bytes_sent_total",
    "pobox_deliveries_total",
    "pobox_storage_errors_total",
    "pobox_tls_handshakes_total",
    "pobox_tls_handshake_failures_total",
)

_PROTOCOL_REASONS: Final = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNSUPPORTED_PROTOCOL",
        "VERSION_TOO_LOW",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_SHARED_CIPHER",
        "NO_CIPHERS_AVAILABLE",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNKNOWN_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "WRONG_SSL_VERSION",
        "INAPPROPRIATE_FALLBACK",
    }
)


def tls_failure_class(exc: BaseException | None) -> str:
    """Return the class of a failed handshake's error, one of :data:`TLS_FAILURES`.

    ``None`` means the connection closed during the handshake.
    """
    if exc is None or isinstance(exc, ssl.SSLEOFError | ConnectionError | EOFError):
        return "closed"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        if reason in _PROTOCOL_REASONS or "VERSION" in reason:
            return "protocol"
        if "CERTIFICATE" in reason or "CERT_" in reason or "UNKNOWN_CA" in reason:
            return "certificate"
        if "EOF" in reason:
            return "closed"
    return "other"


class Metrics:
    """Every metric of one serving process, with its labelled children made up front.

    Args:
        registry: where the metrics are registered (a new private one if ``None``); in a
            worker (multiprocess mode) nothing collects it: the master reads the files.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        connections = Counter(
            "pobox_connections",
            "Connections accepted, by listener kind.",
            ["listener"],
            registry=r,
        )
        self._connections = {kind: connections.labels(kind) for kind in LISTENERS}
        self._open = Gauge(
            "pobox_connections_open",
            "POP3 and POP3S connections open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        sessions = Gauge(
            "pobox_sessions",
            "POP3 sessions open now, by state (RFC 1939 section 3).",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._sessions = {state: sessions.labels(state) for state in STATES}
        logins = Counter(
            "pobox_logins",
            "POP3 logins, by mechanism and result.",
            ["mechanism", "result"],
            registry=r,
        )
        self._logins = {
            (mech, result): logins.labels(mech, result)
            for mech in MECHANISMS
            for result in LOGIN_RESULTS
        }
        refusals = Counter(
            "pobox_login_refusals",
            "Logins refused by the throttle ([LOGIN-DELAY]), the connection limits or the "
            "maildrop lock ([IN-USE]).",
            ["reason"],
            registry=r,
        )
        self._refusals = {reason: refusals.labels(reason) for reason in REFUSALS}
        commands = Histogram(
            "pobox_pop3_command_duration_seconds",
            "POP3 commands, by command, and the time each took until its reply was written.",
            ["command"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        #: The histogram child of each command name (``other`` for the rest).
        self.commands = {name: commands.labels(name) for name in COMMANDS}
        self._bytes_sent = Counter(
            "pobox_pop3_bytes_sent",
            "Bytes written to POP3 clients (before TLS).",
            registry=r,
        )
        deliveries = Counter(
            "pobox_deliveries",
            "Deliveries to one recipient, by protocol and result.",
            ["protocol", "result"],
            registry=r,
        )
        self._deliveries = {
            (proto, result): deliveries.labels(proto, result)
            for proto in DELIVERY_PROTOCOLS
            for result in DELIVERY_RESULTS
        }
        storage = Counter(
            "pobox_storage_errors",
            "Storage failures, by operation.",
            ["operation"],
            registry=r,
        )
        self._storage = {op: storage.labels(op) for op in STORAGE_OPERATIONS}
        handshakes = Counter(
            "pobox_tls_handshakes",
            "TLS handshakes, by where TLS starts and result.",
            ["listener", "result"],
            registry=r,
        )
        self._handshakes = {
            (kind, result): handshakes.labels(kind, result)
            for kind in TLS_KINDS
            for result in ("ok", "failed")
        }
        failures = Counter(
            "pobox_tls_handshake_failures",
            "Failed TLS handshakes, by where TLS starts and reason class.",
            ["listener", "reason"],
            registry=r,
        )
        self._tls_failures = {
            (kind, reason): failures.labels(kind, reason)
            for kind in TLS_KINDS
            for reason in TLS_FAILURES
        }

    # ----------------------------------------------------------------- connections

    def connected(self, listener: str) -> None:
        """Count a connection accepted on a listener of kind ``listener``."""
        self._connections[listener].inc()

    def connections_open(self, count: int) -> None:
        """Say how many POP3 connections this process has open now."""
        self._open.set(count)

    def session_state(self, old: str | None, new: str | None) -> None:
        """Move one session from state ``old`` to ``new`` (``None``: not open)."""
        if old is not None:
            self._sessions[old].dec()
        if new is not None:
            self._sessions[new].inc()

    # ----------------------------------------------------------------- logins

    def login(self, mechanism: str, result: str) -> None:
        """Count a login of ``mechanism`` that ended in ``result`` (:data:`LOGIN_RESULTS`)."""
        mech = mechanism if mechanism in MECHANISMS else "other"
        self._logins[mech, result].inc()
        if result in REFUSALS:
            self._refusals[result].inc()

    # ----------------------------------------------------------------- traffic

    def sent(self, count: int) -> None:
        """Count ``count`` bytes written to a POP3 client."""
        self._bytes_sent.inc(count)

    def clock(self) -> CommandClock:
        """Return a command clock for one session."""
        return CommandClock(self.commands)

    # ----------------------------------------------------------------- delivery, storage

    def delivery(self, protocol: str, reply: str) -> None:
        """Count a delivery to one recipient over ``protocol`` answered with ``reply``."""
        if reply.startswith("2"):
            result = "ok"
        elif reply.startswith("4"):
            result = "tempfail"
        else:
            result = "permfail"
        self._deliveries[protocol, result].inc()

    def storage_error(self, operation: str) -> None:
        """Count a storage failure during ``operation`` (:data:`STORAGE_OPERATIONS`)."""
        self._storage[operation].inc()

    # ----------------------------------------------------------------- TLS

    def tls_handshake(self, listener: str, error: BaseException | None, *, ok: bool) -> None:
        """Count a TLS handshake on ``listener`` (``pop3s``/``stls``) and its failure class."""
        if ok:
            self._handshakes[listener, "ok"].inc()
            return
        self._handshakes[listener, "failed"].inc()
        self._tls_failures[listener, tls_failure_class(error)].inc()


class CommandClock:
    """Time the commands of one session (see the module documentation).

    :meth:`begin` is what the core calls as it takes up a command; :meth:`end` is called by
    the driver when the session waits for the client, or ends.
    """

    __slots__ = ("_children", "_name", "_since")

    def __init__(self, children: dict[str, Histogram]) -> None:
        self._children = children
        self._name: str | None = None
        self._since = 0.0

    def begin(self, name: str) -> None:
        """A command ``name`` is taken up: the one before it (if any) is done."""
        now = time.perf_counter()
        if self._name is not None:
            self._children[self._name].observe(now - self._since)
        self._name = name if name in self._children else "other"
        self._since = now

    def end(self) -> None:
        """The command under way (if any) is answered."""
        if self._name is not None:
            self._children[self._name].observe(time.perf_counter() - self._since)
            self._name = None


# --------------------------------------------------------------------- exposition


def render(registry: CollectorRegistry) -> bytes:
    """Return the exposition of ``registry`` (Prometheus text format)."""
    return generate_latest(registry)


def multiprocess_registry(path: Path) -> CollectorRegistry:
    """Return a registry that sums the workers' files in ``path`` at each collection."""
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return registry


def make_directory(owner: tuple[int, int] | None = None) -> Path:
    """Make the workers' private metrics directory (mode 0700), empty; return its path.

    Args:
        owner: the ``(uid, gid)`` the workers become after binding, when that is not this
            process's user: the directory is theirs, so that they can create their files
            there (the master, root, reads them all the same).
    """
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    path = Path(tempfile.mkdtemp(prefix="pobox-metrics-", dir=base))
    if owner is not None:
        os.chown(path, owner[0], owner[1])
    return path


def remove_directory(path: Path) -> None:
    """Remove the metrics directory and the workers' files (the master's end)."""
    shutil.rmtree(path, ignore_errors=True)


def worker_gone(path: Path, pid: int) -> None:
    """Forget the gauges of the worker ``pid`` that exited (its counters stay counted)."""
    _multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
