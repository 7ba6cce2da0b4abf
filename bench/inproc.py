"""pobox's CPU per command, in process: a real session with no network and no client.

    python bench/inproc.py [--rounds N] [--retrs N] [--messages N] [--size OCTETS]

Drives the real transport driver (:class:`pobox.server._driver.Pop3Protocol`), the real
session and core, and the real Maildir store over maildirs in a temporary folder (messages
as bench/run.py makes them: real mail's shape, 2% of body lines starting with ``.``; one
user's stored with LF, one's with CRLF), with the configuration bench/run.py gives pobox
(maildrop locked for the session, info log to a file).  The transport is a stand-in that
keeps what the driver writes and hands the driver's callbacks what a client would send; each
answer is checked (every RETR's octets against the message as delivered, in wire form), so a
broken path cannot look fast.

Prints, per line end, CPU microseconds (``time.process_time``: the whole process, worker
threads included) per RETR (a logged-in session's ``--retrs`` RETRs of the messages in turn)
and per whole session (greeting, USER, PASS, STAT, LIST, UIDL, a RETR of each message, QUIT:
bench/loadgen.py's ``session``), the best of ``--rounds`` rounds.  ``--json`` prints the
figures as JSON instead (tests/bench/test_inproc.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).resolve().parent)]

import uvloop  # noqa: E402
from floor import _wire  # noqa: E402
from run import _message, _write_maildir, to_crlf  # noqa: E402

from pobox.auth.passwdfile import add_user  # noqa: E402
from pobox.cli import build_context  # noqa: E402
from pobox.config import Config, Listen, build_config  # noqa: E402
from pobox.log import setup_logging  # noqa: E402
from pobox.server import Pop3Server  # noqa: E402
from pobox.server._driver import Pop3Protocol  # noqa: E402

PASSWORD = "pw"
LINE_ENDS = ("lf", "crlf")


class CheckError(Exception):
    """An answer was not what the session must send."""


class Transport:
    """A stand-in for the connection's transport: keeps what is written, closes on request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.protocol: asyncio.Protocol | None = None
        self.written = bytearray()
        self.writes = 0
        self._closing = False
        #: Set when something is written (what a client awaiting an answer waits for).
        self.arrived: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.written += data
        self.writes += 1
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 110)}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            assert self.protocol is not None
            self._loop.call_soon(self.protocol.connection_lost, None)

    abort = close


@dataclasses.dataclass
class Client:
    """Sends commands to the driver's callbacks and takes each answer whole."""

    transport: Transport
    driver: Pop3Protocol

    async def _answer(self, multiline: bool) -> bytes:
        end = b"\r\n.\r\n" if multiline else b"\r\n"
        written = self.transport.written
        while not (written.endswith(end) and (not multiline or written.startswith(b"+OK"))):
            if written.startswith(b"-ERR"):
                raise CheckError(f"answered {bytes(written)!r}")
            self.transport.arrived = asyncio.get_running_loop().create_future()
            await self.transport.arrived
        answer = bytes(written)
        written.clear()
        return answer

    async def command(self, line: bytes, *, multiline: bool = False) -> bytes:
        """Send ``line`` (CRLF added); return its whole answer (``-ERR``: CheckError)."""
        self.driver.data_received(line + b"\r\n")
        written = self.transport.written
        if written.endswith(b"\r\n.\r\n" if multiline else b"\r\n") and written[:3] == b"+OK":
            answer = bytes(written)  # answered in the callback: the common case
            written.clear()
            return answer
        return await self._answer(multiline)


@dataclasses.dataclass
class World:
    """The temporary server: configuration, the listener (the driver's door), the mail."""

    server: Pop3Server
    #: user → each message's RETR answer, whole.
    answers: dict[str, list[bytes]]


def build_world(root: Path, messages: int, size: int) -> World:
    """Write the passwd-file and one maildir per line end; return the server (not started)."""
    rng = random.Random(13)
    mail = [_message(rng, number, size) for number in range(1, messages + 1)]
    passwd = root / "passwd"
    answers: dict[str, list[bytes]] = {}
    for line_end in LINE_ENDS:
        user = f"user-{line_end}"
        add_user(passwd, user, PASSWORD.encode(), scheme="PLAIN")
        stored = [to_crlf(m) for m in mail] if line_end == "crlf" else mail
        _write_maildir(root / "mail" / user, stored)
        answers[user] = [b"+OK %d octets\r\n" % len(to_crlf(m)) + _wire(m) for m in stored]
    base = Config(listen=(Listen("127.0.0.1", 0),), first_valid_uid=0, first_valid_gid=0)
    settings = {
        "mail_location": f"maildir:{root}/mail/%u",
        "passwd_file": str(passwd),
        "pop3_lock_session": True,
        "log_level": "info",
        "log_path": str(root / "pobox.log"),
    }
    config = build_config(settings, base=base)
    return World(Pop3Server(build_context(config)), answers)


