"""Several serving processes on one node (``workers``): the master and its workers.

With ``workers = 1`` ``pobox serve`` is one process, as it always was.  With more, the process
started is the **master**: it binds every listener (POP3, POP3S, LMTP, SMTP) once, as root if
need be (:func:`bind_listeners`), and starts the workers (:class:`Supervisor`), each a
``pobox serve`` of the same configuration that inherits the listening sockets, takes them
instead of binding (:mod:`pobox.server._inherit`), then drops its privileges and reaches mail
exactly as a single process does (in mode 3 each worker starts its own storage helper: one
boundary per worker, no descriptor shared between workers; see the README).  The kernel hands
each new connection to whichever worker accepts it first.

Theory of operation
-------------------
- **Shared state.** Each worker gets one end of a Unix socketpair to the master.  With
  ``shared_state = memory`` its failure counters and session registry are the master's
  (:mod:`pobox.state.remote`), so the throttle and the per-user limits count across the
  workers; with PostgreSQL nothing changes.  The worker says on it when it serves (it is
  *ready*), and sees on it the master go away: a worker whose master died stops at once
  (sessions end without UPDATE), so its listeners and maildrop locks are freed with the
  master, SIGKILL included.
- **Signals.** SIGHUP and SIGUSR1 to the master are passed on to every worker (log reopen,
  TLS reload).  SIGTERM or SIGINT makes the master close its own copies of the listeners,
  answer 503 on the health check and pass SIGTERM on: each worker drains its own sessions
  for ``drain_timeout``; a second signal is passed on too, and every worker stops at once.
  Workers run in their own process group, so a Ctrl-C at a terminal reaches the master
  only (and is passed on once, not twice).
- **Restarts.** A worker that dies while the node serves is started again after a delay
  that doubles with each death in a row (:data:`RESTART_DELAY` up to
  :data:`RESTART_DELAY_MAX`), logged each time; one that served :data:`STABLE_AFTER`
  seconds resets the delay.  A worker that fails before it first served (a configuration
  error it found) stops the node with its exit status: restarting would fail the same way.
- **Log lines.** A worker's own lines say ``worker N:`` where a single process says
  ``master:`` (:class:`WorkerLogNames`); session lines (``pop3-login: ...``, ``pop3(user)``)
  are unchanged, so fail2ban filters match them as before.

May import: the standard library, :mod:`pobox.config`, :mod:`pobox.errors`, the other
modules of :mod:`pobox.server` and :mod:`pobox.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pobox.binding import binding
from pobox.config import Config, Listen, parse_listen
from pobox.errors import ConfigError
from pobox.server import _inherit
from pobox.server._listener import BACKLOG, _listening_sockets

__all__ = [
    "RESTART_DELAY",
    "RESTART_DELAY_MAX",
    "STABLE_AFTER",
    "Listeners",
    "Supervisor",
    "WorkerLogNames",
    "WorkerSpec",
    "bind_listeners",
    "worker_count",
]

logger = logging.getLogger("pobox.server.workers")

#: Seconds before a worker that died is started again, the first time.
RESTART_DELAY: Final = 0.5
#: The longest delay, however often it died in a row.
RESTART_DELAY_MAX: Final = 30.0
#: Seconds of serving after which a worker's death counts as the first in a row again.
STABLE_AFTER: Final = 30.0

_UNIX_PREFIX: Final = "unix:"


def worker_count(config: Config) -> int:
    """Return how many workers ``config`` asks for (``0``: one per CPU this process may use)."""
    if config.workers:
        return config.workers
    return max(1, len(os.sched_getaffinity(0)))


@dataclasses.dataclass
class Listeners:
    """The sockets the master bound, by :func:`~pobox.server._inherit.key`."""

    sockets: dict[str, list[socket.socket]] = dataclasses.field(default_factory=dict)
    #: Unix socket files to remove when the master stops.
    paths: list[Path] = dataclasses.field(default_factory=list)

    def addresses(self, kinds: tuple[str, ...] = ("pop3", "pop3s")) -> list[str]:
        """Return ``host:port`` of every socket of ``kinds`` (ports as bound)."""
        out = []
        for name, sockets in self.sockets.items():
            if name.split(" ", 1)[0] in kinds:
                for sock in sockets:
                    host, port = sock.getsockname()[:2]
                    out.append(f"{host}:{port}")
        return out

    def close(self) -> None:
        """Close the master's copies: the ports are free once every worker closed its own."""
        for sockets in self.sockets.values():
            for sock in sockets:
                sock.close()

    def remove_paths(self) -> None:
        """Remove the Unix socket files the master made."""
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.unlink()
        self.paths.clear()


