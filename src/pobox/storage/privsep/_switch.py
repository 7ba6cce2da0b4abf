"""Becoming another uid/gid for good: the serving process's drop, and ``pobox deliver``'s switch.

:func:`switch_process` changes the whole process (every thread: glibc's ``setuid`` and
``setgid`` apply to all of them) in the classic order: supplementary groups, group, user,
then checks that root cannot be regained.

:class:`SwitchingStore` is the store of ``pobox deliver`` started as root (by an MTA's
``mailbox_command`` or ``pipe`` transport): its first call finds the owner of the user's mail
(:class:`~._owner.OwnerPolicy`, never root) and switches the whole process to it before any
file of the maildir is touched, as ``dovecot-lda`` does; the message is then written by the
owner, and the kernel refuses whatever the owner could not do. A process serves one owner:
a later call for another owner is refused.

May import: the standard library, :mod:`pobox.records`, :mod:`pobox.storage` and the modules
of this package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pobox.records import Quota
from pobox.storage.base import IncomingMessage, Maildrop, MaildropStore, MailUser, Usage
from pobox.storage.privsep._owner import Owner, OwnerPolicy, OwnerRefused, foldered

__all__ = ["SwitchError", "SwitchingStore", "switch_process"]


class SwitchError(OSError):
    """The process could not become the requested uid/gid, or could become root again."""


def switch_process(owner: Owner, *, groups: tuple[int, ...] = ()) -> None:
    """Become ``owner`` for good (needs root unless the process already is ``owner``).

    Args:
        groups: supplementary groups to keep (none by default).

    Raises:
        SwitchError: a step failed, or root could be regained afterwards.
    """
    if (os.geteuid(), os.getegid()) == (owner.uid, owner.gid) and os.getuid() == owner.uid:
        return
    try:
        os.setgroups(list(groups))
        os.setgid(owner.gid)
        os.setuid(owner.uid)
    except OSError as exc:
        msg = f"cannot switch to uid {owner.uid} gid {owner.gid}: {exc.strerror}"
        raise SwitchError(msg) from exc
    if owner.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - a kernel that lets root back in
            msg = f"switching to uid {owner.uid} did not stick"
            raise SwitchError(msg)
    if os.getresuid() != (owner.uid,) * 3 or os.getresgid() != (owner.gid,) * 3:
        msg = f"switching to uid {owner.uid} gid {owner.gid} left {os.getresuid()}"
        raise SwitchError(msg)


class SwitchingStore:
    """A store that switches the whole process to the owner of the mail at its first call.

    Satisfies :class:`pobox.storage.base.MaildropStore` (see the module documentation).
    """

    def __init__(self, inner: MaildropStore, policy: OwnerPolicy) -> None:
        """Wrap ``inner``, which works with the process's credentials."""
        self.inner = inner
        self.policy = policy
        self.owner: Owner | None = None

    def _become(self, user: MailUser) -> None:
        owner = self.policy.owner_of(user)
        if self.owner is None:
            try:
                switch_process(owner)
            except SwitchError as exc:
                raise OwnerRefused(str(exc)) from exc
            self.owner = owner
        elif owner != self.owner:
            msg = (
                f"mail of user {user.name!r} belongs to uid {owner.uid}, but this process "
                f"became uid {self.owner.uid} for another user"
            )
            raise OwnerRefused(msg)

    async def open(self, user: MailUser, *, lock: bool = True) -> Maildrop:
        """Become the owner of ``user``'s mail, then open the maildrop."""
        self._become(user)
        return await self.inner.open(user, lock=lock)

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Become the owner of ``user``'s mail, then deliver."""
        self._become(user)
        return await self.inner.deliver(user, message, quota=quota)

    async def open_folders(
        self, user: MailUser, folders: Sequence[str], *, lock: bool = True
    ) -> Maildrop:
        """Become the owner of ``user``'s mail, then open the maildrop with ``folders``."""
        self._become(user)
        return await foldered(self.inner).open_folders(user, folders, lock=lock)

    async def deliver_to_folder(
        self,
        user: MailUser,
        message: IncomingMessage,
        folder: str,
        *,
        quota: Quota | None = None,
    ) -> str:
        """Become the owner of ``user``'s mail, then deliver into ``folder``.

        Raises:
            StoragePermanentError: the wrapped store has no folders.
        """
        self._become(user)
        return await foldered(self.inner).deliver_to_folder(user, message, folder, quota=quota)

    async def usage(self, user: MailUser) -> Usage:
        """Become the owner of ``user``'s mail, then count its usage."""
        self._become(user)
        return await self.inner.usage(user)

    async def aclose(self) -> None:
        """Close the wrapped store."""
        await self.inner.aclose()
