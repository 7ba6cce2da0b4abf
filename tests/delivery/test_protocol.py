"""The delivery protocol (:mod:`pobox.delivery._protocol`): DATA into a spool, and deadlines."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.delivery.helpers import (
    REPLY_DEADLINE,
    connect,
    maildir_files,
    open_files_in,
    reply,
    retrieve_all,
    running_pobox,
    split_received,
    start_data,
)
from tests.integration.wire import Wire

#: A line of message text, CRLF included.
LINE = b"x" * 70 + b"\r\n"
#: 2 MiB of lines: far over the spool's 256 KiB kept in memory.
LARGE = LINE * (2 * 1024 * 1024 // len(LINE))
TIMEOUT_REPLY = b"421 4.4.2 mx.pobox.test Error: timeout exceeded\r\n"


async def _until(predicate_text: str, check: object) -> None:
    """Wait until ``check()`` is true; fail with ``predicate_text`` after the deadline."""
    deadline = time.monotonic() + REPLY_DEADLINE
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, predicate_text
        await asyncio.sleep(0.02)


async def _trickle(wire: Wire, line: bytes, every: float, most: int) -> tuple[int, bytes]:
    """Send ``line`` every ``every`` seconds until the server says something (or ``most``).

    Returns:
        how many lines were sent, and what the server said (then it closed).
    """
    for sent in range(most):
        try:
            await wire.send(line)
        except ConnectionError:
            return sent, await wire.read_all(REPLY_DEADLINE)
        try:
            said = await wire.line(every)
        except TimeoutError:
            continue
        return sent + 1, said + await wire.read_all(REPLY_DEADLINE)
    return most, b""


class TestDataIntoSpool:
    """DATA is written to a spool file in mail_temp_dir as it arrives."""

    async def test_large_message_is_on_disk_while_it_arrives(self, tmp_path: Path) -> None:
        """Before the end of DATA the message is in a nameless file in mail_temp_dir."""
        spool = tmp_path / "spool"
        spool.mkdir()
        async with running_pobox(tmp_path / "root", mail_temp_dir=str(spool)) as pobox:
            wire = await connect(pobox.smtp)
            await start_data(wire, b"alice@mx.pobox.test")
            await wire.send(b"Subject: big\r\n\r\n" + LARGE)
            await _until("no spool file grew", lambda: sum(open_files_in(spool)) >= len(LARGE) // 2)
            await wire.send(b".\r\n")
            done = await reply(wire)
            after = open_files_in(spool)
            messages = await asyncio.to_thread(
                retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice"
            )
        assert b"250 2.0.0 Ok: delivered\r\n" == done
        assert [] == after
        assert [b"Subject: big\r\n\r\n" + LARGE] == [
            split_received(message)[1].split(b"\r\n", 2)[2] for message in messages
        ]
        assert [] == list(spool.iterdir())

    async def test_disconnect_mid_data_stores_nothing(self, tmp_path: Path) -> None:
        """A client gone mid-DATA leaves no message, no file in tmp/, and its spool freed."""
        spool = tmp_path / "spool"
        spool.mkdir()
        async with running_pobox(tmp_path / "root", mail_temp_dir=str(spool)) as pobox:
            wire = await connect(pobox.lmtp)
            await start_data(wire, lmtp=True)
            await wire.send(LARGE)
            await _until("no spool file", lambda: sum(open_files_in(spool)) >= len(LARGE) // 2)
            await wire.close()
            await _until("the spool is still open", lambda: not open_files_in(spool))
            left = maildir_files(pobox.pop3.root)
            messages = await asyncio.to_thread(
                retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice"
            )
        assert ([], []) == (left, messages)

    async def test_spool_failure_is_a_temporary_failure_per_recipient(self, tmp_path: Path) -> None:
        """A spool that cannot be written gets 451 4.3.0 for each LMTP recipient; the
        connection goes on."""
        spool = tmp_path / "spool"
        spool.mkdir()
        async with running_pobox(
            tmp_path / "root", ("alice", "bob"), mail_temp_dir=str(spool)
        ) as pobox:
            spool.rmdir()  # after the configuration checked it: the spool cannot be made
            wire = await connect(pobox.lmtp)
            assert (await reply(wire)).startswith(b"220 ")
            await wire.send(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice>\r\nRCPT TO:<bob>\r\n")
            for _ in range(4):
                await reply(wire)
            await wire.send(b"DATA\r\n")
            assert (await reply(wire)).startswith(b"354")
            await wire.send(LARGE + b".\r\n")
            answers = [await reply(wire), await reply(wire)]
            noop = await wire.command(b"NOOP")
            left = maildir_files(pobox.pop3.root) + maildir_files(pobox.pop3.root, "bob")
        assert [b"451 4.3.0 Temporary failure, try again later\r\n"] * 2 == answers
        assert b"250 OK\r\n" == noop
        assert [] == left

    async def test_over_long_line_is_refused_and_the_session_goes_on(self, tmp_path: Path) -> None:
        """A line over 64 KiB gets 500 5.5.2 after DATA; nothing is stored; RSET works."""
        async with running_pobox(tmp_path) as pobox:
            wire = await connect(pobox.smtp)
            await start_data(wire, b"alice@mx.pobox.test")
            await wire.send(b"a\r\n" + b"y" * 200_000 + b"\r\n.\r\n")
            refused = await reply(wire)
            rset = await wire.command(b"RSET")
            left = maildir_files(pobox.pop3.root)
        assert (b"500 5.5.2 Line too long\r\n", b"250 OK\r\n") == (refused, rset)
        assert [] == left


class TestDeadlines:
    """delivery_timeout and delivery_min_data_rate close idle and slow clients with 421."""

    async def test_silent_client_is_closed(self, tmp_path: Path) -> None:
        """No command within delivery_timeout: 421 4.4.2, then the connection is closed."""
        async with running_pobox(tmp_path, delivery_timeout=0.5) as pobox:
            wire = await connect(pobox.smtp)
            greeting = await reply(wire)
            rest = await wire.read_all(REPLY_DEADLINE)
        assert greeting.startswith(b"220 mx.pobox.test")
        assert TIMEOUT_REPLY == rest

    async def test_commands_that_deliver_nothing_cannot_hold_a_slot(self, tmp_path: Path) -> None:
        """NOOP well within delivery_timeout, again and again: closed after twice the timeout."""
        async with running_pobox(tmp_path, delivery_timeout=1) as pobox:
            wire = await connect(pobox.lmtp)
            await reply(wire)
            answers = []
            for _ in range(200):  # 50 s of NOOPs at most
                await asyncio.sleep(0.25)
                try:
                    answers.append(await wire.command(b"NOOP"))
                except ConnectionError:
                    break
                if answers[-1] != b"250 OK\r\n":
                    break
            rest = await wire.read_all(REPLY_DEADLINE)
        assert TIMEOUT_REPLY == answers[-1] + rest
        assert 200 > len(answers) > 1

    async def test_stalled_data_is_closed(self, tmp_path: Path) -> None:
        """A line of DATA that never ends: 421 4.4.2 after delivery_timeout, nothing stored."""
        async with running_pobox(tmp_path, delivery_timeout=0.5) as pobox:
            wire = await connect(pobox.smtp)
            await start_data(wire, b"alice@mx.pobox.test")
            await wire.send(b"Subject: never ends\r\n\r\nhalf a li")
            rest = await wire.read_all(REPLY_DEADLINE)
            left = maildir_files(pobox.pop3.root)
        assert (TIMEOUT_REPLY, []) == (rest, left)

    async def test_slow_writer_is_closed(self, tmp_path: Path) -> None:
        """Lines in time but under delivery_min_data_rate: 421 4.4.2, nothing stored."""
        async with running_pobox(tmp_path, delivery_timeout=1, delivery_min_data_rate=100) as pobox:
            wire = await connect(pobox.smtp)
            await start_data(wire, b"alice@mx.pobox.test")
            # 3 octets every 0.2 s: 15 octets a second, each line well within the timeout.
            sent, said = await _trickle(wire, b"x\r\n", 0.2, 200)
            left = maildir_files(pobox.pop3.root)
        assert (TIMEOUT_REPLY, []) == (said, left)
        assert sent < 200

    async def test_writer_above_the_rate_is_served(self, tmp_path: Path) -> None:
        """A client keeping above delivery_min_data_rate may take many timeouts for DATA."""
        async with running_pobox(
            tmp_path, delivery_timeout=0.5, delivery_min_data_rate=100
        ) as pobox:
            wire = await connect(pobox.smtp)
            await start_data(wire, b"alice@mx.pobox.test")
            # 202 octets every 0.2 s (about 1,000 a second) for 3 s: six delivery_timeouts.
            sent, said = await _trickle(wire, b"z" * 200 + b"\r\n", 0.2, 15)
            await wire.send(b".\r\n")
            done = await reply(wire)
            messages = await asyncio.to_thread(
                retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice"
            )
        assert (15, b"") == (sent, said)
        assert b"250 2.0.0 Ok: delivered\r\n" == done
        assert 1 == len(messages)

    async def test_no_credit_beyond_max_message_size(self, tmp_path: Path) -> None:
        """Octets past max_message_size earn no time: a fast endless DATA is closed too."""
        async with running_pobox(
            tmp_path,
            delivery_timeout=1,
            delivery_min_data_rate=1000,
            max_message_size=2000,
        ) as pobox:
            wire = await connect(pobox.smtp)
            await start_data(wire, b"alice@mx.pobox.test")
            # 3,000 octets a second, three times the rate, but all but 2,000 over the limit.
            sent, said = await _trickle(wire, b"w" * 298 + b"\r\n", 0.1, 300)
            left = maildir_files(pobox.pop3.root)
        assert (TIMEOUT_REPLY, []) == (said, left)
        assert sent < 300
