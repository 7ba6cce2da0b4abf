"""The metrics endpoint and the counting helpers, in-process on loopback.

A stuck scraper must not stall the endpoint (nor the event loop); the failure classes of TLS
handshakes come from real handshakes; the command clock times what it is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from pobox.config import Listen
from pobox.metrics import COMMANDS, METRIC_NAMES, Metrics, tls_failure_class
from pobox.server._http import MAX_CONNECTIONS
from pobox.server._metrics import MetricsServer


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[MetricsServer, Metrics, int]]:
    metrics = Metrics()
    server = MetricsServer(Listen("127.0.0.1", 0), metrics.registry)
    await server.start()
    try:
        yield server, metrics, server.addresses[0][1]
    finally:
        await server.aclose()


async def get(port: int, request: bytes = b"GET /metrics HTTP/1.0\r\n\r\n") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def value(answer: bytes, name: str, **labels: str) -> float:
    body = answer.partition(b"\r\n\r\n")[2].decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


class TestEndpoint:
    """GET /metrics answers the registry; the rest is refused; idle clients are no stall."""

    async def test_answers_current_counts(self, endpoint: tuple[MetricsServer, Metrics, int]):
        """Each scrape shows the counts as they are when it arrives."""
        _, metrics, port = endpoint
        first = await get(port)
        metrics.login("PLAIN", "ok")
        metrics.login("NOT-A-MECHANISM", "failed")
        second = await get(port)

        assert first.startswith(b"HTTP/1.0 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in first
        assert 0 == value(first, "pobox_logins_total", mechanism="PLAIN", result="ok")
        assert 1 == value(second, "pobox_logins_total", mechanism="PLAIN", result="ok")
        assert 1 == value(second, "pobox_logins_total", mechanism="other", result="failed")

    async def test_other_requests_refused(self, endpoint: tuple[MetricsServer, Metrics, int]):
        """Other paths 404, other methods 405, garbage 400; HEAD has no body."""
        _, _, port = endpoint
        assert (await get(port, b"GET /health HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
        assert (await get(port, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405")
        assert (await get(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.0 400")
        head = await get(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")
        assert head.endswith(b"\r\n\r\n")

    async def test_stuck_scrapers_do_not_block(self, endpoint: tuple[MetricsServer, Metrics, int]):
        """With every connection held idle by another client, a scrape is still answered."""
        server, _, port = endpoint
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
        try:
            while server._open < MAX_CONNECTIONS:
                await asyncio.sleep(0.01)
            answer = await get(port)
        finally:
            for sock in idle:
                sock.close()
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n")

    async def test_concurrent_scrapes_share_one_exposition(
        self, endpoint: tuple[MetricsServer, Metrics, int]
    ):
        """Scrapes that arrive together are answered from one exposition begun after them."""
        server, metrics, _ = endpoint
        metrics.sent(5)
        answers = await asyncio.gather(*(server.exposition() for _ in range(5)))
        assert 2 >= server._started  # the first alone, then the four waiting ones together
        assert all(b"pobox_pop3_bytes_sent_total 5.0" in answer for answer in answers)


class TestCommandClock:
    """The clock observes each command once, under its name or ``other``."""

    def test_counts(self):
        """A command ends at the next one or at end(); unknown names count as other."""
        metrics = Metrics()
        clock = metrics.clock()
        clock.begin("STAT")
        clock.begin("FROB")
        clock.end()
        clock.end()  # nothing under way: nothing observed
        assert 1 == metrics.registry.get_sample_value(
            "pobox_pop3_command_duration_seconds_count", {"command": "STAT"}
        )
        assert 1 == metrics.registry.get_sample_value(
            "pobox_pop3_command_duration_seconds_count", {"command": "other"}
        )
        assert 2 == sum(
            metrics.registry.get_sample_value(
                "pobox_pop3_command_duration_seconds_count", {"command": name}
            )
            or 0
            for name in COMMANDS
        )


def _handshake(server_ctx: ssl.SSLContext, client: bytes | ssl.SSLContext) -> BaseException:
    """Run a server-side handshake (memory BIOs) against ``client`` bytes or a client context.

    Returns:
        the server's error (``b""``: the client closed before its hello).
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
    peer = None
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    if isinstance(client, bytes):
        incoming.write(client)
        incoming.write_eof()
    else:
        peer = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):
        if peer is not None:
            with contextlib.suppress(ssl.SSLError):
                peer.do_handshake()
            incoming.write(c_out.read())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as exc:
            return exc
        c_in.write(outgoing.read())
    raise AssertionError("the handshake did not fail")


class TestTlsFailureClass:
    """Real handshake failures fall in the classes the README names."""

    @pytest.fixture
    def server_ctx(self) -> ssl.SSLContext:
        ca = trustme.CA()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("localhost").configure_cert(ctx)
        return ctx

    def test_plaintext_is_protocol(self, server_ctx: ssl.SSLContext):
        """Plaintext where a ClientHello belongs: protocol."""
        assert "protocol" == tls_failure_class(_handshake(server_ctx, b"USER alice\r\n" * 10))

    def test_eof_is_closed(self, server_ctx: ssl.SSLContext):
        """The client closing before its hello: closed."""
        assert "closed" == tls_failure_class(_handshake(server_ctx, b""))

    def test_old_version_is_protocol(self, server_ctx: ssl.SSLContext):
        """A client that only speaks a version the server refuses: protocol."""
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        assert "protocol" == tls_failure_class(_handshake(server_ctx, client))

    def test_timeout_and_none(self):
        """A timeout is timeout; no exception (closed mid-handshake) is closed."""
        assert "timeout" == tls_failure_class(TimeoutError())
        assert "closed" == tls_failure_class(None)
        assert "other" == tls_failure_class(OSError("odd"))


DASHBOARD = Path(__file__).parents[2] / "contrib" / "grafana" / "pobox.json"


def _exprs(node: object) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and template queries."""
    out: list[str] = []
    if isinstance(node, dict):
        for name, item in node.items():
            if name in ("expr", "query") and isinstance(item, str) and "pobox_" in item:
                out.append(item)
            else:
                out.extend(_exprs(item))
    elif isinstance(node, list):
        for item in node:
            out.extend(_exprs(item))
    return out


class TestGrafanaDashboard:
    """contrib/grafana/pobox.json is built on exactly the metrics pobox exports."""

    def test_every_expression_uses_exported_series_only(self):
        """Each series named in an expression is one pobox exports; every family is used."""
        exported = {
            sample.name for family in Metrics().registry.collect() for sample in family.samples
        }
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = _exprs(dashboard)
        panels_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        used = {name for expr in exprs for name in re.findall(r"\bpobox_[a-z0-9_]+", expr)}

        assert [] == [e for e in panels_exprs if "pobox_" not in e]
        assert set() == used - exported
        families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
        assert {re.sub(r"_total$", "", name) for name in METRIC_NAMES} == families
