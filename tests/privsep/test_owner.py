"""Whose rights a user's mail is accessed with: owner resolution, valid ranges, same-owner store."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.records import User
from pobox.storage.maildir import MaildirStore
from pobox.storage.privsep import Owner, OwnerPolicy, OwnerRefused, SameOwnerStore
from pobox.storage.privsep._owner import lookup_gid, lookup_uid
from tests.helpers.accounts import unused_uid
from tests.helpers.maildir import deliver


class TestOwnerOf:
    """OwnerPolicy.owner_of: userdb first, then mail_uid/mail_gid, then the process."""

    def test_userdb_wins(self) -> None:
        """The uid/gid the userdb sets are used even when mail_uid/mail_gid are set."""
        policy = OwnerPolicy(mail_uid=2000, mail_gid=2000)
        assert Owner(1500, 1600) == policy.owner_of(User("a", uid=1500, gid=1600))

    def test_mail_uid_for_virtual_users(self) -> None:
        """A user without uid/gid gets mail_uid/mail_gid."""
        policy = OwnerPolicy(mail_uid=2000, mail_gid=2001)
        assert Owner(2000, 2001) == policy.owner_of(User("a"))

    def test_gid_from_primary_group(self) -> None:
        """Without a gid anywhere, the uid's primary group in the system database is used."""
        nobody = pwd.getpwnam("nobody")
        policy = OwnerPolicy(mail_uid=nobody.pw_uid)
        assert Owner(nobody.pw_uid, nobody.pw_gid) == policy.owner_of(User("a"))

    def test_process_fallback(self) -> None:
        """A process that is not root serves users without uid as itself."""
        policy = OwnerPolicy(fallback=Owner(1234, 1235))
        assert Owner(1234, 1235) == policy.owner_of(User("a"))

    def test_root_process_without_owner_refuses(self) -> None:
        """Started as root with no uid from the userdb and no mail_uid, the user is refused."""
        policy = OwnerPolicy(fallback=None)
        with pytest.raises(OwnerRefused, match=r"user 'a' has no uid: .*mail_uid is not set"):
            policy.owner_of(User("a"))

    def test_no_gid_anywhere_refuses(self) -> None:
        """A uid without a primary group and no gid set is refused, naming mail_gid."""
        unused = unused_uid()
        with pytest.raises(OwnerRefused, match=r"has no gid: .*mail_gid is not set"):
            OwnerPolicy().owner_of(User("a", uid=unused))


class TestRanges:
    """first_valid_uid/last_valid_uid/first_valid_gid/last_valid_gid, as in Dovecot."""

    def test_root_refused_by_default(self) -> None:
        """uid 0 is below the default first_valid_uid 500, whoever asks."""
        with pytest.raises(
            OwnerRefused, match=r"with uid 0 not permitted \(below first_valid_uid 500\)"
        ):
            OwnerPolicy().owner_of(User("root", uid=0, gid=0))

    def test_system_account_refused(self) -> None:
        """A uid below first_valid_uid (a system account) is refused."""
        with pytest.raises(OwnerRefused, match=r"uid 100 not permitted"):
            OwnerPolicy().owner_of(User("daemon", uid=100, gid=1000))

    def test_gid_zero_refused(self) -> None:
        """gid 0 is below the default first_valid_gid 1."""
        with pytest.raises(OwnerRefused, match=r"gid 0 not permitted \(below first_valid_gid 1\)"):
            OwnerPolicy().owner_of(User("a", uid=1000, gid=0))

    def test_last_valid(self) -> None:
        """A uid above last_valid_uid is refused; 0 means no upper limit."""
        with pytest.raises(OwnerRefused, match=r"above last_valid_uid 1999"):
            OwnerPolicy(last_valid_uid=1999).owner_of(User("a", uid=2000, gid=2000))
        assert Owner(70_000, 70_000) == OwnerPolicy().owner_of(User("a", uid=70_000, gid=70_000))

    def test_zero_allows_root(self) -> None:
        """first_valid_uid = 0 and first_valid_gid = 0 let mail be accessed as root."""
        policy = OwnerPolicy(first_valid_uid=0, first_valid_gid=0)
        assert Owner(0, 0) == policy.owner_of(User("root", uid=0, gid=0))


