"""pobox against Dovecot, side by side: one command, the same data, one core each.

    .venv/bin/python bench/run.py [--quick] [--workloads session,login,empty,bulk,bigbox,idle]

What it does, per workload:

1. writes the same data twice, one copy per server (Maildir per user under a world-searchable
   temp dir, a Dovecot-format passwd-file with the same hashes: ``{PLAIN}``, and
   ``{SHA512-CRYPT}`` / ``{ARGON2ID}`` made by ``doveadm pw``);
2. starts pobox (``python -m pobox serve -c pobox.toml``) and Dovecot (``dovecot -F``, long-lived
   processes: ``service_count = 0`` for pop3-login and pop3, limits raised), each under
   ``taskset -c 0`` (every Dovecot process inherits it), both with ``pop3_lock_session`` on;
3. warms both up, then runs interleaved rounds (pobox, Dovecot, pobox, Dovecot, ...) of a
   closed-loop load from generator process(es) pinned to the other core(s), checking every
   answer (see :mod:`loadgen`), and reports medians and the pobox/Dovecot ratio;
4. records each round's busy share of the server core and the generator core (``/proc/stat``),
   the generator's own CPU time, which shows whether the generator is the bottleneck, and the
   CPU time of the server's own processes, for work per server CPU-second (a figure that other
   load on a shared machine does not skew the way it skews wall-clock throughput).

``--stores maildir,postgresql`` adds a third server, ``pobox-pg``: the same pobox on the
PostgreSQL store (issue 11), on a throwaway cluster (tests/helpers/postgres.py) pinned to the
server core too, so pobox-pg and its database share the one core Dovecot gets; its CPU time
counts the database's processes. Its data is the same mail, stored through the store.

Results: ``bench/results/results.md`` (a table, with the machine) and ``results.png``.
``--generators 2`` splits the clients over two generator processes; ``--check-generator``
runs ``session`` (16 clients) and ``login`` (PLAIN) once more with two generator processes
and reports both figures side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src"), str(Path(__file__).resolve().parent)]

import loadgen  # noqa: E402
from loadgen import LoadResult, Spec  # noqa: E402
from tests.helpers.dovecot import (  # noqa: E402
    _chown_tree,
    _mail_account,
    dovecot_config,
    find_dovecot,
    searchable_tmpdir,
)

from pobox.config import KEYS  # noqa: E402

HOST = "127.0.0.1"
PASSWORD = "pw"
SERVER_CORE = 0
ALL_WORKLOADS = ("session", "login", "empty", "bulk", "bigbox", "idle")
#: The servers of this run, in the order they are measured (``--stores`` adds pobox-pg).
SERVERS: list[str] = ["pobox", "dovecot"]
#: The DSN of the throwaway PostgreSQL cluster when pobox-pg runs.
PG: dict[str, str] = {}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """How big and how long: the full run, or ``--quick`` for the smoke test."""

    quick: bool
    rounds: int
    duration: float
    session_users: int = 200
    session_messages: int = 50
    session_concurrency: tuple[int, ...] = (1, 16, 128)
    login_users: int = 200
    argon_users: int = 32
    bulk_bytes: int = 20 * 1024 * 1024
    bigbox_messages: int = 10_000
    idle_levels: tuple[int, ...] = (1_000, 5_000, 10_000)
    generators: int = 1

    @classmethod
    def make(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            base = cls(
                quick=True,
                rounds=args.rounds or 1,
                duration=args.duration or 0.5,
                session_users=20,
                session_messages=10,
                session_concurrency=(1, 4),
                login_users=20,
                argon_users=4,
                bulk_bytes=1024 * 1024,
                bigbox_messages=500,
                idle_levels=(50, 100),
            )
        else:
            base = cls(quick=False, rounds=args.rounds or 3, duration=args.duration or 4.0)
        return replace(base, generators=args.generators)


# --------------------------------------------------------------------------- data


def _message(rng: random.Random, number: int, size: int) -> bytes:
    """Return a plausible LF-terminated message of about ``size`` bytes."""
    words = ("mail", "pop3", "server", "python", "dovecot", "maildir", "fast", "the", "a", "of")
    head = (
        f"Return-Path: <sender{number}@example.org>\n"
        f"Delivered-To: user@example.com\n"
        f"From: Sender {number} <sender{number}@example.org>\n"
        f"To: User <user@example.com>\n"
        f"Subject: Benchmark message {number}\n"
        f"Date: Mon, 23 Nov 2026 12:00:{number % 60:02d} +0000\n"
        f"Message-ID: <{number}.{rng.getrandbits(40)}@example.org>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n\n"
    )
    lines = [head]
    total = len(head)
    while total < size:
        line = " ".join(rng.choice(words) for _ in range(11))
        if rng.random() < 0.02:
            line = "." + line  # dot-stuffing must be undone to match LIST
        lines.append(line + "\n")
        total += len(line) + 1
    return "".join(lines).encode()


def _write_maildir(maildir: Path, messages: list[bytes]) -> None:
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    new = maildir / "new"
    for number, data in enumerate(messages, 1):
        wire = len(data) + data.count(b"\n") - data.count(b"\r\n")
        name = f"{1_700_000_000 + number}.M{number}P1000.bench,S={len(data)},W={wire}"
        (new / name).write_bytes(data)


@dataclass
class World:
    """The generated data: users, their messages, one copy per server."""

    root: Path
    settings: Settings
    users: dict[str, str] = field(default_factory=dict)  # name -> stored password
    mail: dict[str, list[bytes]] = field(default_factory=dict)  # name -> messages

    def add(self, prefix: str, count: int, stored: str, messages: list[bytes]) -> list[str]:
        names = [f"{prefix}{i:05d}" for i in range(count)]
        for name in names:
            self.users[name] = stored
            self.mail[name] = messages
        return names

    def home(self, server: str, user: str) -> Path:
        return self.root / server / "home" / user

    def passwd(self, server: str) -> Path:
        return self.root / server / "passwd"

    def write(self) -> None:
        account = _mail_account()
        for server in SERVERS:
            if server == "pobox-pg":
                (self.root / server).mkdir(parents=True, exist_ok=True)
                lines = [f"{user}:{stored}::::::\n" for user, stored in self.users.items()]
                self.passwd(server).write_text("".join(lines))
                continue
            lines = []
            for user, stored in self.users.items():
                home = self.home(server, user)
                _write_maildir(home / "Maildir", self.mail[user])
                lines.append(f"{user}:{stored}:{account.uid}:{account.gid}::{home}::\n")
            self.passwd(server).write_text("".join(lines))
        if os.geteuid() == 0:
            _chown_tree(self.root / "dovecot" / "home", account.uid, account.gid)


def _doveadm_hash(scheme: str) -> str:
    doveadm = shutil.which("doveadm") or str(find_dovecot().parent / "doveadm")
    out = subprocess.run(
        [str(doveadm), "pw", "-s", scheme, "-p", PASSWORD],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def build_world(root: Path, settings: Settings, workloads: list[str]) -> dict[str, list[str]]:
    """Write the data the chosen workloads need; return the user groups."""
    rng = random.Random(1939)
    world = World(root, settings)
    groups: dict[str, list[str]] = {}
    plain = "{PLAIN}" + PASSWORD
    groups["plain"] = world.add("p", settings.login_users, plain, [])
    if "session" in workloads:
        messages = [
            _message(rng, n, rng.randint(3500, 4600)) for n in range(settings.session_messages)
        ]
        groups["session"] = world.add("s", settings.session_users, plain, messages)
    if "login" in workloads:
        groups["sha512"] = world.add("c", settings.login_users, _doveadm_hash("SHA512-CRYPT"), [])
        groups["argon2"] = world.add("a", settings.argon_users, _doveadm_hash("ARGON2ID"), [])
    if "bulk" in workloads:
        groups["bulk"] = world.add("bulk", 1, plain, [_message(rng, 1, settings.bulk_bytes)])
    if "bigbox" in workloads:
        messages = [
            _message(rng, n, rng.randint(800, 1600)) for n in range(settings.bigbox_messages)
        ]
        groups["bigbox"] = world.add("big", settings.rounds, plain, messages)
    if "idle" in workloads:
        groups["idle"] = world.add("i", max(settings.idle_levels), plain, [])
    world.write()
    if "pobox-pg" in SERVERS:
        _load_postgresql(world)
    return groups


def _load_postgresql(world: World) -> None:
    """Store every user's mail in the PostgreSQL store, through the store (not timed)."""
    from pobox.records import User  # noqa: PLC0415
    from pobox.storage.postgres import PostgresStore  # noqa: PLC0415

    async def load() -> None:
        # Loading is not measured: the loader's commits need not wait for the disk.
        store = PostgresStore(
            PG["dsn"] + " options='-c synchronous_commit=off'", pool_min=8, pool_max=8
        )
        queue = [(user, data) for user, messages in world.mail.items() for data in messages]
        try:

            async def worker() -> None:
                while queue:
                    user, data = queue.pop(0)
                    await store.append(User(name=user), data)

            await asyncio.gather(*(worker() for _ in range(8)))
        finally:
            await store.aclose()

    asyncio.run(load())


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _wait_greeting(process: subprocess.Popen[bytes], port: int, what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection((HOST, port), timeout=2) as conn:
                if conn.makefile("rb").readline().startswith(b"+OK"):
                    return
        except OSError:
            time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    msg = f"{what} did not start on port {port}:\n{tail}"
    raise RuntimeError(msg)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Server:
    """A running server: its name, port and master PID."""

    name: str
    port: int
    pid: int
    #: Other processes whose CPU time is the server's (pobox-pg: the PostgreSQL postmaster).
    helpers: tuple[int, ...] = ()

    def cpu_seconds(self) -> float:
        """CPU time of the server's processes (and its helpers') so far."""
        return sum(server_cpu_seconds(pid) for pid in (self.pid, *self.helpers))


#: Limits raised like Dovecot's below (only those this pobox knows, as the tree moves).
_POBOX_LIMITS = {"max_connections": 20_000, "max_connections_per_ip": 20_000}


@contextlib.contextmanager
def run_pobox(root: Path, name: str = "pobox") -> Iterator[Server]:
    """Start ``python -m pobox serve`` on core 0 (``pobox-pg``: on the PostgreSQL store)."""
    port = _free_port()
    base = root / name
    config = base / "pobox.toml"
    log = base / "pobox.log"
    store = (
        f'mail_location = "postgresql"\npostgresql_dsn = "{PG["dsn"]}"\n'
        if name == "pobox-pg"
        else 'mail_location = "maildir:~/Maildir"\n'
    )
    config.write_text(
        f'listen = ["{HOST}:{port}"]\n' + store + f'passwd_file = "{base / "passwd"}"\n'
        "pop3_lock_session = true\n"
        'log_level = "info"\n'
        f'log_path = "{log}"\n'
        + "".join(f"{key} = {value}\n" for key, value in _POBOX_LIMITS.items() if key in KEYS)
    )
    command = [sys.executable, "-m", "pobox", "serve", "-c", str(config)]
    with _started(name, command, base, port, base / "pobox.out") as server:
        yield server


@contextlib.contextmanager
def _started(name: str, command: list[str], base: Path, port: int, log: Path) -> Iterator[Server]:
    """Run ``command`` on the server core (output to ``base/<name>.out``) until its greeting."""
    with (base / f"{name}.out").open("ab") as sink:
        process = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CORE), *command],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_greeting(process, port, "Dovecot" if name == "dovecot" else name, log)
        extra = (int(PG["pid"]),) if name == "pobox-pg" else ()
        yield Server(name, port, process.pid, extra)
    finally:
        _stop(process)


