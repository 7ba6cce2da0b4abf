"""Whose rights a user's mail is accessed with: Dovecot's ``mail_uid`` model.

The *owner* of a user's mail is the uid/gid it is read, created and removed with:

* the uid the user database sets (Dovecot's userdb ``uid``), else ``mail_uid``, else, when
  the process is not root, the process's own uid (:attr:`OwnerPolicy.fallback`);
* the gid the user database sets, else ``mail_gid``, else the primary group of the owner's
  uid in the system's user database (``getpwuid``), else the fallback gid when the owner is
  the process itself.

The owner must lie in ``first_valid_uid``..``last_valid_uid`` and ``first_valid_gid``..
``last_valid_gid`` (0 as the last: no limit): by default uid 0 and every system account
below 500 are refused, and gid 0. A user without an owner, or outside the ranges, gets
:class:`OwnerRefused` (``-ERR [SYS/PERM]``, ``451 4.3.0`` in delivery) with a message naming
the setting to change. Unlike Dovecot, which refuses root whatever ``first_valid_uid`` says,
``first_valid_uid = 0`` lets mail be accessed as root: tests that run servers in-process as
root set it, nothing else should.

:class:`SameOwnerStore` is the store of the modes without a privilege boundary (a server not
started as root, or one that runs as the single ``mail_uid``): it serves only the users whose
owner is the process's own uid/gid, and refuses the others before touching any file.

May import: the standard library, :mod:`pobox.errors`, :mod:`pobox.records` and
:mod:`pobox.storage`.
"""

from __future__ import annotations

import functools
import grp
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pobox.errors import ConfigError
from pobox.records import Quota
from pobox.storage.base import (
    IncomingMessage,
    Maildrop,
    MaildropFolders,
    MaildropStore,
    MailUser,
    StoragePermanentError,
    Usage,
)

if TYPE_CHECKING:
    from pobox.config import Config

__all__ = [
    "Owner",
    "OwnerPolicy",
    "OwnerRefused",
    "SameOwnerStore",
    "foldered",
    "lookup_gid",
    "lookup_uid",
]


class OwnerRefused(StoragePermanentError):
    """The user's mail has no owner, or one that may not be used (RFC 3206 ``SYS/PERM``)."""


@dataclass(frozen=True, slots=True)
class Owner:
    """The credentials one user's mail is accessed with."""

    uid: int
    gid: int


def lookup_uid(value: str, key: str) -> int:
    """Return the uid of a user given by name or number.

    Raises:
        ConfigError: naming ``key``: no such user.
    """
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ConfigError(f"{key}: no such user {value!r}") from None


def lookup_gid(value: str, key: str) -> int:
    """Return the gid of a group given by name or number.

    Raises:
        ConfigError: naming ``key``: no such group.
    """
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(f"{key}: no such group {value!r}") from None


