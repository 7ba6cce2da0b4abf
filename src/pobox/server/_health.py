"""The health check a load balancer asks: ``GET /health`` on ``health_listen``.

HAProxy (``option httpchk GET /health``, or ``http-check send meth GET uri /health``) takes a
node out of rotation when the answer is not 2xx.  The answer is ``200 ok`` while the node can
reach its stores and is not draining, else ``503`` with a one-line reason:

- *reach its stores*: every probe the composition root gives (``SELECT 1`` on the PostgreSQL
  pool of the mail store and of the userdb; a Maildir needs none) answered within
  :data:`CHECK_TIMEOUT`.  The result is kept for :data:`CHECK_TTL` seconds and concurrent
  requests share one check in flight, so a check storm costs the database one query a second.
  A check that takes longer is answered 503 at :data:`CHECK_TIMEOUT` and left to finish
  under the store's own timeout (``postgresql_timeout``).
- *draining*: after ``SIGTERM`` (:meth:`HealthServer.drain`), at once, for good.

The endpoint itself (:class:`~pobox.server._http.HttpEndpoint`, shared with the metrics) is
bounded against strangers: a few connections, short deadlines, eviction of idle ones, so
they cannot take the node out of rotation.  A ``503`` names the store that failed, never the
driver's message (which names database hosts and users; it goes to the log).  Bind it to loopback
or a private network all the same.

May import: the standard library, :mod:`pobox.config`, :mod:`pobox.server._http`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from pobox.binding import binding
from pobox.config import Listen
from pobox.server import _http
from pobox.server._http import MAX_CONNECTIONS, MAX_REQUEST, READ_DEADLINE, HttpEndpoint

__all__ = [
    "CHECK_TIMEOUT",
    "CHECK_TTL",
    "MAX_CONNECTIONS",
    "MAX_REQUEST",
    "READ_DEADLINE",
    "HealthServer",
    "Probe",
]

logger = logging.getLogger("pobox.health")

#: A check of one store: returns normally when it can be reached, raises when not.
Probe = Callable[[], Awaitable[object]]

#: Seconds the stores' probes may take together before the node counts as unhealthy; below
#: HAProxy's default check timeout (``inter``, 2 s).
CHECK_TIMEOUT: Final = 1.5
#: Seconds a check result is reused (the database sees at most one query per this).
CHECK_TTL: Final = 1.0


def parse_request(data: bytes) -> tuple[int, str, bool]:
    """Judge one request's line and headers; return ``(status, text, head_only)``.

    Args:
        data: the request up to and including the blank line (``\\r\\n\\r\\n``).

    Returns:
        what to answer (with 200 meaning "answer with the node's health").
    """
    return _http.parse_request(data, b"/health")


class HealthServer(HttpEndpoint):
    """The HTTP health endpoint of one node."""

    def __init__(self, listen: Listen, probes: Sequence[tuple[str, Probe]]) -> None:
        """Prepare the endpoint on ``listen``; each probe is ``(name, check)``."""
        super().__init__(listen, b"/health")
        self._probes = list(probes)
        self._draining = False
        self._result: str | None = None
        self._checked_at = -CHECK_TTL
        self._check: asyncio.Task[None] | None = None
        self._probing = ""
        self._was_ok = True

    async def start(self) -> None:
        """Bind the address.

        Raises:
            ListenError: it cannot be bound (naming health_listen).
        """
        with binding("health_listen", str(self._listen)):
            await super().start()
        for host, port in self.addresses:
            logger.info("master: Health check on http://%s:%d/health", host, port)

    def drain(self) -> None:
        """Answer 503 from now on: the node is draining (SIGTERM)."""
        self._draining = True

    async def status(self) -> str | None:
        """Return why the node is unhealthy, or ``None`` if it is healthy.

        A check still running after :data:`CHECK_TIMEOUT` counts as failed, but is not
        cancelled (cancelling a database query waits for the server, which may be the one
        that cannot be reached): it goes on, bounded by the store's own timeout, and later
        requests wait for it rather than start another.
        """
        if self._draining:
            return "draining"
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at < CHECK_TTL:
            return self._result
        if self._check is None:
            self._check = loop.create_task(self._run_probes())
        done, _ = await asyncio.wait({self._check}, timeout=CHECK_TIMEOUT)
        if done:
            return self._result
        return f"{self._probing} did not answer within {CHECK_TIMEOUT:g} s"

    async def _run_probes(self) -> None:
        loop = asyncio.get_running_loop()
        result: str | None = None
        detail = ""
        try:
            for name, probe in self._probes:
                self._probing = name
                try:
                    await probe()
                except Exception as exc:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    result, detail = f"{name} unreachable", first
                    break
        finally:
            self._check = None
        self._result, self._checked_at = result, loop.time()
        if result is not None and self._was_ok:
            logger.warning("master: health check failing: %s: %s", result, detail)
        elif result is None and not self._was_ok:
            logger.info("master: health check passing again")
        self._was_ok = result is None

    async def respond(self, *, head: bool) -> tuple[int, bytes, str]:
        """Answer ``GET /health``: ``200 ok``, or ``503`` and the reason."""
        reason = await self.status()
        status, text = (200, "ok") if reason is None else (503, reason)
        return status, _http.text_body(text), "text/plain; charset=us-ascii"

    async def aclose(self) -> None:
        """Stop listening."""
        await self._close_server()
        check = self._check
        if check is not None:
            check.cancel()
            with contextlib.suppress(BaseException):
                await check


def probes_of(stores: Sequence[object]) -> list[tuple[str, Probe]]:
    """Return the probes of the stores that have one (a ``ping`` coroutine method)."""
    out: list[tuple[str, Probe]] = []
    for store in stores:
        ping = getattr(store, "ping", None)
        if ping is not None:
            out.append((getattr(store, "health_name", type(store).__name__), ping))
    return out