#: Dovecot's limits, raised for the idle workload's 10,000 connections and some to spare.
_DOVECOT_LIMIT = 12_000


def _dovecot_config(base: Path, port: int) -> str:
    """Return ``dovecot.conf``: the tests' template plus long-lived processes and limits.

    ``service_count = 0`` keeps the login and pop3 processes alive between connections
    (Dovecot's high-performance mode), and the limits let it hold every idle connection.
    """
    limit = _DOVECOT_LIMIT
    extra = f"""\
# Added by bench/run.py: long-lived processes, limits raised for many connections.
pop3_lock_session = yes
mail_max_userip_connections = {limit}
default_process_limit = {limit}
default_client_limit = {limit}
default_vsz_limit = 1G
service pop3-login {{
  service_count = 0
  process_min_avail = 1
  client_limit = {limit}
}}
service pop3 {{
  service_count = 0
  process_limit = {limit}
}}
"""
    log = base / "dovecot.log"
    return dovecot_config(base, base / "passwd", log, port, "maildir:~/Maildir", extra)


@contextlib.contextmanager
def run_dovecot(root: Path) -> Iterator[Server]:
    """Start ``dovecot -F`` on core 0 (every process it forks inherits the affinity)."""
    port = _free_port()
    base = root / "dovecot"
    for sub in ("run", "state"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    config = base / "dovecot.conf"
    config.write_text(_dovecot_config(base, port))
    command = [str(find_dovecot()), "-F", "-c", str(config)]
    with _started("dovecot", command, base, port, base / "dovecot.log") as server:
        yield server


@contextlib.contextmanager
def run_server(name: str, root: Path) -> Iterator[Server]:
    if name == "dovecot":
        with run_dovecot(root) as server:
            yield server
    else:
        with run_pobox(root, name) as server:
            yield server


# --------------------------------------------------------------------------- measuring


def _cpu_jiffies() -> dict[int, tuple[int, int]]:
    """Return (busy, total) jiffies per CPU from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *values = line.split()
            numbers = [int(v) for v in values]
            idle = numbers[3] + numbers[4]
            out[int(name[3:])] = (sum(numbers[:8]) - idle, sum(numbers[:8]))
    return out


def _busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpu: int) -> float:
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return busy / total if total else 0.0


def _descendants(pid: int) -> list[int]:
    """Return ``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


_TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float:
    """Return the CPU time of ``pid`` and its descendants, with the children it has reaped."""
    total = 0
    for index, process in enumerate(_descendants(pid)):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            if index == 0:
                total += int(fields[13]) + int(fields[14])  # cutime, cstime (reaped children)
    return total / _TICKS


def memory_kb(pid: int) -> tuple[int, int, int, int]:
    """Return (RSS, PSS, USS in KB, process count) summed over ``pid`` and its descendants.

    RSS counts shared pages once per process, PSS shares them out, USS (private pages) is
    what each process alone costs.
    """
    rss = pss = uss = 0
    pids = _descendants(pid)
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    uss += int(line.split()[1])
    return rss, pss, uss, len(pids)


def _generator_cores() -> list[int]:
    others = sorted(os.sched_getaffinity(0) - {SERVER_CORE})
    return others or [SERVER_CORE]


def _child(spec: Spec, conn) -> None:
    os.sched_setaffinity(0, _generator_cores())
    conn.send(loadgen.run_load(spec))
    conn.close()


def generate(spec: Spec, processes: int) -> LoadResult:
    """Run ``spec`` from ``processes`` generator processes (users split between them)."""
    ctx = multiprocessing.get_context("fork")
    workers = []
    for index in range(processes):
        part = replace(
            spec,
            users=spec.users[index::processes],
            concurrency=max(1, spec.concurrency // processes),
        )
        parent, child = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child, args=(part, child))
        process.start()
        workers.append((process, parent))
    total = LoadResult()
    for process, pipe in workers:
        total.merge(pipe.recv())
        process.join()
    return total


@dataclass
class Round:
    """One measured round against one server."""

    value: float
    result: LoadResult
    server_busy: float
    generator_busy: float
    #: work done per CPU-second the server's own processes used (sessions, logins or MB).
    per_cpu: float = float("nan")


@dataclass
class Row:
    """One line of the results table: a workload variant, both servers' rounds."""

    workload: str
    variant: str
    unit: str
    higher_is_better: bool
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {s: [] for s in SERVERS})
    note: str = ""

    def median(self, server: str) -> float:
        values = [r.value for r in self.rounds[server]]
        return statistics.median(values) if values else float("nan")

    def ratio(self, server: str = "pobox") -> float:
        """``server`` ÷ Dovecot (for time and memory: the measured value's ratio)."""
        dovecot = self.median("dovecot")
        return self.median(server) / dovecot if dovecot else float("nan")

    def errors(self, server: str) -> int:
        return sum(r.result.errors for r in self.rounds[server])

    def gen_cpu(self, server: str) -> float:
        """The generator's own CPU use (fraction of one core), median over rounds."""
        values = [r.result.cpu / r.result.elapsed for r in self.rounds[server] if r.result.elapsed]
        return statistics.median(values) if values else float("nan")

    def per_cpu(self, server: str) -> float:
        values = [r.per_cpu for r in self.rounds[server] if r.per_cpu == r.per_cpu]
        return statistics.median(values) if values else float("nan")

    def per_cpu_ratio(self, server: str = "pobox") -> float:
        """``server`` ÷ Dovecot work per server CPU-second: robust to other load on the core."""
        dovecot = self.per_cpu("dovecot")
        return self.per_cpu(server) / dovecot if dovecot else float("nan")

    def busy(self, server: str, which: str) -> float:
        values = [getattr(r, which) for r in self.rounds[server]]
        return statistics.median(values) if values else float("nan")


