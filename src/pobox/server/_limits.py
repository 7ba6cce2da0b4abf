"""Process limits: connection caps, and the open-file limit raised at start-up to fit them.

:class:`ConnectionLimits` counts open connections in all and per client address against two
caps; the POP3 listener and the LMTP/SMTP listeners (:mod:`pobox.delivery`) each keep one.
Addresses are grouped as the login throttle groups them (an IPv6 address counts for its /64,
:func:`~._throttle.address_group`), so one attacker's /64 does not get a cap per address.

The open-file limit: raise ``RLIMIT_NOFILE`` at start-up to what the configuration needs.

One pobox process holds every session, so its descriptor limit caps how many sessions it can
hold: a session keeps its socket open, and a second descriptor while RETR or TOP streams a
message file (the maildrop's session lock is a lock file that is not kept open). The usual
soft limit (1024) would stop a default server (``max_connections = 1000``) at about 500 sessions,
with ``Too many open files`` (EMFILE) failures instead of ``-ERR [SYS/TEMP]``.

So ``pobox serve`` does at start-up what Dovecot's processes do (``restrict_fd_limit()`` with
``client_limit`` times the worst case per connection, plus 16 and the listeners): it computes
the need from ``max_connections`` and the delivery listeners' caps (or takes
``max_open_files``), raises the soft limit towards
it, and, while still root (before the privilege drop), the hard limit too, up to the kernel's
ceiling ``/proc/sys/fs/nr_open``. If that is still not enough it logs one warning with the
numbers and the fix (``LimitNOFILE=`` in the systemd unit), like Dovecot's master
("fd limit (ulimit -n) is lower than required under max. load").

May import: the standard library, :mod:`pobox.config` and :mod:`._throttle`.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pobox.config import Config
from pobox.server._throttle import address_group

__all__ = [
    "IN_ALL",
    "ConnectionLimits",
    "OpenFileLimit",
    "descriptors_needed",
    "plan_limit",
    "raise_open_file_limit",
]

logger = logging.getLogger(__name__)

#: Descriptors beside the sessions: standard streams, the event loop's epoll and wake-up
#: pipes, listeners (POP3, POP3S, LMTP, SMTP), the log file, the passwd-file and index files
#: being read, a delivery's temporary file. Dovecot's login processes keep 16 plus one per
#: listener; pobox is one process doing the work of several Dovecot services.
RESERVE: Final = 64

#: Per session: the client socket, and a message file while RETR/TOP streams it.
PER_SESSION: Final = 2

#: What :meth:`ConnectionLimits.admit` says when the total cap is reached.
IN_ALL: Final = "in all"

#: Per LMTP/SMTP connection: the client socket, the spool file of a large message, and the
#: message file being written into a maildir.
PER_DELIVERY: Final = 3

#: Where Linux keeps the ceiling of any process's descriptor limit.
NR_OPEN_PATH: Final = Path("/proc/sys/fs/nr_open")


def descriptors_needed(config: Config) -> int:
    """Return the open-file limit ``config`` needs: ``max_open_files``, or computed.

    The computed figure is :data:`RESERVE` plus ``max_connections`` times the descriptors of
    one session (:data:`PER_SESSION`), plus, for each delivery protocol that listens, its
    ``*_max_connections`` times :data:`PER_DELIVERY`.
    """
    if config.max_open_files:
        return config.max_open_files
    delivery = 0
    if config.lmtp_listen:
        delivery += config.lmtp_max_connections
    if config.smtp_listen:
        delivery += config.smtp_max_connections
    return RESERVE + config.max_connections * PER_SESSION + delivery * PER_DELIVERY


class ConnectionLimits:
    """Open connections, in all and per client address, held under two caps.

    A listener calls :meth:`admit` for each new connection and, if it was admitted,
    :meth:`release` when it closes. Connections without an address (Unix sockets) count
    toward the total only.
    """

    def __init__(self, total: int, per_address: int) -> None:
        """Cap connections at ``total`` in all and ``per_address`` from one address."""
        self.total = total
        self.per_address = per_address
        self._open = 0
        self._by_address: Counter[str] = Counter()

    @property
    def open(self) -> int:
        """How many connections are open now."""
        return self._open

    def admit(self, address: str | None) -> str | None:
        """Count a new connection from ``address`` if the caps allow it.

        Returns:
            ``None`` when it is admitted (and counted); else why not: ``"in all"`` or
            ``"from ADDRESS"`` (``"from NETWORK/64"`` for IPv6).
        """
        if self._open >= self.total:
            return IN_ALL
        group = None if address is None else address_group(address)
        if group is not None and self._by_address[group] >= self.per_address:
            return f"from {group}"
        self._open += 1
        if group is not None:
            self._by_address[group] += 1
        return None

    def release(self, address: str | None) -> None:
        """Forget an admitted connection from ``address`` that has closed."""
        self._open -= 1
        if address is not None:
            group = address_group(address)
            self._by_address[group] -= 1
            if not self._by_address[group]:
                del self._by_address[group]


def _finite(value: int) -> int:
    """Return ``value``, with ``RLIM_INFINITY`` as the largest integer."""
    return sys.maxsize if value == resource.RLIM_INFINITY else value


def plan_limit(
    wanted: int, soft: int, hard: int, *, nr_open: int, privileged: bool
) -> tuple[int, int]:
    """Return the ``(soft, hard)`` limits to set for ``wanted`` descriptors; never lower ones.

    Args:
        wanted: the descriptors the configuration needs.
        soft: the current soft limit (``RLIM_INFINITY`` allowed).
        hard: the current hard limit (``RLIM_INFINITY`` allowed).
        nr_open: the kernel's ceiling for any limit (``/proc/sys/fs/nr_open``).
        privileged: whether the process may raise its hard limit (root: CAP_SYS_RESOURCE).
    """
    if _finite(soft) >= wanted:
        return soft, hard
    if privileged and _finite(hard) < wanted:
        hard = max(hard, min(wanted, nr_open))
    return min(wanted, _finite(hard)), hard


@dataclass(frozen=True, slots=True)
class OpenFileLimit:
    """What :func:`raise_open_file_limit` found and set."""

    #: the descriptors the configuration needs.
    wanted: int
    #: the ``(soft, hard)`` limits at start-up.
    before: tuple[int, int]
    #: the ``(soft, hard)`` limits now.
    after: tuple[int, int]

    @property
    def enough(self) -> bool:
        """Whether the soft limit now covers :attr:`wanted`."""
        return _finite(self.after[0]) >= self.wanted


def _nr_open() -> int:
    """Return the kernel's ceiling for a descriptor limit (Linux), else no ceiling."""
    try:
        return int(NR_OPEN_PATH.read_text())
    except (OSError, ValueError):
        return sys.maxsize


