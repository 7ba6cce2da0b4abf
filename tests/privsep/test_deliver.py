"""``pobox deliver`` started as root becomes the owner of the recipient's mail first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.accounts import VMAIL, system_user
from tests.privsep.conftest import World

MESSAGE = b"Subject: lda\n\nvia pobox deliver\n"


def _deliver(world: World, user: str, *settings: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``pobox deliver -u USER`` as root with a config holding ``settings``."""
    config = world.root / "pobox.toml"
    config.write_text(f'passwd_file = "{world.root / "passwd"}"\n' + "".join(settings))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pobox",
            "deliver",
            "-u",
            user,
            "-f",
            "s@example.org",
            "-c",
            str(config),
        ],
        input=MESSAGE,
        capture_output=True,
        check=False,
        timeout=60,
    )


def _write_passwd(world: World, *lines: str) -> None:
    path = world.root / "passwd"
    path.write_text(world.passwd_line(world.alice) + "".join(lines))
    path.chmod(0o600)


def _new(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir())


class TestDeliverAsRoot:
    """The whole process switches to the owner (setgroups, setgid, setuid) before writing."""

    def test_file_owned_by_user(self, world: World) -> None:
        """A message for alice is written by alice's uid/gid: the file is hers."""
        _write_passwd(world)
        done = _deliver(world, world.alice.name)
        files = _new(world.maildir(world.alice))
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in files}
        assert (0, b"") == (done.returncode, done.stderr)
        assert 2 == len(files)
        assert {(world.alice.uid, world.alice.gid)} == owners

    def test_kernel_refuses_what_the_user_cannot_write(self, world: World) -> None:
        """alice's new/ made read-only (0555) stops the delivery: root could write there."""
        _write_passwd(world)
        new = world.maildir(world.alice) / "new"
        new.chmod(0o555)
        done = _deliver(world, world.alice.name)
        assert 1 == len(_new(world.maildir(world.alice)))
        assert done.returncode in (73, 75)
        assert b"Permission denied" in done.stderr

    def test_root_user_refused(self, world: World) -> None:
        """A recipient with uid 0 is refused (73): mail is never written as root."""
        _write_passwd(world, f"toor:{{PLAIN}}x:0:0::{world.home(world.alice)}::\n")
        done = _deliver(world, "toor")
        assert 73 == done.returncode
        assert b"uid 0 not permitted (below first_valid_uid 500)" in done.stderr
        assert 1 == len(_new(world.maildir(world.alice)))

    def test_no_owner_refused(self, world: World) -> None:
        """A recipient with no uid and no mail_uid is refused (73), naming mail_uid."""
        _write_passwd(world, f"nouid:{{PLAIN}}x::::{world.home(world.alice)}::\n")
        done = _deliver(world, "nouid")
        assert 73 == done.returncode
        assert b"has no uid" in done.stderr

    def test_mail_uid_for_virtual_users(self, world: World) -> None:
        """With mail_uid, a recipient without uid gets a file of vmail's."""
        vmail = system_user(VMAIL)
        maildir = world.root / "virtual"
        maildir.mkdir()
        os.chown(maildir, vmail.uid, vmail.gid)
        _write_passwd(world, f"virtual:{{PLAIN}}x::::::userdb_mail=maildir:{maildir}\n")
        done = _deliver(world, "virtual", f'mail_uid = "{vmail.name}"\n')
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in _new(maildir)}
        assert (0, b"") == (done.returncode, done.stderr)
        assert {(vmail.uid, vmail.gid)} == owners
