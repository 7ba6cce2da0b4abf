"""``fetch_account`` against real servers (pobox and Dovecot): delete, keep, keep-days.

Every downloaded message is compared byte for byte with what was delivered (LF line ends).
"""

from __future__ import annotations

import asyncio
import mailbox
import poplib
import re
import time
from pathlib import Path

from pobox.client import FetchResult, SeenState, Status, fetch_account
from pobox.client._fetch import _top_identity
from tests.client.conftest import (
    PASSWORD,
    Peer,
    dovecot_peer,
    lf,
    local_messages,
    make_account,
)

MESSAGES = [
    b"From: a@example.test\nSubject: plain\nMessage-ID: <a@example.test>\n\nhello\n",
    b"From: b@example.test\nSubject: dots\n\n.leading dot\n..two dots\n.\nend\n",
    b"From: c@example.test\r\nSubject: crlf stored\r\n\r\nbody with CRLF\r\n",
    b"From: d@example.test\nSubject: 8bit\n\ncaf\xc3\xa9 \xff\xfe bytes\nFrom the start\n",
    b"From: e@example.test\nSubject: long line\n\n" + b"x" * 150_000 + b"\n.\n",
]


async def fetch(peer: Peer, tmp_path: Path, **settings: object) -> FetchResult:
    """Run one fetch of alice's account in a thread (the pobox server shares the loop)."""
    account = make_account(peer, tmp_path, **settings)
    return await asyncio.to_thread(fetch_account, account)


class TestDeleteMode:
    """The default: download everything, then delete it on the server."""

    async def test_downloads_and_deletes(self, peer: Peer, tmp_path: Path) -> None:
        """Every message arrives byte for byte and the server maildrop is emptied."""
        for message in MESSAGES:
            peer.deliver(message)
        result = await fetch(peer, tmp_path)
        assert (Status.OK, None) == (result.status, result.error)
        assert (5, 5) == (result.fetched, result.deleted)
        assert sorted(lf(m) for m in MESSAGES) == local_messages(tmp_path / "local")
        assert 0 == peer.remaining()

    async def test_summary_line(self, peer: Peer, tmp_path: Path) -> None:
        """The summary names the account, the count, the bytes and the deletions."""
        peer.deliver(MESSAGES[0])
        result = await fetch(peer, tmp_path)
        size = len(lf(MESSAGES[0]))
        assert f"alice@127.0.0.1: fetched 1 ({size:,} bytes), deleted 1" == result.summary()

    async def test_empty_maildrop(self, peer: Peer, tmp_path: Path) -> None:
        """An empty maildrop is a successful run that fetches nothing."""
        result = await fetch(peer, tmp_path)
        assert (Status.OK, 0, 0) == (result.status, result.fetched, result.deleted)

    async def test_wrong_password(self, peer: Peer, tmp_path: Path) -> None:
        """A refused login is an authentication failure and touches nothing."""
        peer.deliver(MESSAGES[0])
        (tmp_path / "wrong").write_text("nope\n")
        result = await fetch(peer, tmp_path, password_file=str(tmp_path / "wrong"))
        assert Status.AUTH == result.status
        assert 1 == peer.remaining()


class TestMbox:
    """Delivery into an mbox file."""

    async def test_mbox_byte_for_byte(self, peer: Peer, tmp_path: Path) -> None:
        """Each message reads back from the mbox intact once the mboxrd quoting is undone."""
        for message in MESSAGES:
            peer.deliver(message)
        result = await fetch(peer, tmp_path, mbox=str(tmp_path / "inbox"))
        assert (Status.OK, 5) == (result.status, result.fetched)
        box = mailbox.mbox(tmp_path / "inbox")
        try:
            stored = [box.get_bytes(key) for key in box.iterkeys()]
        finally:
            box.close()
        unquoted = [re.sub(rb"(?m)^>(>*From )", rb"\1", m) for m in stored]
        assert sorted(lf(m) for m in MESSAGES) == sorted(unquoted)


class TestKeepMode:
    """``keep``: mail stays on the server and each message is downloaded once."""

    async def test_three_runs_with_new_mail_between(self, peer: Peer, tmp_path: Path) -> None:
        """Three runs with new mail delivered between them store each message exactly once."""
        fetched = []
        for batch in (MESSAGES[:2], MESSAGES[2:4], MESSAGES[4:]):
            for message in batch:
                peer.deliver(message)
            result = await fetch(peer, tmp_path, keep=True)
            assert Status.OK == result.status
            fetched.append((result.fetched, result.deleted))
        assert [(2, 0), (2, 0), (1, 0)] == fetched
        assert sorted(lf(m) for m in MESSAGES) == local_messages(tmp_path / "local")
        assert 5 == peer.remaining()

    async def test_keep_days_deletes_old_downloads(self, peer: Peer, tmp_path: Path) -> None:
        """Messages downloaded at least N days ago are deleted; newer ones stay."""
        peer.deliver(MESSAGES[0])
        first = await fetch(peer, tmp_path, keep_days=3)
        peer.deliver(MESSAGES[1])
        account = make_account(peer, tmp_path, keep_days=3)
        later = await asyncio.to_thread(fetch_account, account, now=time.time() + 3 * 86400)
        assert (1, 0) == (first.fetched, first.deleted)
        assert (1, 1) == (later.fetched, later.deleted)
        assert 1 == peer.remaining()
        assert sorted(lf(m) for m in MESSAGES[:2]) == local_messages(tmp_path / "local")


