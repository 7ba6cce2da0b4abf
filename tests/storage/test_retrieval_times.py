"""The RetrievalTimes contract (RFC 2449 EXPIRE): every backend records first retrievals.

Runs against every backend of the ``backend`` fixture (``conftest.py``) but mbox, which keeps
no such times (``pop3_expire_days`` is refused with it); times are plain numbers the test
picks, never the clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pobox.storage.base import RetrievalTimes, StorageError
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._retrieved import format_retrieved, parse_retrieved
from tests.helpers.maildir import User, deliver
from tests.storage.conftest import BACKENDS

if TYPE_CHECKING:
    from pathlib import Path

    from tests.storage.conftest import Backend

T0 = 1_700_000_000.0
DAY = 86_400.0


#: The backends that keep first-retrieval times: all but mbox.
RECORDING = [name for name in BACKENDS if name != "mbox"]


@pytest.mark.parametrize("backend", RECORDING, indirect=True)
class TestRetrievalTimes:
    """``note_retrieved`` keeps the first time; ``retrieved_before`` lists by it."""

    async def test_nothing_retrieved(self, backend: Backend) -> None:
        """A maildrop whose messages were never retrieved lists none."""
        backend.deliver("alice", b"one\n")
        maildrop = await backend.store.open(backend.user("alice"))
        assert isinstance(maildrop, RetrievalTimes)
        assert () == await maildrop.retrieved_before(T0 + 1000 * DAY)
        await maildrop.close()

    async def test_times_outlive_the_session(self, backend: Backend) -> None:
        """Times recorded in one session decide what a later session lists, in order."""
        for n in range(3):
            backend.deliver("alice", f"message {n}\n".encode())
        maildrop = await backend.store.open(backend.user("alice"))
        keys = [info.key for info in maildrop.messages]
        assert isinstance(maildrop, RetrievalTimes)
        await maildrop.note_retrieved({keys[2]: T0, keys[0]: T0 + DAY})
        await maildrop.close()
        maildrop = await backend.store.open(backend.user("alice"))
        assert isinstance(maildrop, RetrievalTimes)
        assert () == await maildrop.retrieved_before(T0 - 1)
        assert (keys[2],) == await maildrop.retrieved_before(T0)
        assert (keys[0], keys[2]) == await maildrop.retrieved_before(T0 + DAY)
        await maildrop.close()

    async def test_first_retrieval_counts(self, backend: Backend) -> None:
        """A later retrieval does not move the time of the first."""
        backend.deliver("alice", b"one\n")
        maildrop = await backend.store.open(backend.user("alice"))
        key = maildrop.messages[0].key
        assert isinstance(maildrop, RetrievalTimes)
        await maildrop.note_retrieved({key: T0})
        await maildrop.close()
        maildrop = await backend.store.open(backend.user("alice"))
        assert isinstance(maildrop, RetrievalTimes)
        await maildrop.note_retrieved({key: T0 + 5 * DAY})
        assert (key,) == await maildrop.retrieved_before(T0 + DAY)
        await maildrop.close()

    async def test_unknown_keys_skipped(self, backend: Backend) -> None:
        """Keys not in the snapshot are skipped, not an error."""
        backend.deliver("alice", b"one\n")
        maildrop = await backend.store.open(backend.user("alice"))
        assert isinstance(maildrop, RetrievalTimes)
        await maildrop.note_retrieved({"no-such-key": T0})
        assert () == await maildrop.retrieved_before(T0 + DAY)
        await maildrop.close()

    async def test_deleted_message_forgotten(self, backend: Backend) -> None:
        """A deleted message's time goes with it; the others stay."""
        backend.deliver("alice", b"one\n")
        backend.deliver("alice", b"two\n")
        maildrop = await backend.store.open(backend.user("alice"))
        keys = [info.key for info in maildrop.messages]
        assert isinstance(maildrop, RetrievalTimes)
        await maildrop.note_retrieved(dict.fromkeys(keys, T0))
        await maildrop.delete([keys[0]])
        await maildrop.close()
        maildrop = await backend.store.open(backend.user("alice"))
        assert isinstance(maildrop, RetrievalTimes)
        assert (keys[1],) == await maildrop.retrieved_before(T0)
        await maildrop.close()

    async def test_closed_maildrop_refuses(self, backend: Backend) -> None:
        """After close, neither method touches the maildrop."""
        backend.deliver("alice", b"one\n")
        maildrop = await backend.store.open(backend.user("alice"))
        key = maildrop.messages[0].key
        await maildrop.close()
        assert isinstance(maildrop, RetrievalTimes)
        with pytest.raises(RuntimeError):
            await maildrop.note_retrieved({key: T0})
        with pytest.raises(RuntimeError):
            await maildrop.retrieved_before(T0)


class TestPoboxRetrievedFile:
    """Maildir's ``pobox-retrieved`` is the user's file: read with care."""

    def test_bad_lines_skipped(self) -> None:
        """Lines that do not parse are dropped; the first time of a name wins."""
        text = (
            "pobox-retrieved 1\n"
            "100 a\n"
            "x b\n"
            "-5 c\n"
            "200 \n"
            "300 d/e\n"
            "\u0663 f\n"
            "9999999999999 g\n"
            "400 a\n"
            "500 h i\n"
        )
        assert {"a": 100, "h i": 500} == parse_retrieved(text)

    def test_unknown_header_gives_nothing(self) -> None:
        """A file of another format (or version) says nothing."""
        assert {} == parse_retrieved("pobox-retrieved 2\n100 a\n")

    def test_round_trip(self) -> None:
        """What is written reads back the same."""
        times = {"b": 200, "a": 100}
        assert times == parse_retrieved(format_retrieved(times))

    async def test_link_refused(self, tmp_path: Path) -> None:
        """A ``pobox-retrieved`` that is a link is never followed: a storage error."""
        store = MaildirStore("maildir:~/Maildir")
        user = User("alice", home=str(tmp_path / "home"))
        deliver(store.maildir_path(user), b"one\n", fields="SW", flags=None)
        (tmp_path / "elsewhere").write_text("pobox-retrieved 1\n1 x\n")
        (store.maildir_path(user) / "pobox-retrieved").symlink_to(tmp_path / "elsewhere")
        maildrop = await store.open(user)
        with pytest.raises(StorageError):
            await maildrop.retrieved_before(T0)
        await maildrop.close()
        await store.aclose()


@pytest.mark.parametrize("backend", ["mbox"], indirect=True)
async def test_mbox_keeps_no_times(backend: Backend) -> None:
    """mbox does not offer RetrievalTimes (so EXPIRE is never advertised over it)."""
    backend.deliver("alice", b"one\n")
    maildrop = await backend.store.open(backend.user("alice"))
    assert not isinstance(maildrop, RetrievalTimes)
    await maildrop.close()