def raise_open_file_limit(config: Config) -> OpenFileLimit:
    """Raise this process's open-file limit to what ``config`` needs, as far as allowed.

    The soft limit rises to the need, or to the hard limit; when the process is root (call it
    before the privilege drop) the hard limit rises too, up to ``/proc/sys/fs/nr_open``. A
    root without CAP_SYS_RESOURCE (a container) keeps its hard limit. Logs what it raised, and
    one warning when the limit stays below the need.

    Returns:
        the need and the limits before and after.
    """
    wanted = descriptors_needed(config)
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    privileged = os.geteuid() == 0
    nr_open = _nr_open()
    after = plan_limit(wanted, *before, nr_open=nr_open, privileged=privileged)
    if after != before:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, after)
        except (ValueError, OSError):  # EPERM: the hard limit may not rise here
            after = plan_limit(wanted, *before, nr_open=nr_open, privileged=False)
            resource.setrlimit(resource.RLIMIT_NOFILE, after)
    result = OpenFileLimit(wanted, before, after)
    if after != before:
        logger.info(
            "master: open-file limit raised from %s (hard %s) to %s (hard %s); %d wanted",
            *_shown(before),
            *_shown(after),
            wanted,
        )
    if not result.enough:
        _warn(config, result, nr_open)
    return result


def _shown(limits: tuple[int, int]) -> tuple[str, str]:
    soft, hard = ("unlimited" if v == resource.RLIM_INFINITY else str(v) for v in limits)
    return soft, hard


def _why_not(result: OpenFileLimit, nr_open: int) -> str:
    """Say why the hard limit stayed below the need."""
    if nr_open < result.wanted and result.after[1] >= nr_open:
        return f"the kernel's fs.nr_open is {nr_open}"
    if os.geteuid() != 0:
        return "only root may raise the hard limit"
    return "root without CAP_SYS_RESOURCE, as in a container, may not raise the hard limit"


def _warn(config: Config, result: OpenFileLimit, nr_open: int) -> None:
    soft, hard = _shown(result.after)
    if config.max_open_files:
        source = f"max_open_files = {config.max_open_files} asks for"
    elif config.lmtp_listen or config.smtp_listen:
        source = (
            f"max_connections = {config.max_connections} and the LMTP/SMTP connection caps "
            f"need ({PER_SESSION} per session, {PER_DELIVERY} per delivery + {RESERVE})"
        )
    else:
        source = (
            f"max_connections = {config.max_connections} needs "
            f"({PER_SESSION} per session + {RESERVE})"
        )
    sessions = max(0, (result.after[0] - RESERVE) // PER_SESSION)
    logger.warning(
        "master: open-file limit (ulimit -n) %s (hard %s) is below the %d that %s; %s. "
        "At worst, sessions beyond about %d may fail with 'Too many open files'. Fix: "
        "LimitNOFILE=%d in pobox's systemd unit (systemctl edit pobox), or ulimit -n %d "
        "in the shell that starts it, or lower max_connections",
        soft,
        hard,
        result.wanted,
        source,
        _why_not(result, nr_open),
        sessions,
        result.wanted,
        result.wanted,
    )
