"""pobox nodes behind HAProxy on one PostgreSQL: one node against two, and HAProxy's cost.

    .venv/bin/python bench/cluster.py [--quick] [--rounds N] [--duration S] [--out DIR]

What it does:

1. starts the test cluster (:func:`tests.helpers.cluster.running_cluster`): a throwaway
   PostgreSQL (fsync on), two ``pobox serve`` nodes with mail and users in it, and HAProxy
   running ``contrib/haproxy/pobox.cfg`` (``send-proxy-v2``, ``balance leastconn``);
2. stores the same small messages for every user through the PostgreSQL store (not timed);
3. measures, in interleaved rounds, three ways to the same data, from a load generator in a
   process of its own whose clients connect from 127.0.0.2 (outside
   ``haproxy_trusted_networks``, so it may also talk to a node directly):

   - ``direct``: node 1's POP3 port, no HAProxy;
   - ``haproxy, 1 node``: HAProxy's POP3 frontend with node 2 in maintenance (``disable
     server`` on the stats socket);
   - ``haproxy, 2 nodes``: HAProxy's POP3 frontend, both nodes;

   for two workloads: ``session`` (login, STAT, LIST, UIDL, RETR of every message, QUIT) and
   ``login`` (USER, PASS, QUIT). Every answer is checked while the load runs
   (:mod:`loadgen`: STAT counts, LIST sizes against RETR bytes, distinct UIDLs, each RETR's
   content against the stored messages), and so is which nodes served each round's logins
   (their logs); one wrong answer makes the run fail.
4. reports medians and two ratios: HAProxy's cost (``haproxy, 1 node`` ÷ ``direct``) and the
   scaling (``haproxy, 2 nodes`` ÷ ``haproxy, 1 node``), and HAProxy's own CPU time per
   operation (from /proc).

Nothing is pinned: HAProxy, PostgreSQL, the nodes and the generator share the machine's
cores, as they would on one small host; the scaling figure says what a second node buys when
the cores are the limit, not what a second machine would.

Results: ``bench/results/cluster.md`` (or ``--out DIR``/cluster.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src"), str(Path(__file__).resolve().parent)]

import loadgen  # noqa: E402
import psycopg  # noqa: E402
from loadgen import LoadResult, Spec  # noqa: E402
from run import server_cpu_seconds  # noqa: E402
from tests.helpers.cluster import Cluster, running_cluster  # noqa: E402

from pobox.records import User  # noqa: E402
from pobox.storage.postgres import PostgresStore  # noqa: E402

HOST = "127.0.0.1"
#: The generator's address: not trusted by the nodes, so it may connect to one directly.
SOURCE = "127.0.0.2"
PASSWORD = "pw"
VARIANTS = ("direct", "haproxy, 1 node", "haproxy, 2 nodes")
WORKLOADS = ("session", "login")


@dataclass(frozen=True)
class Settings:
    """How big and how long: the full run, or ``--quick`` for the smoke test."""

    rounds: int
    duration: float
    users: int
    messages: int
    concurrency: int

    @classmethod
    def make(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            base = cls(rounds=1, duration=0.3, users=8, messages=3, concurrency=4)
        else:
            base = cls(rounds=3, duration=4.0, users=100, messages=10, concurrency=16)
        return replace(
            base, rounds=args.rounds or base.rounds, duration=args.duration or base.duration
        )


def _message(number: int) -> bytes:
    """A plausible message of about 3 KB, with a line that needs dot-stuffing."""
    head = (
        f"From: Sender {number} <sender{number}@example.org>\r\nTo: user@example.com\r\n"
        f"Subject: cluster benchmark {number}\r\nMessage-ID: <{number}@example.org>\r\n\r\n"
    )
    body = "".join(
        f"line {line} of message {number}, some words to fill it\r\n" for line in range(60)
    )
    return (head + ".a dot-stuffed line\r\n" + body).encode()


def load_data(cluster: Cluster, settings: Settings) -> list[str]:
    """Add the users (SQL) and store their mail through the store; return the user names."""
    users = [f"u{number:04d}" for number in range(settings.users)]
    with psycopg.connect(cluster.dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO pobox.users (username, password) VALUES (%s, %s)",
            [(user, "{PLAIN}" + PASSWORD) for user in users],
        )

    async def store_all() -> None:
        # Loading is not measured: its commits need not wait for the disk.
        store = PostgresStore(
            cluster.dsn + " options='-c synchronous_commit=off'", pool_min=4, pool_max=4
        )
        queue = [(user, n) for user in users for n in range(settings.messages)]

        async def worker() -> None:
            while queue:
                user, number = queue.pop()
                await store.append(User(name=user), _message(number))

        try:
            await asyncio.gather(*(worker() for _ in range(4)))
        finally:
            await store.aclose()

    asyncio.run(store_all())
    return users


# --------------------------------------------------------------------------- measuring


def _child(spec: Spec, conn) -> None:
    conn.send(loadgen.run_load(spec))
    conn.close()


def generate(spec: Spec) -> LoadResult:
    """Run ``spec`` in a generator process of its own; return what it did."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(spec, child))
    process.start()
    result: LoadResult = parent.recv()
    process.join()
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Figures:
    """The rounds of one workload: ops/s per variant, HAProxy CPU per op, errors."""

    per_second: dict[str, list[float]] = field(default_factory=dict)
    haproxy_us: dict[str, list[float]] = field(default_factory=dict)
    #: CPU time of the whole server side (nodes, PostgreSQL, HAProxy) per operation.
    server_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""

    def median(self, variant: str) -> float:
        return statistics.median(self.per_second[variant])

    def cpu_ms(self, variant: str) -> float:
        return statistics.median(self.server_ms[variant])


