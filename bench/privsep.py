"""What the storage helper (mode 3) costs per login and per RETR, against mode 2's direct store.

Run as root: ``.venv/bin/python bench/privsep.py``. It makes one maildir of ``--messages``
messages of about 4 KB, owned by ``nobody``, then times, for each store, ``--rounds`` logins
(open with the session lock, close) and ``--rounds`` reads of one message (``read_now`` or
``read_message``), in one process with one event loop, and reports the wall time and the CPU
time (this process plus the helper) per operation. Mode 2's store is the Maildir store with
``nobody`` as the owner, as the server running as ``mail_uid`` uses it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.helpers.dovecot import searchable_tmpdir  # noqa: E402
from tests.helpers.maildir import deliver  # noqa: E402

from pobox.config import build_config  # noqa: E402
from pobox.records import User  # noqa: E402
from pobox.storage.base import Maildrop, MaildropStore  # noqa: E402
from pobox.storage.maildir import MaildirStore  # noqa: E402
from pobox.storage.privsep import OwnerPolicy, StorageHelper  # noqa: E402


def _cpu(pid: int | None) -> float:
    """CPU seconds of this process, plus those of ``pid`` if given."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _read(maildrop: Maildrop, key: str) -> int:
    data = maildrop.read_now(key)
    if data is not None:
        return len(data)
    size = 0
    async for chunk in maildrop.read_message(key):
        size += len(chunk)
    return size


async def _measure(
    label: str, rounds: int, pid: int | None, work: Callable[[], Awaitable[object]]
) -> None:
    for _ in range(max(10, rounds // 20)):  # warm up (caches, imports)
        await work()
    wall, cpu, own = time.perf_counter(), _cpu(pid), _cpu(None)
    for _ in range(rounds):
        await work()
    wall, cpu, own = time.perf_counter() - wall, _cpu(pid) - cpu, _cpu(None) - own
    print(
        f"  {label:<22} {wall / rounds * 1e6:8.1f} µs wall  {cpu / rounds * 1e6:8.1f} µs CPU"
        f" (serving process {own / rounds * 1e6:.1f}, helper {(cpu - own) / rounds * 1e6:.1f})"
    )


async def _bench(store: MaildropStore, user: User, rounds: int, pid: int | None) -> None:
    async def login() -> None:
        maildrop = await store.open(user, lock=True)
        await maildrop.close()

    await _measure("login (open + close)", rounds, pid, login)
    maildrop = await store.open(user, lock=True)
    key = maildrop.messages[0].key
    try:
        await _measure("RETR of one message", rounds, pid, lambda: _read(maildrop, key))
    finally:
        await maildrop.close()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=50)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the helper is root, the mail belongs to nobody")
    nobody = pwd.getpwnam("nobody")
    with searchable_tmpdir() as folder:
        maildir = folder / "nobody" / "Maildir"
        body = b"".join(b"line %d of a message of about four kilobytes\n" % n for n in range(90))
        for n in range(args.messages):
            deliver(maildir, b"Subject: %d\n\n" % n + body)
        for path in [folder / "nobody", *(folder / "nobody").rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        location = f"maildir:{folder}/%u/Maildir"
        user = User("nobody", uid=nobody.pw_uid, gid=nobody.pw_gid)
        print(f"{args.messages} messages of {len(body) + 14} octets, {args.rounds} rounds")
        print("mode 2 (the Maildir store in the serving process):")
        await _bench(MaildirStore(location, owner=nobody.pw_uid), user, args.rounds, None)
        config = build_config({"mail_location": location, "passwd_file": str(folder / "passwd")})
        policy = OwnerPolicy.from_config(config, fallback=None)
        helper = await StorageHelper.start(config, policy, on_lost=print)
        try:
            print(f"mode 3 (through the storage helper, pid {helper.pid}):")
            await _bench(helper.store, user, args.rounds, helper.pid)
        finally:
            await helper.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
