"""``pobox who`` and ``pobox kick``: the client side of the control socket.

The server side, and the line protocol, are in :mod:`pobox.server._control`.  Exit statuses
(sysexits.h): 0 done (``kick``: at least one session matched), 1 ``kick`` matched nothing,
69 no server answers on the socket (or its registry is unavailable), 77 the server refused
this user, 78 a configuration error.

Everything printed comes from the registry: user names come from the userdb, addresses from
clients (PROXY headers), so control characters are shown escaped and, on a terminal, nothing
is read as rich markup.

May import: the standard library, rich, :mod:`pobox.config` and :mod:`pobox.server._control`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from typing import Any, Final

from pobox.config import Config, load_config
from pobox.errors import PoboxError
from pobox.server._control import PROTOCOL_VERSION, REQUEST_TIMEOUT, control_socket_path, kick_wait

__all__ = ["add_control_parsers", "ask", "cmd_kick", "cmd_who", "format_sessions"]

#: sysexits.h.
EX_UNAVAILABLE: Final = 69
EX_NOPERM: Final = 77
#: The most octets of answer read: a who of 100,000 sessions is some 25 MB.
MAX_ANSWER: Final = 64 * 1024 * 1024

_COLUMNS: Final = ("USER", "ADDRESS", "SINCE", "TLS", "MECHANISM", "BYTES", "NODE", "SESSION")


class ControlError(PoboxError):
    """The control socket did not give an answer; ``status`` is the exit status to use."""

    def __init__(self, message: str, status: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.status = status


def _clean(value: object) -> str:
    """Return ``value`` as text with control characters escaped (a terminal acts on them)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def ask(config: Config, request: dict[str, object], *, timeout: float) -> dict[str, Any]:
    """Send one request on the configured control socket; return the answer (``ok`` true).

    Raises:
        ControlError: no server answers, or it refused or failed the request.
    """
    path = control_socket_path(config)
    if path is None and config.control_socket == "off":
        raise ControlError("no control socket: control_socket is off in this configuration", 78)
    if path is None:
        raise ControlError(
            "no control socket: control_socket is auto, this user is not root and "
            "XDG_RUNTIME_DIR is unset; set control_socket to the server's",
            78,
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except PermissionError:
            raise ControlError(
                f"permission denied on the control socket {path} (control_socket): run it "
                "as root or as the server's user",
                EX_NOPERM,
            ) from None
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise ControlError(
                f"no server answers on the control socket {path} (control_socket): is "
                "pobox serve running with this configuration?"
            ) from None
        # A server that refuses this user answers without reading: read that answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps({"v": PROTOCOL_VERSION, **request}).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n") and len(data) <= MAX_ANSWER:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ControlError(f"the server did not answer on {path} within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"no valid answer on the control socket {path}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"no valid answer on the control socket {path}")
    if not answer.get("ok"):
        error = _clean(answer.get("error", "the server failed the request"))
        status = EX_NOPERM if error.startswith("permission denied") else EX_UNAVAILABLE
        raise ControlError(f"the server says: {error}", status)
    return answer


def _cells(session: dict[str, Any]) -> list[str]:
    octets = session.get("bytes")
    return [
        _clean(session.get("user", "")),
        _clean(session.get("rip", "")),
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(session.get("since", 0)))),
        "yes" if session.get("tls") else "no",
        _clean(session.get("mechanism", "")),
        "-" if octets is None else str(int(octets)),
        _clean(session.get("node", "")),
        _clean(session.get("id", "")),
    ]


def format_sessions(sessions: list[dict[str, Any]]) -> str:
    """Return the plain-text table of ``sessions`` (what ``who`` prints off a terminal)."""
    rows = [list(_COLUMNS), *(_cells(s) for s in sessions)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    return "\n".join(lines)


def _footer(sessions: list[dict[str, Any]]) -> str:
    note = f"{len(sessions)} session{'' if len(sessions) == 1 else 's'}"
    if any(s.get("bytes") is None for s in sessions):
        note += "; BYTES '-': a session of another node (each node counts only its own)"
    return note


def cmd_who(args: argparse.Namespace) -> int:
    """List the live sessions (every node's with PostgreSQL shared state)."""
    config = load_config(args.config)
    try:
        answer = ask(config, {"op": "who"}, timeout=REQUEST_TIMEOUT * 2)
    except ControlError as exc:
        print(f"pobox who: {exc}", file=sys.stderr)
        return exc.status
    sessions = [s for s in answer.get("sessions", []) if isinstance(s, dict)]
    if args.json:
        print(json.dumps({"node": answer.get("node"), "sessions": sessions}, indent=2))
        return 0
    if sys.stdout.isatty():
        from rich.console import Console  # noqa: PLC0415 - only on a terminal
        from rich.table import Table  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        table = Table(*_COLUMNS, caption=_footer(sessions))
        for session in sessions:
            table.add_row(*(Text(cell) for cell in _cells(session)))
        Console().print(table)
        return 0
    print(format_sessions(sessions))
    print(_footer(sessions))
    return 0


def cmd_kick(args: argparse.Namespace) -> int:
    """End the sessions of a user, or one session, without UPDATE; say how many ended."""
    config = load_config(args.config)
    wait = kick_wait(config)
    try:
        answer = ask(
            config, {"op": "kick", "target": args.target}, timeout=wait + REQUEST_TIMEOUT * 2
        )
    except ControlError as exc:
        print(f"pobox kick: {exc}", file=sys.stderr)
        return exc.status
    asked, ended = int(answer.get("asked", 0)), int(answer.get("ended", 0))
    line = f"{ended} session{'' if ended == 1 else 's'} ended"
    if asked > ended:
        line += f" ({asked - ended} more asked to end: at their node's next heartbeat)"
    print(line)
    return 0 if asked else 1


def add_control_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``who`` and ``kick`` to the ``pobox`` subcommands."""
    who = sub.add_parser(
        "who",
        help="list the logged-in sessions (all nodes with PostgreSQL shared state)",
        description="List the sessions logged in to the running server, asked over its "
        "control socket (control_socket): user, address, since, TLS, mechanism, octets of "
        "mail sent, node, session id. Exit 69 if no server answers.",
    )
    who.add_argument("--config", "-c", required=True, help="the server's TOML configuration")
    who.add_argument("--json", action="store_true", help="print JSON, not a table")
    who.set_defaults(func=cmd_who)
    kick = sub.add_parser(
        "kick",
        help="end a user's sessions, or one session, without UPDATE",
        description="End every session of USER, or the session SESSION (its id in the logs "
        "and in pobox who), on any node, without UPDATE: messages marked deleted stay. Prints "
        "how many sessions ended; exit 0 if any matched, 1 if none, 69 if no server answers.",
    )
    kick.add_argument("target", metavar="USER|SESSION")
    kick.add_argument("--config", "-c", required=True, help="the server's TOML configuration")
    kick.set_defaults(func=cmd_kick)