class Bench:
    """The cluster, its data, and the switch between the three variants."""

    def __init__(self, cluster: Cluster, users: list[str], settings: Settings) -> None:
        self.cluster = cluster
        self.users = tuple(users)
        self.settings = settings
        assert cluster.haproxy is not None
        self.haproxy = cluster.haproxy
        self.second_enabled = True

    def _second_node(self, enabled: bool) -> None:
        """Take node 2 out of HAProxy's rotation (maintenance) or put it back, and wait."""
        if enabled == self.second_enabled:
            return
        verb = "enable" if enabled else "disable"
        self.haproxy.command(f"{verb} server pobox_pop3/pobox2")
        self.cluster.wait_states({"pobox2": "UP" if enabled else "MAINT"})
        self.second_enabled = enabled

    def spec(self, variant: str, kind: str, duration: float) -> Spec:
        """The load for ``variant``: where it connects, with node 2 in or out."""
        if variant == "direct":
            port = self.cluster.node("pobox1").ports["pop3"]
        else:
            port = self.cluster.front["pop3"]
            self._second_node(variant.endswith("2 nodes"))
        return Spec(
            kind=kind,
            host=HOST,
            port=port,
            users=self.users,
            password=PASSWORD,
            concurrency=self.settings.concurrency,
            duration=duration,
            messages=self.settings.messages,
            source=SOURCE,
            # Every RETR's content checked against what was stored (the loader's order).
            expected=tuple(_message(number) for number in range(self.settings.messages)),
        )

    def server_cpu(self) -> float:
        """CPU seconds used so far by the nodes, PostgreSQL (all backends) and HAProxy."""
        pids = [node.pid for node in self.cluster.nodes] + [self.cluster.pg.pid, self.haproxy.pid]
        return sum(server_cpu_seconds(pid) for pid in pids)

    def logins(self) -> list[int]:
        """How many logins each node has logged so far."""
        return [node.text().count("Login: user=<") for node in self.cluster.nodes]

    def run(self, variant: str, kind: str, figures: Figures) -> None:
        """One round of ``kind`` against ``variant``, added to ``figures``.

        The nodes' logs are checked too: each login of the round was served by the nodes the
        variant should use, and by no other.
        """
        spec = self.spec(variant, kind, self.settings.duration)
        logins = self.logins()
        before = cpu_seconds(self.haproxy.pid)
        server_before = self.server_cpu()
        result = generate(spec)
        used = cpu_seconds(self.haproxy.pid) - before
        server_used = self.server_cpu() - server_before
        figures.server_ms.setdefault(variant, []).append(1e3 * server_used / max(result.ops, 1))
        served = [after - was for after, was in zip(self.logins(), logins, strict=True)]
        if sum(served) < result.ops or (served[1] > 0) != variant.endswith("2 nodes"):
            result.errors += 1
            result.first_error = result.first_error or f"{variant}: logins per node {served}"
        figures.per_second.setdefault(variant, []).append(result.ops / result.elapsed)
        figures.haproxy_us.setdefault(variant, []).append(1e6 * used / max(result.ops, 1))
        figures.errors[variant] = figures.errors.get(variant, 0) + result.errors
        figures.first_error = figures.first_error or result.first_error
        print(
            f"  {kind:7} {variant:16} {result.ops / result.elapsed:8.1f}/s  errors {result.errors}",
            flush=True,
        )

    def warm(self) -> None:
        """A short unmeasured run of each variant (pools filled, listings cached)."""
        for variant in VARIANTS:
            generate(self.spec(variant, "session", min(1.0, self.settings.duration)))


