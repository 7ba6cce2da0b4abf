"""pobox against Dovecot at its best, side by side: one command, the same data, one core each.

    .venv/bin/python bench/run.py [--quick] [--workloads session,login,empty,bulk,bigbox,idle]
        [--servers pobox,pobox-nolock,dovecot-tuned,dovecot-tuned-lock] [--dovecot-perclient]
        [--line-ends crlf,lf] [--server-cores 0]

The servers (``--servers``, measured in this order, interleaved):

- ``pobox``: its defaults, so the maildrop locked for the session (``pop3_lock_session = true``);
- ``pobox-nolock``: the same with ``pop3_lock_session = false``;
- ``dovecot-tuned``, **the main baseline**: Dovecot at its fastest, many clients per long-lived
  process (``service pop3-login { service_count = 0  process_min_avail = 1  client_limit =
  12000 }``, ``service pop3 { service_count = 0  client_limit = 1000 }``) with its default
  ``pop3_lock_session = no``;
- ``dovecot-tuned-lock``: the same with ``pop3_lock_session = yes``;
- ``dovecot-perclient`` (``--dovecot-perclient``): the row before issue 13, one ``pop3``
  process per connected client (its built-in ``client_limit = 1``, ``service_count = 0``),
  ``pop3_lock_session = yes``;
- ``pobox-pg`` (``--stores maildir,postgresql``): pobox on the PostgreSQL store;
- ``pobox-compiled`` (named in ``--servers``): ``pobox`` with its hot modules compiled by
  mypyc, from the tree ``POBOX_COMPILED_SRC`` names (``bench/compile_tree.sh``), an
  experiment (bench/results/mypyc.md).

Every ratio is over ``dovecot-tuned``; beside it, each lock setting against its match
(``pobox`` ÷ ``dovecot-tuned-lock``: both lock; ``pobox-nolock`` ÷ ``dovecot-tuned``: neither).

What it does, per workload:

1. writes the same data once per server (Maildir per user under a world-searchable temp dir,
   a Dovecot-format passwd-file with the same hashes: ``{PLAIN}``, and ``{SHA512-CRYPT}`` /
   ``{ARGON2ID}`` made by ``doveadm pw``). Messages look like real mail (a folded
   ``Received:`` header, wrapped body lines of at most 76 characters) and 2% of their body
   lines start with ``.`` (a tenth of those are a lone ``.``), so every RETR dot-stuffs.
   ``session`` and ``bulk`` run once on mail stored with CRLF line ends and once on mail
   stored with LF (``--line-ends``), each its own users and rows; ``crlf-nodots`` adds mail
   stored with CRLF and no dot line, which RETR may send as stored (``sendfile``);
2. starts each server under ``taskset -c <server cores>`` (every Dovecot process inherits it);
   with several server cores (``--server-cores 0,1``) pobox gets ``workers = N`` when its
   configuration knows the key, and Dovecot ``process_min_avail = N`` for both services;
3. warms them up, then runs interleaved rounds (pobox, pobox-nolock, dovecot-tuned, ...) of a
   closed-loop load from generator process(es) pinned to the other core(s), checking every
   answer (see :mod:`loadgen`: STAT, LIST against RETR sizes, UIDL, and each RETR's content
   un-stuffed against the delivered message normalised to CRLF), and reports medians and
   the ratios;
4. records each round's busy share of the server core and the generator core (``/proc/stat``),
   the generator's own CPU time, which shows whether the generator is the bottleneck, and the
   CPU time of the server's own processes, for work per server CPU-second (a figure that other
   load on a shared machine does not skew the way it skews wall-clock throughput).

``--stores maildir,postgresql`` adds a server, ``pobox-pg``: the same pobox on the
PostgreSQL store (issue 11), on a throwaway cluster (tests/helpers/postgres.py) pinned to the
server core too, so pobox-pg and its database share the one core Dovecot gets; its CPU time
counts the database's processes. Its data is the same mail, stored through the store.

Results: ``bench/results/results.md`` (a table, with the machine) and ``results.png``.
``--generators 2`` splits the clients over two generator processes; ``--check-generator``
runs ``session`` (16 clients) and ``login`` (PLAIN) once more with two generator processes
and reports both figures side by side. The soak (idle sessions plus busy clients for minutes,
RSS sampled) is ``bench/soak.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing
import os
import platform
import pwd
import random
import re
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
#: The cores the server under test may run on (``--server-cores``); the generator gets the rest.
SERVER_CORES: list[int] = [0]
ALL_WORKLOADS = ("session", "login", "empty", "bulk", "bigbox", "idle")
ALL_SERVERS = (
    "pobox",
    "pobox-nolock",
    "pobox-pg",
    "dovecot-tuned",
    "dovecot-tuned-lock",
    "dovecot-perclient",
    "python-floor",
    "pobox-compiled",
)
DEFAULT_SERVERS = ("pobox", "pobox-nolock", "dovecot-tuned", "dovecot-tuned-lock")
#: The baseline every ratio is taken over: Dovecot at its best.
MAIN = "dovecot-tuned"
#: Each pobox row and the Dovecot row with the same lock setting.
LOCK_MATCH = {"pobox": "dovecot-tuned-lock", "pobox-nolock": "dovecot-tuned"}
#: Mail stored with these line ends (``--line-ends``), for the session and bulk workloads.
LINE_ENDS: list[str] = ["crlf", "lf"]
#: The servers of this run, in the order they are measured (``--servers``; ``--stores``
#: adds pobox-pg).
SERVERS: list[str] = list(DEFAULT_SERVERS)
#: What each server is, for the report.
SERVER_SETUPS = {
    "pobox": "pobox, default pop3_lock_session = true (the maildrop locked per session)",
    "pobox-nolock": "pobox, pop3_lock_session = false",
    "pobox-compiled": "pobox with its hot modules compiled by mypyc (bench/compile_tree.sh, "
    "POBOX_COMPILED_SRC), default pop3_lock_session = true; an experiment, not for serving",
    "pobox-pg": "pobox on the PostgreSQL store, pop3_lock_session = true",
    "dovecot-tuned": "Dovecot, long-lived processes, pop3-login client_limit 12000, "
    "pop3 client_limit 1000 (many clients per pop3 process), default pop3_lock_session = no",
    "dovecot-tuned-lock": "the same with pop3_lock_session = yes",
    "dovecot-perclient": "Dovecot, one pop3 process per client (client_limit 1, "
    "service_count 0), pop3_lock_session = yes (the benchmark before issue 13)",
    "python-floor": "bench/floor.py, the least a uvloop POP3 server does for these workloads "
    "(no lock, log, limit or safety check): the ceiling of a CPython server of this design",
}
#: The delivered messages of each user group, normalised to CRLF (what RETR must return).
EXPECTED: dict[str, tuple[bytes, ...]] = {}
#: Lines starting with "." over all body lines of the generated mail, filled by build_world.
DOT_SHARE: dict[str, float] = {}
#: The DSN of the throwaway PostgreSQL cluster when pobox-pg runs; "extra": --pg-config lines.
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


#: Words for body lines; a few are long so that wrapping is real.
_WORDS = (
    "mail", "pop3", "server", "python", "dovecot", "maildir", "fast", "the", "a", "of",
    "retrieve", "message", "delivery", "configuration", "to", "and", "is", "benchmark",
)  # fmt: skip
#: Share of body lines that start with "." (RFC 1939 §3 stuffs them); a tenth of those are a
#: lone "." (which would end the message if it were not stuffed).
DOT_LINES = 0.02
#: Body lines are wrapped at this many characters, as mail user agents do (RFC 5322 §2.1.1).
WRAP = 76


def _message(rng: random.Random, number: int, size: int) -> bytes:
    """Return a plausible LF-terminated message of about ``size`` bytes.

    Real mail's shape: trace and MIME headers (one folded), a body of wrapped lines, some
    of them starting with ``.``: :data:`DOT_LINES` of the body lines.
    """
    head = (
        f"Return-Path: <sender{number}@example.org>\n"
        f"Delivered-To: user@example.com\n"
        f"Received: from mx{number % 7}.example.org (mx{number % 7}.example.org "
        f"[192.0.2.{number % 250 + 1}])\n"
        f"\tby mail.example.com (pobox-bench) with ESMTPS id {rng.getrandbits(48):012x}\n"
        f"\tfor <user@example.com>; Mon, 23 Nov 2026 12:00:{number % 60:02d} +0000\n"
        f"From: Sender {number} <sender{number}@example.org>\n"
        f"To: User <user@example.com>\n"
        f"Subject: Benchmark message {number}\n"
        f"Date: Mon, 23 Nov 2026 12:00:{number % 60:02d} +0000\n"
        f"Message-ID: <{number}.{rng.getrandbits(40)}@example.org>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "Content-Transfer-Encoding: 7bit\n\n"
    )
    lines = [head]
    total = len(head)
    while total < size:
        roll = rng.random()
        if roll < DOT_LINES / 10:
            line = "."
        else:
            line = rng.choice(_WORDS)
            while len(line) < WRAP - 16:
                line += " " + rng.choice(_WORDS)
            if roll < DOT_LINES:
                line = "." + line  # dot-stuffing must be undone to match LIST
        lines.append(line + "\n")
        total += len(line) + 1
    return "".join(lines).encode()


def to_crlf(data: bytes) -> bytes:
    """Return ``data`` with every line ending CRLF: what POP3 sends before dot-stuffing."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def dot_share(messages: list[bytes]) -> float:
    """Return the share of body lines (after the header) that start with ``.``."""
    dots = lines = 0
    for data in messages:
        body = to_crlf(data).split(b"\r\n\r\n", 1)[1]
        lines += body.count(b"\r\n")
        dots += body.count(b"\r\n.") + body.startswith(b".")
    return dots / lines if lines else 0.0


