"""``pobox db upgrade/status/gc`` and ``pobox serve`` refusing a schema it does not know.

Each test gets a database of its own on the throwaway cluster, empty (no pobox schema).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pobox.auth.passwdfile import add_user
from pobox.cli import main
from pobox.storage.postgres import latest_version, migrations, upgrade
from tests.helpers.postgres import Postgres


@pytest.fixture
def fresh(pg_cluster: Postgres) -> Iterator[str]:
    """The DSN of a new, empty database (dropped at the end)."""
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.dsn(name)
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture
def config(tmp_path: Path, fresh: str) -> Path:
    """A configuration on the fresh database (and a passwd-file with alice)."""
    add_user(tmp_path / "passwd", "alice", b"secret", scheme="PLAIN")
    path = tmp_path / "pobox.toml"
    path.write_text(
        f'listen = ["127.0.0.1:0"]\nworkers = 1\npasswd_file = "{tmp_path / "passwd"}"\n'
        f'mail_location = "postgresql"\npostgresql_dsn = "{fresh}"\npostgresql_timeout = 5\n'
    )
    return path


class TestUpgrade:
    """``pobox db upgrade``: creates the schema once, then has nothing to do."""

    def test_creates_then_is_idempotent(
        self, config: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The first run applies every migration, the second applies none; both exit 0."""
        first = main(["db", "upgrade", "-c", str(config)])
        out_first = capsys.readouterr().out
        second = main(["db", "upgrade", "-c", str(config)])
        out_second = capsys.readouterr().out
        version = latest_version()
        assert (0, 0) == (first, second)
        assert "applied 0001_maildrops\n" in out_first
        assert f"schema 'pobox' was already at version {version}\n" == out_second

    def test_concurrent_runs_apply_each_migration_once(self, fresh: str) -> None:
        """Three upgrades at once: the advisory lock lets one apply, the others find it done."""

        async def one() -> int:
            conn = await psycopg.AsyncConnection.connect(fresh, autocommit=True)
            async with conn:
                return len(await upgrade(conn, "pobox"))

        async def all_three() -> list[int]:
            return list(await asyncio.gather(one(), one(), one()))

        applied = asyncio.run(all_three())
        assert [0, 0, len(migrations())] == sorted(applied)


class TestStatus:
    """``pobox db status``: what is applied and pending; exit 69 unless current."""

    def test_pending_on_an_empty_database(
        self, config: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An empty database: every migration pending, told what to run, exit 69."""
        code = main(["db", "status", "-c", str(config)])
        out = capsys.readouterr().out
        assert (69, True, True) == (
            code,
            "  pending 0001_maildrops\n" in out,
            out.endswith("run `pobox db upgrade -c CONFIG`\n"),
        )

    def test_current_after_upgrade(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """After an upgrade: applied, nothing pending, exit 0."""
        main(["db", "upgrade", "-c", str(config)])
        capsys.readouterr()
        code = main(["db", "status", "-c", str(config)])
        out = capsys.readouterr().out
        assert (0, True, False) == (code, "  applied 0001_maildrops at " in out, "pending" in out)

    def test_needs_the_postgresql_store(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """On a Maildir configuration, db commands are a configuration error (exit 78)."""
        path = tmp_path / "pobox.toml"
        path.write_text(f'mail_location = "maildir:{tmp_path}/%u"\n')
        assert 78 == main(["db", "status", "-c", str(path)])
        assert "needs mail_location" in capsys.readouterr().err

    def test_unreachable_database(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A database that cannot be reached: a one-line error, exit 69."""
        path = tmp_path / "pobox.toml"
        path.write_text(
            'mail_location = "postgresql"\n'
            f'postgresql_dsn = "host={tmp_path} port=1 dbname=none"\npostgresql_timeout = 2\n'
        )
        assert 69 == main(["db", "status", "-c", str(path)])
        assert capsys.readouterr().err.startswith("pobox db status: database error: ")


class TestMalformedDsn:
    """A malformed postgresql_dsn is a configuration error that never shows the DSN's text."""

    @pytest.mark.parametrize(
        "dsn", ["host=db user=pobox password=my secret", "postgresql://pobox:secr%et@db/pobox"]
    )
    def test_db_status(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], dsn: str) -> None:
        """libpq's message quotes the password around the fault; pobox says what key is wrong."""
        path = tmp_path / "pobox.toml"
        path.write_text(f'mail_location = "postgresql"\npostgresql_dsn = "{dsn}"\n')
        status = main(["db", "status", "-c", str(path)])
        err = capsys.readouterr().err
        assert (78, True, False) == (status, "postgresql_dsn: not a valid" in err, "secr" in err)

    def test_serve(self, tmp_path: Path) -> None:
        """pobox serve refuses it the same way, nothing of the password in its output."""
        path = tmp_path / "pobox.toml"
        path.write_text(
            'mail_location = "postgresql"\nuserdb = "postgresql"\n'
            'postgresql_dsn = "host=db user=pobox password=my secret"\n'
            f'listen = ["127.0.0.1:0"]\nlog_path = "{tmp_path}/pobox.log"\n'
        )
        done = serve(path)
        output = done.stdout + done.stderr + (tmp_path / "pobox.log").read_text(errors="replace")
        assert (78, True, False) == (
            done.returncode,
            "postgresql_dsn: not a valid" in output,
            "secret" in output,
        )


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    """Run ``pobox serve -c config`` (a process of its own: it sets up logging)."""
    return subprocess.run(
        [sys.executable, "-m", "pobox", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestServeRefuses:
    """``pobox serve`` does not start on a schema it does not know."""

    def test_no_schema(self, config: Path) -> None:
        """No pobox tables yet: serve exits, saying to run pobox db upgrade."""
        done = serve(config)
        assert (True, True) == (
            done.returncode != 0,
            "run `pobox db upgrade -c CONFIG`" in done.stderr,
        )

    def test_newer_schema(
        self, config: Path, fresh: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A schema with a migration this pobox does not have: serve exits, saying so."""
        main(["db", "upgrade", "-c", str(config)])
        with psycopg.connect(fresh, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pobox.schema_migrations (version, name, checksum)"
                " VALUES (9999, 'from_the_future', '')"
            )
        done = serve(config)
        assert (True, True) == (done.returncode != 0, "newer than this pobox knows" in done.stderr)


class TestGc:
    """``pobox db gc``: sweeps unused bodies."""

    def test_reports_what_it_dropped(
        self, config: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """On a fresh schema there is nothing to drop; it says so and exits 0."""
        main(["db", "upgrade", "-c", str(config)])
        capsys.readouterr()
        assert 0 == main(["db", "gc", "-c", str(config)])
        assert "dropped 0 unused message bodies\n" == capsys.readouterr().out
