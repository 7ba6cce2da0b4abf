"""The control socket: ``pobox who`` and ``pobox kick`` ask the running server over it.

A Unix stream socket (``control_socket``), made by the process that holds the session
registry: the single server process (``workers = 1``), or the master (``workers`` > 1), which
answers for all its workers.  With ``shared_state = postgresql`` the registry lists and kicks
the sessions of every node of the cluster.

Protocol (version 1)
--------------------
One request per connection, one JSON object on one line (at most :data:`MAX_REQUEST`
octets, ``\\n``-terminated), one JSON line back, then the server closes::

    {"v": 1, "op": "who"}
    {"v": 1, "ok": true, "node": "mx1", "sessions": [{"id": ..., "user": ..., "node": ...,
     "rip": ..., "since": 1765108534.2, "tls": true, "mechanism": "PLAIN", "bytes": 1234}]}

    {"v": 1, "op": "kick", "target": "alice"}
    {"v": 1, "ok": true, "asked": 2, "ended": 2}

    {"v": 1, "ok": false, "error": "..."}

``bytes`` is the octets of mail (RETR and TOP) a session has sent; ``null`` for a session of
another node (only each node counts its own; the shared registry carries no counters, which
would cost a write per RETR).  With workers it is as of each worker's last heartbeat.
``kick`` matches ``target`` as a session id and as a user name; ``asked`` is how many
sessions the registry marked to end, ``ended`` how many were gone within
:func:`kick_wait` (a session of another node ends at that node's next heartbeat; one of this
process, or of a worker of this master, at once).

Who may ask
-----------
The socket is made mode 0600 (0660 when ``group`` is set), owned by the service user
(``user``) when started as root; on top of that each peer's ``SO_PEERCRED`` uid must be root,
this process's own, or the service user's: anyone else gets one error line and the
connection is closed (and a log line).  A client gets :data:`REQUEST_TIMEOUT` seconds to send
its request and as long to read the answer; at most :data:`MAX_CLIENTS` are served at once:
a stuck client costs a coroutine, never the event loop.

May import: the standard library, :mod:`pobox.config`, :mod:`pobox.errors`,
:mod:`pobox.state` and :mod:`pobox.server._cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from pobox.config import Config
from pobox.errors import ConfigError
from pobox.state.base import SessionEntry, SessionRegistry, StateUnavailable

__all__ = [
    "MAX_CLIENTS",
    "MAX_REQUEST",
    "PROTOCOL_VERSION",
    "REQUEST_TIMEOUT",
    "ControlServer",
    "SessionControl",
    "bind_control_socket",
    "control_socket_path",
    "kick_wait",
]

logger = logging.getLogger("pobox.server.control")

#: The version of the line protocol; a request of another version gets an error.
PROTOCOL_VERSION: Final = 1
#: The longest request line: a kick names one user or session (user names are at most 255
#: octets in the passwd-file and the RFC 1939 argument limit), with room to spare.
MAX_REQUEST: Final = 4096
#: Seconds a client may take to send its request, and again to read the answer.
REQUEST_TIMEOUT: Final = 5.0
#: Control connections served at once; more get an error line at once.
MAX_CLIENTS: Final = 16
#: How soon a kick looks again whether the sessions it marked are gone: doubling from the
#: first to the last (a few queries per kick, even against PostgreSQL).
_KICK_POLL: Final = 0.05
_KICK_POLL_MAX: Final = 0.4

_PEERCRED: Final = struct.Struct("3i")


def control_socket_path(config: Config, *, euid: int | None = None) -> Path | None:
    """Return where the control socket is (``None``: there is none), ``auto`` resolved.

    ``auto`` is ``$RUNTIME_DIRECTORY/control`` when systemd set that variable
    (``RuntimeDirectory=pobox`` of contrib/systemd: ``/run/pobox``, so a server run as
    ``vmail`` and ``pobox who`` run by root agree), else ``/run/pobox/control`` for root
    (``euid`` 0), else ``$XDG_RUNTIME_DIR/pobox/control``, and none when that is unset.
    """
    value = config.control_socket
    if value == "off":
        return None
    if value != "auto":
        return Path(value)
    systemd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if systemd.startswith("/"):
        return Path(systemd) / "control"
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/run/pobox/control")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    return Path(runtime) / "pobox" / "control" if runtime.startswith("/") else None


def kick_wait(config: Config) -> float:
    """Seconds a kick waits for the sessions it marked to end: three heartbeats, 2 s at least.

    The owner of a session sees a kick at its next heartbeat (``shared_state_heartbeat``).
    """
    return max(2.0, 3 * config.shared_state_heartbeat)


def bind_control_socket(
    path: Path, *, uid: int | None, gid: int | None, group: bool
) -> socket.socket:
    """Bind and listen on the control socket at ``path``; chown it to ``uid``/``gid`` if given.

    A socket file left by a server that is gone is replaced; one a live server answers on is
    not.  The directory is made (mode 0755) if missing, its parent must exist.

    Raises:
        ConfigError: the path is not a socket, or a server answers on it, or it cannot be made.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"control_socket: cannot make {path.parent}: {exc.strerror}"
            ) from None
    else:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"control_socket: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)  # a live server with a full backlog: EAGAIN, not a wait
        try:
            probe.connect(str(path))
        except BlockingIOError:
            probe.close()
            raise ConfigError(f"control_socket: a server already answers on {path}") from None
        except OSError:
            path.unlink(missing_ok=True)  # left by a server that is gone
        else:
            raise ConfigError(f"control_socket: a server already answers on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Before anyone may connect: the peer check below holds whatever the umask was.
        os.chmod(path, 0o660 if group else 0o600)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"control_socket: cannot listen on {path}: {exc.strerror}") from None
    return sock