def _write_maildir(maildir: Path, messages: list[bytes]) -> None:
    # Benchmark data, the same files for every server, as a foreign MTA leaves them: not
    # pobox's Maildir writer (pobox.storage.maildir.deliver_message). S= is the file's size,
    # W= the size with CRLF line ends (the POP3 size), as Dovecot names its files.
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

    def add(
        self, prefix: str, count: int, stored: str, messages: list[bytes], line_end: str = "lf"
    ) -> list[str]:
        """Add ``count`` users with ``messages`` stored with ``line_end`` (``lf``/``crlf``)."""
        names = [f"{prefix}{i:05d}" for i in range(count)]
        kept = [to_crlf(m) for m in messages] if line_end.startswith("crlf") else messages
        for name in names:
            self.users[name] = stored
            self.mail[name] = kept
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
            # Both servers access the mail as the one unprivileged mail account, as a
            # production server run as root does (pobox: mode 2, mail_uid; Dovecot: its
            # mail processes run as the userdb uid).
            for server in SERVERS:
                if server != "pobox-pg":  # mail in the database: no home, no files
                    _chown_tree(self.root / server / "home", account.uid, account.gid)


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
    """Write the data the chosen workloads need; return the user groups.

    ``session`` and ``bulk`` get a group per line end (``session-crlf``, ``bulk-lf``, ...):
    the same messages, stored with CRLF or with LF. :data:`EXPECTED` gets each group's
    messages normalised to CRLF, for the loadgen's content check.
    """
    rng = random.Random(1939)
    world = World(root, settings)
    groups: dict[str, list[str]] = {}
    plain = "{PLAIN}" + PASSWORD
    groups["plain"] = world.add("p", settings.login_users, plain, [])
    if "session" in workloads:
        messages = [
            _message(rng, n, rng.randint(3500, 4600)) for n in range(settings.session_messages)
        ]
        DOT_SHARE["session"] = dot_share(messages)
        for end in LINE_ENDS:
            group = f"session-{end}"
            kept = [without_dots(m) for m in messages] if end == "crlf-nodots" else messages
            groups[group] = world.add(f"s{end}", settings.session_users, plain, kept, end)
            EXPECTED[group] = tuple(to_crlf(m) for m in kept)
    if "login" in workloads:
        groups["sha512"] = world.add("c", settings.login_users, _doveadm_hash("SHA512-CRYPT"), [])
        groups["argon2"] = world.add("a", settings.argon_users, _doveadm_hash("ARGON2ID"), [])
    if "bulk" in workloads:
        messages = [_message(rng, 1, settings.bulk_bytes)]
        DOT_SHARE["bulk"] = dot_share(messages)
        for end in LINE_ENDS:
            group = f"bulk-{end}"
            kept = [without_dots(m) for m in messages] if end == "crlf-nodots" else messages
            groups[group] = world.add(f"bulk{end}", 1, plain, kept, end)
            EXPECTED[group] = tuple(to_crlf(m) for m in kept)
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
#: How pobox started as root reaches the mail (``--pobox-access``): ``mail_uid`` (mode 2, the
#: whole server runs as the mail account) or ``helper`` (mode 3, the storage helper opens
#: every file with the owner's uid, for users who each own their mail).
POBOX_ACCESS = {"value": "mail_uid"}
#: What runs ``-m pobox`` instead of Python itself (``soak.py --memtrace``: bench/memtrace.py).
POBOX_WRAPPER: list[str] = []
#: Whether pobox runs with ``metrics_listen`` (``--pobox-metrics``).
POBOX_METRICS: dict[str, bool] = {"value": False}


