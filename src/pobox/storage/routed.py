"""One store per mail format, chosen per user: a user's ``mail`` field may name another format.

``mail_location`` names the format most users have; a user database's ``mail`` field
(``userdb_mail``) overrides it per user, and may name the other format, as in Dovecot: a site
moving from ``/var/mail`` to Maildir one user at a time sets ``mail_location =
"maildir:~/Maildir"`` and ``userdb_mail=mbox:/var/mail/%u`` for those not moved yet.
:class:`FormatRouter` sends each call to the store of the user's format: ``mbox:`` to the
mbox store, ``maildir:`` (or a bare path, which the Maildir store reads as a maildir) to the
Maildir store, no ``mail`` field to the default store. Folders (``pop3_folders``,
:class:`~pobox.storage.base.MaildropFolders`) go to a store that has them; a user of a store
without (mbox) gets the INBOX alone, as a session on such a store does.

May import: the standard library and :mod:`pobox.storage`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pobox.storage.base import (
    INBOX,
    IncomingMessage,
    Maildrop,
    MaildropFolders,
    MaildropStore,
    MailUser,
    Quota,
    StoragePermanentError,
    Usage,
    check_folder,
)

__all__ = ["FormatRouter"]


class FormatRouter:
    """Send each user's calls to the store of their mail format; a ``MaildropStore``."""

    def __init__(
        self, default: MaildropStore, *, maildir: MaildropStore, mbox: MaildropStore
    ) -> None:
        """Route to ``maildir`` or ``mbox`` by the user's ``mail`` field, else to ``default``.

        ``default`` is one of the two.
        """
        self.default = default
        self.maildir = maildir
        self.mbox = mbox

    def store_for(self, user: MailUser) -> MaildropStore:
        """Return the store that serves ``user``."""
        mail = user.mail
        if not mail:
            return self.default
        return self.mbox if mail.startswith("mbox:") else self.maildir

    async def open(self, user: MailUser, *, lock: bool = True) -> Maildrop:
        """Open ``user``'s maildrop in the store of their format."""
        return await self.store_for(user).open(user, lock=lock)

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Deliver to ``user`` in the store of their format."""
        return await self.store_for(user).deliver(user, message, quota=quota)

    async def usage(self, user: MailUser) -> Usage:
        """Return ``user``'s usage in the store of their format."""
        return await self.store_for(user).usage(user)

    async def open_folders(
        self, user: MailUser, folders: Sequence[str], *, lock: bool = True
    ) -> Maildrop:
        """Open ``user``'s maildrop with ``folders`` merged in, if their store has folders.

        A store without folders (mbox) opens the INBOX alone.

        Raises:
            FolderNameError: a folder name is not acceptable.
        """
        names = [check_folder(name) for name in folders]
        store = self.store_for(user)
        if isinstance(store, MaildropFolders):
            return await store.open_folders(user, names, lock=lock)
        return await store.open(user, lock=lock)

    async def deliver_to_folder(
        self,
        user: MailUser,
        message: IncomingMessage,
        folder: str,
        *,
        quota: Quota | None = None,
    ) -> str:
        """Deliver into ``folder`` in the store of ``user``'s format.

        Raises:
            FolderNameError: the folder name is not acceptable.
            StoragePermanentError: a folder other than the INBOX in a store without folders.
        """
        name = check_folder(folder)
        store = self.store_for(user)
        if isinstance(store, MaildropFolders):
            return await store.deliver_to_folder(user, message, name, quota=quota)
        if name != INBOX:
            msg = f"this mail store has no folders: cannot deliver into {name}"
            raise StoragePermanentError(msg)
        return await store.deliver(user, message, quota=quota)

    async def aclose(self) -> None:
        """Close both stores."""
        await self.maildir.aclose()
        await self.mbox.aclose()
