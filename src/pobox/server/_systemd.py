"""systemd integration without libsystemd: readiness, watchdog and socket activation.

**Notifications** (``sd_notify(3)``, ``Type=notify``): systemd passes ``$NOTIFY_SOCKET``, an
``AF_UNIX`` datagram socket (a path, or an abstract name written with a leading ``@``); a
service sends it newline-separated ``KEY=VALUE`` assignments.  pobox sends

- ``READY=1`` (with ``MAINPID=`` and a ``STATUS=`` line) once every listener is bound and
  privileges are dropped: a unit ordered ``After=pobox.service`` finds the ports answering;
- ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` from the event loop itself, when
  ``WatchdogSec=`` is set and ``$WATCHDOG_PID`` (if given) is this process: a loop that
  hangs stops the pings and systemd restarts the service;
- ``RELOADING=1`` (with ``MONOTONIC_USEC=``) then ``READY=1`` around ``SIGHUP``;
- ``STOPPING=1`` when ``SIGTERM`` starts the drain, and ``STATUS=`` lines saying how it goes.

With ``workers`` the master, the process systemd started, is the one that notifies; the
variables are removed from the environment once read, so workers and the storage helper
never see them.  Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.  A
notification that cannot be sent is logged once and never stops the server.

**Socket activation** (``sd_listen_fds(3)``, ``pobox.socket``): systemd binds the ports and
passes them as descriptors 3, 4, ... with ``$LISTEN_FDS`` and ``$LISTEN_PID``;
:func:`adopt_listen_fds` matches each to the listener of the configuration with the same
address (``listen``, ``ssl_listen``, ``lmtp_listen``, ``smtp_listen``) and records it in
:mod:`pobox.server._inherit`, where the listeners (and a master's workers) take it instead
of binding.  A passed socket that no listener names is an error: pobox would otherwise
leave a port the admin meant to serve unanswered.

May import: the standard library, :mod:`pobox.config`, :mod:`pobox.errors` and
:mod:`pobox.server._inherit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Final

from pobox.config import Config, parse_listen
from pobox.errors import ConfigError
from pobox.server import _inherit

__all__ = ["SD_LISTEN_FDS_START", "Notifier", "adopt_listen_fds", "listen_fds"]

logger = logging.getLogger("pobox.server")

#: sd_listen_fds(3): the first passed descriptor.
SD_LISTEN_FDS_START: Final = 3

_NOTIFY_VARIABLES: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_LISTEN_VARIABLES: Final = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _status_text(text: str) -> str:
    """Return ``text`` fit for one ``STATUS=`` assignment (no newline can start another)."""
    return "".join(c if c.isprintable() else " " for c in text)


class Notifier:
    """Sends sd_notify messages to systemd; does nothing when not started by it."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        """Notify ``address`` (``@name``: abstract); ping every ``watchdog_usec`` / 2."""
        self.address: str | bytes | None = None
        self.watchdog_interval = watchdog_usec / 1_000_000 if watchdog_usec > 0 else 0.0
        self._sock: socket.socket | None = None
        self._failed = False
        if address:
            self.address = ("\0" + address[1:]) if address.startswith("@") else address
            # Opened now, before the privilege drop: the socket (not the path) is what counts.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` and the watchdog variables, and remove them.

        ``$WATCHDOG_USEC`` counts only if ``$WATCHDOG_PID`` is unset or this process.
        """
        env = os.environ if environ is None else environ
        values = {name: env.pop(name, "") for name in _NOTIFY_VARIABLES}
        usec = 0
        pid_ok = not values["WATCHDOG_PID"] or values["WATCHDOG_PID"] == str(os.getpid())
        with contextlib.suppress(ValueError):
            usec = int(values["WATCHDOG_USEC"]) if pid_ok else 0
        return cls(values["NOTIFY_SOCKET"] or None, usec)

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening."""
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; return whether it was sent."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._failed:
                logger.warning("master: cannot notify systemd at %r: %s", self.address, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> None:
        """Say the service is up (READY=1), with its pid and a status line."""
        self.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={_status_text(status)}")

    def reloading(self) -> None:
        """Say a reload (SIGHUP) has begun; :meth:`ready` ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self, status: str) -> None:
        """Say the service is stopping (the drain has begun)."""
        self.send("STOPPING=1", f"STATUS={_status_text(status)}")

    def status(self, status: str) -> None:
        """Send a status line (``systemctl status`` shows it)."""
        self.send(f"STATUS={_status_text(status)}")

    async def watchdog(self, status: Callable[[], str] | None = None) -> None:
        """Ping the watchdog from the event loop every half interval, until cancelled.

        Args:
            status: called at each ping for a fresh ``STATUS=`` line (sessions open, ...).
        """
        if not self.watchdog_interval or self._sock is None:
            return
        while True:
            if status is None:
                self.send("WATCHDOG=1")
            else:
                self.send("WATCHDOG=1", f"STATUS={_status_text(status())}")
            await asyncio.sleep(self.watchdog_interval / 2)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Return the sockets systemd passed this process, and remove the variables.

    ``$LISTEN_PID`` must be this process (a child that inherited the variables takes
    nothing).  The descriptors are made close-on-exec.

    Raises:
        ConfigError: a descriptor ``$LISTEN_FDS`` counts is not a socket.
    """
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, "") for name in _LISTEN_VARIABLES}
    if not values["LISTEN_FDS"] or values["LISTEN_PID"] != str(os.getpid()):
        return []
    try:
        count = int(values["LISTEN_FDS"])
    except ValueError:
        return []
    sockets: list[socket.socket] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            for done in sockets:
                done.close()
            msg = f"socket activation: LISTEN_FDS={count}, but descriptor {fd} is no socket ({exc})"
            raise ConfigError(msg) from None
        sockets.append(sock)
    return sockets


def _same_address(sock: socket.socket, host: str, port: int) -> bool:
    """Whether ``sock`` is bound to ``host:port`` (addresses compared as addresses)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    bound_host, bound_port = sock.getsockname()[:2]
    if bound_port != port:
        return False
    try:
        return ipaddress.ip_address(bound_host) == ipaddress.ip_address(host)
    except ValueError:  # a host name in the config: what it resolves to
        with contextlib.suppress(OSError):
            infos = socket.getaddrinfo(host, port, sock.family, socket.SOCK_STREAM)
            return any(
                ipaddress.ip_address(info[4][0]) == ipaddress.ip_address(bound_host)
                for info in infos
            )
        return False


