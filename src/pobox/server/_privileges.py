"""Who the server runs as, and whose rights mail is accessed with: the modes.

``pobox serve`` decides at start (:func:`plan_privileges`), before it binds anything:

1. **Not started as root** (:attr:`MailAccess.SELF`): mail is accessed with the process's own
   credentials, the fast path developers and tests run. Users whose mail belongs to another
   uid/gid are refused; ``mail_uid``/``mail_gid`` other than the process's own are a
   configuration error.
2. **Root with** ``mail_uid`` **set**, and ``user`` empty or the same uid (``group`` empty or
   the same gid) (:attr:`MailAccess.MAIL_UID`): virtual users under one vmail uid. After
   binding the ports and reading the TLS keys the whole process becomes ``mail_uid`` /
   ``mail_gid`` (or ``mail_uid``'s primary group): no boundary, the fast paths kept. Users
   whose userdb uid/gid differ are refused.
3. **Root otherwise** (:attr:`MailAccess.HELPER`): users who each own their mail. The storage
   helper (:mod:`pobox.storage.privsep`) is started while still root; the serving process then
   becomes ``user`` (``nobody`` when unset, with a warning) and reaches mail, the passwd-file
   and the TLS files only through the helper, which accesses each user's mail with that user's
   uid/gid and never as root or a uid below ``first_valid_uid``.

Mail in PostgreSQL (``mail_location = "postgresql"``, :attr:`MailAccess.DATABASE`) is no
file of anyone's, so there are no owners: started as root, the process becomes ``user``
after binding, else ``mail_uid`` (as in mode 2), else ``nobody`` (with a warning), without a
helper; not started as root, it stays who it is.

The order of a switch is the classic one (supplementary groups, group, user, then a check
that root cannot be regained: :func:`pobox.storage.privsep.switch_process`).

May import: the standard library, :mod:`pobox.config`, :mod:`pobox.errors` and
:mod:`pobox.storage.privsep`.
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
from dataclasses import dataclass

from pobox.config import Config
from pobox.errors import ConfigError
from pobox.storage.privsep import (
    Owner,
    OwnerPolicy,
    OwnerRefused,
    SwitchError,
    lookup_gid,
    switch_process,
)

__all__ = ["MailAccess", "PrivilegePlan", "drop_privileges", "plan_privileges", "switch_to"]

#: The serving process's user in mode 3 when ``user`` is not set.
DEFAULT_SERVING_USER = "nobody"


class MailAccess(enum.Enum):
    """How the server reaches mail (see the module documentation)."""

    #: Mode 1: with the process's own credentials (not started as root).
    SELF = "self"
    #: Mode 2: the whole process runs as the one ``mail_uid``.
    MAIL_UID = "mail_uid"
    #: Mode 3: through the storage helper, with each owner's credentials.
    HELPER = "helper"
    #: Mail in PostgreSQL: no files, no owners; the process never stays root.
    DATABASE = "database"


@dataclass(frozen=True, slots=True)
class PrivilegePlan:
    """What :func:`plan_privileges` decided.

    Attributes:
        access: the mode.
        policy: how owners are found and which are allowed.
        identity: the uid/gid mail is accessed with in modes 1 and 2 (``None`` in mode 3).
        serve_as: the uid/gid the serving process becomes after binding (``None``: it stays).
        serve_name: the name of ``serve_as``, for the log.
        warnings: lines to log at start.
    """

    access: MailAccess
    policy: OwnerPolicy
    identity: Owner | None
    serve_as: Owner | None
    serve_name: str = ""
    warnings: tuple[str, ...] = ()


def _account(user: str, group: str) -> tuple[Owner, str]:
    """Resolve ``user`` (name or number) and ``group`` (default: the user's primary group).

    Raises:
        ConfigError: naming ``user`` or ``group``.
    """
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user: no such user {user!r}") from None
    gid = lookup_gid(group, "group") if group else pw.pw_gid
    return Owner(pw.pw_uid, gid), pw.pw_name


def _mail_identity(config: Config, policy: OwnerPolicy) -> Owner:
    """Return ``mail_uid`` with ``mail_gid`` or its primary group.

    Raises:
        ConfigError: no gid can be found.
    """
    assert policy.mail_uid is not None
    gid = policy.mail_gid
    if gid is None:
        try:
            gid = pwd.getpwuid(policy.mail_uid).pw_gid
        except KeyError:
            msg = f"mail_gid: mail_uid {config.mail_uid} has no primary group; set mail_gid"
            raise ConfigError(msg) from None
    return Owner(policy.mail_uid, gid)


def plan_privileges(
    config: Config, *, euid: int | None = None, egid: int | None = None
) -> PrivilegePlan:
    """Decide how the server reaches mail and whom it runs as (see the module doc).

    Args:
        euid, egid: the process's credentials (default: the real ones; for tests).

    Raises:
        ConfigError: naming the key: an unknown user or group, a ``mail_uid`` a process
            that is not root cannot serve, a serving user that is root in mode 3, an owner
            outside the valid ranges.
    """
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    if config.mail_location == "postgresql":
        return _database_plan(config, euid, egid)
    if euid != 0:
        me = Owner(euid, egid)
        policy = OwnerPolicy.from_config(config, fallback=me)
        if config.user:
            wanted, _ = _account(config.user, config.group)
            if wanted != me:
                msg = f"user: switching to {config.user!r} needs the server to start as root"
                raise ConfigError(msg)
        if policy.mail_uid is not None and policy.mail_uid != euid:
            msg = f"mail_uid: {config.mail_uid} is not this process's uid {euid} (not root)"
            raise ConfigError(msg)
        if policy.mail_gid is not None and policy.mail_gid != egid:
            msg = f"mail_gid: {config.mail_gid} is not this process's gid {egid} (not root)"
            raise ConfigError(msg)
        _check_range(policy, me, "first_valid_uid")
        return PrivilegePlan(MailAccess.SELF, policy, me, None)
    policy = OwnerPolicy.from_config(config, fallback=None)
    if policy.mail_uid is not None:
        mail = _mail_identity(config, policy)
        serving = _account(config.user, config.group)[0] if config.user else mail
        if serving == mail:
            _check_range(policy, mail, "mail_uid")
            name = _name_of(mail.uid)
            serve_as = None if mail.uid == 0 else mail
            return PrivilegePlan(MailAccess.MAIL_UID, policy, mail, serve_as, name)
    if config.mail_location.startswith("mbox:"):
        msg = (
            "mail_location: mbox spools are served with one uid: set mail_uid (and mail_gid, "
            "e.g. a group that may write the spool directory), or start pobox as that user; "
            "the storage helper for mail of several uids serves Maildir only"
        )
        raise ConfigError(msg)
    warnings: tuple[str, ...] = ()
    if config.user:
        serve_as, name = _account(config.user, config.group)
    else:
        serve_as, name = _account(DEFAULT_SERVING_USER, config.group)
        warnings = (
            f"user: not set; the serving process runs as {name} (uid {serve_as.uid}). "
            'A user of its own is better, e.g. user = "pobox".',
        )
    if serve_as.uid == 0:
        msg = (
            "user: the serving process must not stay root when mail belongs to several "
            "uids (set mail_uid to serve as the one mail uid)"
        )
        raise ConfigError(msg)
    return PrivilegePlan(MailAccess.HELPER, policy, None, serve_as, name, warnings)


def _database_plan(config: Config, euid: int, egid: int) -> PrivilegePlan:
    """Plan for mail in PostgreSQL: no files, so no owners; the serving identity only.

    Started as root the process becomes ``user``, else ``mail_uid`` (as in mode 2; root only
    with an explicit ``first_valid_uid = 0``), else ``nobody`` with a warning.

    Raises:
        ConfigError: ``user`` names root, or needs the server to start as root.
    """
    me = Owner(euid, egid)
    if euid != 0:
        policy = OwnerPolicy.from_config(config, fallback=me)
        if config.user and _account(config.user, config.group)[0] != me:
            msg = f"user: switching to {config.user!r} needs the server to start as root"
            raise ConfigError(msg)
        return PrivilegePlan(MailAccess.DATABASE, policy, me, None)
    policy = OwnerPolicy.from_config(config, fallback=None)
    if config.mail_location.startswith("mbox:"):
        msg = (
            "mail_location: mbox spools are served with one uid: set mail_uid (and mail_gid, "
            "e.g. a group that may write the spool directory), or start pobox as that user; "
            "the storage helper for mail of several uids serves Maildir only"
        )
        raise ConfigError(msg)
    warnings: tuple[str, ...] = ()
    if config.user:
        serve_as, name = _account(config.user, config.group)
    elif policy.mail_uid is not None:
        serve_as = _mail_identity(config, policy)
        _check_range(policy, serve_as, "mail_uid")
        name = _name_of(serve_as.uid)
        if serve_as.uid == 0:  # explicitly allowed by first_valid_uid = 0: stay as we are
            return PrivilegePlan(MailAccess.DATABASE, policy, serve_as, None, name)
    else:
        serve_as, name = _account(DEFAULT_SERVING_USER, config.group)
        warnings = (
            f"user: not set; the serving process runs as {name} (uid {serve_as.uid}). "
            'A user of its own is better, e.g. user = "pobox".',
        )
    if serve_as.uid == 0:
        msg = "user: the serving process must not stay root (mail is in PostgreSQL)"
        raise ConfigError(msg)
    return PrivilegePlan(MailAccess.DATABASE, policy, serve_as, serve_as, name, warnings)


def _check_range(policy: OwnerPolicy, owner: Owner, key: str) -> None:
    """Refuse to start when every login would be refused for the owner's range.

    Raises:
        ConfigError: naming ``key``.
    """
    try:
        policy.check(owner, key)
    except OwnerRefused as exc:
        msg = f"{key}: uid {owner.uid} gid {owner.gid} may not access mail: {exc}"
        raise ConfigError(msg) from None


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def drop_privileges(user: str, group: str = "") -> bool:
    """Become ``user`` (and ``group``, default the user's primary group) for good.

    Does nothing when ``user`` is empty, or when the process already runs as ``user``.

    Returns:
        whether the identity was changed.

    Raises:
        ConfigError: naming ``user``/``group``: no such user or group, or not root.
    """
    if not user:
        return False
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user: no such user {user!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise ConfigError(f"group: no such group {group!r}") from None
    if os.geteuid() != 0:
        if os.geteuid() == pw.pw_uid and os.getegid() == gid:
            return False
        raise ConfigError(f"user: switching to {user!r} needs the server to start as root")
    switch_to(Owner(pw.pw_uid, gid), user)
    return True


def switch_to(owner: Owner, name: str) -> None:
    """Become ``owner`` for good, keeping its gid as the only supplementary group.

    Raises:
        ConfigError: the switch failed (naming ``user``).
    """
    try:
        switch_process(owner, groups=(owner.gid,))
    except SwitchError as exc:
        raise ConfigError(f"user: cannot become {name}: {exc}") from None