def _pobox_access(name: str = "pobox") -> str:
    """The TOML lines that pick pobox's mode when the benchmark runs as root."""
    if os.geteuid() != 0 or "mail_uid" not in KEYS:
        return ""
    account = _mail_account()
    if name == "pobox-pg":  # no mail files: the server runs as the mail account all the same
        return f'user = "{pwd.getpwuid(account.uid).pw_name}"\n'
    if POBOX_ACCESS["value"] == "helper":
        return ""  # each passwd line names the uid: the helper accesses the mail with it
    return f'mail_uid = "{account.uid}"\nmail_gid = "{account.gid}"\n'


@contextlib.contextmanager
def run_pobox(root: Path, name: str = "pobox", extra: str = "") -> Iterator[Server]:
    """Start ``python -m pobox serve`` on the server cores (``pobox-pg``: on PostgreSQL).

    ``extra``: configuration lines added at the end (bench/profile_server.py --set).
    """
    port = _free_port()
    base = root / name
    config = base / "pobox.toml"
    log = base / "pobox.log"
    store = (
        f'mail_location = "postgresql"\npostgresql_dsn = "{PG["dsn"]}"\n'
        if name == "pobox-pg"
        else 'mail_location = "maildir:~/Maildir"\n'
    )
    lock = "false" if name == "pobox-nolock" else "true"  # true: pobox's default
    # --pobox-metrics: the Prometheus endpoint on (what counting costs per command).
    metrics = f'metrics_listen = "{HOST}:{_free_port()}"\n' if POBOX_METRICS["value"] else ""
    # workers = N only once pobox knows the key (a multi-process pobox is being built).
    workers = f"workers = {len(SERVER_CORES)}\n" if "workers" in KEYS else ""
    config.write_text(
        f'listen = ["{HOST}:{port}"]\n' + store + f'passwd_file = "{base / "passwd"}"\n'
        f"pop3_lock_session = {lock}\n" + workers + metrics + 'log_level = "info"\n'
        f'log_path = "{log}"\n'
        + "".join(f"{key} = {value}\n" for key, value in _POBOX_LIMITS.items() if key in KEYS)
        + _pobox_access(name)
        + extra
    )
    command = [sys.executable, *POBOX_WRAPPER, "-m", "pobox", "serve", "-c", str(config)]
    if name == "pobox-compiled":  # POBOX_COMPILED_SRC is checked with --servers
        command = ["env", f"PYTHONPATH={os.environ['POBOX_COMPILED_SRC']}", *command]
    if name == "pobox-pg":
        with config.open("a") as more:
            more.write(PG.get("extra", ""))
    with _started(name, command, base, port, base / "pobox.out") as server:
        yield server


