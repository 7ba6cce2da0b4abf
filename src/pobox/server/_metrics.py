"""The Prometheus endpoint: ``GET /metrics`` on ``metrics_listen``.

Answered by the process that holds the whole node's view: a single ``pobox serve``, or the
master of ``workers`` > 1, which sums the workers' files (:mod:`pobox.metrics`).  The endpoint
is the health check's (:class:`~pobox.server._http.HttpEndpoint`: a few connections, short
deadlines, idle ones evicted, nothing echoed), so a slow or stuck scraper holds one of its
connections for :data:`~pobox.server._http.READ_DEADLINE` seconds at most and never the
event loop.  The exposition is built in a worker thread, one at a time: a request is answered
with an exposition begun after it arrived (concurrent requests share one), and one begins at
most every :data:`MIN_INTERVAL` seconds, so a stranger scraping in a loop costs the node a
bounded share of one core, and the event loop nothing.

Anyone who reaches the port sees the counts (no user names or addresses are in them): bind
it to loopback or a private network.

May import: the standard library, :mod:`pobox.config`, :mod:`pobox.metrics`,
:mod:`pobox.server._http`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from prometheus_client import CollectorRegistry

from pobox.binding import binding
from pobox.config import Listen
from pobox.metrics import CONTENT_TYPE, render
from pobox.server._http import HttpEndpoint

__all__ = ["MIN_INTERVAL", "MetricsServer"]

logger = logging.getLogger("pobox.metrics")

#: Seconds between the start of two expositions at least (Prometheus scrapes every 15 s).
MIN_INTERVAL: Final = 0.1


class MetricsServer(HttpEndpoint):
    """The metrics endpoint of one node.

    Args:
        listen: where to listen.
        registry: what to expose (the process's own metrics, or the workers' sums).
    """

    def __init__(self, listen: Listen, registry: CollectorRegistry) -> None:
        super().__init__(listen, b"/metrics")
        self._registry = registry
        self._lock = asyncio.Lock()
        self._started = 0
        self._done_at = -MIN_INTERVAL
        self._last = b""

    async def start(self) -> None:
        """Bind the address.

        Raises:
            ListenError: it cannot be bound (naming metrics_listen).
        """
        with binding("metrics_listen", str(self._listen)):
            await super().start()
        for host, port in self.addresses:
            logger.info("master: Metrics on http://%s:%d/metrics", host, port)

    async def respond(self, *, head: bool) -> tuple[int, bytes, str]:
        """Answer ``GET /metrics`` with the exposition."""
        return 200, await self.exposition(), CONTENT_TYPE

    async def exposition(self) -> bytes:
        """Return an exposition begun after this call (shared with concurrent callers)."""
        seen = self._started
        async with self._lock:
            if self._started > seen:  # one began after us and has ended meanwhile
                return self._last
            loop = asyncio.get_running_loop()
            wait = self._done_at + MIN_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._started += 1
            try:
                self._last = await asyncio.to_thread(render, self._registry)
            finally:
                self._done_at = loop.time()
            return self._last

    async def aclose(self) -> None:
        """Stop listening."""
        await self._close_server()
