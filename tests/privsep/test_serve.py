"""``pobox serve`` started as root, in each mode, checked with the kernel's own answers.

Mode 3 (nothing set: system users who own their mail) runs the serving process as nobody and
reaches mail through the root storage helper with each user's uid/gid; mode 2 (``mail_uid``)
runs the whole server as the vmail uid; mode 1 (not started as root) serves only its own mail.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import smtplib
import sys
from pathlib import Path

import pytest

from tests.helpers.accounts import VMAIL, Account, chown_tree, process_ids, system_user
from tests.integration.wire import Wire
from tests.privsep.conftest import ALICE_MESSAGE, BOB_SECRET, ROOT_SECRET, World
from tests.privsep.serving import DEADLINE, Served, children, serve

LOCK = "dovecot-pop3-session.lock"


def _passwd(world: World, *lines: str) -> Path:
    """Write a root-only passwd-file with alice, bob and ``lines``."""
    path = world.root / "passwd"
    path.write_text(world.passwd_line(world.alice) + world.passwd_line(world.bob) + "".join(lines))
    path.chmod(0o600)
    return path


async def _retrieve_all(port: int, user: bytes = b"pobox-ps-alice") -> tuple[bytes, list[bytes]]:
    """Log in and RETR every message; return the STAT line and each RETR answer."""
    wire = await Wire.connect("127.0.0.1", port)
    await wire.login(user)
    stat = await wire.command(b"STAT")
    count = int(stat.split()[1])
    answers = []
    for number in range(1, count + 1):
        await wire.send(b"RETR %d\r\n" % number)
        answers.append(await wire.multiline())
    await wire.send(b"QUIT\r\n")
    await wire.read_all()
    return stat, answers


async def _pass(port: int, user: bytes, password: bytes = b"secret") -> bytes:
    """Connect, send USER and PASS; return the answer to PASS."""
    wire = await Wire.connect("127.0.0.1", port)
    await wire.line()
    await wire.command(b"USER " + user)
    return await wire.command(b"PASS " + password)


async def _until(condition: object) -> None:
    """Wait until ``condition()`` is true (a deadline, not a timed assertion)."""
    async with asyncio.timeout(DEADLINE):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def _lmtp(served: Served, recipient: str) -> dict[str, tuple[int, bytes]]:
    """Send one message over the server's LMTP listener; return the refused recipients."""
    _, port = await served.lmtp_address()
    return await asyncio.to_thread(_send_lmtp, port, recipient)


def _send_lmtp(port: int, recipient: str) -> dict[str, tuple[int, bytes]]:
    client = smtplib.LMTP("127.0.0.1", port)
    try:
        return client.sendmail("s@example.org", [recipient], b"Subject: lmtp\r\n\r\nvia lmtp\r\n")
    finally:
        client.quit()


def _new_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir())


