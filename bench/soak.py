"""A soak: many idle sessions and busy clients against one server for minutes, RSS sampled.

    .venv/bin/python bench/soak.py [--servers pobox,dovecot-tuned] [--idle 10000] [--busy 128]
        [--minutes 10] [--interval 10] [--memtrace DIR [--memtrace-frames N]] [--quick]

Per server, one after the other (each on a fresh copy of the same data, pinned like
``bench/run.py``: the server to ``--server-cores``, the clients to the other core(s)):

1. a holder process logs ``--idle`` users in (USER/PASS, 100 at a time) and keeps the sessions
   open, each sending a NOOP every 4 minutes (``--noop-every``; both servers' autologout is
   RFC 1939's 10 minutes) and checking its ``+OK``; a session the server closes is an error;
2. once they are all in, a load process runs ``--busy`` clients in a closed loop of full
   sessions (login, STAT, LIST, UIDL, RETR of each of 50 messages of about 4 KB, QUIT; every
   answer and every RETR's content checked, see :mod:`loadgen`) for ``--minutes``;
3. meanwhile the server's memory is sampled every ``--interval`` seconds over all of its
   processes: RSS and PSS (``/proc/PID/smaps_rollup``). The figure judged is pobox's RSS and
   Dovecot's PSS (its processes share their libraries, so their RSS would count them many
   times);
4. at the end every idle session must still answer a NOOP.

"Flat" means: over the samples after the first minute (``--warmup``), the least-squares line
grows by less than 2% of their mean or less than 1 MiB over that span. Results go to
``<out>/soak.md`` (default ``bench/results/soak.md``) and are printed. The soak is run by hand
(it takes ``--minutes`` per server plus the logins), not in CI; ``--quick`` is a seconds-long
smoke run of the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import loadgen  # noqa: E402
import run  # noqa: E402
from loadgen import LoadResult, Spec  # noqa: E402

#: Seconds between an idle session's NOOPs: well inside the 10-minute autologout of RFC 1939.
NOOP_EVERY = {"value": 240.0}
#: "Flat": the fitted growth after the warm-up is under this share of the mean ...
FLAT_SHARE = 0.02
#: ... or under this many KB.
FLAT_KB = 1024


@dataclass
class Sample:
    """One memory reading of the server's processes."""

    seconds: float
    rss_kb: int
    pss_kb: int
    processes: int


@dataclass
class SoakResult:
    """What one server did in the soak."""

    server: str
    idle_wanted: int
    idle_held: int = 0
    idle_errors: int = 0
    idle_first_error: str = ""
    busy: LoadResult = field(default_factory=LoadResult)
    samples: list[Sample] = field(default_factory=list)
    warmup: float = 60.0

    @property
    def judged(self) -> str:
        """The memory figure judged: pobox's RSS, Dovecot's PSS."""
        return "pss_kb" if run.is_dovecot(self.server) else "rss_kb"

    def after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.seconds >= self.warmup]

    def slope_kb_per_min(self) -> float:
        """The least-squares slope of the judged figure after the warm-up, KB per minute."""
        points = self.after_warmup()
        if len(points) < 2:
            return float("nan")
        xs = [p.seconds / 60 for p in points]
        ys = [float(getattr(p, self.judged)) for p in points]
        return statistics.linear_regression(xs, ys).slope

    def growth_kb(self) -> float:
        """The fitted growth over the span after the warm-up."""
        points = self.after_warmup()
        if len(points) < 2:
            return float("nan")
        return self.slope_kb_per_min() * (points[-1].seconds - points[0].seconds) / 60

    def mean_kb(self) -> float:
        points = self.after_warmup()
        return statistics.fmean(getattr(p, self.judged) for p in points) if points else 0.0

    def flat(self) -> bool:
        growth = self.growth_kb()
        return growth == growth and (growth < FLAT_KB or growth < FLAT_SHARE * self.mean_kb())

    def errors(self) -> int:
        return self.idle_errors + self.busy.errors + (self.idle_wanted - self.idle_held)


