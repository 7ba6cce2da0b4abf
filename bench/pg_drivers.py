"""psycopg 3 + psycopg_pool against asyncpg, on pobox's own queries (issue 11).

Starts a throwaway PostgreSQL cluster (tests/helpers/postgres.py), creates pobox's schema,
loads a maildrop of 10,000 messages and a 20 MB body, then times with each driver:

* open: the snapshot of the 10,000-message maildrop (the query a login runs);
  psycopg asks for binary results where bytea comes back (``binary=True``), as the store does;
* stream: a 20 MB body read two 256 KiB chunks per query, as RETR does (and the peak of
  Python memory while doing it);
* deliver: one delivery transaction with the quota check (body, chunk, counters, message,
  COMMIT), one at a time and 16 at once;
* update: the UPDATE transaction (fencing check, DELETE of 20 messages, counters, COMMIT);
* lock: take and release an advisory lock (pg_try_advisory_lock + pg_advisory_unlock).

Each driver runs the same SQL on the same data; figures are medians of several runs.
Usage: ``.venv/bin/python bench/pg_drivers.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import psycopg
from psycopg_pool import AsyncConnectionPool
from tests.helpers.postgres import migrate, running_postgres

MAILBOX = "bigbox"
MESSAGES = 10_000
BIG = 20 * 1024 * 1024
CHUNK = 256 * 1024

SNAPSHOT = "SELECT uid, wire_size, uidl, digest FROM pobox.message WHERE mailbox = {0} ORDER BY uid"
PAGE = (
    "SELECT b.chunks, c.seq, c.data FROM pobox.body AS b LEFT JOIN pobox.body_chunk AS c"
    " ON c.digest = b.digest AND c.seq >= {1} AND c.seq < {1} + 2"
    " WHERE b.digest = {0} ORDER BY c.seq"
)
INSERT_BODY = (
    "INSERT INTO pobox.body (digest, size, chunks) VALUES ({0}, {1}, 1)"
    " ON CONFLICT (digest) DO NOTHING RETURNING 1"
)
INSERT_CHUNK = "INSERT INTO pobox.body_chunk (digest, seq, data) VALUES ({0}, 0, {1})"
COUNT = (
    "INSERT INTO pobox.mailbox AS mb (mailbox, uidvalidity, next_uid, messages, octets)"
    " VALUES ({0}, 1, 2, 1, {1}) ON CONFLICT (mailbox) DO UPDATE SET"
    " next_uid = mb.next_uid + 1, messages = mb.messages + 1, octets = mb.octets + EXCLUDED.octets"
    " RETURNING next_uid - 1, messages, octets"
)
INSERT_MESSAGE = (
    "INSERT INTO pobox.message (mailbox, uid, uidl, wire_size, size, digest, header)"
    " VALUES ({0}, {1}, {2}, {3}, {3}, {4}, {5})"
)
FENCE = (
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
    " AND pid = pg_backend_pid() AND granted AND objsubid = 1"
    " AND classid = ({0}::bigint >> 32)::oid AND objid = ({0}::bigint & 4294967295)::oid)"
)
DELETE = (
    "DELETE FROM pobox.message WHERE mailbox = {0} AND uid = ANY({1}) RETURNING uid, size, digest"
)
UNCOUNT = (
    "UPDATE pobox.mailbox SET messages = messages - {1}, octets = octets - {2} WHERE mailbox = {0}"
)


def pg(sql: str) -> str:
    """The query with asyncpg's $n placeholders."""
    return sql.format(*(f"${n}" for n in range(1, 10)))


def ps(sql: str) -> str:
    """The query with psycopg's %(aN)s placeholders (see :func:`args`)."""
    return sql.format(*(f"%(a{n})s" for n in range(9)))


def args(*values: object) -> dict[str, object]:
    """Parameters for a query made by :func:`ps`."""
    return {f"a{n}": value for n, value in enumerate(values)}


