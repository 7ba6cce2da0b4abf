"""The state traffic of one login with ``workers``: a worker and its master over a socketpair.

    .venv/bin/python bench/state_notices.py

Both ends run in this process (their CPU time together, per login): the throttle's count,
the registration, and the unregistration at the end, sent as a call the master answers
(``call``, as before issue 13's notices) or as a notice (``notify``, now).  Five
interleaved rounds of 20,000 logins each; the best of each is compared.
"""

from __future__ import annotations

import os
import socket
import time

import uvloop

from pobox.state.base import SessionEntry
from pobox.state.remote import (
    RemoteFailureCounters,
    RemoteSessionRegistry,
    RemoteState,
    StateService,
)


async def one(mode: str, n: int) -> float:
    """Return the CPU µs per login of ``n`` logins, unregistering by ``mode``."""
    service = StateService(60, "a")
    m, w = socket.socketpair()
    service.attach(m)
    state = RemoteState(w)
    counters, reg = RemoteFailureCounters(state), RemoteSessionRegistry(state, "a")
    t0 = time.process_time()
    for i in range(n):
        await counters.counts(["ip:192.0.2.1"])
        entry = SessionEntry(f"s{i}", "alice", "a", "192.0.2.1", 1.0, False, "PLAIN")
        await reg.register(entry, max_user=0, max_userip=10)
        if mode == "call":
            await state.call("unregister", id=f"s{i}")
        else:
            await reg.unregister(f"s{i}")
    await counters.counts(["ip:x"])  # everything applied
    t = time.process_time() - t0
    await state.aclose()
    await service.aclose()
    return t / n * 1e6


async def main() -> None:
    """Run the interleaved rounds and print the figures."""
    n = 20000
    res: dict[str, list[float]] = {"call": [], "notify": []}
    for _ in range(5):
        for mode in ("call", "notify"):
            res[mode].append(await one(mode, n))
    print({k: [round(x, 1) for x in v] for k, v in res.items()}, "load", os.getloadavg())
    best_call, best_notify = min(res["call"]), min(res["notify"])
    print(
        f"best: call {best_call:.1f} µs, notify {best_notify:.1f} µs per login, "
        f"ratio {best_notify / best_call:.2f}"
    )


if __name__ == "__main__":
    uvloop.run(main())
