"""The Maildir backend, pobox's default storage.

:class:`MaildirStore` is the asyncio store (:mod:`._store`); :class:`MaildirAccess` and
:class:`MaildirHandle` are its synchronous core (:mod:`._access`, which explains how a maildir
is read, indexed and locked), which can run in a thread with other credentials. Every file
operation goes through :mod:`pobox.storage._safefs` (symlink-proof, owner-checked).

Files pobox keeps inside each maildir:

* ``pobox-uidlist``: UIDVALIDITY, next UID, and per message (by base name) its UID and wire
  size; format in :mod:`._index`.
* ``pobox-uidlist.lock``: serializes updates of ``pobox-uidlist`` and deliveries.
* ``pobox-uidvalidity``: the last UIDVALIDITY handed out, so a lost index never gets it again.
* ``dovecot-pop3-session.lock``: the session lock, held from open to close; Dovecot's
  ``pop3_lock_session`` dotlock, so pobox and Dovecot exclude each other (see :mod:`._fs`).

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.storage`.
"""

from __future__ import annotations

from pobox.storage.maildir._access import LOCK_TIMEOUT, MaildirAccess, MaildirHandle
from pobox.storage.maildir._deliver import deliver_message, message_name, open_maildir
from pobox.storage.maildir._store import MaildirGates, MaildirMaildrop, MaildirStore

__all__ = [
    "LOCK_TIMEOUT",
    "MaildirAccess",
    "MaildirGates",
    "MaildirHandle",
    "MaildirMaildrop",
    "MaildirStore",
    "deliver_message",
    "message_name",
    "open_maildir",
]
