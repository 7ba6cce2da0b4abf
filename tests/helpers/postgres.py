"""Run a throwaway PostgreSQL cluster, for tests and benchmarks.

``with running_postgres() as pg:`` runs ``initdb`` in a fresh temporary directory, starts
``postgres`` on it as a child process (never a server that happens to run on the machine),
listening on a unix socket in that directory and on ``127.0.0.1`` at a free port, and stops it
again by the PID it started, then removes the directory. ``fsync`` stays on: the durability
tests kill the server with SIGKILL and count on what it acknowledged.

PostgreSQL refuses to run as root, so when the tests run as root (CI does) the server runs as
an unprivileged system user, ``pobox-pgtest``, created here if it does not exist yet (and the
temporary directory is handed over to it). As any other user, the server runs as that user.

Each test gets a database of its own, copied from a template that holds pobox's schema
(:meth:`Postgres.create_database`), so tests never see each other's rows.

A missing ``initdb``/``postgres`` raises :class:`PostgresError`: tests fail, never skip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from pobox.storage.postgres import PostgresStore, upgrade
from tests.helpers.maildir import User
from tests.helpers.ports import free_port

__all__ = [
    "PG_USER",
    "Postgres",
    "PostgresError",
    "StoreThread",
    "find_bindir",
    "migrate",
    "pg_cluster",
    "pg_dsn",
    "running_postgres",
    "stored_messages",
]

#: The system user the server runs as when the tests run as root.
PG_USER = "pobox-pgtest"
#: The cluster's superuser, the role tests connect as.
SUPERUSER = "postgres"
_HOST = "127.0.0.1"


class PostgresError(RuntimeError):
    """PostgreSQL is missing, or failed to start or stop."""


def find_bindir() -> Path:
    """Return the directory of ``initdb`` and ``postgres``: Debian's newest, else the PATH.

    Raises:
        PostgresError: PostgreSQL is not installed.
    """
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    msg = "PostgreSQL is not installed: run scripts/install-deps --test (Debian: postgresql)"
    raise PostgresError(msg)


def _ensure_user() -> pwd.struct_passwd:
    """Return the account the server runs as, creating ``pobox-pgtest`` when we are root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        pass
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    # Exit status 9: another test process created it meanwhile.
    if done.returncode not in (0, 9):
        msg = f"useradd {PG_USER} failed: {done.stderr.strip()}"
        raise PostgresError(msg)
    return pwd.getpwnam(PG_USER)


@dataclass
class Postgres:
    """A running throwaway cluster.

    Attributes:
        root: the temporary directory (data directory, socket, log).
        port: the TCP port on 127.0.0.1 (the unix socket has the same number).
        bindir: where ``postgres`` and ``initdb`` are.
        process: the postmaster, a child of this process.
    """

    root: Path
    port: int
    bindir: Path
    account: pwd.struct_passwd
    settings: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        """The directory of the unix socket."""
        return self.root / "run"

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.root / "postgres.log"

    @property
    def pid(self) -> int:
        """The PID of the postmaster.

        Raises:
            PostgresError: it is not running.
        """
        if self.process is None:
            msg = "PostgreSQL is not running"
            raise PostgresError(msg)
        return self.process.pid

    def dsn(self, dbname: str = "postgres", *, tcp: bool = False) -> str:
        """Return a libpq conninfo string for ``dbname``, over the unix socket or TCP."""
        host = _HOST if tcp else str(self.socket_dir)
        return f"host={host} port={self.port} dbname={dbname} user={SUPERUSER}"

    def uri(self, dbname: str = "postgres") -> str:
        """Return a ``postgresql://`` URI for ``dbname`` over TCP."""
        return f"postgresql://{SUPERUSER}@{_HOST}:{self.port}/{dbname}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster (in a process group of its own) and wait until it accepts.

        Raises:
            PostgresError: it did not come up within ``timeout`` seconds.
        """
        options: list[str] = []
        for key, value in self.settings.items():
            options += ["-c", f"{key}={value}"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), *options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                user=self.account.pw_uid if os.geteuid() == 0 else None,
                group=self.account.pw_gid if os.geteuid() == 0 else None,
                extra_groups=[] if os.geteuid() == 0 else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                msg = f"postgres exited with {self.process.returncode}:\n{self.log_tail()}"
                raise PostgresError(msg)
            if self.accepting():
                return
            time.sleep(0.05)
        msg = f"postgres did not accept connections within {timeout} s:\n{self.log_tail()}"
        raise PostgresError(msg)

    def accepting(self) -> bool:
        """Tell whether the server accepts connections now (``pg_isready``)."""
        done = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-q",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
            ],
            check=False,
        )
        return done.returncode == 0

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server with a fast shutdown (SIGINT), SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(process)

    def kill(self) -> None:
        """Crash the server: SIGKILL to the postmaster and every backend at once."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            self._kill_group(process)

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process group the postmaster leads, and wait until it is empty."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.02)

    def restart(self) -> None:
        """Start the server again after :meth:`stop` or :meth:`kill` (crash recovery runs)."""
        self.start()

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with psql as the superuser; return its output (unaligned, no headers).

        Raises:
            PostgresError: psql failed.
        """
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn(dbname),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            msg = f"psql failed: {done.stderr.strip()}"
            raise PostgresError(msg)
        return done.stdout.strip()

    def create_database(self, template: str = "template1") -> str:
        """Create a new database copied from ``template``; return its name."""
        name = f"pobox_test_{os.getpid()}_{next(self._numbers)}"
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting whoever is still connected."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the server log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    """Tell whether any process of process group ``pgid`` is still alive (not a zombie)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


