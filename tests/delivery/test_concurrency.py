"""8 LMTP deliverers and a POP3 client deleting at the same time: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import re
import smtplib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.delivery.helpers import retrieve_all, running_pobox

#: Messages in all (the issue asks for 2,000) and parallel LMTP connections.
TOTAL = 2000
DELIVERERS = 8
_MESSAGE_ID = re.compile(rb"^Message-ID: <(\d+)-(\d+)@example\.org>\r$", re.MULTILINE)


def _deliverer(host: str, port: int, index: int, count: int) -> int:
    """Send ``count`` messages over one LMTP connection; return how many got 250."""
    delivered = 0
    with smtplib.LMTP(host, port) as client:
        for number in range(count):
            message = (
                f"Subject: message {number} of deliverer {index}\r\n"
                f"Message-ID: <{index}-{number}@example.org>\r\n\r\nbody {number}\r\n"
            )
            refused = client.sendmail("sender@example.org", ["alice"], message)
            if not refused:
                delivered += 1
    return delivered


def _collector(host: str, port: int, done: threading.Event) -> list[bytes]:
    """Retrieve and delete messages by POP3 until the deliverers are done and none are left."""
    seen: list[bytes] = []
    while True:
        finished = done.is_set()
        for message in retrieve_all(host, port, "alice", delete=True):
            match = _MESSAGE_ID.search(message)
            assert match is not None
            seen.append(match.group(0))
        if finished:
            return seen


class TestConcurrentDeliveryAndRetrieval:
    """Deliveries never wait for the POP3 session, and none is lost or doubled."""

    async def test_count_in_equals_count_retrieved(self, tmp_path: Path) -> None:
        """2,000 messages from 8 LMTP clients all reach a POP3 client deleting meanwhile, once."""
        async with running_pobox(tmp_path) as pobox:
            loop = asyncio.get_running_loop()
            host, port = pobox.lmtp
            done = threading.Event()
            with ThreadPoolExecutor(DELIVERERS + 1) as pool:
                collector = loop.run_in_executor(
                    pool, _collector, pobox.pop3.host, pobox.pop3.port, done
                )
                sent = await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            pool, _deliverer, host, port, index, TOTAL // DELIVERERS
                        )
                        for index in range(DELIVERERS)
                    )
                )
                done.set()
                seen = await collector
        assert [TOTAL // DELIVERERS] * DELIVERERS == sent
        assert TOTAL == len(seen)
        assert TOTAL == len(set(seen))
