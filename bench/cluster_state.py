"""What cluster-wide state costs a login: each PostgreSQL state call, timed (issue 12).

Starts a throwaway PostgreSQL cluster (tests/helpers/postgres.py), creates pobox's schema,
fills the registry with 2,000 sessions of 1,000 users on 4 nodes and the counters with
50,000 keys, then times, one call at a time on the loopback TCP connection pobox would use:

* counts: the throttle's read at every login (one address key);
* register: admission within the limits + insert, at every successful login;
* unregister: at every logout;
* add: a failed login (address and user keys);
* heartbeat: a node's lease renewal with 500 live sessions (every shared_state_heartbeat);
* upkeep: counter trim (after ANALYZE, as autovacuum keeps the estimate) and purge: the
  dead nodes' sessions (every 12 heartbeats);
and the same calls on the memory backends for comparison.  Figures are medians in µs.
Usage: ``.venv/bin/python bench/cluster_state.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.postgres import migrate, running_postgres

from pobox.state import MemoryFailureCounters, MemorySessionRegistry, SessionEntry
from pobox.state.postgres import PostgresFailureCounters, PostgresSessionRegistry, PostgresState


async def timed(rounds: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Return the median µs of ``call(i)`` over ``rounds`` calls (after a warm-up)."""
    for i in range(20):
        await call(-i - 1)
    laps = []
    for i in range(rounds):
        start = time.perf_counter_ns()
        await call(i)
        laps.append(time.perf_counter_ns() - start)
    return statistics.median(laps) / 1000


def entry(i: int, node: str) -> SessionEntry:
    """A session of user ``i % 1000``."""
    return SessionEntry(
        f"{node}-{i}", f"user{i % 1000}", node, f"10.0.{i % 200}.1", 0.0, True, "PLAIN"
    )


async def run(dsn: str, rounds: int) -> None:
    """Fill the tables, then time every call on both backends."""
    state = PostgresState(dsn, timeout=5)
    counters = PostgresFailureCounters(state, 600)
    registry = PostgresSessionRegistry(state, "bench", lease=15)
    others = [PostgresSessionRegistry(state, f"n{n}", lease=15) for n in range(4)]
    for other in others:
        await other.heartbeat([])
    for i in range(2000):
        await others[i % 4].register(entry(i, others[i % 4].node), max_user=0, max_userip=0)
    for i in range(0, 50_000, 1000):
        await counters.add([f"ip:192.0.{j // 256 % 256}.{j % 256}" for j in range(i, i + 1000)])
    await state.run("analyze", lambda conn: conn.execute("ANALYZE pobox.failure_counter"))
    await registry.heartbeat([])
    live = [f"bench-{i}" for i in range(500)]
    for sid in live:
        await registry.register(
            SessionEntry(sid, "x", "bench", "1", 0.0, False, "P"), max_user=0, max_userip=0
        )
    figures = {
        "counts": await timed(rounds, lambda i: counters.counts([f"ip:203.0.113.{i % 250}"])),
        "register": await timed(
            rounds,
            lambda i: registry.register(
                SessionEntry(f"r{i}", f"user{i % 1000}", "bench", "10.9.9.9", 0.0, True, "PLAIN"),
                max_user=0,
                max_userip=10,
            ),
        ),
        "unregister": await timed(rounds, lambda i: registry.unregister(f"r{i}")),
        "add": await timed(
            rounds, lambda i: counters.add([f"ip:198.51.100.{i % 250}", f"user:u{i}"])
        ),
        "heartbeat (500 live)": await timed(rounds, lambda i: registry.heartbeat(live)),
        "upkeep": await timed(max(10, rounds // 20), lambda i: counters.upkeep()),
        "purge": await timed(max(10, rounds // 20), lambda i: registry.purge()),
    }
    await state.aclose()
    memory_counters = MemoryFailureCounters(600)
    memory_registry = MemorySessionRegistry("bench")
    memory = {
        "counts": await timed(rounds, lambda i: memory_counters.counts([f"ip:{i}"])),
        "register": await timed(
            rounds,
            lambda i: memory_registry.register(entry(i, "bench"), max_user=0, max_userip=10),
        ),
        "unregister": await timed(rounds, lambda i: memory_registry.unregister(f"bench-{i}")),
        "add": await timed(rounds, lambda i: memory_counters.add([f"ip:{i}", f"user:{i}"])),
    }
    print(f"{'call':<22}{'postgresql µs':>15}{'memory µs':>12}")
    for name, value in figures.items():
        mem = memory.get(name)
        print(f"{name:<22}{value:>15.0f}{'' if mem is None else f'{mem:.1f}':>12}")
    login = figures["counts"] + figures["register"] + figures["unregister"]
    print(f"successful login + logout (counts + register + unregister): {login:.0f} µs")
    print(f"failed login (counts + add): {figures['counts'] + figures['add']:.0f} µs")


def main() -> None:
    """Start PostgreSQL, run the benchmark, stop it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    with running_postgres() as pg:
        pg.psql('CREATE DATABASE "pobox"')
        dsn = pg.dsn("pobox", tcp=True)
        migrate(dsn)
        asyncio.run(run(dsn, args.rounds))


if __name__ == "__main__":
    main()
