"""UIDLs of other servers kept at a maildir's first open: Courier, X-UIDL, the admin's map.

Files are written in the formats the servers write (``courierpop3dsizelist`` as Courier's
``pop3dserver.c`` saves it, version 3 and 2; ``X-UIDL:`` headers as qpopper leaves them) and
a real pobox answers UIDL to poplib on loopback. What is imported must stay an RFC 1939
unique-id, unique in the maildrop; the files are the user's, so links, FIFOs, huge files and
garbage are survived.
"""

from __future__ import annotations

import asyncio
import logging
import os
import poplib
from pathlib import Path

import pytest

from pobox.storage.maildir._foreign import (
    parse_courier_sizelist,
    parse_uidl_map,
    xuidl_header,
)
from pobox.testing import RunningServer, running_server
from tests.helpers.maildir import deliver

TIMEOUT = 10
UIDV = 1700000123


def uidls(srv: RunningServer) -> list[str]:
    """Log in as alice, return the UIDLs by message number, QUIT."""
    client = poplib.POP3(srv.host, srv.port, timeout=TIMEOUT)
    client.user("alice")
    client.pass_("secret")
    _, lines, _ = client.uidl()
    client.quit()
    return [line.split()[1].decode() for line in lines]


def courier_list(names: list[str], *, version: int = 3, flags: str = ":2,S") -> str:
    """``courierpop3dsizelist`` as Courier writes it: UIDs 1.. in that order, file names."""
    lines = [f"/{version} {len(names) + 1} {UIDV}"]
    for number, name in enumerate(names, 1):
        tail = f"{number}:{UIDV}:0" if version == 3 else f"{number}:{UIDV}"
        lines.append(f"{name}{flags} 42 {tail}")
    return "\n".join(lines) + "\n"


class TestParsers:
    """The formats, line by line."""

    def test_courier_v3_and_v2(self) -> None:
        """Both versions give ``UID<n>-<uidvalidity>`` by base name; flags do not matter."""
        v3 = f"/3 9 {UIDV}\n1.M1P1.h,S=5:2,S 7 4:{UIDV}:1\n2.M2P2.h 9 5:{UIDV}:0\n"
        v2 = f"/2 9 {UIDV}\n1.M1P1.h,S=5:2,RS 7 4:{UIDV}\n3 .M3 7 6:0\n"
        assert {"1.M1P1.h,S=5": f"UID4-{UIDV}", "2.M2P2.h": f"UID5-{UIDV}"} == (
            parse_courier_sizelist(v3)
        )
        assert {"1.M1P1.h,S=5": f"UID4-{UIDV}", "3 .M3": "UID6"} == parse_courier_sizelist(v2)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "1.M1P1.h 7 4:5\n",  # headerless (before Courier 0.43): Courier ignores it too
            "/4 9 1\n1.M1P1.h 7 4:5\n",  # unknown version
            "/3 9 1\n\n \nname\nname 7\nname x 4:5\nname 7 x:5\n../x 7 4:5\nname 7 0:5\n",
            "/3 9 1\n" + "\x00\xff garbage \udcff\n" * 100,
        ],
    )
    def test_courier_garbage_gives_nothing(self, text: str) -> None:
        """Unusable headers and malformed lines are skipped, never an exception."""
        assert {} == parse_courier_sizelist(text)

    def test_map(self) -> None:
        """``name uidl`` lines; comments, blanks, extra fields and paths skipped; first wins."""
        text = (
            "# exported from the old server\n\n"
            "1.M1P1.h:2,S  old-1\n"
            "2.M2P2.h\told-2\n"
            "1.M1P1.h old-again\n"
            "3.M3P3.h too many fields\n"
            "../4.M4 old-4\n"
            "5.M5P5.h\n"
        )
        assert {"1.M1P1.h": "old-1", "2.M2P2.h": "old-2"} == parse_uidl_map(text)

    @pytest.mark.parametrize(
        ("head", "expected"),
        [
            (b"From: a\nX-UIDL: 3f2a9c\nSubject: s\n\nbody\n", "3f2a9c"),
            (b"x-uidl:   abc \r\nSubject: s\r\n\r\n", "abc"),
            (b"Subject: s\n\nX-UIDL: in-the-body\n", None),
            (b"X-UIDL:\n\n", None),
            (b"", None),
        ],
    )
    def test_xuidl_header(self, head: bytes, expected: str | None) -> None:
        """The first ``X-UIDL:`` of the header, stripped; never one in the body."""
        assert expected == xuidl_header(head)