def load(dsn: str) -> bytes:
    """Fill the maildrop with 10,000 messages and store a 20 MB body; return its digest."""
    big = os.urandom(BIG)
    digest = hashlib.sha256(big).digest()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pobox.body (digest, size, chunks) VALUES (%s, %s, %s)",
            (digest, BIG, BIG // CHUNK),
        )
        with conn.cursor().copy("COPY pobox.body_chunk (digest, seq, data) FROM STDIN") as copy:
            for seq in range(BIG // CHUNK):
                copy.write_row((digest, seq, big[seq * CHUNK : (seq + 1) * CHUNK]))
        conn.execute(
            "INSERT INTO pobox.mailbox (mailbox, uidvalidity, next_uid, messages, octets)"
            " VALUES (%s, 1, %s, %s, %s)",
            (MAILBOX, MESSAGES + 1, MESSAGES, MESSAGES * 4000),
        )
        conn.execute(
            "INSERT INTO pobox.message (mailbox, uid, uidl, wire_size, size, digest, header)"
            " SELECT %s, n, upper(lpad(to_hex(n), 8, '0')) || '00000001', 4000 + n %% 97,"
            " 4000, %s, '' FROM generate_series(1, %s) AS n",
            (MAILBOX, digest, MESSAGES),
        )
        conn.execute("VACUUM ANALYZE pobox.message")
    return digest


async def timed(work: Callable[[], Awaitable[object]], runs: int) -> float:
    """Return the median seconds of ``runs`` runs of ``work`` (after one warm-up)."""
    await work()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await work()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


class Driver:
    """The five operations on one driver."""

    name = ""

    async def open(self) -> int:
        raise NotImplementedError

    async def stream(self, digest: bytes) -> int:
        raise NotImplementedError

    async def deliver(self, n: int) -> None:
        raise NotImplementedError

    async def update(self, uids: list[int]) -> None:
        raise NotImplementedError

    async def lock(self, key: int) -> None:
        raise NotImplementedError


class Psycopg(Driver):
    """psycopg 3 (C extension, libpq) with psycopg_pool."""

    name = "psycopg 3.{} + psycopg_pool".format(psycopg.__version__.split(".", 2)[1])

    def __init__(self, dsn: str) -> None:
        self.pool = AsyncConnectionPool(
            dsn, min_size=16, max_size=16, kwargs={"autocommit": True}, open=False
        )
        self.dsn = dsn

    async def start(self) -> None:
        await self.pool.open(wait=True)
        self.lock_conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    async def stop(self) -> None:
        await self.lock_conn.close()
        await self.pool.close()

    async def open(self) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(ps(SNAPSHOT), args(MAILBOX), binary=True)
            return len(await cur.fetchall())

    async def stream(self, digest: bytes) -> int:
        total = seq = 0
        while True:
            async with self.pool.connection() as conn:
                cur = await conn.execute(ps(PAGE), args(digest, seq), binary=True)
                rows = await cur.fetchall()
            chunks = rows[0][0]
            for _, number, data in rows:
                total += len(data)
                seq = number + 1
            if seq >= chunks:
                return total

    async def deliver(self, n: int) -> None:
        data = f"Subject: {n} {time.time_ns()}\n\nbody\n".encode() * 20
        digest = hashlib.sha256(data).digest()
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(ps(INSERT_BODY), args(digest, len(data)))
            if await cur.fetchone():
                await conn.execute(ps(INSERT_CHUNK), args(digest, data))
            cur = await conn.execute(ps(COUNT), args("deliveries", len(data)))
            uid, messages, _ = await cur.fetchone()  # type: ignore[misc]
            assert messages < 10**9  # the quota check
            await conn.execute(
                ps(INSERT_MESSAGE),
                args("deliveries", uid, f"{uid:08X}00000001", len(data), digest, b"H: x\n"),
            )

    async def update(self, uids: list[int]) -> None:
        conn = self.lock_conn
        async with conn.transaction():
            cur = await conn.execute(
                ps(FENCE),
                args(
                    42,
                ),
            )
            await cur.fetchone()
            cur = await conn.execute(ps(DELETE), args("deliveries", uids))
            rows = await cur.fetchall()
            await conn.execute(
                ps(UNCOUNT), args("deliveries", len(rows), sum(size for _, size, _ in rows))
            )

    async def lock(self, key: int) -> None:
        conn = self.lock_conn
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        await cur.fetchone()
        cur = await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        await cur.fetchone()


class Asyncpg(Driver):
    """asyncpg (its own protocol implementation, Cython) with its pool."""

    name = f"asyncpg {asyncpg.__version__}"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=16, max_size=16)
        self.lock_conn = await asyncpg.connect(self.dsn)

    async def stop(self) -> None:
        await self.lock_conn.close()
        await self.pool.close()

    async def open(self) -> int:
        async with self.pool.acquire() as conn:
            return len(await conn.fetch(pg(SNAPSHOT), MAILBOX))

    async def stream(self, digest: bytes) -> int:
        total = seq = 0
        while True:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(pg(PAGE), digest, seq)
            chunks = rows[0][0]
            for _, number, data in rows:
                total += len(data)
                seq = number + 1
            if seq >= chunks:
                return total

    async def deliver(self, n: int) -> None:
        data = f"Subject: {n} {time.time_ns()}\n\nbody\n".encode() * 20
        digest = hashlib.sha256(data).digest()
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(pg(INSERT_BODY), digest, len(data)):
                await conn.execute(pg(INSERT_CHUNK), digest, data)
            uid, messages, _ = await conn.fetchrow(pg(COUNT), "deliveries", len(data))
            assert messages < 10**9
            await conn.execute(
                pg(INSERT_MESSAGE),
                "deliveries", uid, f"{uid:08X}00000001", len(data), digest, b"H: x\n",
            )  # fmt: skip

    async def update(self, uids: list[int]) -> None:
        conn = self.lock_conn
        async with conn.transaction():
            await conn.fetchval(pg(FENCE), 42)
            rows = await conn.fetch(pg(DELETE), "deliveries", uids)
            await conn.execute(pg(UNCOUNT), "deliveries", len(rows), sum(r["size"] for r in rows))

    async def lock(self, key: int) -> None:
        conn = self.lock_conn
        await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
        await conn.fetchval("SELECT pg_advisory_unlock($1)", key)