# --------------------------------------------------------------------------- idle holder


async def _hold(host: str, port: int, users: list[str], conn) -> None:
    """Open the idle sessions, report, keep them alive until told to stop, check them."""
    opened: list[loadgen.Client] = []
    errors = await loadgen.hold_idle(host, port, users, run.PASSWORD, opened)
    first = f"{errors} logins failed" if errors else ""
    conn.send(("ready", len(opened), errors))
    alive = list(opened)

    async def stop() -> None:
        # Polled, not a loop.add_reader: a holder once waited for minutes with "stop" unread
        # in its pipe, whose descriptor was no longer in the event loop's epoll set.
        while not conn.poll():
            await asyncio.sleep(_STOP_POLL)

    async def noop(client: loadgen.Client) -> str:
        try:
            await asyncio.wait_for(client.ok(b"NOOP\r\n"), 60)
        except (loadgen.CheckError, OSError, TimeoutError) as exc:
            client.close()
            return repr(exc) or "timeout"
        return ""

    async def keep_alive() -> None:
        # Each session sends a NOOP every NOOP_EVERY seconds, spread evenly over the period.
        while True:
            step = NOOP_EVERY["value"] / max(1, len(alive))
            for client in list(alive):
                await asyncio.sleep(step)
                failed = "connection closed by the server" if client.closed else await noop(client)
                if failed:
                    alive.remove(client)
                    nonlocal_errors.append(failed)

    nonlocal_errors: list[str] = []
    keeper = asyncio.ensure_future(keep_alive())
    await stop()
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    conn.recv()
    # Every session still held must answer once more.
    gate = asyncio.Semaphore(200)

    async def last(client: loadgen.Client) -> str:
        async with gate:
            if client.closed:
                return "connection closed by the server"
            return await noop(client)

    finals = await asyncio.gather(*(last(client) for client in alive))
    failures = nonlocal_errors + [f for f in finals if f]
    for client in opened:
        client.close()
    await asyncio.sleep(0.2)
    conn.send(
        (
            "done",
            len(opened) - len(failures),
            errors + len(failures),
            first or (failures[0] if failures else ""),
        )
    )


def _holder(host: str, port: int, users: list[str], conn) -> None:
    os.sched_setaffinity(0, run._generator_cores())
    runner = loadgen.uvloop.run if loadgen.uvloop else asyncio.run
    runner(_hold(host, port, users, conn))
    conn.close()


# --------------------------------------------------------------------------- one server


#: How often the idle holder looks for "stop" in its pipe (seconds).
_STOP_POLL = 0.2
#: Seconds the idle holder has to report after "stop" (its last NOOPs time out after 60).
_HOLDER_REPORT_TIMEOUT = 150
#: Seconds a generator process has to exit once it has sent its result.
_EXIT_TIMEOUT = 30


