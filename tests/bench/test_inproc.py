"""bench/inproc.py: it reports sane figures, and a wrong answer stops it (nothing timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import inproc  # noqa: E402

ONE_ROUND = ("--rounds", "1", "--retrs", "20", "--messages", "5")


def test_reports_checked_figures() -> None:
    """One round: CPU per RETR and per session, both line ends, every answer checked."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inproc.py"), "--json", *ONE_ROUND],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(done.stdout)
    assert set(results) == {"lf", "crlf"}
    for figures in results.values():
        assert 0 < figures["retr_us"] < 100_000
        assert figures["retr_us"] < figures["session_us"] < 1_000_000
        assert figures["retrs_checked"] == 20 + 5 * 2


@pytest.mark.parametrize("line_end", inproc.LINE_ENDS)
async def test_a_changed_message_is_caught(tmp_path: Path, line_end: str) -> None:
    """A stored message changed after its answer was worked out: the session stops there."""
    world = inproc.build_world(tmp_path, 3, 500)
    user = f"user-{line_end}"
    await inproc.session(world, user)
    (path,) = (tmp_path / "mail" / user).glob("[cn][ue][rw]/*M2P*")
    data = path.read_bytes()
    path.write_bytes(data[:-2] + b"x" + data[-1:])  # same size, one octet different
    with pytest.raises(inproc.CheckError, match="RETR 2"):
        await inproc.session(world, user)
