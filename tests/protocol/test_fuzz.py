"""A quick deterministic fuzz of ServerConnection, as h11's afl-server.py does (§3.14).

Each input is fed whole, one byte at a time and in random pieces: the events and output must
be the same, nothing may raise, and the framer's buffer must stay bounded.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pobox.protocol import ConnectionClosed, ServerConnection

from .helpers import Msg, Shell, drive, logged_in, pieces

SEED = 1939
INPUTS = 2500

SNAPSHOT = [Msg(25, "u1"), Msg(7, "u2"), Msg(100, "u3")]

TOKENS = [
    b"USER alice",
    b"user bob",
    b"PASS secret",
    b"PASS  wrong password",
    b"QUIT",
    b"CAPA",
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"UIDL",
    b"UIDL 3",
    b"RETR 1",
    b"retr 2",
    b"TOP 1 0",
    b"TOP 3 99999999999999999999999",
    b"DELE 2",
    b"DELE 2",
    b"RSET",
    b"NOOP",
    b"RETR 0",
    b"RETR -1",
    b"LIST 1 2",
    b"STLS",
    b"AUTH PLAIN",
    b"XYZZY",
    b" ",
    b"",
    b"\x00",
    b"\x7f",
    b"\xff\xfe",
]
ENDINGS = [b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\r\n"]


def make_input(rng: random.Random) -> bytes:
    """A random mix of commands, junk, long lines and stray CR/LF/NUL."""
    parts: list[bytes] = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.6:
            parts.append(rng.choice(TOKENS) + rng.choice(ENDINGS))
        elif kind < 0.8:
            parts.append(rng.randbytes(rng.randint(0, 16)))
        elif kind < 0.9:
            parts.append(rng.choice([b"\r", b"\n", b"\x00", b"\r\n", b" "]))
        else:
            parts.append(b"A" * rng.choice([253, 254, 255, 256, 600]) + rng.choice(ENDINGS))
    return b"".join(parts)


def new_connection(state: str) -> ServerConnection:
    """A connection in AUTHORIZATION or TRANSACTION."""
    if state == "TRANSACTION":
        return logged_in(SNAPSHOT)
    return ServerConnection()


class TestFuzz:
    """Random input against the core."""

    @pytest.mark.parametrize("state", ["AUTHORIZATION", "TRANSACTION"])
    def test_split_invariance(self, state):
        """Whole, byte by byte, or in random pieces: same result, no exception, small buffer."""
        rng = random.Random(f"{SEED}-{state}")
        shell = Shell(messages=SNAPSHOT, chunk=5)
        reasons: Counter[str] = Counter()

        def bounded(conn: ServerConnection) -> None:
            assert len(conn._framer._buf) <= 255

        for _ in range(INPUTS):
            data = make_input(rng)
            cut_at = [rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 6))]

            whole = drive(new_connection(state), [data], shell, on_idle=bounded)
            one_by_one = drive(
                new_connection(state), [data[i : i + 1] for i in range(len(data))], shell
            )
            split = drive(new_connection(state), pieces(data, cut_at), shell, on_idle=bounded)

            assert whole == one_by_one, data
            assert whole == split, (data, cut_at)
            last = whole[0][-1]
            assert isinstance(last, ConnectionClosed)
            reasons[last.reason] += 1

        # The generator reaches every way a session can end.
        assert {"eof", "quit", "too-many-bad-commands"} == set(reasons)

    @pytest.mark.parametrize("state", ["AUTHORIZATION", "TRANSACTION"])
    def test_without_eof(self, state):
        """Input that stops without EOF leaves the session open or closed, never broken."""
        rng = random.Random(f"{SEED}-open-{state}")
        shell = Shell(messages=SNAPSHOT)

        for _ in range(INPUTS // 3):
            data = make_input(rng)
            whole = drive(new_connection(state), [data], shell, eof=False)
            one_by_one = drive(
                new_connection(state), [data[i : i + 1] for i in range(len(data))], shell, eof=False
            )

            assert whole == one_by_one, data