class TestHelperMode:
    """Mode 3: root with nothing set serves as nobody, with each user's own rights."""

    async def test_processes(self, world: World) -> None:
        """The serving process is nobody (all four ids); its child, the helper, is root."""
        nobody = pwd.getpwnam("nobody")
        async with serve(world.root, f'passwd_file = "{_passwd(world)}"\n') as served:
            server_ids = process_ids(served.proc.pid)
            helper_ids = process_ids(served.helper_pid)
            kids = children(served.proc.pid)
        assert ([nobody.pw_uid] * 4, [nobody.pw_gid] * 4) == server_ids
        assert ([0] * 4, [0] * 4) == helper_ids
        assert [served.helper_pid] == kids
        assert any("user: not set; the serving process runs as nobody" in x for x in served.log)

    async def test_planted_links_not_served(self, world: World) -> None:
        """Links to a root-only file and to bob's message in alice's maildir yield neither."""
        new = world.maildir(world.alice) / "new"
        bob_file = next((world.maildir(world.bob) / "new").iterdir())
        bob_file.chmod(0o600)
        # Planted by root here (alice could make the symbolic links herself); the hard links
        # share the targets' inodes, which stay root's and bob's.
        os.symlink(world.secret, new / "1700000001.M1P1.evil,S=17,W=18")
        os.symlink(bob_file, new / "1700000002.M2P2.evil,S=33,W=36")
        os.link(world.secret, new / "1700000003.M3P3.evil,S=17,W=18")
        os.link(bob_file, new / "1700000004.M4P4.evil,S=33,W=36")
        async with serve(world.root, f'passwd_file = "{_passwd(world)}"\n') as served:
            stat, answers = await _retrieve_all(served.port)
        served_bytes = b"".join(answers)
        assert stat.startswith(b"+OK ")
        assert ALICE_MESSAGE.replace(b"\n", b"\r\n") in served_bytes
        assert ROOT_SECRET.strip() not in served_bytes
        assert b"BOB-SECRET" not in served_bytes

    async def test_reads_with_the_users_rights(self, world: World) -> None:
        """alice's own message with mode 0000 is refused: the helper reads as alice, not root."""
        message = next((world.maildir(world.alice) / "new").iterdir())
        message.chmod(0)
        async with serve(world.root, f'passwd_file = "{_passwd(world)}"\n') as served:
            stat, answers = await _retrieve_all(served.port)
            logged = await served.wait_log(r"Cannot read message 1")
        assert stat.startswith(b"+OK 1 ")
        assert [b"-ERR [SYS/PERM] Cannot read the message, try later.\r\n"] == answers
        assert "Permission denied" in logged

    async def test_root_user_refused(self, world: World) -> None:
        """A userdb entry with uid 0 gets -ERR [SYS/PERM], and the log says why."""
        line = f"toor:{{PLAIN}}secret:0:0::{world.home(world.alice)}::\n"
        async with serve(world.root, f'passwd_file = "{_passwd(world, line)}"\n') as served:
            answer = await _pass(served.port, b"toor", b"secret")
            logged = await served.wait_log(r"Cannot open maildrop of user=<toor>")
        assert answer.startswith(b"-ERR [SYS/PERM] ")
        assert "uid 0 not permitted (below first_valid_uid 500)" in logged

    async def test_delivery_owned_by_user(self, world: World) -> None:
        """A message delivered over LMTP is a file of alice's uid and gid, not root's."""
        settings = f'passwd_file = "{_passwd(world)}"\nlmtp_listen = ["127.0.0.1:0"]\n'
        async with serve(world.root, settings) as served:
            refused = await _lmtp(served, world.alice.name)
        files = _new_files(world.maildir(world.alice))
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in files}
        assert {} == refused
        assert 2 == len(files)
        assert {(world.alice.uid, world.alice.gid)} == owners

    async def test_passwd_file_read_through_helper(self, world: World) -> None:
        """The root-only passwd-file is read again after a change, though the server is nobody."""
        passwd = _passwd(world)
        async with serve(world.root, f'passwd_file = "{passwd}"\n') as served:
            before = await _pass(served.port, b"pobox-ps-bob", b"changed")
            passwd.write_text(
                passwd.read_text().replace(
                    "pobox-ps-bob:{PLAIN}secret", "pobox-ps-bob:{PLAIN}changed"
                )
            )
            await asyncio.sleep(1.1)  # the passwd-file is checked at most once a second
            after = await _pass(served.port, b"pobox-ps-bob", b"changed")
        assert before.startswith(b"-ERR")
        assert b"+OK Logged in.\r\n" == after
        assert 0o600 == passwd.stat().st_mode & 0o777

    async def test_killing_server_releases_locks(self, world: World) -> None:
        """SIGKILL of the serving process: the helper releases alice's lock and exits."""
        lock = world.maildir(world.alice) / LOCK
        async with serve(world.root, f'passwd_file = "{_passwd(world)}"\n') as served:
            wire = await Wire.connect("127.0.0.1", served.port)
            await wire.login(b"pobox-ps-alice")
            held = lock.exists()
            helper = served.helper_pid
            served.proc.send_signal(signal.SIGKILL)
            await served.wait_exit()
            await _until(lambda: not Path(f"/proc/{helper}").exists())
        assert held
        assert not lock.exists()

    async def test_workers_each_with_a_helper(self, world: World) -> None:
        """workers = 2: a root master, two workers as nobody, each with its own root helper;
        SIGKILL of the master ends them all and releases the maildrop lock."""
        nobody = pwd.getpwnam("nobody")
        lock = world.maildir(world.alice) / LOCK
        settings = f'passwd_file = "{_passwd(world)}"\nworkers = 2\n'
        async with serve(world.root, settings) as served:
            await served.wait_log(r"master: pobox \S+ started")
            workers = children(served.proc.pid)
            helpers = [pid for worker in workers for pid in children(worker)]
            ids = [process_ids(pid) for pid in workers + helpers]
            stat, answers = await _retrieve_all(served.port)
            wire = await Wire.connect("127.0.0.1", served.port)
            await wire.login(b"pobox-ps-alice")
            held = lock.exists()
            served.proc.send_signal(signal.SIGKILL)
            await served.wait_exit()
            await _until(lambda: not any(Path(f"/proc/{p}").exists() for p in workers + helpers))
        assert 2 == len(workers)
        assert 2 == len(helpers)
        assert [([nobody.pw_uid] * 4, [nobody.pw_gid] * 4)] * 2 == ids[:2]
        assert [([0] * 4, [0] * 4)] * 2 == ids[2:]
        assert stat.startswith(b"+OK 1 ")
        assert ALICE_MESSAGE.replace(b"\n", b"\r\n") in answers[0]
        assert held
        assert not lock.exists()

    async def test_killing_helper_stops_server(self, world: World) -> None:
        """SIGKILL of the helper: the server logs it and exits with 69, never serves on."""
        async with serve(world.root, f'passwd_file = "{_passwd(world)}"\n') as served:
            os.kill(served.helper_pid, signal.SIGKILL)
            status = await served.wait_exit()
        assert 69 == status
        assert any("the storage helper is gone" in line for line in served.log)

    async def test_log_reopened_through_helper(self, world: World) -> None:
        """After a rotation, SIGUSR1 gets a new log file in a directory only root may write."""
        logs = world.root / "logs"
        logs.mkdir(mode=0o755)
        log = logs / "pobox.log"
        settings = f'passwd_file = "{_passwd(world)}"\nlog_path = "{log}"\n'
        async with serve(world.root, settings, log=log) as served:
            log.rename(logs / "pobox.log.1")
            served.proc.send_signal(signal.SIGUSR1)
            await _until(lambda: log.exists() and "log file reopened" in log.read_text())
            await _pass(served.port, b"pobox-ps-alice")
            await _until(lambda: "Login: user=<pobox-ps-alice>" in log.read_text())
            info = log.stat()
        assert (0, 0o640) == (info.st_uid, info.st_mode & 0o777)
        assert "Login: user=" not in (logs / "pobox.log.1").read_text()

    async def test_tls_reload_with_root_only_key(self, world: World) -> None:
        """SIGHUP reloads a root-only TLS key through the helper."""
        from tests.tls.helpers import Pki  # noqa: PLC0415

        pki = Pki.create(world.root / "pki")
        pki.key_pem.chmod(0o600)
        settings = (
            f'passwd_file = "{_passwd(world)}"\nssl_cert = "{pki.cert_pem}"\n'
            f'ssl_key = "{pki.key_pem}"\n'
        )
        async with serve(world.root, settings) as served:
            pki.issue("localhost", "127.0.0.1")
            pki.key_pem.chmod(0o600)
            served.proc.send_signal(signal.SIGHUP)
            line = await served.wait_log(r"TLS (certificates reloaded|reload failed)")
        assert "TLS certificates reloaded" in line


