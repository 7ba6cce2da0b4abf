"""A real server against a hostile maildir: what POP3 clients and MTAs see.

The maildir's user plants links, swaps directories, puts FIFOs in place of messages and holds
the index lock, while real clients (poplib, smtplib's LMTP) talk to a running pobox. Nothing
outside the maildir is served or touched, every client command is answered (``-ERR`` where
it must be) and other users go on undisturbed. The last class is a stress test: a process of
the attacking user rearranges their maildir for a dozen seconds while sessions and deliveries
run, as root serving mail as that user's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import poplib
import random
import smtplib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pobox.auth.passwdfile import PasswdFileAuthenticator
from pobox.delivery import DeliveryServer, build_agent
from pobox.storage.maildir import MaildirStore
from pobox.testing import RunningServer, deliver_to_maildir, running_server
from tests.delivery.helpers import running_pobox
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.maildir import index_lock_held, swap_for_link
from tests.helpers.users import MALLORY, VICTIM, popen_as, system_user

SECRET = b"canary-secret-never-on-the-wire"
#: Over the 128 KiB inline limit: read by a worker thread.
LARGE = b"Subject: large\r\n\r\n" + b"y" * (300 * 1024) + b"\r\n"
#: Every client command is answered within this, or the session counts as stalled.
CLIENT_TIMEOUT = 10


def login(srv: RunningServer, user: str = "alice") -> poplib.POP3:
    """Log ``user`` in by POP3 (password ``secret``)."""
    client = poplib.POP3(srv.host, srv.port, timeout=CLIENT_TIMEOUT)
    client.user(user)
    client.pass_("secret")
    return client


def retr_all(client: poplib.POP3) -> bytes:
    """RETR every message of the session that can be read; return all the bytes served."""
    out = []
    count, _ = client.stat()
    for number in range(1, count + 1):
        with contextlib.suppress(poplib.error_proto):
            _, lines, _ = client.retr(number)
            out.append(b"\n".join(lines))
    return b"".join(out)


class TestSessions:
    """One session at a time against one planted trap."""

    async def test_link_to_root_only_file_is_never_served(self, tmp_path: Path) -> None:
        """A link in ``cur/`` to a root-only file is not a message: not in LIST, not in RETR."""
        secret = tmp_path / "shadow"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        async with running_server(tmp_path / "srv") as srv:
            srv.deliver("alice", b"Subject: real\r\n\r\nbody\r\n")
            (srv.maildir("alice") / "cur" / "1700000000.M1P1.evil:2,S").symlink_to(secret)
            client = await asyncio.to_thread(login, srv)
            count, _ = await asyncio.to_thread(client.stat)
            served = await asyncio.to_thread(retr_all, client)
            await asyncio.to_thread(client.quit)
        assert (1, False) == (count, SECRET in served)

    async def test_fifo_in_place_of_a_message_gets_err_and_the_session_goes_on(
        self, tmp_path: Path
    ) -> None:
        """RETR of a large message swapped for a FIFO answers -ERR at once; NOOP and QUIT work."""
        async with running_server(tmp_path / "srv") as srv:
            path = srv.deliver("alice", LARGE)
            client = await asyncio.to_thread(login, srv)
            path.unlink()
            os.mkfifo(path)
            try:
                with pytest.raises(poplib.error_proto) as refused:
                    await asyncio.to_thread(client.retr, 1)
                noop = await asyncio.to_thread(client.noop)
                bye = await asyncio.to_thread(client.quit)
            finally:
                with contextlib.suppress(OSError):  # a broken server waits in open(): free it
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        assert refused.value.args[0].startswith(b"-ERR [SYS/PERM]")
        assert (b"+OK", b"+OK") == (noop[:3], bye[:3])

    async def test_dele_after_cur_became_a_link_removes_nothing_outside(
        self, tmp_path: Path
    ) -> None:
        """DELE 1 + QUIT after ``cur/`` was swapped for a link: -ERR, the file there survives."""
        async with running_server(tmp_path / "srv") as srv:
            path = srv.deliver("alice", b"Subject: one\r\n\r\n")
            maildir = srv.maildir("alice")
            os.rename(path, maildir / "cur" / f"{path.name}:2,S")
            client = await asyncio.to_thread(login, srv)
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir()
            (elsewhere / f"{path.name}:2,S").write_bytes(SECRET)
            swap_for_link(maildir / "cur", elsewhere)
            await asyncio.to_thread(client.dele, 1)
            try:
                with pytest.raises(poplib.error_proto) as refused:
                    await asyncio.to_thread(client.quit)
            finally:
                client.close()  # poplib closes only after +OK to QUIT
        assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP] Logging out, but 1 message")
        assert SECRET == (elsewhere / f"{path.name}:2,S").read_bytes()


def lmtp_deliver(address: tuple[str, int], user: str, timeout: float) -> int:
    """Deliver one message to ``user`` by LMTP; return the reply code (250, 451, ...)."""
    with smtplib.LMTP(*address, timeout=timeout) as client:
        try:
            client.sendmail("sender@example.org", [user], b"Subject: hi\r\n\r\nbody\r\n")
        except smtplib.SMTPRecipientsRefused as exc:
            return int(exc.recipients[user][0])
        except smtplib.SMTPDataError as exc:
            return int(exc.smtp_code)
    return 250


class TestHeldIndexLock:
    """A user holding their own index lock forever stalls no one else."""

    async def test_other_users_go_on_and_the_holders_deliveries_fail_temporarily(
        self, tmp_path: Path
    ) -> None:
        """While alice's lock is held, bob gets mail and logs in; alice's mail gets 4xx, later."""
        async with running_pobox(tmp_path, ("alice", "bob")) as pobox:
            pobox.pop3.deliver("alice", b"Subject: first\r\n\r\n")
            loop = asyncio.get_running_loop()
            with (
                index_lock_held(pobox.pop3.maildir("alice")),
                ThreadPoolExecutor(12) as pool,
            ):
                waiting = [
                    loop.run_in_executor(pool, lmtp_deliver, pobox.lmtp, "alice", 60)
                    for _ in range(10)
                ]
                await asyncio.sleep(0.5)  # all ten are waiting for alice's lock now
                # Bob is served meanwhile, well within the lock's 10 second bound.
                bob_code = await loop.run_in_executor(pool, lmtp_deliver, pobox.lmtp, "bob", 5)
                client = await loop.run_in_executor(pool, login, pobox.pop3, "bob")
                bob_count, _ = await loop.run_in_executor(pool, client.stat)
                await loop.run_in_executor(pool, client.quit)
                pending = sum(not future.done() for future in waiting)
                codes = await asyncio.gather(*waiting)
        assert (250, 1, 10) == (bob_code, bob_count, pending)
        assert all(400 <= code < 500 for code in codes), codes


# --------------------------------------------------------------------------- stress

#: How long the attacker rearranges the maildir.
ATTACK_SECONDS = 12.0

#: The attacking user's program: random rearrangements of their maildir until told to stop.
#: Arguments: maildir, canaries directory, canary files (joined by ":"), nowhere directory.
ATTACKER = r"""
import os, random, sys, time
maildir, canary_dir, canaries, nowhere, seconds = sys.argv[1:6]
canaries = canaries.split(":")
deadline = time.monotonic() + float(seconds)
rng = random.Random(int(sys.argv[6]))
stash = os.path.join(maildir, ".stash")
os.makedirs(stash, exist_ok=True)
ops = {}