def measure(bench: Bench, settings: Settings, log: Callable[[str], None]) -> dict[str, Figures]:
    """Interleaved rounds of every workload over every variant."""
    figures = {kind: Figures() for kind in WORKLOADS}
    for number in range(settings.rounds):
        log(f"round {number + 1} of {settings.rounds}")
        for kind in WORKLOADS:
            for variant in VARIANTS:
                bench.run(variant, kind, figures[kind])
    return figures


# --------------------------------------------------------------------------- report


def _version(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0].strip() if done.returncode == 0 else "?"


def machine(cluster: Cluster) -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": f"{os.cpu_count()} ({cpu}), shared by HAProxy, PostgreSQL, nodes, generator",
        "python": platform.python_version(),
        "haproxy": _version(["haproxy", "-v"]),
        "postgresql": cluster.pg.bindir.parent.name,
        "pobox tree": _version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "load average at start": Path("/proc/loadavg").read_text().split()[0],
    }


def report(figures: dict[str, Figures], settings: Settings, about: dict[str, str]) -> str:
    """The results as Markdown."""
    units = {"session": "sessions/s", "login": "logins/s"}
    lines = [
        "# pobox nodes behind HAProxy",
        "",
        *(f"- {key}: {value}" for key, value in about.items()),
        f"- {settings.users} users, {settings.messages} messages of ~3 KB each, "
        f"{settings.concurrency} clients, {settings.rounds} rounds of {settings.duration} s "
        "(medians)",
        "",
        "| workload | unit | direct | haproxy, 1 node | haproxy, 2 nodes | HAProxy cost "
        "(1 node ÷ direct) | scaling (2 nodes ÷ 1 node) | server CPU ms/op (direct / 1 / 2) "
        "| of which HAProxy µs/op | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, fig in figures.items():
        direct, one, two = (fig.median(variant) for variant in VARIANTS)
        cpu = " / ".join(f"{fig.cpu_ms(variant):.2f}" for variant in VARIANTS)
        haproxy_us = statistics.median(fig.haproxy_us["haproxy, 1 node"])
        errors = sum(fig.errors.values())
        lines.append(
            f"| {kind} | {units[kind]} | {direct:,.1f} | {one:,.1f} | {two:,.1f} | "
            f"{one / direct:.2f} | {two / one:.2f} | {cpu} | {haproxy_us:,.0f} | {errors} |"
        )
    lines += [
        "",
        "Throughput is wall-clock (operations per second, every answer checked). Server CPU is "
        "the CPU time of the nodes, PostgreSQL and HAProxy per operation, steadier than "
        "throughput when other work shares the machine; HAProxy's own share is measured "
        "with one node behind it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny and short: a smoke run")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    settings = Settings.make(args)
    args.out.mkdir(parents=True, exist_ok=True)
    node_settings = {"log_level": "info", "postgresql_pool_max": 8}
    with tempfile.TemporaryDirectory(prefix="pobox-cluster-bench-") as tmp:
        started = time.monotonic()
        with running_cluster(Path(tmp), nodes=2, settings=node_settings) as cluster:
            about = machine(cluster)
            users = load_data(cluster, settings)
            print(f"bench: cluster up, data loaded in {time.monotonic() - started:.1f} s")
            bench = Bench(cluster, users, settings)
            bench.warm()
            figures = measure(bench, settings, print)
            bench._second_node(enabled=True)
    text = report(figures, settings, about)
    (args.out / "cluster.md").write_text(text)
    print(text)
    wrong = {kind: fig.first_error for kind, fig in figures.items() if sum(fig.errors.values())}
    if wrong:
        print(f"bench: wrong or failed answers: {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
