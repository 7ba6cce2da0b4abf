"""Privilege drop: a server started as root (to bind 110/995 and read the TLS key) switches
to an unprivileged user before it serves anyone or reads any mail.

The order is the classic one: supplementary groups, then the group, then the user (after
``setuid`` the process could no longer change its groups), and a check that root cannot be
regained.

May import: the standard library and :mod:`pobox.errors`.
"""

from __future__ import annotations

import grp
import os
import pwd

from pobox.errors import ConfigError

__all__ = ["drop_privileges"]


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
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(pw.pw_uid)
    if pw.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - a kernel that lets root back in
            raise ConfigError(f"user: dropping root for {user!r} did not stick")
    return True
