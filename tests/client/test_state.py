"""The per-account state: journal appends, atomic snapshots, the run lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pobox.client import SeenState
from pobox.client._state import StateLocked


class TestSeenState:
    """SeenState keeps identities across runs and crashes."""

    def test_records_survive_a_crash_before_compaction(self, tmp_path: Path) -> None:
        """Identities journaled by a run that never compacted are seen by the next run."""
        path = tmp_path / "acct.json"
        with SeenState(path) as state:
            state.record("uidl:a", 100.0)
            state.record("uidl:b", 200.0)
        with SeenState(path) as again:
            assert {"uidl:a": 100.0, "uidl:b": 200.0} == again.seen

    def test_torn_last_journal_line_is_ignored(self, tmp_path: Path) -> None:
        """A journal line cut short by a crash does not count as stored."""
        path = tmp_path / "acct.json"
        (tmp_path / "acct.journal").write_bytes(b"uidl:a\t100\nuidl:b\t2")
        with SeenState(path) as state:
            assert {"uidl:a": 100.0} == state.seen

    def test_compact_keeps_only_what_is_still_on_the_server(self, tmp_path: Path) -> None:
        """Compaction writes a snapshot of the kept identities and removes the journal."""
        path = tmp_path / "acct.json"
        with SeenState(path) as state:
            state.record("uidl:a", 100.0)
            state.record("uidl:b", 200.0)
            state.compact(keep=["uidl:b", "uidl:c"])
        assert {"version": 1, "seen": {"uidl:b": 200.0}} == json.loads(path.read_bytes())
        assert not (tmp_path / "acct.journal").exists()
        assert not (tmp_path / "acct.json.tmp").exists()

    def test_second_run_is_locked_out(self, tmp_path: Path) -> None:
        """A second run of the same account while one is running is refused."""
        path = tmp_path / "acct.json"
        with SeenState(path), pytest.raises(StateLocked), SeenState(path):
            pass

    def test_damaged_snapshot_is_an_error(self, tmp_path: Path) -> None:
        """A snapshot that is not JSON stops the run instead of refetching everything."""
        path = tmp_path / "acct.json"
        path.write_bytes(b"{not json")
        with pytest.raises(Exception, match="damaged"), SeenState(path):
            pass


class TestPending:
    """Pending lines name a file being put in place."""

    def test_pending_until_recorded(self, tmp_path: Path) -> None:
        """A pending name survives a crash and is cleared once the identity is recorded."""
        path = tmp_path / "acct.json"
        with SeenState(path) as state:
            state.record_pending("uidl:a", "123.M1P2Q3.host,S=10")
            state.record_pending("uidl:b", "124.M1P2Q4.host,S=10")
            state.record("uidl:b", 100.0)
        with SeenState(path) as again:
            assert {"uidl:a": "123.M1P2Q3.host,S=10"} == again.pending
            assert {"uidl:b": 100.0} == again.seen