def measure(
    rows: dict[str, Row],
    key: str,
    server: Server,
    spec: Spec,
    settings: Settings,
    value_of,
) -> None:
    """Run one round of ``spec`` against ``server`` and record it in ``rows[key]``."""
    spec = replace(spec, port=server.port)
    cpu_before = server.cpu_seconds()
    before = _cpu_jiffies()
    result = generate(spec, settings.generators)
    after = _cpu_jiffies()
    used = server.cpu_seconds() - cpu_before
    gen_core = _generator_cores()[0]
    work = result.bytes / 1e6 if spec.kind == "bulk" else result.ops
    measured = Round(
        value_of(result),
        result,
        _busy(before, after, SERVER_CORE),
        _busy(before, after, gen_core),
        work / used if used > 0 else float("nan"),
    )
    rows[key].rounds[server.name].append(measured)
    row = rows[key]
    shown = f"{measured.value:,.1f} {row.unit}"
    print(
        f"  {row.workload} {row.variant:<14} {server.name:<8} {shown:<18} "
        f"ops={result.ops} errors={result.errors} server-core={measured.server_busy:.0%} "
        f"gen-core={measured.generator_busy:.0%} gen-cpu={result.cpu / result.elapsed:.0%} "
        f"per-server-cpu-s={measured.per_cpu:,.1f}"
        + (f"  first error: {result.first_error}" if result.errors else ""),
        flush=True,
    )