class TestFromConfig:
    """The policy built from the configuration keys."""

    def test_names_and_numbers(self) -> None:
        """mail_uid and mail_gid take names or numbers (TOML integers too)."""
        nobody = pwd.getpwnam("nobody")
        by_name = OwnerPolicy.from_config(
            build_config({"mail_uid": "nobody", "mail_gid": "nogroup"}), fallback=None
        )
        by_number = OwnerPolicy.from_config(
            build_config({"mail_uid": nobody.pw_uid, "mail_gid": "65534"}), fallback=None
        )
        assert (nobody.pw_uid, lookup_gid("nogroup", "x")) == (by_name.mail_uid, by_name.mail_gid)
        assert (nobody.pw_uid, 65534) == (by_number.mail_uid, by_number.mail_gid)

    def test_unknown_name_names_the_key(self) -> None:
        """An unknown user or group is a configuration error naming the key."""
        with pytest.raises(ConfigError, match=r"^mail_uid: no such user 'no-such-pobox-user'"):
            lookup_uid("no-such-pobox-user", "mail_uid")
        with pytest.raises(ConfigError, match=r"^mail_gid: no such group 'no-such-pobox-group'"):
            OwnerPolicy.from_config(
                build_config({"mail_gid": "no-such-pobox-group"}), fallback=None
            )

    @pytest.mark.parametrize(
        ("values", "error"),
        [
            ({"mail_uid": "-5"}, r"^mail_uid: '-5' is not a user/group name or a number"),
            ({"mail_gid": "a b"}, r"^mail_gid: 'a b' is not"),
            ({"first_valid_uid": -1}, r"^first_valid_uid: must not be negative"),
            (
                {"first_valid_uid": 1000, "last_valid_uid": 999},
                r"^last_valid_uid: 999 is below first_valid_uid 1000",
            ),
            ({"mail_uid": True}, r"^mail_uid: expected str, got bool"),
        ],
    )
    def test_bad_values(self, values: dict[str, object], error: str) -> None:
        """Bad values are refused when the configuration is read, naming the key."""
        with pytest.raises(ConfigError, match=error):
            build_config(values)

    def test_defaults(self) -> None:
        """Dovecot's defaults: first_valid_uid 500, first_valid_gid 1, no upper limits."""
        config = build_config({})
        assert (500, 0, 1, 0, "", "") == (
            config.first_valid_uid,
            config.last_valid_uid,
            config.first_valid_gid,
            config.last_valid_gid,
            config.mail_uid,
            config.mail_gid,
        )


class TestSameOwnerStore:
    """The store of the modes without a boundary serves only the process's own mail."""

    async def test_foreign_owner_refused_before_any_file(self, tmp_path: Path) -> None:
        """A user owned by another uid is refused, and the maildir is not even created."""
        me = Owner(os.geteuid(), os.getegid())
        policy = OwnerPolicy(first_valid_uid=0, first_valid_gid=0, fallback=me)
        store = SameOwnerStore(MaildirStore(f"maildir:{tmp_path}/%u"), policy, me)
        with pytest.raises(OwnerRefused, match=r"belongs to uid 4242 gid 4242, but this pobox"):
            await store.open(User("bob", uid=4242, gid=4242))
        assert [] == list(tmp_path.iterdir())

    async def test_own_mail_served(self, tmp_path: Path) -> None:
        """A user owned by the process (explicitly or by the fallback) is served as before."""
        me = Owner(os.geteuid(), os.getegid())
        policy = OwnerPolicy(first_valid_uid=0, first_valid_gid=0, fallback=me)
        store = SameOwnerStore(MaildirStore(f"maildir:{tmp_path}/%u"), policy, me)
        deliver(tmp_path / "alice", b"Subject: x\n\nhello\n")
        maildrop = await store.open(User("alice", uid=me.uid, gid=me.gid))
        try:
            count = len(maildrop.messages)
        finally:
            await maildrop.close()
        assert 1 == count

    async def test_range_applies_to_own_uid(self, tmp_path: Path) -> None:
        """The process's own uid is refused too when it is outside the valid range."""
        me = Owner(os.geteuid(), os.getegid())
        policy = OwnerPolicy(first_valid_uid=me.uid + 1, first_valid_gid=0, fallback=me)
        store = SameOwnerStore(MaildirStore(f"maildir:{tmp_path}/%u"), policy, me)
        with pytest.raises(OwnerRefused, match=r"below first_valid_uid"):
            await store.usage(User("alice"))
