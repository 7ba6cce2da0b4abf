"""The health endpoint (``health_listen``): answers, draining, and what strangers may send.

Real sockets on loopback; the stores' probes here are plain coroutines (the PostgreSQL ones
are in tests/integration/test_health_drain.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from pobox.config import Listen
from pobox.server._health import MAX_CONNECTIONS, MAX_REQUEST, HealthServer, Probe


class Switch:
    """A store that is up or down, and counts how often it was asked."""

    def __init__(self) -> None:
        self.up = True
        self.asked = 0

    async def ping(self) -> None:
        self.asked += 1
        if not self.up:
            msg = "connection refused\nsecond line"
            raise OSError(msg)


async def ask(server: HealthServer, request: bytes) -> bytes:
    """Send ``request`` to ``server``; return everything it answers before closing.

    A connection reset before any answer counts as no answer (``b""``).
    """
    host, port = server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()


def waiting(health: HealthServer) -> int:
    """How many connections wait for their request."""
    return sum(len(held) for held in health._waiting.values())


async def until(condition: Callable[[], bool]) -> None:
    """Wait (10 s at most) until ``condition()`` holds: the server has taken the connections."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def switch() -> Switch:
    return Switch()


@pytest.fixture
async def health(switch: Switch) -> AsyncIterator[HealthServer]:
    probes: list[tuple[str, Probe]] = [("mail store", switch.ping)]
    server = HealthServer(Listen("127.0.0.1", 0), probes)
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


GET = b"GET /health HTTP/1.0\r\n\r\n"


