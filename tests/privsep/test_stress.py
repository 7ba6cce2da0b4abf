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
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pobox.testing import deliver_to_maildir
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.users import MALLORY, VICTIM, popen_as, system_user
from tests.integration.test_hostile_maildir import (
    ATTACK_SECONDS,
    ATTACKER,
    SECRET,
    Tally,
    fingerprint,
    lmtp_client,
    login,
    pop3_client,
)
from tests.privsep.serving import serve


@dataclass
class _Address:
    """What the POP3 client helpers need of a server."""

    host: str
    port: int


def _canaries(base: Path, mallory: tuple[int, int], victim: tuple[int, int]) -> Path:
    """Files outside the maildir no session may ever read, write or remove."""
    canary_dir = base / "canaries"
    canary_dir.mkdir(mode=0o755)
    shadow = canary_dir / "shadow"
    shadow.write_bytes(SECRET + b" root only\n")
    shadow.chmod(0o600)
    theirs = canary_dir / "victim-message"
    theirs.write_bytes(SECRET + b" the victim's message\n")
    os.chown(theirs, *victim)
    (canary_dir / "1700000000.M1P1.canary:2,S").write_bytes(SECRET + b" in a dir\n")
    own_dir = canary_dir / "mallory-dir"
    own_dir.mkdir()
    (own_dir / "1700000000.M1P1.canary:2,S").write_bytes(SECRET + b" mallory's dir\n")
    for path in (own_dir, *own_dir.iterdir()):
        os.chown(path, *mallory)
    return canary_dir


class TestStressMode3:
    """A hostile user rearranges their maildir while a mode 3 server serves and delivers."""

    async def test_nothing_outside_is_touched_and_nothing_stalls(self) -> None:
        """After the attack: no canary read, written or removed; no command went unanswered."""
        mallory, victim = system_user(MALLORY), system_user(VICTIM)
        with searchable_tmpdir() as base:
            canary_dir = _canaries(base, mallory, victim)
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
                tally, ops = await self._attack(
                    server, lmtp, mallory, mail / "alice", canary_dir, nowhere
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

    @staticmethod
    async def _attack(
        server: _Address,
        lmtp: tuple[str, int],
        mallory: tuple[int, int],
        maildir: Path,
        canary_dir: Path,
        nowhere: Path,
    ) -> tuple[Tally, str]:
        """Run the attacker, three POP3 clients and an LMTP client; return what they saw."""
        canaries = ":".join(str(path) for path in sorted(canary_dir.iterdir()) if not path.is_dir())
        attacker = popen_as(
            mallory,
            "import sys\n"
            f"sys.argv = ['attacker', {str(maildir)!r}, {str(canary_dir)!r}, "
            f"{canaries!r}, {str(nowhere)!r}, {ATTACK_SECONDS!r}, {random.randrange(1 << 30)}]\n"
            + ATTACKER,
        )
        tally = Tally()
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(4) as pool:
            clients = [
                loop.run_in_executor(pool, pop3_client, server, "alice", stop, tally),
                loop.run_in_executor(pool, pop3_client, server, "alice", stop, tally),
                loop.run_in_executor(pool, pop3_client, server, "bob", stop, tally),
                loop.run_in_executor(pool, lmtp_client, lmtp, stop, tally),
            ]
            out, _ = await asyncio.to_thread(attacker.communicate, timeout=ATTACK_SECONDS + 30)
            stop.set()
            await asyncio.gather(*clients)
        assert 0 == attacker.returncode, out
        return tally, out