def _unix_listener(path: Path) -> socket.socket:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            msg = f"unix socket path {path} exists and is not a socket"
            raise ConfigError(msg)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


#: The configuration key of each kind of listener, for the errors of binding it.
_KEY_OF_KIND: Final = {
    "pop3": "listen",
    "pop3s": "ssl_listen",
    "lmtp": "lmtp_listen",
    "smtp": "smtp_listen",
}


def bind_listeners(config: Config) -> Listeners:
    """Bind every listener of ``config`` once, for the workers to share.

    Raises:
        ConfigError: a delivery address is malformed, or a socket path is not a socket.
        ListenError: an address cannot be bound (in use, not permitted), naming its key.
    """
    out = Listeners()
    wanted: list[tuple[str, str, Listen | Path]] = []
    wanted += [("pop3", f"{lis.host}:{lis.port}", lis) for lis in config.listen]
    wanted += [("pop3s", f"{lis.host}:{lis.port}", lis) for lis in config.ssl_listen]
    for kind, texts in (("lmtp", config.lmtp_listen), ("smtp", config.smtp_listen)):
        for text in texts:
            if text.startswith(_UNIX_PREFIX):
                wanted.append((kind, text, Path(text[len(_UNIX_PREFIX) :])))
            else:
                wanted.append((kind, text, parse_listen(text, key=f"{kind}_listen")))
    try:
        for kind, text, where in wanted:
            passed = _inherit.take(_inherit.key(kind, text))
            if passed is not None:  # systemd's socket activation: bound (and removed) by it
                out.sockets[_inherit.key(kind, text)] = passed
                continue
            with binding(_KEY_OF_KIND[kind], text):
                if isinstance(where, Path):
                    out.sockets[_inherit.key(kind, text)] = [_unix_listener(where)]
                    out.paths.append(where)
                else:
                    out.sockets[_inherit.key(kind, text)] = _listening_sockets(where)
    except BaseException:
        out.close()
        out.remove_paths()
        raise
    return out


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told at start (its ``--worker`` argument).

    Attributes:
        index: the worker's number, from 1, for its log lines.
        state_fd: its end of the socketpair to the master.
        listeners: the inherited listening descriptors by listener key.
    """

    index: int
    state_fd: int
    listeners: dict[str, list[int]]

    def encode(self) -> str:
        """Return the argument that :meth:`decode` reads."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        """Read a ``--worker`` argument.

        Raises:
            ConfigError: it is not one the master writes.
        """
        try:
            data = json.loads(text)
            return cls(
                int(data["index"]),
                int(data["state_fd"]),
                {str(k): [int(fd) for fd in v] for k, v in data["listeners"].items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"--worker: malformed ({exc})") from None

    def adopt(self) -> socket.socket:
        """Record the inherited listeners (:mod:`~pobox.server._inherit`); return the state end."""
        for name, fds in self.listeners.items():
            _inherit.inherit(name, [socket.socket(fileno=fd) for fd in fds])
        return socket.socket(fileno=self.state_fd)


class WorkerLogNames(logging.Filter):
    """Say ``worker N:`` where a single process's lines say ``master:``."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self._prefix = f"worker {index}: "

    def filter(self, record: logging.LogRecord) -> bool:
        """Rename the line; keep every record."""
        if isinstance(record.msg, str) and record.msg.startswith("master: "):
            record.msg = self._prefix + record.msg[len("master: ") :]
        return True


@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    ready: bool = False
    started_at: float = 0.0
    deaths: int = 0
    restart: asyncio.TimerHandle | None = None


