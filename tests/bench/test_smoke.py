"""Smoke test of the benchmark: ``bench/run.py --quick`` runs and reports both servers.

Nothing here is timed: the figures of a seconds-long run on a shared machine mean nothing.
It checks that the benchmark starts both servers, loads them with answers it checked, and
writes the table and the plot.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(out: Path, *options: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``bench/run.py --quick`` with ``options``, results into ``out``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", *options, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.external
class TestQuickRun:
    """``bench/run.py --quick --workloads session,login``."""

    def test_reports_both_servers(self, tmp_path: Path) -> None:
        """A quick run exits 0 and writes a table with a row per workload for both servers."""
        done = bench(tmp_path, "--workloads", "session,login", "--duration", "0.3")
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        table = (tmp_path / "results.md").read_text()
        assert "| workload | variant | unit | pobox | Dovecot | ratio |" in table
        rows = [line for line in table.splitlines() if line.startswith(("| session", "| login"))]
        assert 5 == len(rows)  # session at 1 and 4 clients; login PLAIN, SHA512-CRYPT, ARGON2ID
        for row in rows:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert "0/0" == cells[8], row  # no wrong answers from either server
            assert "n/a" not in cells[3:5], row  # a figure for pobox and for Dovecot

    def test_writes_the_plot(self, tmp_path: Path) -> None:
        """A quick login-only run writes a PNG plot."""
        done = bench(tmp_path, "--workloads", "empty", "--duration", "0.2")
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        assert b"\x89PNG\r\n\x1a\n" == (tmp_path / "results.png").read_bytes()[:8]

    def test_postgresql_store_beside_maildir(self, tmp_path: Path) -> None:
        """``--stores maildir,postgresql`` adds pobox-pg, measured on the same sessions."""
        done = bench(
            tmp_path,
            *("--stores", "maildir,postgresql", "--workloads", "session", "--duration", "0.3"),
            timeout=240,
        )
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        table = (tmp_path / "results.md").read_text()
        _, heading, pg_table = table.partition("pobox on the PostgreSQL store (pobox-pg)")
        pg_rows = [line for line in pg_table.splitlines() if line.startswith("| session")]
        assert (True, 2) == (bool(heading), len(pg_rows))  # 1 and 4 clients
        for row in pg_rows:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert ("0", False) == (cells[-1], "n/a" in cells[3]), row
