"""The mode ``pobox serve`` picks at start, from the configuration and its credentials."""

from __future__ import annotations

import pwd
from typing import Any

import pytest

from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.server._privileges import MailAccess, plan_privileges
from pobox.storage.privsep import Owner
from tests.helpers.accounts import VMAIL, system_user, unused_uid


def _plan(euid: int, egid: int = 1000, **values: Any):
    return plan_privileges(build_config(values), euid=euid, egid=egid)


class TestNotRoot:
    """Mode 1: a process that is not root serves its own mail."""

    def test_self(self) -> None:
        """Its own uid/gid, no switch, and users without uid fall back to it."""
        plan = _plan(1000, 1000)
        assert (MailAccess.SELF, Owner(1000, 1000), None) == (
            plan.access,
            plan.identity,
            plan.serve_as,
        )
        assert Owner(1000, 1000) == plan.policy.fallback

    def test_foreign_mail_uid_refused(self) -> None:
        """A mail_uid other than its own is a configuration error naming the key."""
        with pytest.raises(ConfigError, match=r"^mail_uid: 4242 is not this process's uid 1000"):
            _plan(1000, mail_uid=4242)

    def test_own_uid_below_range_refused(self) -> None:
        """Running as a uid the range refuses would refuse every login: an error at start."""
        with pytest.raises(ConfigError, match=r"^first_valid_uid: uid 100 gid 1000 may not"):
            _plan(100)

    def test_user_needs_root(self) -> None:
        """user set to someone else needs root, as before."""
        with pytest.raises(ConfigError, match=r"^user: switching to 'nobody' needs"):
            _plan(1000, user="nobody")


class TestRootWithMailUid:
    """Mode 2: root with mail_uid serves as that uid, the whole process."""

    def test_mail_uid(self) -> None:
        """mail_uid (by name) with its primary group; the process becomes it."""
        vmail = system_user(VMAIL)
        plan = _plan(0, 0, mail_uid=VMAIL)
        assert (MailAccess.MAIL_UID, Owner(vmail.uid, vmail.gid)) == (plan.access, plan.identity)
        assert Owner(vmail.uid, vmail.gid) == plan.serve_as
        assert plan.policy.fallback is None

    def test_same_user_is_mode_2(self) -> None:
        """user naming the mail_uid's account is still mode 2."""
        system_user(VMAIL)
        assert MailAccess.MAIL_UID == _plan(0, 0, mail_uid=VMAIL, user=VMAIL).access

    def test_other_user_is_mode_3(self) -> None:
        """user naming another account means the helper (mode 3)."""
        system_user(VMAIL)
        assert MailAccess.HELPER == _plan(0, 0, mail_uid=VMAIL, user="nobody").access

    def test_mail_uid_root_refused_by_default(self) -> None:
        """mail_uid = 0 is refused at start unless first_valid_uid/gid allow it."""
        with pytest.raises(ConfigError, match=r"^mail_uid: uid 0 gid 0 may not access mail"):
            _plan(0, 0, mail_uid="root")
        allowed = _plan(0, 0, mail_uid="root", first_valid_uid=0, first_valid_gid=0)
        assert (MailAccess.MAIL_UID, None) == (allowed.access, allowed.serve_as)

    def test_mail_uid_without_group(self) -> None:
        """A numeric mail_uid without a passwd entry needs mail_gid."""
        unused = unused_uid()
        with pytest.raises(ConfigError, match=r"^mail_gid: mail_uid \d+ has no primary group"):
            _plan(0, 0, mail_uid=unused)
        assert Owner(unused, 60_001) == _plan(0, 0, mail_uid=unused, mail_gid=60_001).identity


class TestRootOtherwise:
    """Mode 3: root without mail_uid starts the helper and serves as user, or nobody."""

    def test_nothing_set(self) -> None:
        """The safe default: helper, serving as nobody, with a warning, never root."""
        nobody = pwd.getpwnam("nobody")
        plan = _plan(0, 0)
        assert (MailAccess.HELPER, Owner(nobody.pw_uid, nobody.pw_gid), None) == (
            plan.access,
            plan.serve_as,
            plan.identity,
        )
        assert plan.policy.fallback is None
        assert "user: not set; the serving process runs as nobody" in plan.warnings[0]

    def test_user_set(self) -> None:
        """user names the serving account; no warning."""
        vmail = system_user(VMAIL)
        plan = _plan(0, 0, user=VMAIL)
        assert (Owner(vmail.uid, vmail.gid), ()) == (plan.serve_as, plan.warnings)

    def test_root_serving_user_refused(self) -> None:
        """The serving process may not stay root when mail has several owners."""
        with pytest.raises(ConfigError, match=r"^user: the serving process must not stay root"):
            _plan(0, 0, user="root")

    def test_mbox_refused(self) -> None:
        """mbox spools are not served through the helper: mail_uid is asked for."""
        with pytest.raises(ConfigError, match=r"^mail_location: mbox spools .* set mail_uid"):
            _plan(0, 0, mail_location="mbox:/var/mail/%u")

    def test_mbox_with_mail_uid(self) -> None:
        """With mail_uid (mode 2) an mbox location is served."""
        plan = _plan(0, 0, mail_location="mbox:/var/mail/%u", mail_uid=VMAIL)
        assert MailAccess.MAIL_UID == plan.access


class TestMailInPostgresql:
    """mail_location = "postgresql": no mail files, so no owners and no helper."""

    @staticmethod
    def _pg(euid: int, egid: int = 0, **values: Any):
        return _plan(euid, egid, mail_location="postgresql", **values)

    def test_not_root_stays(self) -> None:
        """A process that is not root serves as itself, with no switch."""
        plan = self._pg(1000, 1000)
        assert (MailAccess.DATABASE, None) == (plan.access, plan.serve_as)

    def test_root_becomes_nobody_with_a_warning(self) -> None:
        """Root with nothing set becomes nobody, never a storage helper, and says so."""
        nobody = pwd.getpwnam("nobody")
        plan = self._pg(0)
        assert (MailAccess.DATABASE, Owner(nobody.pw_uid, nobody.pw_gid)) == (
            plan.access,
            plan.serve_as,
        )
        assert ["user: not set"] == [w[: len("user: not set")] for w in plan.warnings]

    def test_root_becomes_user(self) -> None:
        """user names the serving account; mail_uid does not make it a helper setup."""
        system_user(VMAIL)
        vmail = pwd.getpwnam(VMAIL)
        plan = self._pg(0, user=VMAIL, mail_uid="nobody")
        assert (MailAccess.DATABASE, Owner(vmail.pw_uid, vmail.pw_gid), ()) == (
            plan.access,
            plan.serve_as,
            plan.warnings,
        )

    def test_root_only_when_explicitly_allowed(self) -> None:
        """user = root is refused; mail_uid root with first_valid_uid 0 keeps root."""
        with pytest.raises(ConfigError, match=r"^user: the serving process must not stay root"):
            self._pg(0, user="root")
        allowed = self._pg(0, mail_uid="root", first_valid_uid=0, first_valid_gid=0)
        assert (MailAccess.DATABASE, None) == (allowed.access, allowed.serve_as)
