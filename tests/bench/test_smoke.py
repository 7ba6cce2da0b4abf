"""Smoke test of the benchmark: ``bench/run.py --quick`` and ``bench/soak.py --quick`` run.

Nothing here is timed: the figures of a seconds-long run on a shared machine mean nothing.
It checks that the benchmark starts every server it is asked for (pobox with and without its
lock, Dovecot tuned with and without its lock, Dovecot with a process per client), loads them
with answers it checked (RETR contents included) on mail stored with CRLF and with LF, and
writes the tables and the plot; and that the soak holds its idle sessions and reports memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The default servers, in the order of the table's columns.
DEFAULT = ["pobox", "pobox-nolock", "dovecot-tuned", "dovecot-tuned-lock"]


def bench(
    out: Path, *options: str, script: str = "run.py", timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``bench/<script> --quick`` with ``options``, results into ``out``.

    A run past ``timeout`` fails with the end of what it printed (where it stopped).
    """
    try:
        return subprocess.run(
            [sys.executable, str(ROOT / "bench" / script), "--quick", *options, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # all it printed, if it stops
        )
    except subprocess.TimeoutExpired as exc:
        printed = [part for part in (exc.stdout, exc.stderr) if part]
        text = "".join(p.decode(errors="replace") if isinstance(p, bytes) else p for p in printed)
        pytest.fail(f"bench/{script} ran past {timeout:g} s; its output ends:\n{text[-4000:]}")


def table_rows(table: str, *workloads: str) -> list[list[str]]:
    """Return the cells of the first table's rows for ``workloads``."""
    first = table.split("\n\n| workload |", 2)[1]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in first.splitlines()
        if line.startswith(tuple(f"| {w} " for w in workloads))
    ]