def warm(server: Server, users: list[str], messages: int, kind: str = "session") -> None:
    """Visit every user once (both servers build their indexes on the first visit)."""
    spec = Spec(
        kind, HOST, server.port, tuple(users), PASSWORD, min(16, len(users)), 600.0, messages
    )
    spec = replace(spec, ops_limit=len(users))
    result = loadgen.run_load(spec)
    if result.errors:
        msg = f"warm-up against {server.name} failed: {result.first_error}"
        raise RuntimeError(msg)


def per_second(result: LoadResult) -> float:
    return result.ops / result.elapsed if result.elapsed else 0.0


def mb_per_second(result: LoadResult) -> float:
    return result.bytes / result.elapsed / 1e6 if result.elapsed else 0.0


def median_ms(result: LoadResult) -> float:
    return statistics.median(result.latencies) * 1000 if result.latencies else float("nan")


# --------------------------------------------------------------------------- workloads


def _interleaved(
    root: Path,
    settings: Settings,
    rows: dict[str, Row],
    plan: list[tuple[str, Spec, object]],
    warmups: list[tuple[list[str], int, str]],
) -> None:
    """Start the servers, warm them, then run ``plan`` in rounds: pobox, Dovecot, ..."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(run_server(name, root)) for name in SERVERS]
        for server in servers:
            for users, messages, kind in warmups:
                warm(server, users, messages, kind)
        for _ in range(settings.rounds):
            for key, spec, value_of in plan:
                for server in servers:
                    measure(rows, key, server, spec, settings, value_of)


def wl_session(root, settings, groups, rows) -> None:
    users = tuple(groups["session"])
    plan = []
    for clients in settings.session_concurrency:
        key = f"session-{clients}"
        rows[key] = Row("session", f"{clients} clients", "sessions/s", True)
        spec = Spec(
            "session",
            HOST,
            0,
            users,
            PASSWORD,
            clients,
            settings.duration,
            settings.session_messages,
        )
        plan.append((key, spec, per_second))
    _interleaved(root, settings, rows, plan, [(list(users), settings.session_messages, "session")])


def wl_login(root, settings, groups, rows) -> None:
    plan = []
    variants = (("plain", "PLAIN", 16), ("sha512", "SHA512-CRYPT", 16), ("argon2", "ARGON2ID", 4))
    for group, label, clients in variants:
        key = f"login-{group}"
        rows[key] = Row("login", f"{label} ({clients} cl.)", "logins/s", True)
        spec = Spec("login", HOST, 0, tuple(groups[group]), PASSWORD, clients, settings.duration)
        plan.append((key, spec, per_second))
    warmups = [(groups[g], 0, "login") for g, _, _ in variants]
    _interleaved(root, settings, rows, plan, warmups)


def wl_empty(root, settings, groups, rows) -> None:
    rows["empty"] = Row("empty", "16 clients", "sessions/s", True)
    spec = Spec("empty", HOST, 0, tuple(groups["plain"]), PASSWORD, 16, settings.duration, 0)
    _interleaved(
        root, settings, rows, [("empty", spec, per_second)], [(groups["plain"], 0, "empty")]
    )


def wl_bulk(root, settings, groups, rows) -> None:
    size_mb = settings.bulk_bytes / 1024 / 1024
    rows["bulk"] = Row("bulk", f"RETR {size_mb:.0f} MiB", "MB/s", True)
    spec = Spec("bulk", HOST, 0, tuple(groups["bulk"]), PASSWORD, 1, settings.duration, 1)
    _interleaved(
        root, settings, rows, [("bulk", spec, mb_per_second)], [(groups["bulk"], 1, "session")]
    )


def wl_bigbox(root, settings, groups, rows) -> None:
    n = settings.bigbox_messages
    rows["bigbox-first"] = Row("bigbox", f"first login ({n:,} msgs)", "ms", False)
    rows["bigbox-second"] = Row("bigbox", f"next logins ({n:,} msgs)", "ms", False)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(run_server(name, root)) for name in SERVERS]
        for server in servers:
            warm(server, groups["plain"], 0, "empty")
        for user in groups["bigbox"]:
            for server in servers:
                spec = Spec("bigbox", HOST, 0, (user,), PASSWORD, 1, 600.0, n, ops_limit=1)
                measure(rows, "bigbox-first", server, spec, settings, median_ms)
                spec = replace(spec, duration=settings.duration, ops_limit=0)
                measure(rows, "bigbox-second", server, spec, settings, median_ms)


async def _idle(server: Server, users: list[str], levels: tuple[int, ...]) -> list[dict]:
    opened: list[loadgen.Client] = []
    rss0, pss0, uss0, procs0 = memory_kb(server.pid)
    out = []
    try:
        done = 0
        for level in levels:
            started = time.perf_counter()
            errors = await loadgen.hold_idle(HOST, server.port, users[done:level], PASSWORD, opened)
            took = time.perf_counter() - started
            done = level
            await asyncio.sleep(1.0)
            rss, pss, uss, procs = memory_kb(server.pid)
            count = len(opened)
            out.append(
                {
                    "level": level,
                    "held": count,
                    "errors": errors,
                    "rss_kb": (rss - rss0) / count if count else float("nan"),
                    "pss_kb": (pss - pss0) / count if count else float("nan"),
                    "uss_kb": (uss - uss0) / count if count else float("nan"),
                    "procs": procs,
                    "total_rss_mb": rss / 1024,
                    "seconds": took,
                }
            )
            print(
                f"  idle {level:>6} {server.name:<8} held={count} errors={errors} "
                f"RSS/conn={out[-1]['rss_kb']:.1f} KB PSS/conn={out[-1]['pss_kb']:.1f} KB "
                f"USS/conn={out[-1]['uss_kb']:.1f} KB "
                f"processes={procs} (was {procs0}) total RSS={rss / 1024:.0f} MB "
                f"opened in {took:.1f}s",
                flush=True,
            )
    finally:
        for client in opened:
            client.close()
        await asyncio.sleep(0.5)
    return out


def wl_idle(root, settings, groups, rows) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(settings.idle_levels) * 2 + 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, need), hard), hard))
    for level in settings.idle_levels:
        rows[f"idle-{level}"] = Row("idle", f"{level:,} connections", "KB RSS/conn", False)
    for name in SERVERS:
        if name == "pobox-pg":
            continue  # idle connections hold no database state: the Maildir figure holds
        with run_server(name, root) as server:
            warm(server, groups["plain"][:4], 0, "empty")
            runner = loadgen.uvloop.run if loadgen.uvloop else asyncio.run
            for entry in runner(_idle(server, groups["idle"], settings.idle_levels)):
                result = LoadResult(ops=entry["held"], errors=entry["errors"], elapsed=1.0)
                row = rows[f"idle-{entry['level']}"]
                row.rounds[name].append(Round(entry["rss_kb"], result, 0.0, 0.0))
                row.note += (
                    f"{name}: PSS {entry['pss_kb']:.1f} KB/conn, USS {entry['uss_kb']:.1f} "
                    f"KB/conn, {entry['procs']} processes, {entry['held']:,} held, "
                    f"{entry['errors']} failed; "
                )


WORKLOADS = {
    "session": wl_session,
    "login": wl_login,
    "empty": wl_empty,
    "bulk": wl_bulk,
    "bigbox": wl_bigbox,
    "idle": wl_idle,
}


# --------------------------------------------------------------------------- generator check


def check_generator(root, settings, groups, rows) -> list[str]:
    """Rerun session (16 clients) and login (PLAIN) with two generator processes."""
    lines = []
    checks = []
    if "session-16" in rows:
        spec = Spec(
            "session",
            HOST,
            0,
            tuple(groups["session"]),
            PASSWORD,
            16,
            settings.duration,
            settings.session_messages,
        )
        checks.append(("session-16", spec))
    if "login-plain" in rows:
        spec = Spec("login", HOST, 0, tuple(groups["plain"]), PASSWORD, 16, settings.duration)
        checks.append(("login-plain", spec))
    for key, spec in checks:
        two = {key: Row(rows[key].workload, rows[key].variant, rows[key].unit, True)}
        with run_server("pobox", root) as pobox, run_server("dovecot", root) as dovecot:
            for server in (pobox, dovecot):
                warm(server, list(spec.users), spec.messages, spec.kind)
            for _ in range(settings.rounds):
                for server in (pobox, dovecot):
                    measure(two, key, server, spec, replace(settings, generators=2), per_second)
        for server in SERVERS:
            lines.append(
                f"| {key} | {server} | {rows[key].median(server):,.0f} | "
                f"{two[key].median(server):,.0f} | {_fmt(rows[key].per_cpu(server))} | "
                f"{_fmt(two[key].per_cpu(server))} | {rows[key].gen_cpu(server):.0%} | "
                f"{two[key].gen_cpu(server):.0%} |"
            )
    return lines


# --------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    dovecot = subprocess.run(
        [str(find_dovecot()), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dovecot": dovecot,
        "generator loop": loadgen.LOOP_NAME,
        "pobox tree": _git_head(),
        "load average at start": _loadavg(),
    }


def _loadavg() -> str:
    """The 1-minute load average: other work on the machine makes figures noisy."""
    return Path("/proc/loadavg").read_text().split()[0]


def _git_head() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def write_markdown(
    path: Path, rows: dict[str, Row], info: dict[str, str], settings: Settings, check: list[str]
) -> str:
    lines = [
        "# pobox vs Dovecot",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        f"Each server pinned to core {SERVER_CORE}, the load generator to the other core; "
        f"{settings.rounds} interleaved round(s) of {settings.duration:g} s per server, medians; "
        f"{settings.generators} generator process(es). Ratio = pobox ÷ Dovecot: for throughput "
        "higher is better for pobox, for ms and KB lower is better. 'Per server CPU-s' is the "
        "work (sessions, logins, MB) per CPU-second used by the server's own processes "
        "(/proc/PID/stat, all processes summed): it does not move when other programs share "
        "the core, which the wall-clock figures do."
        + (" **Quick run: small data, not representative.**" if settings.quick else ""),
        "",
        "| workload | variant | unit | pobox | Dovecot | ratio | per server CPU-s (p/D) "
        "| ratio per CPU-s | errors (p/D) | server core busy (p/D) | generator CPU (p/D) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        ratio = row.ratio()
        better = "↑" if row.higher_is_better else "↓"
        lines.append(
            f"| {row.workload} | {row.variant} | {row.unit} {better} | {_fmt(row.median('pobox'))} "
            f"| {_fmt(row.median('dovecot'))} | {ratio:.2f}x | {_fmt(row.per_cpu('pobox'))}/"
            f"{_fmt(row.per_cpu('dovecot'))} | {row.per_cpu_ratio():.2f}x | {row.errors('pobox')}/"
            f"{row.errors('dovecot')} | {row.busy('pobox', 'server_busy'):.0%}/"
            f"{row.busy('dovecot', 'server_busy'):.0%} | {row.gen_cpu('pobox'):.0%}/"
            f"{row.gen_cpu('dovecot'):.0%} |"
        )
    if "pobox-pg" in SERVERS:
        lines += [
            "",
            "pobox on the PostgreSQL store (pobox-pg), with its database on the same server "
            "core; ratios over Dovecot and over pobox on Maildir (↑: higher is better for "
            "throughput; for ms lower is better). Per CPU-s counts the database's processes.",
            "",
            "| workload | variant | unit | pobox-pg | pobox (Maildir) | Dovecot | pg ÷ Dovecot "
            "| pg ÷ Maildir | per server CPU-s (pg) | ratio per CPU-s (pg/D) | errors (pg) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows.values():
            if not row.rounds.get("pobox-pg"):
                continue
            maildir = row.median("pobox")
            over_maildir = row.median("pobox-pg") / maildir if maildir else float("nan")
            better = "↑" if row.higher_is_better else "↓"
            lines.append(
                f"| {row.workload} | {row.variant} | {row.unit} {better} "
                f"| {_fmt(row.median('pobox-pg'))} | {_fmt(maildir)} "
                f"| {_fmt(row.median('dovecot'))} | {row.ratio('pobox-pg'):.2f}x "
                f"| {over_maildir:.2f}x | {_fmt(row.per_cpu('pobox-pg'))} "
                f"| {row.per_cpu_ratio('pobox-pg'):.2f}x | {row.errors('pobox-pg')} |"
            )
    notes = [f"- {row.workload} {row.variant}: {row.note}" for row in rows.values() if row.note]
    if notes:
        lines += [
            "",
            "Idle memory (RSS, PSS and USS summed over all the server's processes, "
            "minus the figure before the connections):",
            "",
            *notes,
        ]
    if check:
        lines += [
            "",
            "Generator check: the same workload from one and from two generator processes "
            "(both on the generator core):",
            "",
            "| workload | server | 1 process | 2 processes | per server CPU-s (1) "
            "| per server CPU-s (2) | gen CPU (1) | gen CPU (2, summed) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *check,
        ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plot(path: Path, rows: dict[str, Row]) -> None:
    import matplotlib  # noqa: PLC0415 - only the report needs it, after Agg is chosen

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    keys = [k for k, r in rows.items() if r.median("dovecot") == r.median("dovecot")]
    labels = [f"{rows[k].workload}\n{rows[k].variant}" for k in keys]
    ratios = []
    for k in keys:
        ratio = rows[k].ratio()
        ratios.append(ratio if rows[k].higher_is_better else (1 / ratio if ratio else 0))
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.9), 5))
    colours = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    ax.bar(range(len(keys)), ratios, color=colours)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(range(len(keys)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("pobox advantage (x, log; >1: pobox better)")
    ax.set_title("pobox vs Dovecot, one core each (medians)")
    for i, r in enumerate(ratios):
        ax.text(i, r, f"{r:.2f}x", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def _raise_fd_limit(want: int = 65_536) -> None:
    """Raise the open-file limit the servers inherit (root may raise the hard limit too).

    10,000 idle sessions need 10,000 descriptors in the pobox process and many more in
    Dovecot's (a process per session).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, short rounds (smoke)")
    parser.add_argument(
        "--workloads", default=",".join(ALL_WORKLOADS), help=f"comma-separated: {ALL_WORKLOADS}"
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds per server (3; quick 1)")
    parser.add_argument(
        "--duration", type=float, default=0, help="seconds per round (4; quick 0.5)"
    )
    parser.add_argument("--generators", type=int, default=1, help="generator processes (1)")
    parser.add_argument(
        "--stores",
        default="maildir",
        help="pobox stores to measure, comma-separated: maildir (always), postgresql",
    )
    parser.add_argument(
        "--check-generator", action="store_true", help="rerun two workloads with 2 generators"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    parser.add_argument("--keep", action="store_true", help="print and keep the data folder")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - set(ALL_WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {sorted(unknown)}")
    if os.cpu_count() and os.cpu_count() < 2:
        print("warning: one CPU: server and generator share it", file=sys.stderr)
    settings = Settings.make(args)
    stores = {store.strip() for store in args.stores.split(",") if store.strip()}
    if stores - {"maildir", "postgresql"}:
        parser.error(f"unknown stores: {sorted(stores - {'maildir', 'postgresql'})}")
    with contextlib.ExitStack() as stack:
        if "postgresql" in stores:
            _start_postgresql(stack)
        return _run(args, settings, workloads)


def _start_postgresql(stack: contextlib.ExitStack) -> None:
    """Start a throwaway PostgreSQL on the server core, with pobox's schema; add pobox-pg."""
    from tests.helpers.postgres import migrate, running_postgres  # noqa: PLC0415

    cluster = stack.enter_context(running_postgres({"max_connections": "200"}))
    for pid in _descendants(cluster.pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {SERVER_CORE})
    cluster.psql('CREATE DATABASE "bench"')
    PG["dsn"] = cluster.dsn("bench")
    PG["pid"] = str(cluster.pid)
    migrate(PG["dsn"])
    SERVERS.insert(1, "pobox-pg")
    print(f"bench: PostgreSQL {cluster.bindir.parent.name} on core {SERVER_CORE}", flush=True)


def _run(args: argparse.Namespace, settings: Settings, workloads: list[str]) -> int:
    """Run the workloads against every server; write the table and the plot."""
    os.sched_setaffinity(0, _generator_cores())
    _raise_fd_limit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    started = time.monotonic()
    rows: dict[str, Row] = {}
    check: list[str] = []
    with searchable_tmpdir() as root:
        print(f"bench: data in {root}", flush=True)
        groups = build_world(root, settings, workloads)
        print(f"bench: data written in {time.monotonic() - started:.1f}s", flush=True)
        for workload in workloads:
            print(f"bench: {workload}", flush=True)
            WORKLOADS[workload](root, settings, groups, rows)
        if args.check_generator:
            print("bench: generator check (2 processes)", flush=True)
            check = check_generator(root, settings, groups, rows)
        if args.keep:
            kept = Path(tempfile_copy(root))
            print(f"bench: data kept in {kept}")
    info["load average at end"] = _loadavg()
    text = write_markdown(out / "results.md", rows, info, settings, check)
    write_plot(out / "results.png", rows)
    print(text)
    print(f"bench: done in {time.monotonic() - started:.0f}s; results in {out}")
    return 0


def tempfile_copy(root: Path) -> str:
    target = str(root) + "-kept"
    shutil.copytree(root, target, symlinks=True)
    return target


if __name__ == "__main__":
    sys.exit(main())
