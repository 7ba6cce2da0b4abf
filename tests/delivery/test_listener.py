"""The delivery listeners (:mod:`pobox.delivery._listener`): connection caps per protocol."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from tests.delivery.helpers import connect, reply, running_pobox
from tests.integration.wire import Wire

GREETING = b"220 mx.pobox.test"
PER_ADDRESS = b"421 4.7.0 mx.pobox.test Error: too many connections from 127.0.0.1\r\n"
IN_ALL = b"421 4.3.2 mx.pobox.test Error: too many connections, try again later\r\n"


async def _first_words(wire: Wire) -> bytes:
    """Return what the server says first, and everything after it if that is a refusal."""
    said = await reply(wire)
    if said.startswith(b"421"):
        said += await wire.read_all()
    return said


class TestPerAddressCap:
    """``*_max_connections_per_ip``."""

    async def test_smtp_connections_over_the_cap_are_refused(self, tmp_path: Path) -> None:
        """300 connections from one address: the cap's worth are served, the rest get 421."""
        async with running_pobox(tmp_path, smtp_max_connections_per_ip=5) as pobox:
            wires = [await connect(pobox.smtp) for _ in range(300)]
            said = [await _first_words(wire) for wire in wires]
        assert 5 == sum(1 for words in said if words.startswith(GREETING))
        assert [PER_ADDRESS] * 295 == [words for words in said if not words.startswith(GREETING)]

    async def test_slot_comes_back_when_a_connection_closes(self, tmp_path: Path) -> None:
        """After one of the connections at the cap closes, a new one is served."""
        async with running_pobox(tmp_path, lmtp_max_connections_per_ip=1) as pobox:
            first = await connect(pobox.lmtp)
            assert (await reply(first)).startswith(GREETING)
            refused = await _first_words(await connect(pobox.lmtp))
            assert b"221 Bye\r\n" == await first.command(b"QUIT")
            await first.read_all()
            for _ in range(100):  # the server may see the close a moment after the client
                served = await _first_words(await connect(pobox.lmtp))
                if served != PER_ADDRESS:
                    break
                await asyncio.sleep(0.01)
        assert PER_ADDRESS == refused
        assert served.startswith(GREETING)

    async def test_other_addresses_are_served(self, tmp_path: Path) -> None:
        """The cap is per address: another loopback address still gets in."""
        async with running_pobox(tmp_path, smtp_max_connections_per_ip=1) as pobox:
            held = await connect(pobox.smtp)
            await reply(held)
            refused = await _first_words(await connect(pobox.smtp))
            other = await reply(await connect(pobox.smtp, source="127.0.0.2"))
        assert PER_ADDRESS == refused
        assert other.startswith(GREETING)


class TestTotalCap:
    """``*_max_connections``."""

    async def test_over_the_total_from_many_addresses(self, tmp_path: Path) -> None:
        """Connections from several addresses beyond the total get 421 4.3.2."""
        async with running_pobox(tmp_path, smtp_max_connections=3) as pobox:
            wires = [await connect(pobox.smtp, source=f"127.0.0.{n}") for n in range(2, 8)]
            said = [await _first_words(wire) for wire in wires]
        assert 3 == sum(1 for words in said if words.startswith(GREETING))
        assert [IN_ALL] * 3 == [words for words in said if not words.startswith(GREETING)]

    async def test_unix_socket_connections_count(self, tmp_path: Path) -> None:
        """The MTA's LMTP socket counts toward lmtp_max_connections, TCP or not."""
        path = tmp_path / "lmtp.sock"
        async with running_pobox(
            tmp_path / "root",
            lmtp_listen=["127.0.0.1:0", f"unix:{path}"],
            lmtp_max_connections=2,
        ) as pobox:
            by_socket = [await connect(path) for _ in range(2)]
            served = [await reply(wire) for wire in by_socket]
            over_tcp = await _first_words(await connect(pobox.lmtp))
            over_socket = await _first_words(await connect(path))
        assert all(words.startswith(GREETING) for words in served)
        assert (IN_ALL, IN_ALL) == (over_tcp, over_socket)

    async def test_protocols_have_their_own_caps(self, tmp_path: Path) -> None:
        """SMTP at its cap leaves LMTP alone: the MTA still delivers."""
        async with running_pobox(tmp_path, smtp_max_connections=1) as pobox:
            held = await connect(pobox.smtp)
            await reply(held)
            refused = await _first_words(await connect(pobox.smtp, source="127.0.0.2"))
            host, port = pobox.lmtp

            def deliver() -> dict[str, tuple[int, bytes]]:
                with smtplib.LMTP(host, port) as client:
                    return client.sendmail("s@example.org", ["alice"], b"Subject: x\r\n\r\nx\r\n")

            refused_by_lmtp = await asyncio.to_thread(deliver)
        assert IN_ALL == refused
        assert {} == refused_by_lmtp