class Supervisor:
    """Start ``count`` workers and keep them running until :meth:`stop` (in the master).

    Args:
        command: the worker's command line, to which ``--worker SPEC`` is added.
        listeners: the sockets the workers inherit.
        count: how many workers.
        attach: serves one worker's end of its socketpair (the master's state service).
        env: the workers' environment (``None``: this process's).
        on_exit: called with the pid of each worker that exited, once it is reaped.
    """

    def __init__(
        self,
        command: list[str],
        listeners: Listeners,
        count: int,
        attach: Callable[[socket.socket], object],
        *,
        env: dict[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._command = command
        self._env = env
        self._on_exit = on_exit
        self._listeners = listeners
        self._attach = attach
        self._workers = [_Worker(i + 1) for i in range(count)]
        self._stopping = False
        self._all_ready = asyncio.Event()
        self._all_gone = asyncio.Event()
        #: Set to a worker's exit status when one failed before it ever served.
        self.failed: int | None = None

    @property
    def serving(self) -> int:
        """How many workers are alive and have said they serve."""
        return sum(1 for w in self._workers if w.proc is not None and w.ready)

    @property
    def pids(self) -> list[int]:
        """The process ids of the live workers, in worker order."""
        return [w.proc.pid for w in self._workers if w.proc is not None]

    def start(self) -> None:
        """Start every worker."""
        for worker in self._workers:
            self._spawn(worker)

    async def wait_ready(self) -> bool:
        """Wait until every worker serves; False if one failed first (see :attr:`failed`)."""
        await self._all_ready.wait()
        return self.failed is None

    def ready(self, index: int, pid: int) -> None:
        """Note that worker ``index`` serves (its message on the socketpair)."""
        for worker in self._workers:
            if worker.index == index and worker.proc is not None and worker.proc.pid == pid:
                worker.ready = True
                worker.started_at = asyncio.get_running_loop().time()
                logger.info("master: worker %d (pid %d) serving", index, pid)
        if all(w.ready for w in self._workers):
            self._all_ready.set()

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        master_end, worker_end = socket.socketpair()
        fds = {name: [s.fileno() for s in socks] for name, socks in self._listeners.sockets.items()}
        spec = WorkerSpec(worker.index, worker_end.fileno(), fds)
        passed = [worker_end.fileno(), *(fd for group in fds.values() for fd in group)]
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                [*self._command, "--worker", spec.encode()],
                stdin=subprocess.DEVNULL,
                pass_fds=passed,
                env=self._env,
                process_group=0,  # a terminal's Ctrl-C reaches the master only
            )
        except OSError as exc:
            master_end.close()
            worker_end.close()
            logger.error("master: cannot start worker %d: %s", worker.index, exc)
            self._schedule_restart(worker)
            return
        worker_end.close()
        worker.proc, worker.ready = proc, False
        worker.pidfd = os.pidfd_open(proc.pid)
        asyncio.get_running_loop().add_reader(worker.pidfd, self._reap, worker)
        self._attach(master_end)
        logger.info("master: worker %d started (pid %d)", worker.index, proc.pid)

    def _reap(self, worker: _Worker) -> None:
        proc = worker.proc
        assert proc is not None
        status = proc.poll()
        if status is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        worker.pidfd, worker.proc = -1, None
        was_ready, worker.ready = worker.ready, False
        if self._on_exit is not None:
            self._on_exit(proc.pid)
        if self._stopping or self.failed is not None:
            # Stopping, or going down after a worker failed at start: another worker that
            # fails then (it cannot serve either) is not started again.
            logger.info(
                "master: worker %d (pid %d) exited (status %d)", worker.index, proc.pid, status
            )
        elif not was_ready and not self._all_ready.is_set():
            logger.error(
                "master: worker %d (pid %d) failed at start (status %d); stopping",
                worker.index,
                proc.pid,
                status,
            )
            self.failed = status or 1
            self._all_ready.set()
        else:
            if loop.time() - worker.started_at >= STABLE_AFTER:
                worker.deaths = 0
            worker.deaths += 1
            delay = self._schedule_restart(worker)
            logger.error(
                "master: worker %d (pid %d) died (status %d); starting it again in %g s",
                worker.index,
                proc.pid,
                status,
                delay,
            )
        if all(w.proc is None for w in self._workers) and (self._stopping or self.failed):
            self._all_gone.set()

    def _schedule_restart(self, worker: _Worker) -> float:
        delay = min(RESTART_DELAY_MAX, RESTART_DELAY * float(2 ** max(0, worker.deaths - 1)))
        worker.restart = asyncio.get_running_loop().call_later(delay, self._spawn, worker)
        return delay

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every live worker."""
        for worker in self._workers:
            if worker.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Start no worker again, and send ``sig`` to every live one."""
        self._stopping = True
        for worker in self._workers:
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
        self.send(sig)
        if all(w.proc is None for w in self._workers):
            self._all_gone.set()

    async def wait_gone(self) -> None:
        """Wait until every worker has exited (after :meth:`stop`)."""
        await self._all_gone.wait()