@contextlib.contextmanager
def _started(name: str, command: list[str], base: Path, port: int, log: Path) -> Iterator[Server]:
    """Run ``command`` on the server core (output to ``base/<name>.out``) until its greeting."""
    with (base / f"{name}.out").open("ab") as sink:
        process = subprocess.Popen(
            ["taskset", "-c", ",".join(map(str, SERVER_CORES)), *command],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_greeting(process, port, name, log)
        extra = (int(PG["pid"]),) if name == "pobox-pg" else ()
        yield Server(name, port, process.pid, extra)
    finally:
        _stop(process)


#: Dovecot's limits, raised for the idle workload's 10,000 connections and some to spare.
_DOVECOT_LIMIT = 12_000
#: Clients per ``pop3`` process in the tuned Dovecot (issue 13's setting).
_DOVECOT_POP3_CLIENTS = 1000


def _dovecot_config(base: Path, port: int, variant: str) -> str:
    """Return ``dovecot.conf`` for ``variant``: the tests' template plus the service settings.

    All variants keep their processes alive between connections (``service_count = 0``) and
    raise the limits so that they can hold every idle connection.

    - ``dovecot-tuned``: Dovecot at its fastest, one ``pop3`` process serves up to 1,000
      clients; ``pop3_lock_session = no`` (Dovecot's default);
    - ``dovecot-tuned-lock``: the same with ``pop3_lock_session = yes``;
    - ``dovecot-perclient``: one ``pop3`` process per client (the built-in ``client_limit =
      1``), ``pop3_lock_session = yes``: the benchmark's Dovecot before issue 13.

    With several server cores, ``process_min_avail`` is their number for both services, so
    that every core has a login and a ``pop3`` process from the start.
    """
    limit = _DOVECOT_LIMIT
    cores = len(SERVER_CORES)
    lock = "no" if variant == "dovecot-tuned" else "yes"
    if variant == "dovecot-perclient":
        pop3 = f"service_count = 0\n  process_limit = {limit}"
    else:
        pop3 = (
            f"service_count = 0\n  client_limit = {_DOVECOT_POP3_CLIENTS}\n"
            f"  process_limit = {limit}"
        )
        if cores > 1:
            pop3 += f"\n  process_min_avail = {cores}"
    extra = f"""\
# Added by bench/run.py ({variant}): long-lived processes, limits raised for many connections.
pop3_lock_session = {lock}
mail_max_userip_connections = {limit}
default_process_limit = {limit}
default_client_limit = {limit}
default_vsz_limit = 1G
service pop3-login {{
  service_count = 0
  process_min_avail = {max(1, cores)}
  client_limit = {limit}
}}
service pop3 {{
  {pop3}
}}
"""
    log = base / "dovecot.log"
    return dovecot_config(base, base / "passwd", log, port, "maildir:~/Maildir", extra)


@contextlib.contextmanager
def run_dovecot(root: Path, name: str) -> Iterator[Server]:
    """Start ``dovecot -F`` on the server cores (every process it forks inherits the affinity)."""
    port = _free_port()
    base = root / name
    for sub in ("run", "state"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    config = base / "dovecot.conf"
    config.write_text(_dovecot_config(base, port, name))
    command = [str(find_dovecot()), "-F", "-c", str(config)]
    with _started(name, command, base, port, base / "dovecot.log") as server:
        yield server


@contextlib.contextmanager
def run_floor(root: Path, name: str) -> Iterator[Server]:
    """Start bench/floor.py (the Python floor) on the server cores."""
    port = _free_port()
    base = root / name
    floor = Path(__file__).resolve().parent / "floor.py"
    command = [sys.executable, str(floor), "--port", str(port), "--passwd", str(base / "passwd")]
    with _started(name, command, base, port, base / f"{name}.out") as server:
        yield server


def is_dovecot(name: str) -> bool:
    return name.startswith("dovecot")


@contextlib.contextmanager
def run_server(name: str, root: Path) -> Iterator[Server]:
    if is_dovecot(name):
        with run_dovecot(root, name) as server:
            yield server
    elif name == "python-floor":
        with run_floor(root, name) as server:
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
    others = sorted(set(range(os.cpu_count() or 1)) - set(SERVER_CORES))
    return others or list(SERVER_CORES)


def _server_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    """The server cores' mean busy share between two /proc/stat readings."""
    return statistics.fmean(_busy(before, after, cpu) for cpu in SERVER_CORES)


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
    """One line of the results table: a workload variant, every server's rounds."""

    workload: str
    variant: str
    unit: str
    higher_is_better: bool
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {s: [] for s in SERVERS})
    note: str = ""

    def median(self, server: str) -> float:
        values = [r.value for r in self.rounds.get(server, [])]
        return statistics.median(values) if values else float("nan")

    def ratio(self, server: str = "pobox", base: str = "") -> float:
        """``server`` ÷ ``base`` (default: the main Dovecot; time and memory: value ratio)."""
        over = self.median(base or main_dovecot())
        return self.median(server) / over if over else float("nan")

    def errors(self, server: str) -> int:
        return sum(r.result.errors for r in self.rounds.get(server, []))

    def gen_cpu(self, server: str) -> float:
        """The generator's own CPU use (fraction of one core), median over rounds."""
        values = [
            r.result.cpu / r.result.elapsed for r in self.rounds.get(server, []) if r.result.elapsed
        ]
        return statistics.median(values) if values else float("nan")

    def per_cpu(self, server: str) -> float:
        values = [r.per_cpu for r in self.rounds.get(server, []) if r.per_cpu == r.per_cpu]
        return statistics.median(values) if values else float("nan")

    def per_cpu_ratio(self, server: str = "pobox", base: str = "") -> float:
        """``server`` ÷ ``base`` work per server CPU-second: robust to other load on the core."""
        over = self.per_cpu(base or main_dovecot())
        return self.per_cpu(server) / over if over else float("nan")

    def busy(self, server: str, which: str) -> float:
        values = [getattr(r, which) for r in self.rounds.get(server, [])]
        return statistics.median(values) if values else float("nan")


def main_dovecot() -> str:
    """The baseline of the ratios: ``dovecot-tuned``, else the first Dovecot of the run."""
    if MAIN in SERVERS:
        return MAIN
    return next((name for name in SERVERS if is_dovecot(name)), MAIN)


def lock_pairs() -> list[tuple[str, str]]:
    """(pobox variant, Dovecot with the same lock setting) pairs both in this run."""
    return [(a, b) for a, b in LOCK_MATCH.items() if a in SERVERS and b in SERVERS]


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
        _server_busy(before, after),
        _busy(before, after, gen_core),
        work / used if used > 0 else float("nan"),
    )
    rows[key].rounds[server.name].append(measured)
    row = rows[key]
    shown = f"{measured.value:,.1f} {row.unit}"
    print(
        f"  {row.workload} {row.variant:<18} {server.name:<18} {shown:<18} "
        f"ops={result.ops} errors={result.errors} server-core={measured.server_busy:.0%} "
        f"gen-core={measured.generator_busy:.0%} gen-cpu={result.cpu / result.elapsed:.0%} "
        f"per-server-cpu-s={measured.per_cpu:,.1f}"
        + (f"  first error: {result.first_error}" if result.errors else ""),
        flush=True,
    )