#: Settings of the throwaway server: small, quick to start, durable (fsync stays on).
DEFAULT_SETTINGS = {
    "listen_addresses": _HOST,
    "max_connections": "300",
    "shared_buffers": "64MB",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "logging_collector": "off",
    "log_min_messages": "warning",
    # Crash tests restart the server: keep recovery short.
    "checkpoint_timeout": "5min",
    "max_wal_size": "256MB",
    "deadlock_timeout": "1s",
}


@contextlib.contextmanager
def running_postgres(settings: dict[str, str] | None = None) -> Iterator[Postgres]:
    """Yield a fresh PostgreSQL cluster on loopback; stop it and remove its files at the end.

    Raises:
        PostgresError: PostgreSQL is missing or does not start.
    """
    bindir = find_bindir()
    account = _ensure_user()
    root = Path(tempfile.mkdtemp(prefix="pobox-pg-"))
    try:
        root.chmod(0o755)
        (root / "run").mkdir(mode=0o755)
        if os.geteuid() == 0:
            os.chown(root, account.pw_uid, account.pw_gid)
            os.chown(root / "run", account.pw_uid, account.pw_gid)
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(root / "data"),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            user=account.pw_uid if os.geteuid() == 0 else None,
            group=account.pw_gid if os.geteuid() == 0 else None,
            extra_groups=[] if os.geteuid() == 0 else None,
            cwd=root,
        )
        if init.returncode:
            msg = f"initdb failed: {init.stderr.strip()}"
            raise PostgresError(msg)
        port = free_port()
        values = {
            **DEFAULT_SETTINGS,
            "port": str(port),
            "unix_socket_directories": str(root / "run"),
            **(settings or {}),
        }
        pg = Postgres(root=root, port=port, bindir=bindir, account=account, settings=values)
        pg.start()
        try:
            yield pg
        finally:
            pg.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- pytest fixtures

#: The database of a test session that holds pobox's schema; tests get it emptied.
TEST_DATABASE = "pobox"
#: Tables emptied before each test (everything but the record of migrations).
_TABLES = (
    "mailbox",
    "message",
    "body",
    "body_chunk",
    "deleted_message",
    "users",
    "failure_counter",
    "cluster_node",
    "cluster_session",
    "login_time",
)


def migrate(dsn: str, schema: str = "pobox") -> None:
    """Create pobox's schema in the database of ``dsn`` (``pobox db upgrade``)."""

    async def run() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn:
            await upgrade(conn, schema)

    # On a thread of its own: the caller may be inside an event loop (an async fixture).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster for the whole test session, with pobox's schema."""
    try:
        with running_postgres() as pg:
            pg.psql(f'CREATE DATABASE "{TEST_DATABASE}"')
            migrate(pg.dsn(TEST_DATABASE))
            yield pg
    except PostgresError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def pg_dsn(pg_cluster: Postgres) -> str:
    """The DSN of the test database, emptied, with no other session connected to it.

    Leftover connections of an earlier test (and any advisory lock they held) are ended
    first; then every pobox table is truncated, so each test starts from nothing.
    """
    if pg_cluster.process is None or pg_cluster.process.poll() is not None:
        pg_cluster.restart()  # an earlier test crashed it on purpose
    tables = ", ".join(f"pobox.{table}" for table in _TABLES)
    pg_cluster.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        f" WHERE datname = '{TEST_DATABASE}' AND pid <> pg_backend_pid();"
        f" TRUNCATE {tables};",
        TEST_DATABASE,
    )
    return pg_cluster.dsn(TEST_DATABASE)


class StoreThread:
    """A PostgreSQL store running on an event loop of its own, in a thread of its own.

    Tests deliver through it synchronously, from inside their own event loop, the way an MTA
    on another node would: it has its own connections, nothing shared with the store under
    test.
    """

    def __init__(self, dsn: str, **options: object) -> None:
        """Start the thread and make the store (``options`` as for ``PostgresStore``)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        defaults: dict[str, object] = {"pool_min": 1, "pool_max": 4, "lock_connections": 1}
        self.store = PostgresStore(dsn, **{**defaults, **options})  # type: ignore[arg-type]

    def call(self, coroutine: object, timeout: float = 60.0) -> object:
        """Run ``coroutine`` on the thread's loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def append(self, name: str, data: bytes) -> str:
        """Store ``data`` as it is in ``name``'s maildrop; return the key."""
        key = self.call(self.store.append(User(name), data))
        assert isinstance(key, str)
        return key

    def close(self) -> None:
        """Close the store and stop the thread."""
        try:
            self.call(self.store.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def stored_messages(dsn: str, mailbox: str) -> list[bytes]:
    """Return the messages of ``mailbox`` in UID order, read with plain SQL (header + body)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT m.header || coalesce((SELECT string_agg(c.data, ''::bytea ORDER BY c.seq)"
            " FROM pobox.body_chunk AS c WHERE c.digest = m.digest), ''::bytea)"
            " FROM pobox.message AS m WHERE m.mailbox = %s ORDER BY m.uid",
            (mailbox,),
        ).fetchall()
    return [bytes(row[0]) for row in rows]
