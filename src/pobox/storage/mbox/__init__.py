"""The mbox backend: a spool file such as ``/var/mail/alice``, shared with MTAs and MUAs.

:class:`MboxStore` (:mod:`._store`, which says where files are and how deletion and delivery
work) reads the format as Dovecot does (:mod:`._format`), keeps UIDLs in a file beside the
spool (:mod:`._uidlist`) and locks as every mail program on the machine does (:mod:`._locks`).

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.storage`.
"""

from __future__ import annotations

from pobox.storage.mbox._store import LOCK_TIMEOUT, MboxMaildrop, MboxStore, parse_mbox_location

__all__ = ["LOCK_TIMEOUT", "MboxMaildrop", "MboxStore", "parse_mbox_location"]
