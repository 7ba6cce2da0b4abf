"""The Maildir backend, pobox's default storage (see :mod:`._store` for how it works).

Files pobox keeps inside each maildir:

* ``pobox-uidlist``: UIDVALIDITY, next UID, and per message (by base name) its UID and wire
  size; format in :mod:`._index`.
* ``pobox-uidlist.lock``: serializes updates of ``pobox-uidlist``.
* ``pobox-uidvalidity``: the last UIDVALIDITY handed out, so a lost index never gets it again.
* ``dovecot-pop3-session.lock``: the session lock, held from open to close; Dovecot's
  ``pop3_lock_session`` dotlock, so pobox and Dovecot exclude each other (see :mod:`._fs`).

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.storage`.
"""

from __future__ import annotations

from pobox.storage.maildir._store import MaildirMaildrop, MaildirStore

__all__ = ["MaildirMaildrop", "MaildirStore"]