def _row(entry: SessionEntry, octets: dict[str, int]) -> dict[str, object]:
    row: dict[str, object] = dataclasses.asdict(entry)
    row["bytes"] = octets.get(entry.id)
    return row


class SessionControl:
    """What ``who`` and ``kick`` do, over the registry of the process that hosts the socket.

    Args:
        registry: the session registry (every node's sessions with PostgreSQL).
        octets: the octets sent by each session this node serves (this process or its workers).
        end_here: ends at once those of the given sessions this process (or a worker of
            this master) serves; the others see the kick at their node's next heartbeat.
        wait: seconds a kick waits for the sessions it marked to be gone.
        normalise: turns a kick's target into the user name logins register (the
            userdb's form of it), for the match by user.
    """

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        octets: Callable[[], dict[str, int]],
        end_here: Callable[[set[str]], int] | None = None,
        wait: float = 2.0,
        normalise: Callable[[str], str] = str,
    ) -> None:
        self.registry = registry
        self._normalise = normalise
        self._octets = octets
        self._end_here = end_here
        self.wait = wait

    async def who(self) -> list[dict[str, object]]:
        """Return every live session, oldest first, with the octets this node knows."""
        octets = self._octets()
        return [_row(entry, octets) for entry in await self.registry.sessions()]

    async def kick(self, target: str) -> tuple[int, int]:
        """Kick the session ``target`` or the sessions of the user ``target``.

        Returns:
            how many sessions were asked to end, and how many were gone within :attr:`wait`.
        """
        user = self._normalise(target)
        found = await self.registry.sessions()
        of_user = {e.id for e in found if e.user == user}
        matched = of_user | {e.id for e in found if e.id == target}
        asked = await self.registry.kick(user=user) if of_user else 0
        if target not in of_user:
            asked += await self.registry.kick(session_id=target)
        if self._end_here is not None:
            self._end_here(matched)
        users = {e.user for e in found if e.id in matched}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        pause = _KICK_POLL
        while True:  # only the users concerned: an indexed look-up each, not every session
            live = {e.id for u in users for e in await self.registry.sessions(u)}
            left = matched & live
            if not left or loop.time() >= deadline:
                return asked, len(matched - left)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _KICK_POLL_MAX)


class ControlServer:
    """Serve :class:`SessionControl` on a bound control socket (see the module docstring).

    Args:
        sock: the listening socket (:func:`bind_control_socket`).
        path: its file, removed at :meth:`aclose` when that is allowed.
        control: what answers the requests.
        allowed: the peer uids answered besides root and this process's own (read at each
            connection: a server that switched user after binding answers its new uid).
        node: this node's name, in the ``who`` answer.
    """

    def __init__(
        self,
        sock: socket.socket,
        path: Path,
        control: SessionControl,
        *,
        allowed: frozenset[int] = frozenset(),
        node: str = "",
    ) -> None:
        self._sock = sock
        self.path = path
        self.control = control
        self.allowed = allowed
        self.node = node
        self._server: asyncio.Server | None = None
        self._clients = 0
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Begin answering."""
        self._server = await asyncio.start_unix_server(
            self._handle, sock=self._sock, limit=MAX_REQUEST
        )

    async def aclose(self) -> None:
        """Stop answering, end the connections under way, and remove the socket file."""
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):  # not after a switch to a user who may not
            self.path.unlink()

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> tuple[bool, int, int]:
        sock = writer.get_extra_info("socket")
        pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        return uid == 0 or uid == os.geteuid() or uid in self.allowed, uid, pid

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._clients += 1
        try:
            answer = await self._answer(reader, writer)
            writer.write(json.dumps({"v": PROTOCOL_VERSION, **answer}).encode() + b"\n")
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass  # a client that went away or does not read: nothing more to tell it
        finally:
            self._clients -= 1
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, object]:
        allowed, uid, pid = self._peer_allowed(writer)
        if not allowed:
            logger.warning(
                "master: control socket: refused uid %d (pid %d): only root and the "
                "server's own user may ask",
                uid,
                pid,
            )
            return {"ok": False, "error": f"permission denied for uid {uid}"}
        if self._clients > MAX_CLIENTS:
            return {"ok": False, "error": "too many control connections, try again"}
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            return {"ok": False, "error": f"no request within {REQUEST_TIMEOUT:g} s"}
        except asyncio.LimitOverrunError:
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} octets"}
        except asyncio.IncompleteReadError:
            return {"ok": False, "error": "request not terminated by a newline"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "request is not a JSON object"}
        if request.get("v") != PROTOCOL_VERSION:
            return {"ok": False, "error": f"protocol version must be {PROTOCOL_VERSION}"}
        try:
            return await self._run(request, uid)
        except StateUnavailable as exc:
            return {"ok": False, "error": f"the session registry is unavailable: {exc}"}

    async def _run(self, request: dict[str, Any], uid: int) -> dict[str, object]:
        op = request.get("op")
        if op == "who":
            return {"ok": True, "node": self.node, "sessions": await self.control.who()}
        if op == "kick":
            target = request.get("target")
            if not isinstance(target, str) or not target or len(target) > 255:
                return {"ok": False, "error": "kick needs a target: a user or a session id"}
            asked, ended = await self.control.kick(target)
            logger.info(
                "master: control socket: kick %s by uid %d: %d sessions asked to end, %d ended",
                target,
                uid,
                asked,
                ended,
            )
            return {"ok": True, "asked": asked, "ended": ended}
        return {"ok": False, "error": "unknown operation (who, kick)"}