def warm(
    server: Server,
    users: list[str],
    messages: int,
    kind: str = "session",
    expected: tuple[bytes, ...] = (),
) -> None:
    """Visit every user once (the servers build their indexes on the first visit)."""
    spec = Spec(
        kind, HOST, server.port, tuple(users), PASSWORD, min(16, len(users)), 600.0, messages
    )
    spec = replace(spec, ops_limit=len(users), expected=expected)
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
    warmups: list[tuple[list[str], int, str, tuple[bytes, ...]]],
) -> None:
    """Start the servers, warm them, then run ``plan`` in rounds: pobox, Dovecot, ..."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(run_server(name, root)) for name in SERVERS]
        for server in servers:
            for users, messages, kind, expected in warmups:
                warm(server, users, messages, kind, expected)
        for _ in range(settings.rounds):
            for key, spec, value_of in plan:
                for server in servers:
                    measure(rows, key, server, spec, settings, value_of)


def _line_end_label(end: str) -> str:
    if end == "crlf-nodots":  # wire-ready: what RETR may send as stored (sendfile)
        return "CRLF-stored, no dot lines"
    return end.upper() + "-stored"


def without_dots(data: bytes) -> bytes:
    """Return ``data`` with no line starting with ``.`` (for ``--line-ends crlf-nodots``)."""
    data = re.sub(rb"(?m)^\.+(?=\r?\n)", b"x", data)  # a line of dots: one letter instead
    return re.sub(rb"(?m)^\.+", b"", data)


def wl_session(root, settings, groups, rows) -> None:
    plan = []
    warmups = []
    for end in LINE_ENDS:
        group = f"session-{end}"
        users = tuple(groups[group])
        for clients in settings.session_concurrency:
            key = f"session-{clients}-{end}"
            rows[key] = Row(
                "session", f"{clients} clients, {_line_end_label(end)}", "sessions/s", True
            )
            spec = Spec(
                "session",
                HOST,
                0,
                users,
                PASSWORD,
                clients,
                settings.duration,
                settings.session_messages,
                expected=EXPECTED[group],
            )
            plan.append((key, spec, per_second))
        warmups.append((list(users), settings.session_messages, "session", EXPECTED[group]))
    _interleaved(root, settings, rows, plan, warmups)


def wl_login(root, settings, groups, rows) -> None:
    plan = []
    variants = (("plain", "PLAIN", 16), ("sha512", "SHA512-CRYPT", 16), ("argon2", "ARGON2ID", 4))
    for group, label, clients in variants:
        key = f"login-{group}"
        rows[key] = Row("login", f"{label} ({clients} cl.)", "logins/s", True)
        spec = Spec("login", HOST, 0, tuple(groups[group]), PASSWORD, clients, settings.duration)
        plan.append((key, spec, per_second))
    warmups = [(groups[g], 0, "login", ()) for g, _, _ in variants]
    _interleaved(root, settings, rows, plan, warmups)


def wl_empty(root, settings, groups, rows) -> None:
    rows["empty"] = Row("empty", "16 clients", "sessions/s", True)
    spec = Spec("empty", HOST, 0, tuple(groups["plain"]), PASSWORD, 16, settings.duration, 0)
    _interleaved(
        root, settings, rows, [("empty", spec, per_second)], [(groups["plain"], 0, "empty", ())]
    )


def wl_bulk(root, settings, groups, rows) -> None:
    size_mb = settings.bulk_bytes / 1024 / 1024
    plan = []
    warmups = []
    for end in LINE_ENDS:
        group = f"bulk-{end}"
        key = f"bulk-{end}"
        rows[key] = Row("bulk", f"RETR {size_mb:.0f} MiB, {_line_end_label(end)}", "MB/s", True)
        spec = Spec(
            "bulk",
            HOST,
            0,
            tuple(groups[group]),
            PASSWORD,
            1,
            settings.duration,
            1,
            expected=EXPECTED[group],
        )
        plan.append((key, spec, mb_per_second))
        warmups.append((groups[group], 1, "session", EXPECTED[group]))
    _interleaved(root, settings, rows, plan, warmups)


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
    end = LINE_ENDS[0]
    if f"session-16-{end}" in rows:
        spec = Spec(
            "session",
            HOST,
            0,
            tuple(groups[f"session-{end}"]),
            PASSWORD,
            16,
            settings.duration,
            settings.session_messages,
            expected=EXPECTED[f"session-{end}"],
        )
        checks.append((f"session-16-{end}", spec))
    if "login-plain" in rows:
        spec = Spec("login", HOST, 0, tuple(groups["plain"]), PASSWORD, 16, settings.duration)
        checks.append(("login-plain", spec))
    for key, spec in checks:
        two = {key: Row(rows[key].workload, rows[key].variant, rows[key].unit, True)}
        checked = [name for name in ("pobox", main_dovecot()) if name in SERVERS]
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(run_server(name, root)) for name in checked]
            for server in servers:
                warm(server, list(spec.users), spec.messages, spec.kind, spec.expected)
            for _ in range(settings.rounds):
                for server in servers:
                    measure(two, key, server, spec, replace(settings, generators=2), per_second)
        for server in checked:
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


def _x(value: float) -> str:
    """A ratio as ``1.23x``, or ``n/a``."""
    return f"{value:.2f}x" if value == value else "n/a"


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def _ratio_columns() -> list[tuple[str, str, str]]:
    """(heading, server, base) of each ratio column: over the main Dovecot, then lock-matched.

    A lock-matched pair that is already a main column (``pobox-nolock`` ÷ ``dovecot-tuned``)
    is not repeated; its heading says the locks match.
    """
    base = main_dovecot()
    matched = dict(lock_pairs())
    columns = []
    for name in SERVERS:
        if is_dovecot(name) or name == "pobox-pg" or base not in SERVERS:
            continue
        note = f" (locks {'on' if name == 'pobox' else 'off'})" if matched.get(name) == base else ""
        columns.append((f"{name} ÷ {base}{note}", name, base))
    for a, b in matched.items():
        if b != base:
            columns.append((f"{a} ÷ {b} (locks on)", a, b))
    return columns


def _servers_in_tables() -> list[str]:
    return [name for name in SERVERS if name != "pobox-pg"]


def write_markdown(
    path: Path, rows: dict[str, Row], info: dict[str, str], settings: Settings, check: list[str]
) -> str:
    servers = _servers_in_tables()
    base = main_dovecot()
    columns = _ratio_columns()
    shares = ", ".join(f"{k} mail {v:.1%}" for k, v in DOT_SHARE.items())
    cores = ",".join(map(str, SERVER_CORES))
    lines = [
        "# pobox vs Dovecot at its best",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        "Servers: " + "; ".join(f"`{name}`: {SERVER_SETUPS[name]}" for name in SERVERS) + ".",
        "",
        f"Each server pinned to core(s) {cores}, the load generator to the other core(s); "
        f"{settings.rounds} interleaved round(s) of {settings.duration:g} s per server, medians; "
        f"{settings.generators} generator process(es). Every ratio is over `{base}` "
        "(Dovecot at its best), beside it each pobox lock setting over the Dovecot with the "
        "same one. For throughput higher is better for pobox (↑), for ms and KB lower (↓). "
        "Every answer checked: STAT, LIST against RETR sizes, UIDL, and every RETR's content, "
        "un-stuffed, against the delivered message normalised to CRLF. Body lines starting with "
        f"'.': {shares or 'n/a'}. 'CRLF-stored' / 'LF-stored': the line ends of the stored files."
        + (" **Quick run: small data, not representative.**" if settings.quick else ""),
        "",
        "| workload | variant | unit | "
        + " | ".join(servers)
        + " | "
        + " | ".join(c[0] for c in columns)
        + " | errors ("
        + " / ".join(servers)
        + ") |",
        "|---|---|---|" + "---:|" * (len(servers) + len(columns)) + "---:|",
    ]
    for row in rows.values():
        better = "↑" if row.higher_is_better else "↓"
        lines.append(
            f"| {row.workload} | {row.variant} | {row.unit} {better} | "
            + " | ".join(_fmt(row.median(name)) for name in servers)
            + " | "
            + " | ".join(_x(row.ratio(a, b)) for _, a, b in columns)
            + " | "
            + "/".join(str(row.errors(name)) for name in servers)
            + " |"
        )
    lines += [
        "",
        "Work per CPU-second of the server's own processes (/proc/PID/stat, all processes "
        "summed: sessions, logins or MB), which other programs sharing the core do not skew "
        "the way they skew wall-clock figures; the server cores' busy share and the "
        "generator's own CPU use (a fraction of one core), medians:",
        "",
        "| workload | variant | "
        + " | ".join(f"per CPU-s {name}" for name in servers)
        + " | "
        + " | ".join(f"per CPU-s {c[0]}" for c in columns)
        + " | server cores busy | generator CPU |",
        "|---|---|" + "---:|" * (len(servers) + len(columns)) + "---:|---:|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row.workload} | {row.variant} | "
            + " | ".join(_fmt(row.per_cpu(name)) for name in servers)
            + " | "
            + " | ".join(_x(row.per_cpu_ratio(a, b)) for _, a, b in columns)
            + " | "
            + "/".join(f"{row.busy(name, 'server_busy'):.0%}" for name in servers)
            + " | "
            + "/".join(f"{row.gen_cpu(name):.0%}" for name in servers)
            + " |"
        )
    if "pobox-pg" in SERVERS:
        lines += [
            "",
            "pobox on the PostgreSQL store (pobox-pg), with its database on the same server "
            f"core(s); ratios over `{base}` and over pobox on Maildir (↑: higher is better for "
            "throughput; for ms lower is better). Per CPU-s counts the database's processes.",
            "",
            f"| workload | variant | unit | pobox-pg | pobox (Maildir) | {base} | pg ÷ {base} "
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
                f"| {_fmt(row.median(base))} | {_x(row.ratio('pobox-pg'))} "
                f"| {_x(over_maildir)} | {_fmt(row.per_cpu('pobox-pg'))} "
                f"| {_x(row.per_cpu_ratio('pobox-pg'))} | {row.errors('pobox-pg')} |"
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

    columns = _ratio_columns()
    keys = [k for k, r in rows.items() if r.median(main_dovecot()) == r.median(main_dovecot())]
    labels = [f"{rows[k].workload}\n{rows[k].variant}" for k in keys]
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 1.2), 5.5))
    width = 0.8 / max(1, len(columns))
    for index, (heading, server, base) in enumerate(columns):
        ratios = []
        for k in keys:
            ratio = rows[k].ratio(server, base)
            ratios.append(ratio if rows[k].higher_is_better else (1 / ratio if ratio else 0))
        xs = [i + (index - (len(columns) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, ratios, width=width, label=heading)
        for x, r in zip(xs, ratios, strict=True):
            if r == r:
                ax.text(x, r, f"{r:.2f}", ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(range(len(keys)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("pobox advantage (x, log; >1: pobox better)")
    ax.set_title(f"pobox vs Dovecot at its best ({main_dovecot()}), medians")
    ax.legend(fontsize=7)
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
    parser.add_argument(
        "--pobox-access",
        choices=("mail_uid", "helper"),
        default="mail_uid",
        help="as root: pobox runs as the mail uid (mail_uid, the default) or through the "
        "storage helper (helper)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"servers to measure, comma-separated, in this order: {', '.join(ALL_SERVERS)} "
        f"(default {','.join(DEFAULT_SERVERS)}; every ratio is over {MAIN})",
    )
    parser.add_argument(
        "--dovecot-perclient",
        action="store_true",
        help="add dovecot-perclient: one pop3 process per client, the pre-issue-13 row",
    )
    parser.add_argument(
        "--line-ends",
        default="crlf,lf",
        help="line ends of the stored mail for session and bulk, comma-separated: crlf,lf "
        "(crlf-nodots: CRLF without dot lines, wire-ready)",
    )
    parser.add_argument(
        "--server-cores",
        default="0",
        help="cores the server runs on, comma-separated (0; 0,1: pobox gets workers = 2 "
        "when it knows the key, Dovecot process_min_avail = 2)",
    )
    parser.add_argument(
        "--pobox-metrics",
        action="store_true",
        help="pobox with metrics_listen set (its counting's cost, against a run without)",
    )
    parser.add_argument(
        "--pg-config",
        action="append",
        default=[],
        metavar="LINE",
        help="a configuration line added for pobox-pg only, e.g. 'shared_state = \"memory\"' "
        "(the state the Maildir pobox keeps: the store alone compared)",
    )
    args = parser.parse_args(argv)
    POBOX_ACCESS["value"] = args.pobox_access
    if args.pg_config:
        PG["extra"] = "".join(f"{line}\n" for line in args.pg_config)
        SERVER_SETUPS["pobox-pg"] += ", with " + "; ".join(args.pg_config)
    POBOX_METRICS["value"] = args.pobox_metrics
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    if args.dovecot_perclient and "dovecot-perclient" not in servers:
        servers.append("dovecot-perclient")
    if set(servers) - set(ALL_SERVERS) or not servers or len(set(servers)) != len(servers):
        parser.error(f"--servers: choose among {', '.join(ALL_SERVERS)}, each once")
    if "pobox-compiled" in servers and not os.environ.get("POBOX_COMPILED_SRC"):
        parser.error("pobox-compiled: set POBOX_COMPILED_SRC (bench/compile_tree.sh)")
    line_ends = [end.strip() for end in args.line_ends.split(",") if end.strip()]
    if not line_ends or set(line_ends) - {"crlf", "lf", "crlf-nodots"}:
        parser.error("--line-ends: among crlf, lf and crlf-nodots")
    try:
        cores = sorted({int(core) for core in args.server_cores.split(",") if core.strip()})
    except ValueError:
        parser.error("--server-cores: comma-separated core numbers")
    if not cores or set(cores) - os.sched_getaffinity(0):
        parser.error(f"--server-cores: cores among {sorted(os.sched_getaffinity(0))}")
    SERVERS[:] = [name for name in servers if name != "pobox-pg"]
    LINE_ENDS[:] = line_ends
    SERVER_CORES[:] = cores
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - set(ALL_WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {sorted(unknown)}")
    if set(_generator_cores()) & set(SERVER_CORES):
        print("warning: no core left for the generator: it shares the server's", file=sys.stderr)
    settings = Settings.make(args)
    stores = {store.strip() for store in args.stores.split(",") if store.strip()}
    if stores - {"maildir", "postgresql"}:
        parser.error(f"unknown stores: {sorted(stores - {'maildir', 'postgresql'})}")
    if "pobox-pg" in servers:
        stores.add("postgresql")
    with contextlib.ExitStack() as stack:
        if "postgresql" in stores:
            _start_postgresql(stack)
        return _run(args, settings, workloads)


def _start_postgresql(stack: contextlib.ExitStack, settings: dict[str, str] | None = None) -> None:
    """Start a throwaway PostgreSQL on the server core, with pobox's schema; add pobox-pg."""
    from tests.helpers.postgres import migrate, running_postgres  # noqa: PLC0415

    cluster = stack.enter_context(running_postgres({"max_connections": "200", **(settings or {})}))
    for pid in _descendants(cluster.pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, set(SERVER_CORES))
    cluster.psql('CREATE DATABASE "bench"')
    PG["dsn"] = cluster.dsn("bench")
    PG["pid"] = str(cluster.pid)
    migrate(PG["dsn"])
    SERVERS.insert(1, "pobox-pg")
    cores = ",".join(map(str, SERVER_CORES))
    print(f"bench: PostgreSQL {cluster.bindir.parent.name} on core(s) {cores}", flush=True)


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