@pytest.fixture
def vmail_world(world: World) -> tuple[World, Account]:
    """alice's maildir handed to the vmail user."""
    vmail = system_user(VMAIL)
    chown_tree(world.home(world.alice), vmail)
    return world, vmail


class TestMailUidMode:
    """Mode 2: root with mail_uid serves as that uid entirely, with no helper."""

    def _passwd(self, world: World, vmail: Account) -> Path:
        path = world.root / "passwd"
        path.write_text(
            f"virtual:{{PLAIN}}secret::::::userdb_mail=maildir:{world.maildir(world.alice)}\n"
            + world.passwd_line(world.bob)
        )
        path.chmod(0o640)
        os.chown(path, 0, vmail.gid)
        return path

    async def test_runs_as_vmail(self, vmail_world: tuple[World, Account]) -> None:
        """Every id of the server is vmail's, there is no helper, and a virtual user logs in."""
        world, vmail = vmail_world
        settings = f'passwd_file = "{self._passwd(world, vmail)}"\nmail_uid = "{vmail.name}"\n'
        async with serve(world.root, settings) as served:
            ids = process_ids(served.proc.pid)
            kids = children(served.proc.pid)
            stat, answers = await _retrieve_all(served.port, b"virtual")
        assert ([vmail.uid] * 4, [vmail.gid] * 4) == ids
        assert [] == kids
        assert stat.startswith(b"+OK 1 ")
        assert ALICE_MESSAGE.replace(b"\n", b"\r\n") in answers[0]

    async def test_other_uid_refused(self, vmail_world: tuple[World, Account]) -> None:
        """A user whose userdb uid is not mail_uid is refused, and the log says why."""
        world, vmail = vmail_world
        settings = f'passwd_file = "{self._passwd(world, vmail)}"\nmail_uid = "{vmail.name}"\n'
        async with serve(world.root, settings) as served:
            answer = await _pass(served.port, b"pobox-ps-bob", b"secret")
            logged = await served.wait_log(r"Cannot open maildrop of user=<pobox-ps-bob>")
        assert answer.startswith(b"-ERR [SYS/PERM] ")
        assert f"belongs to uid {world.bob.uid}" in logged
        assert BOB_SECRET not in answer

    async def test_delivery_owned_by_vmail(self, vmail_world: tuple[World, Account]) -> None:
        """A message delivered over LMTP to a virtual user is a file of vmail's."""
        world, vmail = vmail_world
        settings = (
            f'passwd_file = "{self._passwd(world, vmail)}"\nmail_uid = "{vmail.name}"\n'
            'lmtp_listen = ["127.0.0.1:0"]\n'
        )
        async with serve(world.root, settings) as served:
            refused = await _lmtp(served, "virtual")
        owners = {
            (p.stat().st_uid, p.stat().st_gid) for p in _new_files(world.maildir(world.alice))
        }
        assert {} == refused
        assert {(vmail.uid, vmail.gid)} == owners

    async def test_unreadable_passwd_file_stops_start(
        self, vmail_world: tuple[World, Account]
    ) -> None:
        """A passwd-file vmail cannot read is a configuration error at start (78)."""
        world, vmail = vmail_world
        path = self._passwd(world, vmail)
        path.chmod(0o600)
        (world.root / "pobox.toml").write_text(
            f'listen = ["127.0.0.1:0"]\nworkers = 1\n'
            f'passwd_file = "{path}"\nmail_uid = "{vmail.name}"\n'
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pobox",
            "serve",
            "-c",
            str(world.root / "pobox.toml"),
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(DEADLINE):
            _, err = await proc.communicate()
        assert 78 == proc.returncode
        assert b"passwd_file: " in err
        assert b"is not readable by mail_uid" in err


class TestSelfMode:
    """Mode 1: a server not started as root serves only the mail its own uid owns."""

    async def test_only_own_mail(self, world: World) -> None:
        """Started as alice, it serves alice and refuses bob (another uid)."""
        passwd = _passwd(world)
        os.chown(passwd, world.alice.uid, world.alice.gid)
        # The interpreter may live where alice cannot read (a pyenv under /root): the child
        # imports pobox as root, then becomes alice for good before it starts.
        prelude = (
            "import os, uvloop\n"
            "from pobox.cli import main\n"
            "import pobox.storage.privsep, pobox.storage.maildir, pobox.delivery\n"
            f"os.setgroups([]); os.setgid({world.alice.gid}); os.setuid({world.alice.uid})\n"
        )
        settings = f'passwd_file = "{passwd}"\nevent_loop = "asyncio"\n'
        async with serve(world.root, settings, prelude=prelude) as served:
            ids = process_ids(served.proc.pid)
            stat, _ = await _retrieve_all(served.port)
            refused = await _pass(served.port, b"pobox-ps-bob", b"secret")
            logged = await served.wait_log(r"Cannot open maildrop of user=<pobox-ps-bob>")
        assert [world.alice.uid] * 4 == ids[0]
        assert stat.startswith(b"+OK 1 ")
        assert refused.startswith(b"-ERR [SYS/PERM] ")
        assert "accesses mail as uid" in logged
        assert any("not started as root" in line for line in served.log)