async def measure(driver: Driver, digest: bytes, quick: bool) -> dict[str, float]:
    """Return each operation's figure for ``driver``."""
    runs = 5 if quick else 15
    await driver.start()
    out: dict[str, float] = {}
    try:
        assert await driver.open() == MESSAGES
        out["open 10k (ms)"] = 1000 * await timed(driver.open, runs)
        assert await driver.stream(digest) == BIG
        out["stream 20 MB (ms)"] = 1000 * await timed(lambda: driver.stream(digest), runs)
        tracemalloc.start()
        await driver.stream(digest)
        out["stream peak (MiB)"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        count = 200 if quick else 500
        started = time.perf_counter()
        for n in range(count):
            await driver.deliver(n)
        out["deliver 1 at a time (/s)"] = count / (time.perf_counter() - started)
        started = time.perf_counter()
        for batch in range(count // 16):
            await asyncio.gather(*(driver.deliver(batch * 16 + i) for i in range(16)))
        out["deliver 16 at once (/s)"] = (count // 16 * 16) / (time.perf_counter() - started)
        uids = iter(range(1, 10**6, 20))

        async def update() -> None:
            first = next(uids)
            await driver.update(list(range(first, first + 20)))

        out["update 20 (ms)"] = 1000 * await timed(update, runs * 2)
        keys = iter(range(10**6))
        lock_runs = 500 if quick else 2000
        started = time.perf_counter()
        for _ in range(lock_runs):
            await driver.lock(next(keys))
        out["lock+unlock (/s)"] = lock_runs / (time.perf_counter() - started)
    finally:
        await driver.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    options = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with running_postgres() as cluster:
        cluster.psql('CREATE DATABASE "bench"')
        dsn = cluster.dsn("bench")
        migrate(dsn)
        digest = load(dsn)
        results = {}
        # Both over the same unix socket.
        uri = f"postgresql://postgres@/bench?host={cluster.socket_dir}&port={cluster.port}"
        for driver in (Psycopg(dsn), Asyncpg(uri)):
            results[driver.name] = runner(measure(driver, digest, options.quick))
    names = list(results)
    print(f"{'operation':28} " + " ".join(f"{n:>28}" for n in names) + "   ratio")
    for op in results[names[0]]:
        a, b = (results[n][op] for n in names)
        print(f"{op:28} {a:28.2f} {b:28.2f}   {a / b:5.2f}")


if __name__ == "__main__":
    main()
