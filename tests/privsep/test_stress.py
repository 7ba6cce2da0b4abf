"""Both layers at once: a hostile user's maildir served by ``pobox serve`` in mode 3.

The stress test of ``tests/integration/test_hostile_maildir.py`` (a process of the attacking
user rearranges their maildir: links to canaries, FIFOs, swapped directories, hard links,
while POP3 sessions and LMTP deliveries run), against a real ``pobox serve`` started as root
with nothing set: the serving process runs as nobody and the storage helper accesses the
attacker's mail with the attacker's uid.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from pobox.testing import deliver_to_maildir
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.users import MALLORY, VICTIM, system_user
from tests.integration.test_hostile_maildir import (
    SECRET,
    fingerprint,
    login,
    plant_canaries,
    run_attack,
)
from tests.privsep.serving import serve


@dataclass
class _Address:
    """What the POP3 client helpers need of a server."""

    host: str
    port: int


class TestStressMode3:
    """A hostile user rearranges their maildir while a mode 3 server serves and delivers."""

    async def test_nothing_outside_is_touched_and_nothing_stalls(self) -> None:
        """After the attack: no canary read, written or removed; no command went unanswered."""
        mallory, victim = system_user(MALLORY), system_user(VICTIM)
        with searchable_tmpdir() as base:
            canary_dir = plant_canaries(base, mallory, victim)
            nowhere = base / "nowhere"
            nowhere.mkdir(mode=0o777)
            before = fingerprint(canary_dir)
            mail = base / "mail"
            mail.mkdir(mode=0o755)
            passwd = base / "passwd"
            passwd.write_text(
                "".join(
                    f"{u}:{{PLAIN}}secret:{mallory[0]}:{mallory[1]}::::\n" for u in ("alice", "bob")
                )
            )
            passwd.chmod(0o600)
            for user in ("alice", "bob"):
                (mail / user).mkdir(mode=0o700)
                os.chown(mail / user, *mallory)
                for n in range(5):
                    data = f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()
                    deliver_to_maildir(mail / user, data, owner=mallory[0])
            settings = (
                f'passwd_file = "{passwd}"\nmail_location = "maildir:{mail}/%u"\n'
                'lmtp_listen = ["127.0.0.1:0"]\nhostname = "mx.pobox.test"\n'
            )
            async with serve(base, settings) as served:
                server = _Address("127.0.0.1", served.port)
                lmtp = await served.lmtp_address()
                tally, ops = await run_attack(
                    server,  # type: ignore[arg-type]
                    lmtp,
                    mallory,
                    mail / "alice",
                    canary_dir,
                    nowhere,
                )
                client = await asyncio.to_thread(login, server, "bob")  # type: ignore[arg-type]
                await asyncio.to_thread(client.quit)
                helper_alive = Path(f"/proc/{served.helper_pid}").exists()
            after = fingerprint(canary_dir)
            made = sorted(os.listdir(nowhere))
        served_bytes = b"".join(tally.served)
        assert [] == tally.stalls
        assert (False, before, []) == (SECRET in served_bytes, after, made)
        assert [] == tally.bob_failures
        assert {250} == set(tally.deliveries["bob"]), tally.deliveries["bob"]
        assert helper_alive
        assert "swap_dir" in ops, ops
        assert tally.alice_sessions > 0, (ops, tally.alice_sessions, tally.alice_refusals)