@functools.lru_cache(maxsize=1024)
def _primary_gid(uid: int) -> int | None:
    """Return the primary group of ``uid`` in the system's user database, if it has one.

    Remembered: a login must not read ``/etc/passwd`` (a change needs a restart, as Dovecot's
    userdb cache would)."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return None


@dataclass(frozen=True, slots=True)
class OwnerPolicy:
    """How a user's owner is found and which owners are allowed (see the module doc).

    Attributes:
        mail_uid, mail_gid: the configured defaults (``None``: not set).
        first_valid_uid, last_valid_uid, first_valid_gid, last_valid_gid: the allowed
            ranges; a last of 0 means no upper limit.
        fallback: the credentials of a process that is not root, used for users with no
            uid anywhere; ``None`` in a process started as root.
    """

    mail_uid: int | None = None
    mail_gid: int | None = None
    first_valid_uid: int = 500
    last_valid_uid: int = 0
    first_valid_gid: int = 1
    last_valid_gid: int = 0
    fallback: Owner | None = None

    @classmethod
    def from_config(cls, config: Config, *, fallback: Owner | None) -> OwnerPolicy:
        """Build the policy of ``config``, looking ``mail_uid``/``mail_gid`` names up.

        Raises:
            ConfigError: naming the key: no such user or group.
        """
        mail_uid = lookup_uid(config.mail_uid, "mail_uid") if config.mail_uid else None
        mail_gid = lookup_gid(config.mail_gid, "mail_gid") if config.mail_gid else None
        if mail_gid is None and mail_uid is not None:
            mail_gid = _primary_gid(mail_uid)  # found once, not at each login
        return cls(
            mail_uid=mail_uid,
            mail_gid=mail_gid,
            first_valid_uid=config.first_valid_uid,
            last_valid_uid=config.last_valid_uid,
            first_valid_gid=config.first_valid_gid,
            last_valid_gid=config.last_valid_gid,
            fallback=fallback,
        )

    def owner_of(self, user: MailUser) -> Owner:
        """Return the owner of ``user``'s mail.

        Raises:
            OwnerRefused: there is none, or it is outside the valid ranges.
        """
        uid = user.uid if user.uid is not None else self.mail_uid
        if uid is None:
            if self.fallback is None:
                msg = (
                    f"user {user.name!r} has no uid: the userdb sets none and mail_uid is "
                    "not set (pobox runs as root and never accesses mail as root)"
                )
                raise OwnerRefused(msg)
            uid = self.fallback.uid
        gid = user.gid if user.gid is not None else self.mail_gid
        if gid is None:
            gid = _primary_gid(uid)
            if gid is None and self.fallback is not None and uid == self.fallback.uid:
                gid = self.fallback.gid
            if gid is None:
                msg = (
                    f"user {user.name!r} has no gid: the userdb sets none, mail_gid is not "
                    f"set and uid {uid} has no primary group"
                )
                raise OwnerRefused(msg)
        owner = Owner(uid, gid)
        self.check(owner, user.name)
        return owner

    def check(self, owner: Owner, name: str) -> None:
        """Refuse ``owner`` if its uid or gid is outside the valid ranges.

        Raises:
            OwnerRefused: naming the setting that refuses it.
        """
        for kind, value in (("uid", owner.uid), ("gid", owner.gid)):
            first = self.first_valid_uid if kind == "uid" else self.first_valid_gid
            last = self.last_valid_uid if kind == "uid" else self.last_valid_gid
            if value < first or (last and value > last):
                bound = (
                    f"below first_valid_{kind} {first}"
                    if value < first
                    else (f"above last_valid_{kind} {last}")
                )
                msg = f"mail access for user {name!r} with {kind} {value} not permitted ({bound})"
                raise OwnerRefused(msg)


class SameOwnerStore:
    """A store serving only users whose mail the process itself owns.

    Satisfies :class:`pobox.storage.base.MaildropStore`: each call finds the user's owner
    (:meth:`OwnerPolicy.owner_of`), refuses any other than ``identity`` with
    :class:`OwnerRefused`, and hands the call to ``inner``, which then runs with the
    process's own credentials (the fast paths of the Maildir store stay as they are).
    """

    def __init__(self, inner: MaildropStore, policy: OwnerPolicy, identity: Owner) -> None:
        """Wrap ``inner``.

        Args:
            policy: how owners are found and checked.
            identity: the uid/gid the process serves mail with.
        """
        self.inner = inner
        self.policy = policy
        self.identity = identity

    def _check(self, user: MailUser) -> None:
        owner = self.policy.owner_of(user)
        if owner != self.identity:
            msg = (
                f"mail of user {user.name!r} belongs to uid {owner.uid} gid {owner.gid}, but "
                f"this pobox accesses mail as uid {self.identity.uid} gid "
                f"{self.identity.gid} only (start it as root to serve several uids)"
            )
            raise OwnerRefused(msg)

    async def open(self, user: MailUser, *, lock: bool = True) -> Maildrop:
        """Open ``user``'s maildrop if the process owns it (see the class doc).

        Raises:
            OwnerRefused: the user's mail has another owner, or none allowed.
        """
        self._check(user)
        return await self.inner.open(user, lock=lock)

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Deliver to ``user`` if the process owns the mail (see the class doc).

        Raises:
            OwnerRefused: the user's mail has another owner, or none allowed.
        """
        self._check(user)
        return await self.inner.deliver(user, message, quota=quota)

    async def open_folders(
        self, user: MailUser, folders: Sequence[str], *, lock: bool = True
    ) -> Maildrop:
        """Open ``user``'s maildrop with ``folders`` merged in, if the process owns it.

        Raises:
            OwnerRefused: the user's mail has another owner, or none allowed.
            StoragePermanentError: the wrapped store has no folders.
        """
        self._check(user)
        return await foldered(self.inner).open_folders(user, folders, lock=lock)

    async def deliver_to_folder(
        self,
        user: MailUser,
        message: IncomingMessage,
        folder: str,
        *,
        quota: Quota | None = None,
    ) -> str:
        """Deliver to ``folder`` of ``user`` if the process owns the mail.

        Raises:
            OwnerRefused: the user's mail has another owner, or none allowed.
            StoragePermanentError: the wrapped store has no folders.
        """
        self._check(user)
        return await foldered(self.inner).deliver_to_folder(user, message, folder, quota=quota)

    async def usage(self, user: MailUser) -> Usage:
        """Return ``user``'s usage if the process owns the mail (see the class doc).

        Raises:
            OwnerRefused: the user's mail has another owner, or none allowed.
        """
        self._check(user)
        return await self.inner.usage(user)

    async def aclose(self) -> None:
        """Close the wrapped store."""
        await self.inner.aclose()


def foldered(store: MaildropStore) -> MaildropFolders:
    """Return ``store`` as a store with folders.

    Raises:
        StoragePermanentError: it has none.
    """
    if not isinstance(store, MaildropFolders):
        msg = "this mail store has no folders (pop3_folders)"
        raise StoragePermanentError(msg)
    return store