class TestResume:
    """A run that stored messages but never reached QUIT."""

    async def test_stored_but_not_quit_is_deleted_not_fetched(
        self, peer: Peer, tmp_path: Path
    ) -> None:
        """Messages in the state after a run that died before QUIT are deleted, not refetched."""
        for message in MESSAGES[:3]:
            peer.deliver(message)
        kept = await fetch(peer, tmp_path, keep=True)  # stands for the dead run's stores
        result = await fetch(peer, tmp_path)
        assert (3, 0, 3) == (kept.fetched, result.fetched, result.deleted)
        assert sorted(lf(m) for m in MESSAGES[:3]) == local_messages(tmp_path / "local")
        assert 0 == peer.remaining()

    async def test_put_in_place_but_unrecorded_is_not_fetched_again(
        self, peer: Peer, tmp_path: Path
    ) -> None:
        """A message whose pending name is in the local Maildir counts as stored."""
        peer.deliver(MESSAGES[0])

        def uidl() -> str:
            pop = poplib.POP3(peer.host, peer.port, timeout=10)
            try:
                pop.user("alice")
                pop.pass_(PASSWORD)
                return pop.uidl(1).split()[2].decode()
            finally:
                pop.quit()

        identity = "uidl:" + await asyncio.to_thread(uidl)
        local = tmp_path / "local"
        for sub in ("cur", "new", "tmp"):
            (local / sub).mkdir(parents=True)
        (local / "cur" / "1.M1P1Q1.host,S=1:2,S").write_bytes(lf(MESSAGES[0]))
        account = make_account(peer, tmp_path)
        with SeenState(account.state_path()) as state:
            state.record_pending(identity, "1.M1P1Q1.host,S=1")
        result = await fetch(peer, tmp_path)
        assert (Status.OK, 0, 1) == (result.status, result.fetched, result.deleted)
        assert [lf(MESSAGES[0])] == local_messages(local)
        assert 0 == peer.remaining()


class TestTopIdentity:
    """The identity used when a server has no UIDL: Message-ID (or header hash) and size."""

    async def test_stable_and_distinct(self, peer: Peer, tmp_path: Path) -> None:
        """Identities repeat across sessions and differ for a resent Message-ID."""
        peer.deliver(MESSAGES[0])
        peer.deliver(MESSAGES[0] + b"resent with a longer body\n")
        peer.deliver(MESSAGES[1])

        def identities() -> list[str]:
            pop = poplib.POP3(peer.host, peer.port, timeout=10)
            try:
                pop.user("alice")
                pop.pass_(PASSWORD)
                sizes = [int(line.split()[1]) for line in pop.list()[1]]
                return [_top_identity(pop, n, s) for n, s in enumerate(sizes, 1)]
            finally:
                pop.quit()

        first = await asyncio.to_thread(identities)
        assert first == await asyncio.to_thread(identities)
        assert 3 == len(set(first))
        assert all(i.startswith("top:") for i in first)


class TestScram:
    """SCRAM (RFC 5802) is preferred when the server offers it (Dovecot here; pobox has none)."""

    async def test_auto_prefers_scram(self, tmp_path: Path) -> None:
        """With SCRAM-SHA-256 on offer, auto logs in with it and fetches."""
        with dovecot_peer("auth_mechanisms = plain scram-sha-1 scram-sha-256\n") as peer:
            peer.deliver(MESSAGES[0])
            result = await fetch(peer, tmp_path)
            assert (Status.OK, 1) == (result.status, result.fetched)
            peer.extra["dovecot"].wait_for_log("method=SCRAM-SHA-256")

    async def test_scram_wrong_password(self, tmp_path: Path) -> None:
        """A wrong password in a SCRAM exchange is an authentication failure."""
        with dovecot_peer("auth_mechanisms = plain scram-sha-256\n") as peer:
            peer.deliver(MESSAGES[0])
            (tmp_path / "wrong").write_text("nope\n")
            result = await fetch(
                peer, tmp_path, auth="scram", password_file=str(tmp_path / "wrong")
            )
            assert Status.AUTH == result.status
            assert 1 == peer.remaining()