def messages(sub):
    try:
        return [n for n in os.listdir(os.path.join(maildir, sub)) if not n.startswith(".")]
    except OSError:
        return []

def swap_dir(sub):
    path = os.path.join(maildir, sub)
    aside = os.path.join(stash, sub + ".real")
    os.rename(path, aside)
    try:
        os.symlink(rng.choice([canary_dir, os.path.join(canary_dir, "mallory-dir")]), path)
        time.sleep(rng.uniform(0, 0.05))
    finally:
        os.unlink(path)
        os.rename(aside, path)

def swap_message():
    sub = rng.choice(["new", "cur"])
    names = messages(sub)
    if not names:
        return
    name = rng.choice(names)
    path = os.path.join(maildir, sub, name)
    aside = os.path.join(stash, name)
    os.rename(path, aside)
    try:
        kind = rng.choice(["link", "fifo", "hardlink", "canarydir"])
        if kind == "link":
            os.symlink(rng.choice(canaries), path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "hardlink":
            # Another's file: refused by protected_hardlinks. (A hard link to one's own file
            # outside puts that file in the maildir, which is the user's to do.)
            try:
                os.link(rng.choice([c for c in canaries if "mallory" not in c]), path)
            except OSError:
                os.link(aside, path)  # one's own message: allowed
        else:
            os.symlink(os.path.join(canary_dir, "mallory-dir", "1700000000.M1P1.canary:2,S"), path)
        time.sleep(rng.uniform(0, 0.05))
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.rename(aside, path)

def plant_trap():
    sub = rng.choice(["new", "cur"])
    name = "%d.M%dP1.trap" % (1600000000 + rng.randrange(10**6), rng.randrange(10**6))
    path = os.path.join(maildir, sub, name + (":2,S" if sub == "cur" else ""))
    kind = rng.choice(["link", "fifo", "liar"])
    if kind == "link":
        os.symlink(rng.choice(canaries), path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path = os.path.join(maildir, sub, name + ",S=10,W=10")
        with open(path, "wb") as f:
            f.truncate(4 * 1024 * 1024)
    time.sleep(rng.uniform(0, 0.1))
    os.unlink(path)

def own_file():
    name = rng.choice(["pobox-uidlist.lock", "pobox-uidlist.tmp", "pobox-uidvalidity.tmp",
                       "dovecot-pop3-session.lock", "pobox-uidlist"])
    path = os.path.join(maildir, name)
    aside = os.path.join(stash, name)
    had = os.path.lexists(path)
    if had:
        os.rename(path, aside)
    try:
        if rng.random() < 0.5:
            os.symlink(rng.choice(canaries), path)
        else:
            os.symlink(os.path.join(nowhere, name), path)
        time.sleep(rng.uniform(0, 0.05))
    finally:
        os.unlink(path)
        if had:
            os.rename(aside, path)

def flag():
    names = messages("new")
    if names:
        name = rng.choice(names)
        os.rename(os.path.join(maildir, "new", name), os.path.join(maildir, "cur", name + ":2,S"))

while time.monotonic() < deadline:
    op = rng.choice([swap_dir, swap_dir, swap_message, swap_message, plant_trap, own_file,
                     own_file, flag])
    try:
        if op is swap_dir:
            op(rng.choice(["cur", "new", "tmp"]))
        else:
            op()
        ops[op.__name__] = ops.get(op.__name__, 0) + 1
    except OSError as exc:
        ops["error " + type(exc).__name__] = ops.get("error " + type(exc).__name__, 0) + 1
    time.sleep(rng.uniform(0, 0.01))
print(sorted(ops.items()), flush=True)
"""


@dataclass
class Tally:
    """What the clients saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    served: list[bytes] = field(default_factory=list)
    stalls: list[str] = field(default_factory=list)
    alice_sessions: int = 0
    alice_refusals: int = 0
    bob_failures: list[str] = field(default_factory=list)
    deliveries: dict[str, list[int]] = field(default_factory=lambda: {"alice": [], "bob": []})


def pop3_client(srv: RunningServer, user: str, stop: threading.Event, tally: Tally) -> None:
    """Log in, LIST, UIDL, RETR everything, DELE one now and then, QUIT; until ``stop``."""
    rng = random.Random(hash(user) ^ threading.get_ident())
    while not stop.is_set():
        try:
            client = poplib.POP3(srv.host, srv.port, timeout=CLIENT_TIMEOUT)
        except OSError as exc:
            with tally.lock:
                tally.stalls.append(f"connect: {exc!r}")
            continue
        try:
            client.user(user)
            try:
                client.pass_("secret")
            except poplib.error_proto as exc:
                with tally.lock:
                    if user == "alice":
                        tally.alice_refusals += 1
                    else:
                        tally.bob_failures.append(f"login: {exc!r}")
                continue
            client.list()
            client.uidl()
            served = retr_all(client)
            count, _ = client.stat()
            if count and rng.random() < 0.3:
                client.dele(rng.randrange(1, count + 1))
            with contextlib.suppress(poplib.error_proto):
                client.quit()
            with tally.lock:
                tally.served.append(served)
                if user == "alice":
                    tally.alice_sessions += 1
        except TimeoutError as exc:
            with tally.lock:
                tally.stalls.append(f"{user}: {exc!r}")
        except poplib.error_proto as exc:
            if user == "bob":
                with tally.lock:
                    tally.bob_failures.append(repr(exc))
        finally:
            client.close()


def lmtp_client(address: tuple[str, int], stop: threading.Event, tally: Tally) -> None:
    """Deliver to alice and bob in turn until ``stop``."""
    while not stop.is_set():
        for user in ("alice", "bob"):
            try:
                code = lmtp_deliver(address, user, CLIENT_TIMEOUT * 3)
            except TimeoutError as exc:
                with tally.lock:
                    tally.stalls.append(f"lmtp {user}: {exc!r}")
                continue
            with tally.lock:
                tally.deliveries[user].append(code)


def fingerprint(directory: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Return inode, size, mtime and content of every file under ``directory``."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        out[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns, content)
    return out


def plant_canaries(base: Path, mallory: tuple[int, int], victim: tuple[int, int]) -> Path:
    """Make ``base/canaries``: files outside the maildir no session may read, write or remove."""
    canary_dir = base / "canaries"
    canary_dir.mkdir(mode=0o755)
    shadow = canary_dir / "shadow"
    shadow.write_bytes(SECRET + b" root only\n")
    shadow.chmod(0o600)
    theirs = canary_dir / "victim-message"
    theirs.write_bytes(SECRET + b" the victim's message\n")
    os.chown(theirs, *victim)
    theirs.chmod(0o644)
    (canary_dir / "1700000000.M1P1.canary:2,S").write_bytes(SECRET + b" in a dir\n")
    # The attacker's own files outside the maildir: only "no links" keeps them out.
    private = canary_dir / "mallory-private"
    private.write_bytes(SECRET + b" mallory's, outside the maildir\n")
    own_dir = canary_dir / "mallory-dir"
    own_dir.mkdir()
    (own_dir / "1700000000.M1P1.canary:2,S").write_bytes(SECRET + b" mallory's dir\n")
    (own_dir / "1700000001.M1P1.canary").write_bytes(SECRET + b" mallory's dir\n")
    for path in (private, own_dir, *own_dir.iterdir()):
        os.chown(path, *mallory)
    private.chmod(0o600)
    return canary_dir


class TestStress:
    """A hostile user rearranges their maildir while sessions and deliveries run."""

    async def test_nothing_outside_is_touched_and_nothing_stalls(self) -> None:
        """After 12 s of attacks: no canary read, written or removed; no client op timed out."""
        mallory = system_user(MALLORY)
        victim = system_user(VICTIM)
        with searchable_tmpdir() as base:
            canary_dir = plant_canaries(base, mallory, victim)
            nowhere = base / "nowhere"
            nowhere.mkdir(mode=0o777)
            before = fingerprint(canary_dir)
            root = base / "srv"
            store = MaildirStore(f"maildir:{root}/mail/%u", owner=mallory[0], lock_timeout=2)
            settings = {"lmtp_listen": ["127.0.0.1:0"], "hostname": "mx.pobox.test"}
            users = {"alice": "secret", "bob": "secret"}
            async with running_server(root, users, store=store, **settings) as srv:
                for user in users:
                    os.chown(srv.maildir(user), *mallory)
                    for n in range(5):
                        data = f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()
                        deliver_to_maildir(srv.maildir(user), data, owner=mallory[0])
                config = srv.config
                delivery = DeliveryServer(
                    config, build_agent(config, PasswdFileAuthenticator(config.passwd_file), store)
                )
                await delivery.start()
                try:
                    tally, ops = await self._attack(srv, delivery, mallory, canary_dir, nowhere)
                    # Still serving: bob logs in and out.
                    client = await asyncio.to_thread(login, srv, "bob")
                    await asyncio.to_thread(client.quit)
                finally:
                    await delivery.aclose()
            after = fingerprint(canary_dir)
            made = sorted(os.listdir(nowhere))
        served = b"".join(tally.served)
        assert [] == tally.stalls
        assert (False, before, []) == (SECRET in served, after, made)
        assert [] == tally.bob_failures
        assert set(tally.deliveries["bob"]) == {250}, tally.deliveries["bob"]
        # The attack really ran, and alice was served in between.
        assert "swap_dir" in ops, ops
        assert tally.alice_sessions > 0, (ops, tally.alice_sessions, tally.alice_refusals)

    @staticmethod
    async def _attack(
        srv: RunningServer,
        delivery: DeliveryServer,
        mallory: tuple[int, int],
        canary_dir: Path,
        nowhere: Path,
    ) -> tuple[Tally, str]:
        """Run the attack on alice's maildir with the server's listeners."""
        lmtp = delivery.address("lmtp")
        return await run_attack(srv, lmtp, mallory, srv.maildir("alice"), canary_dir, nowhere)


async def run_attack(
    server: RunningServer,
    lmtp: tuple[str, int],
    mallory: tuple[int, int],
    maildir: Path,
    canary_dir: Path,
    nowhere: Path,
) -> tuple[Tally, str]:
    """Run the attacker on ``maildir``, three POP3 clients and an LMTP client; return what they saw.

    ``server`` needs only ``host`` and ``port`` (any server, in this process or not).
    """
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