def _reap(process: multiprocessing.process.BaseProcess, what: str) -> None:
    """Join a generator process that has sent its result; end it if it does not exit.

    Its result is in hand already: a process stuck in its exit (the interpreter's shutdown in
    a forked child) must not stall the soak, only be noted.
    """
    process.join(_EXIT_TIMEOUT)
    if process.is_alive():
        print(f"  {what} had not exited {_EXIT_TIMEOUT} s after its result: ended", flush=True)
        process.terminate()
        process.join(_EXIT_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()


def soak_server(
    name: str, root: Path, groups: dict[str, list[str]], args: argparse.Namespace
) -> SoakResult:
    """Run the soak against ``name``: idle sessions, busy clients, memory samples."""
    result = SoakResult(name, len(groups["idle"]), warmup=args.warmup)
    ctx = multiprocessing.get_context("fork")
    with run.run_server(name, root) as server:
        run.warm(server, groups["plain"][:4], 0, "empty")
        run.warm(
            server,
            groups["session-lf"],
            args.messages,
            "session",
            run.EXPECTED["session-lf"],
        )
        parent, child = ctx.Pipe()
        holder = ctx.Process(target=_holder, args=(run.HOST, server.port, groups["idle"], child))
        holder.start()
        opened_in = time.monotonic()
        _, held, errors = parent.recv()
        print(
            f"soak {name}: {held:,} idle sessions held ({errors} failed) in "
            f"{time.monotonic() - opened_in:.1f}s",
            flush=True,
        )
        spec = Spec(
            "session",
            run.HOST,
            server.port,
            tuple(groups["session-lf"]),
            run.PASSWORD,
            args.busy,
            args.minutes * 60,
            args.messages,
            expected=run.EXPECTED["session-lf"],
        )
        busy_parent, busy_child = ctx.Pipe(duplex=False)
        busy = ctx.Process(target=run._child, args=(spec, busy_child))
        started = time.monotonic()
        busy.start()
        next_sample = 0.0
        while busy.is_alive() and not busy_parent.poll():
            now = time.monotonic() - started
            if now >= next_sample:
                rss, pss, _, processes = run.memory_kb(server.pid)
                result.samples.append(Sample(now, rss, pss, processes))
                print(
                    f"  {name} {now:6.0f}s RSS {rss / 1024:8.1f} MiB PSS {pss / 1024:8.1f} MiB "
                    f"processes {processes} load {run._loadavg()}",
                    flush=True,
                )
                next_sample += args.interval
            busy_parent.poll(min(1.0, max(0.05, next_sample - now)))
        print(f"  {name} busy load done after {time.monotonic() - started:.0f}s", flush=True)
        if not busy_parent.poll(_EXIT_TIMEOUT):  # it ended without a result
            _reap(busy, "busy load process")
            msg = f"soak {name}: the busy load process sent no result (exit code {busy.exitcode})"
            raise RuntimeError(msg)
        result.busy = busy_parent.recv()
        _reap(busy, "busy load process")
        parent.send("stop")
        # The holder's last NOOPs wait 60 s at most each, all at once.
        if not parent.poll(_HOLDER_REPORT_TIMEOUT):
            holder.terminate()
            msg = f"soak {name}: the idle holder did not report within {_HOLDER_REPORT_TIMEOUT} s"
            raise RuntimeError(msg)
        _, result.idle_held, result.idle_errors, result.idle_first_error = parent.recv()
        _reap(holder, "idle holder")
    print(
        f"soak {name}: busy {result.busy.ops:,} sessions, {result.busy.errors} errors"
        + (f" (first: {result.busy.first_error})" if result.busy.errors else "")
        + f"; idle {result.idle_held:,} of {result.idle_wanted:,} held to the end, "
        f"{result.idle_errors} errors"
        + (f" (first: {result.idle_first_error})" if result.idle_first_error else "")
        + f"; {result.judged[:3].upper()} slope {result.slope_kb_per_min():,.1f} KB/min, "
        f"{'flat' if result.flat() else 'NOT flat'}",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- report


def report(results: list[SoakResult], args: argparse.Namespace, info: dict[str, str]) -> str:
    lines = [
        "# Soak: idle sessions and busy clients",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        f"{args.idle:,} idle sessions (a NOOP every {NOOP_EVERY['value']:g} s each) and "
        f"{args.busy} busy clients (full sessions of {args.messages} messages, every answer "
        "checked) for "
        f"{args.minutes:g} minutes per server; memory of all the server's processes every "
        f"{args.interval:g} s. Judged: pobox's RSS, Dovecot's PSS; flat = the fitted growth "
        f"after the first {args.warmup:g} s is under {FLAT_SHARE:.0%} of the mean or "
        f"{FLAT_KB} KB. Servers: "
        + "; ".join(f"`{r.server}`: {run.SERVER_SETUPS[r.server]}" for r in results)
        + "."
        + (" **Quick run: tiny, not a soak.**" if args.quick else ""),
        "",
        "| server | idle held / wanted | idle errors | busy sessions | busy errors "
        "| judged | at warm-up end (MiB) | at end (MiB) | slope (KB/min) | growth (KB) "
        "| flat | processes |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        points = r.after_warmup()
        first = getattr(points[0], r.judged) / 1024 if points else float("nan")
        last = getattr(points[-1], r.judged) / 1024 if points else float("nan")
        lines.append(
            f"| {r.server} | {r.idle_held:,} / {r.idle_wanted:,} | {r.idle_errors} "
            f"| {r.busy.ops:,} | {r.busy.errors} | {r.judged[:3].upper()} | {first:,.1f} "
            f"| {last:,.1f} | {r.slope_kb_per_min():,.1f} | {r.growth_kb():,.0f} "
            f"| {'yes' if r.flat() else '**no**'} "
            f"| {r.samples[-1].processes if r.samples else 0} |"
        )
    lines += ["", "Samples (seconds: RSS MiB / PSS MiB):", ""]
    for r in results:
        lines.append(
            f"- {r.server}: "
            + ", ".join(
                f"{s.seconds:.0f}: {s.rss_kb / 1024:.1f}/{s.pss_kb / 1024:.1f}" for s in r.samples
            )
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default="pobox,dovecot-tuned", help="one after the other")
    parser.add_argument("--idle", type=int, default=10_000, help="idle sessions (10,000)")
    parser.add_argument("--busy", type=int, default=128, help="busy clients (128)")
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes per server (10)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds not judged (60)")
    parser.add_argument("--messages", type=int, default=50, help="messages per busy maildrop")
    parser.add_argument("--server-cores", default="0", help="cores the server runs on (0)")
    parser.add_argument(
        "--noop-every", type=float, default=240.0, help="seconds between an idle session's NOOPs"
    )
    parser.add_argument(
        "--memtrace",
        metavar="DIR",
        help="run pobox under bench/memtrace.py, its memory log (and snapshots) into DIR",
    )
    parser.add_argument(
        "--memtrace-frames",
        type=int,
        default=0,
        help="with --memtrace: tracemalloc with this many frames (0: off)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny: a smoke run of seconds")
    parser.add_argument("--out", default=str(run.ROOT / "bench" / "results"), help="folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.idle, args.busy, args.minutes = min(args.idle, 50), min(args.busy, 4), 0.15
        args.interval, args.warmup, args.messages, args.noop_every = 1.0, 3.0, 10, 2.0
    NOOP_EVERY["value"] = args.noop_every
    if args.memtrace:  # the server inherits the environment
        os.environ["MEMTRACE_OUT"] = str(Path(args.memtrace).resolve())
        os.environ["MEMTRACE_EVERY"] = str(args.interval)
        if args.memtrace_frames:
            os.environ["MEMTRACE_FRAMES"] = str(args.memtrace_frames)
        run.POBOX_WRAPPER[:] = [str(Path(__file__).resolve().parent / "memtrace.py")]
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    if not servers or set(servers) - set(run.ALL_SERVERS) or "pobox-pg" in servers:
        parser.error("--servers: among pobox, pobox-nolock and the dovecot-* servers")
    run.SERVERS[:] = servers
    run.LINE_ENDS[:] = ["lf"]
    run.SERVER_CORES[:] = sorted({int(core) for core in args.server_cores.split(",")})
    os.sched_setaffinity(0, run._generator_cores())
    run._raise_fd_limit(max(65_536, args.idle * 2 + 1000))
    settings = replace(
        run.Settings(quick=args.quick, rounds=1, duration=1.0),
        session_users=max(200, args.busy + 16),
        session_messages=args.messages,
        login_users=20,
        idle_levels=(args.idle,),
    )
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "pobox tree": run._git_head(),
        "load average at start": run._loadavg(),
    }
    results = []
    with run.searchable_tmpdir() as root:
        groups = run.build_world(root, settings, ["session", "idle"])
        for name in servers:
            results.append(soak_server(name, root, groups, args))
    info["load average at end"] = run._loadavg()
    text = report(results, args, info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
