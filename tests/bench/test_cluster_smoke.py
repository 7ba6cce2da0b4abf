"""Smoke test of the cluster benchmark: ``bench/cluster.py --quick`` runs and reports.

Nothing here is timed: it checks that the benchmark starts the cluster (PostgreSQL, two
nodes, HAProxy), loads it three ways with answers it checked, and writes the table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class TestQuickRun:
    """``bench/cluster.py --quick``."""

    def test_reports_every_variant(self, tmp_path: Path) -> None:
        """A quick run exits 0 and writes a row per workload: three figures, no errors."""
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "cluster.py"), "--quick", "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
        table = (tmp_path / "cluster.md").read_text()
        rows = [line for line in table.splitlines() if line.startswith(("| session", "| login"))]
        assert 2 == len(rows), table
        for row in rows:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            figures = [float(cell.replace(",", "")) for cell in cells[2:7]]
            assert (10, "0", True) == (len(cells), cells[9], all(f > 0 for f in figures)), row