@pytest.mark.external
class TestQuickRun:
    """``bench/run.py --quick``."""

    def test_reports_every_default_server(self, tmp_path: Path) -> None:
        """Session on CRLF- and LF-stored mail and login: a figure for all four servers."""
        done = bench(tmp_path, "--workloads", "session,login", "--duration", "0.3")
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        table = (tmp_path / "results.md").read_text()
        heading = (
            "| workload | variant | unit | pobox | pobox-nolock | dovecot-tuned | "
            "dovecot-tuned-lock | pobox ÷ dovecot-tuned | pobox-nolock ÷ dovecot-tuned "
            "(locks off) | pobox ÷ dovecot-tuned-lock (locks on) |"
        )
        assert heading in table
        rows = table_rows(table, "session", "login")
        variants = [row[1] for row in rows]
        assert [
            "1 clients, CRLF-stored",
            "4 clients, CRLF-stored",
            "1 clients, LF-stored",
            "4 clients, LF-stored",
            "PLAIN (16 cl.)",
            "SHA512-CRYPT (16 cl.)",
            "ARGON2ID (4 cl.)",
        ] == variants
        for row in rows:
            assert "0/0/0/0" == row[-1], row  # no wrong answer from any server
            assert "n/a" not in row[3:7], row  # a figure for every server
            assert all(cell.endswith("x") for cell in row[7:10]), row

    def test_bulk_against_the_per_client_dovecot(self, tmp_path: Path) -> None:
        """``--dovecot-perclient`` adds the old Dovecot row; bulk on both line ends; a plot."""
        done = bench(
            tmp_path,
            *("--servers", "pobox,dovecot-tuned", "--dovecot-perclient", "--workloads", "bulk"),
            "--duration",
            "0.3",
        )
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        table = (tmp_path / "results.md").read_text()
        assert "| pobox | dovecot-tuned | dovecot-perclient | pobox ÷ dovecot-tuned |" in table
        rows = table_rows(table, "bulk")
        assert ["RETR 1 MiB, CRLF-stored", "RETR 1 MiB, LF-stored"] == [row[1] for row in rows]
        for row in rows:
            assert "0/0/0" == row[-1], row
            assert "n/a" not in row[3:6], row
        assert b"\x89PNG\r\n\x1a\n" == (tmp_path / "results.png").read_bytes()[:8]

    def test_wire_ready_rows(self, tmp_path: Path) -> None:
        """``--line-ends crlf-nodots``: CRLF mail without dot lines, checked like the rest."""
        done = bench(
            tmp_path,
            *("--servers", "pobox", "--workloads", "bulk", "--line-ends", "crlf,crlf-nodots"),
            *("--duration", "0.3"),
        )
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        rows = table_rows((tmp_path / "results.md").read_text(), "bulk")
        assert [
            "RETR 1 MiB, CRLF-stored",
            "RETR 1 MiB, CRLF-stored, no dot lines",
        ] == [row[1] for row in rows]
        for row in rows:
            assert "0" == row[-1], row
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            import run  # noqa: PLC0415 - bench/run.py, a script
        finally:
            sys.path.remove(str(ROOT / "bench"))
        assert b"a\nx\nb\nc\n" == run.without_dots(b".a\n.\nb\n..c\n")

    def test_python_floor_beside_pobox(self, tmp_path: Path) -> None:
        """``python-floor`` (bench/floor.py) serves the same data with answers that pass the
        same checks (each RETR's content, un-stuffed, on CRLF- and LF-stored mail), so its
        figure is a floor for the same work, not for less."""
        done = bench(
            tmp_path,
            *("--servers", "pobox,python-floor,dovecot-tuned", "--workloads", "session,login"),
            *("--duration", "0.3"),
        )
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        table = (tmp_path / "results.md").read_text()
        assert "| pobox | python-floor | dovecot-tuned |" in table
        assert "python-floor ÷ dovecot-tuned" in table
        rows = table_rows(table, "session", "login")
        assert 7 == len(rows)
        for row in rows:
            assert "0/0/0" == row[-1], row  # no wrong answer, the floor's included
            assert "n/a" not in row[3:6], row

    def test_refuses_an_unknown_server(self, tmp_path: Path) -> None:
        """An unknown name in ``--servers`` is a usage error, before anything starts."""
        done = bench(tmp_path, "--servers", "pobox,dovecot")
        assert (2, True) == (done.returncode, "--servers" in done.stderr)

    def test_postgresql_store_beside_maildir(self, tmp_path: Path) -> None:
        """``--stores maildir,postgresql`` adds pobox-pg, measured on the same sessions."""
        done = bench(
            tmp_path,
            *("--stores", "maildir,postgresql", "--workloads", "session", "--duration", "0.3"),
            *("--servers", "pobox,dovecot-tuned", "--line-ends", "lf"),
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


@pytest.mark.external
class TestQuickSoak:
    """``bench/soak.py --quick``."""

    def test_memtrace_logs_the_servers_memory(self, tmp_path: Path) -> None:
        """``--memtrace DIR``: pobox runs under bench/memtrace.py, which logs its memory."""
        trace = tmp_path / "trace"
        done = bench(
            tmp_path,
            *("--servers", "pobox", "--memtrace", str(trace), "--memtrace-frames", "1"),
            script="soak.py",
        )
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        lines = (trace / "memory.log").read_text().splitlines()
        assert lines, "no memory line"
        assert all(" rss " in line and " traced " in line for line in lines), lines
        assert list(trace.glob("snap-*.tm"))

    def test_holds_idle_sessions_under_load(self, tmp_path: Path) -> None:
        """pobox and tuned Dovecot keep every idle session while busy clients run, no error."""
        done = bench(tmp_path, script="soak.py")
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        table = (tmp_path / "soak.md").read_text()
        rows = [
            [cell.strip() for cell in line.strip("|").split("|")]
            for line in table.splitlines()
            if line.startswith(("| pobox ", "| dovecot-tuned "))
        ]
        assert ["pobox", "dovecot-tuned"] == [row[0] for row in rows]
        for row in rows:
            assert ["50 / 50", "0"] == row[1:3], row  # idle: all held, no error
            assert ("0", True) == (row[4], int(row[3].replace(",", "")) > 0), row  # busy
            assert ("RSS" if row[0] == "pobox" else "PSS") == row[5]
