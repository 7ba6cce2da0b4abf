"""Profile pobox under one benchmark workload with py-spy, and print where the time goes.

    .venv/bin/python bench/profile_server.py session|login|bulk [--duration 15] [--clients 16]
        [--out DIR] [--store maildir|postgresql] [--set KEY=VALUE ...]

It starts pobox alone on core 0 with the benchmark's data, attaches ``py-spy record`` (flame
graph ``profile-<workload>.svg`` and collapsed stacks ``profile-<workload>.txt``), runs the
workload from the generator core for ``--duration`` seconds, then prints the functions with
the most samples, by self time and by inclusive time (pobox's own frames and the rest).
py-spy slows the target a little (it samples at 100 Hz by reading memory, no signals).

``--store postgresql`` profiles pobox on the PostgreSQL store (``pobox-pg`` of
:mod:`run`, its throwaway database on the server core too), and prints the database's side
as well: the statements by total time, from ``pg_stat_statements`` (calls, ms per call).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from loadgen import Spec

PY_SPY = Path(sys.executable).parent / "py-spy"


def _spec(
    workload: str,
    settings: run.Settings,
    groups: dict[str, list[str]],
    clients: int,
    line_end: str = "crlf",
) -> Spec:
    if workload == "session":
        users = tuple(groups[f"session-{line_end}"])
        return Spec(
            "session", run.HOST, 0, users, run.PASSWORD, clients, 0, settings.session_messages
        )
    if workload == "login":
        return Spec("login", run.HOST, 0, tuple(groups["plain"]), run.PASSWORD, clients, 0)
    if workload == "bulk":
        return Spec("bulk", run.HOST, 0, tuple(groups[f"bulk-{line_end}"]), run.PASSWORD, 1, 0, 1)
    raise SystemExit(f"cannot profile {workload!r}: session, login or bulk")


def _function(frame: str) -> str:
    """``name (path:line)`` -> ``name (file)``: aggregate a function's lines together."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def top(collapsed: Path, limit: int = 25) -> str:
    """Summarise py-spy's collapsed stacks: self and inclusive sample shares per function."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "self:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(limit)]
    lines += ["", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(limit)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload", choices=["session", "login", "bulk"])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--out", default=str(run.ROOT / "bench" / "results"))
    parser.add_argument("--clients", type=int, default=16, help="session/login clients (16)")
    parser.add_argument(
        "--line-end", choices=["crlf", "lf"], default="crlf", help="stored mail (crlf)"
    )
    parser.add_argument(
        "--store", choices=["maildir", "postgresql"], default="maildir", help="(maildir)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a configuration line for pobox (TOML), e.g. --set 'shared_state=\"memory\"'",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.store == "postgresql":
            run.SERVERS[:] = []
            run._start_postgresql(stack, {"shared_preload_libraries": "pg_stat_statements"})
            _psql("CREATE EXTENSION pg_stat_statements")
        return _profile(args)


def _psql(statement: str) -> str:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(run.PG["dsn"], autocommit=True) as conn:
        cur = conn.execute(statement)  # type: ignore[arg-type]
        if cur.description is None:
            return ""
        return "\n".join(" | ".join(str(v) for v in row) for row in cur.fetchall())


def _profile(args: argparse.Namespace) -> int:
    server_name = "pobox-pg" if args.store == "postgresql" else "pobox"
    settings = run.Settings.make(
        argparse.Namespace(quick=False, rounds=1, duration=args.duration, generators=1)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, run._generator_cores())
    with run.searchable_tmpdir() as root:
        groups = run.build_world(root, settings, [args.workload])
        extra = "".join(f"{line}\n" for line in args.set)
        with run.run_pobox(root, server_name, extra) as server:
            spec = replace(
                _spec(args.workload, settings, groups, args.clients, args.line_end),
                port=server.port,
            )
            kind = "session" if spec.kind == "bulk" else spec.kind
            run.warm(server, list(spec.users), spec.messages, kind)
            stem = out / f"profile-{args.workload}"
            recorders = [
                subprocess.Popen(
                    [
                        str(PY_SPY),
                        "record",
                        "--pid",
                        str(server.pid),
                        "--duration",
                        str(int(args.duration)),
                        "--format",
                        fmt,
                        "-o",
                        str(path),
                        "--nonblocking",
                        "--gil",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for fmt, path in (
                    ("flamegraph", stem.with_suffix(".svg")),
                    ("raw", stem.with_suffix(".txt")),
                )
            ]
            time.sleep(1.0)
            if args.store == "postgresql":
                _psql("SELECT pg_stat_statements_reset()")
            cpu0 = [run.server_cpu_seconds(pid) for pid in (server.pid, *server.helpers)]
            result = run.generate(replace(spec, duration=args.duration - 1.5), 1)
            cpu = [
                run.server_cpu_seconds(pid) - before
                for pid, before in zip((server.pid, *server.helpers), cpu0, strict=True)
            ]
            for recorder in recorders:
                recorder.wait()
    rate = result.ops / result.elapsed
    print(
        f"{args.workload}: {rate:,.1f} ops/s, {result.bytes / result.elapsed / 1e6:,.1f} MB/s "
        f"under py-spy, errors={result.errors}"
    )
    print(
        "CPU ms per op: pobox "
        + ", database ".join(f"{seconds * 1000 / max(1, result.ops):.2f}" for seconds in cpu)
        + " (pobox slowed by py-spy)"
    )
    print(top(stem.with_suffix(".txt")))
    if args.store == "postgresql":
        print(f"PostgreSQL statements during the run ({result.ops} sessions):")
        print(
            _psql(
                "SELECT calls, round(total_exec_time::numeric, 1) AS ms,"
                " round((total_exec_time / calls)::numeric, 3) AS ms_per_call,"
                " left(regexp_replace(query, '\\s+', ' ', 'g'), 110)"
                " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15"
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