async def connect(world: World) -> Client:
    """Open a session: the driver, its transport, the greeting."""
    loop = asyncio.get_running_loop()
    transport = Transport(loop)
    driver = Pop3Protocol(world.server)
    transport.protocol = driver
    driver.connection_made(transport)  # type: ignore[arg-type]
    client = Client(transport, driver)
    await client._answer(multiline=False)
    return client


async def login(world: World, user: str) -> Client:
    client = await connect(world)
    await client.command(b"USER " + user.encode())
    await client.command(b"PASS " + PASSWORD.encode())
    return client


async def logout(client: Client) -> None:
    await client.command(b"QUIT")
    await client.driver.done


def check_retrs(answers: list[bytes], got: list[bytes], numbers: list[int]) -> None:
    for number, answer in zip(numbers, got, strict=True):
        if answer != answers[number - 1]:
            raise CheckError(f"RETR {number}: {len(answer)} octets, not its message's")


async def session(world: World, user: str) -> None:
    """bench/loadgen.py's session: login, STAT, LIST, UIDL, RETR each message, QUIT."""
    answers = world.answers[user]
    client = await login(world, user)
    stat = await client.command(b"STAT")
    if int(stat.split()[1]) != len(answers):
        raise CheckError(f"STAT: {stat!r}")
    await client.command(b"LIST", multiline=True)
    await client.command(b"UIDL", multiline=True)
    numbers = list(range(1, len(answers) + 1))
    got = [await client.command(b"RETR %d" % n, multiline=True) for n in numbers]
    await logout(client)
    check_retrs(answers, got, numbers)


async def retrs(world: World, user: str, count: int) -> float:
    """Return the CPU seconds of ``count`` RETRs in one logged-in session (checked after)."""
    answers = world.answers[user]
    client = await login(world, user)
    numbers = [i % len(answers) + 1 for i in range(count)]
    lines = [b"RETR %d" % n for n in numbers]
    command = client.command
    start = time.process_time()
    got = [await command(line, multiline=True) for line in lines]
    spent = time.process_time() - start
    await logout(client)
    check_retrs(answers, got, numbers)
    return spent


async def best(rounds: int, measure: Callable[[], Any]) -> float:
    times = []
    for _ in range(rounds):
        times.append(await measure())
    return min(times)


async def measure_all(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="pobox-inproc-") as tmp:
        world = build_world(Path(tmp), args.messages, args.size)
        handler = setup_logging(world.server.ctx.config)  # lines written as the server does
        results: dict[str, dict[str, float]] = {}
        for line_end in LINE_ENDS:
            user = f"user-{line_end}"
            await session(world, user)  # warm: caches, the index, first imports

            async def one_session(user: str = user) -> float:
                start = time.process_time()
                await session(world, user)
                return time.process_time() - start

            per_session = await best(args.rounds, one_session)
            per_retr = await best(args.rounds, lambda u=user: retrs(world, u, args.retrs))
            results[line_end] = {
                "retr_us": per_retr / args.retrs * 1e6,
                "session_us": per_session * 1e6,
                "retrs_checked": args.retrs * args.rounds + args.messages * (args.rounds + 1),
            }
        handler.close()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--retrs", type=int, default=500, help="RETRs per round for µs/RETR")
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--size", type=int, default=4000, help="octets per message, about")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = uvloop.run(measure_all(args))
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.messages} messages of ~{args.size} octets; best of {args.rounds} rounds")
    for line_end, figures in results.items():
        print(
            f"{line_end:>4}-stored: {figures['retr_us']:7.1f} µs CPU per RETR, "
            f"{figures['session_us']:8.0f} µs CPU per session "
            f"({figures['retrs_checked']} RETR answers checked)"
        )


if __name__ == "__main__":
    main()
