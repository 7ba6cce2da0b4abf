"""What every PostgreSQL connection of pobox asks of the server (``_connect.set_timeouts``)."""

from __future__ import annotations

import psycopg

from pobox.storage.postgres._connect import set_timeouts
from tests.helpers.postgres import TEST_DATABASE, Postgres


class TestServerKeepalives:
    """The server is told to notice soon when a pobox node vanishes (a partition)."""

    async def test_session_settings_over_tcp(self, pg_cluster: Postgres) -> None:
        """Over TCP the server probes after 5 s, 3 probes 2 s apart, and gives up on
        unacknowledged data after the statement timeout."""
        dsn = pg_cluster.dsn(TEST_DATABASE, tcp=True)
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn:
            await set_timeouts(conn, 3)
            names = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
            values = []
            for name in (*names, "tcp_user_timeout", "statement_timeout"):
                cur = await conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,))
                row = await cur.fetchone()
                assert row is not None
                values.append(row[0])
        assert ["5", "2", "3", "3000", "3000"] == values  # seconds, count, milliseconds