def _wanted(config: Config) -> list[tuple[str, str, str, int]]:
    """Return ``(key, unix path or "", host, port)`` of every listener of ``config``."""
    out: list[tuple[str, str, str, int]] = []
    for kind, listens in (("pop3", config.listen), ("pop3s", config.ssl_listen)):
        for listen in listens:
            text = f"{listen.host}:{listen.port}"
            out.append((_inherit.key(kind, text), "", listen.host, listen.port))
    for kind, texts in (("lmtp", config.lmtp_listen), ("smtp", config.smtp_listen)):
        for text in texts:
            if text.startswith("unix:"):
                out.append((_inherit.key(kind, text), text[len("unix:") :], "", 0))
            else:
                listen = parse_listen(text, key=f"{kind}_listen")
                out.append((_inherit.key(kind, text), "", listen.host, listen.port))
    return out


def _listener_of(sock: socket.socket, wanted: list[tuple[str, str, str, int]]) -> str | None:
    """Return the key of the listener ``sock`` is bound as, or ``None``."""
    if sock.type != socket.SOCK_STREAM:
        return None
    for name, path, host, port in wanted:
        if path:
            if sock.family == socket.AF_UNIX and sock.getsockname() == path:
                return name
        elif _same_address(sock, host, port):
            return name
    return None


def adopt_listen_fds(config: Config, sockets: list[socket.socket]) -> list[str]:
    """Record each passed socket as the listener of ``config`` on its address.

    Returns:
        The keys of the listeners that were passed (the others are bound as usual).

    Raises:
        ConfigError: a socket matches no listener of the configuration.
    """
    adopted: dict[str, list[socket.socket]] = {}
    wanted = _wanted(config)
    for sock in sockets:
        name = _listener_of(sock, wanted)
        if name is None:
            where = sock.getsockname()
            for other in sockets:
                other.close()
            msg = (
                f"socket activation: systemd passed a socket on {where!r} that no listen, "
                "ssl_listen, lmtp_listen or smtp_listen names; make pobox.socket's "
                "ListenStream= lines and the configuration agree"
            )
            raise ConfigError(msg)
        adopted.setdefault(name, []).append(sock)
    for name, socks in adopted.items():
        _inherit.inherit(name, socks)
    return sorted(adopted)