class TestFirstOpen:
    """Real sessions on a maildir that pobox opens for the first time."""

    async def test_courier_uidls_kept_and_stable(self, tmp_path: Path) -> None:
        """Courier's UIDLs are answered, again in the next session; new mail gets pobox's."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            names = [deliver(maildir, f"Subject: {n}\n\nbody\n".encode()) for n in range(3)]
            (maildir / "courierpop3dsizelist").write_text(courier_list(names))
            first = await asyncio.to_thread(uidls, srv)
            deliver(maildir, b"Subject: later\n\nbody\n")
            second = await asyncio.to_thread(uidls, srv)
        expected = [f"UID{n}-{UIDV}" for n in (1, 2, 3)]
        assert expected == first
        assert expected == second[:3]
        assert second[3] not in expected
        assert len(second[3]) == 16

    async def test_courier_version_2(self, tmp_path: Path) -> None:
        """A version 2 list (Courier before UTF-8 support) is kept too."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            names = [deliver(maildir, b"Subject: x\n\nbody\n", flags="S") for _ in range(2)]
            (maildir / "courierpop3dsizelist").write_text(courier_list(names, version=2))
            got = await asyncio.to_thread(uidls, srv)
        assert [f"UID1-{UIDV}", f"UID2-{UIDV}"] == got

    async def test_map_wins_over_courier_and_dovecot(self, tmp_path: Path) -> None:
        """The admin's map overrides Dovecot's ``P`` and Courier's; the rest keep theirs."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            names = [deliver(maildir, f"Subject: {n}\n\nbody\n".encode()) for n in range(3)]
            (maildir / "dovecot-uidlist").write_text(
                f"3 V{UIDV} N9 G0123456789abcdef0123456789abcdef\n"
                f"1 Pdovecot-1 :{names[0]}\n2 Pdovecot-2 :{names[1]}\n3 :{names[2]}\n"
            )
            (maildir / "courierpop3dsizelist").write_text(courier_list(names))
            (maildir / "pobox-uidl-map").write_text(f"{names[0]}:2,S admin-1\n")
            got = await asyncio.to_thread(uidls, srv)
        assert ["admin-1", "dovecot-2", f"UID3-{UIDV}"] == got

    async def test_invalid_duplicate_and_lookalike_get_fresh_uidls(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Too long, non-ASCII, duplicated or pobox-shaped UIDLs are refused and logged."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            names = [deliver(maildir, f"Subject: {n}\n\nbody\n".encode()) for n in range(5)]
            # Dovecot's list fixes the UIDVALIDITY (and so the form of pobox's own UIDLs).
            (maildir / "dovecot-uidlist").write_text(
                f"3 V{UIDV} N6 G0123456789abcdef0123456789abcdef\n"
                + "".join(f"{uid} :{name}\n" for uid, name in enumerate(names, 1))
            )
            lookalike = f"{9:08x}{UIDV:08x}"  # what pobox would give a later delivery (UID 9)
            (maildir / "pobox-uidl-map").write_bytes(
                f"{names[0]} same\n{names[1]} same\n{names[2]} {'x' * 71}\n"
                f"{names[3]} caf\u00e9\n{names[4]} {lookalike}\n".encode()
            )
            with caplog.at_level(logging.WARNING):
                got = await asyncio.to_thread(uidls, srv)
        generated = [f"{uid:08x}{UIDV:08x}" for uid in range(1, 6)]
        assert ["same", *generated[1:]] == got
        refused = [r.getMessage() for r in caplog.records if "UIDL refused" in r.getMessage()]
        assert 4 == len(refused)

    async def test_only_at_the_first_open(self, tmp_path: Path) -> None:
        """A map written after pobox indexed the maildir changes nothing."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            name = deliver(maildir, b"Subject: 1\n\nbody\n")
            first = await asyncio.to_thread(uidls, srv)
            (maildir / "pobox-uidl-map").write_text(f"{name} late\n")
            second = await asyncio.to_thread(uidls, srv)
        assert first == second
        assert "late" not in second

    async def test_xuidl_only_with_the_key(self, tmp_path: Path) -> None:
        """``X-UIDL:`` headers are kept with ``pop3_reuse_xuidl``, ignored without."""
        message = b"Received: x\nX-UIDL: 3f2a9c0b1d\nSubject: old\n\nbody\n"
        async with running_server(tmp_path / "on", pop3_reuse_xuidl=True) as srv:
            deliver(srv.maildir("alice"), message)
            deliver(srv.maildir("alice"), b"Subject: no header\n\nbody\n")
            on = await asyncio.to_thread(uidls, srv)
        async with running_server(tmp_path / "off") as srv:
            deliver(srv.maildir("alice"), message)
            off = await asyncio.to_thread(uidls, srv)
        assert "3f2a9c0b1d" == on[0]
        assert len(on[1]) == 16
        assert "3f2a9c0b1d" != off[0]


class TestHostileFiles:
    """The lists are the user's: links, FIFOs and huge files are ignored, logins work."""

    @pytest.mark.parametrize("name", ["pobox-uidl-map", "courierpop3dsizelist"])
    async def test_link_fifo_and_huge_file_ignored(self, tmp_path: Path, name: str) -> None:
        """A link to a readable list elsewhere, a FIFO, a 17 MiB sparse file: none is used."""
        outside = tmp_path / "outside"
        results = []
        for kind in ("link", "fifo", "huge"):
            async with running_server(tmp_path / kind) as srv:
                maildir = srv.maildir("alice")
                base = deliver(maildir, b"Subject: 1\n\nbody\n")
                outside.write_text(
                    courier_list([base]) if name.startswith("courier") else f"{base} stolen\n"
                )
                target = maildir / name
                if kind == "link":
                    target.symlink_to(outside)
                elif kind == "fifo":
                    os.mkfifo(target)
                else:
                    with target.open("wb") as sparse:
                        sparse.write(outside.read_bytes())
                        sparse.truncate(17 * 1024 * 1024)
                results.append(await asyncio.to_thread(uidls, srv))
        assert all(len(got) == 1 and len(got[0]) == 16 for got in results)