class TestAnswers:
    """GET /health says whether the node can serve."""

    async def test_healthy(self, health: HealthServer) -> None:
        """A node whose stores answer gets 200 ok, closed after the answer."""
        answer = await ask(health, GET)
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nok\n")

    async def test_haproxy_http11_check(self, health: HealthServer) -> None:
        """HAProxy's HTTP/1.1 check with headers and a query string gets 200 too."""
        request = b"GET /health?node=a HTTP/1.1\r\nHost: pobox\r\nUser-Agent: HAProxy\r\n\r\n"
        assert (await ask(health, request)).startswith(b"HTTP/1.0 200 ")

    async def test_head(self, health: HealthServer) -> None:
        """HEAD gets the status line and headers, no body."""
        answer = await ask(health, b"HEAD /health HTTP/1.0\r\n\r\n")
        assert (b"HTTP/1.0 200 OK", b"") == (answer.split(b"\r\n")[0], answer.split(b"\r\n\r\n")[1])

    async def test_store_down(
        self, health: HealthServer, switch: Switch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A store that fails gives 503 with its name; why (the driver's words) only in the log."""
        switch.up = False
        answer = await ask(health, GET)
        assert answer.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
        assert answer.endswith(b"\r\n\r\nmail store unreachable\n")
        assert "health check failing: mail store unreachable: connection refused" in caplog.text

    async def test_store_back(self, health: HealthServer, switch: Switch) -> None:
        """Once the store answers again, so does the check (after the cached result ages)."""
        switch.up = False
        down = await ask(health, GET)
        switch.up = True
        answers = [down]
        async with asyncio.timeout(10):
            while not answers[-1].startswith(b"HTTP/1.0 200"):
                await asyncio.sleep(0.1)
                answers.append(await ask(health, GET))
        assert down.startswith(b"HTTP/1.0 503")

    async def test_store_hangs(self, health: HealthServer, switch: Switch) -> None:
        """A store that does not answer gives 503 within the check timeout, not a hang."""

        async def hang() -> None:
            await asyncio.sleep(3600)

        health._probes = [("userdb", hang)]
        answer = await ask(health, GET)
        assert answer.endswith(b"\r\n\r\nuserdb did not answer within 1.5 s\n")

    async def test_results_are_shared(self, health: HealthServer, switch: Switch) -> None:
        """Twenty checks at once cost the store one probe."""
        await asyncio.gather(*(ask(health, GET) for _ in range(20)))
        assert 1 == switch.asked

    async def test_draining(self, health: HealthServer, switch: Switch) -> None:
        """A draining node answers 503 draining, without asking its stores."""
        health.drain()
        answer = await ask(health, GET)
        assert (True, 0) == (answer.endswith(b"\r\n\r\ndraining\n"), switch.asked)


class TestStrangers:
    """What does not look like a health check is answered briefly, and bounded."""

    @pytest.mark.parametrize(
        ("request_bytes", "status"),
        [
            (b"GET /health\r\n\r\n", b"400"),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),
            (b"GET /etc/passwd HTTP/1.0\r\n\r\n", b"404"),
            (b"POST /health HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi", b"405"),
            (b"GET /health HTTP/1.0\r\n" + b"X: " + b"a" * MAX_REQUEST + b"\r\n\r\n", b"431"),
            (b"GET /health HTTP/1.0\r\n" + b"a" * (10 * MAX_REQUEST), b"431"),
        ],
    )
    async def test_refused(self, health: HealthServer, request_bytes: bytes, status: bytes) -> None:
        """Malformed, unknown, other methods and oversized requests get 4xx, never echoed."""
        answer = await ask(health, request_bytes)
        assert status == answer[9:12]
        assert b"passwd" not in answer

    async def test_truncated(self, health: HealthServer) -> None:
        """A request cut off before its blank line gets 400."""
        host, port = health.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.0\r\n")
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.0 400 ")

    async def test_silent_client_is_dropped(self, health: HealthServer) -> None:
        """A client that sends nothing is closed after the read deadline, unanswered."""
        host, port = health.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert b"" == answer

    async def test_connection_cap(self, health: HealthServer) -> None:
        """Past the cap, with every connection's request in, a new one is closed unanswered."""

        async def hang() -> None:
            await asyncio.sleep(3600)

        health._probes = [("userdb", hang)]  # every request waits for the check (1.5 s)
        host, port = health.addresses[0]
        busy = [await asyncio.open_connection(host, port) for _ in range(MAX_CONNECTIONS)]
        try:
            for _, writer in busy:
                writer.write(GET)
            await until(lambda: health._open == MAX_CONNECTIONS and not health._waiting)
            over = await ask(health, GET)
        finally:
            for _, writer in busy:
                writer.close()
                with contextlib.suppress(ConnectionResetError):
                    await writer.wait_closed()
        assert b"" == over

    async def test_idle_connections_cannot_crowd_out_the_check(self, health: HealthServer) -> None:
        """A stranger holding every connection idle does not stop the check: the oldest goes."""
        host, port = health.addresses[0]
        idle = [await asyncio.open_connection(host, port) for _ in range(MAX_CONNECTIONS)]
        try:
            await until(lambda: waiting(health) == MAX_CONNECTIONS)
            answer = await ask(health, GET)
            try:
                first = await asyncio.wait_for(idle[0][0].read(), 10)
            except ConnectionResetError:
                first = b""
        finally:
            for _, writer in idle:
                writer.close()
                with contextlib.suppress(ConnectionResetError):
                    await writer.wait_closed()
        assert (b"HTTP/1.0 200 OK", b"") == (answer.split(b"\r\n")[0], first)

    async def test_a_flood_evicts_its_own(self, health: HealthServer) -> None:
        """A check still to send its request survives a flood from another address."""
        host, port = health.addresses[0]
        check = await asyncio.open_connection(host, port)
        await until(lambda: health._open == 1)
        flood = [
            await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
            for _ in range(2 * MAX_CONNECTIONS)
        ]
        try:
            await until(lambda: health._open == MAX_CONNECTIONS)
            check[1].write(GET)
            answer = await asyncio.wait_for(check[0].read(), 10)
        finally:
            for _, writer in [check, *flood]:
                writer.close()
                with contextlib.suppress(ConnectionResetError):
                    await writer.wait_closed()
        assert b"HTTP/1.0 200 OK" == answer.split(b"\r\n")[0]
