"""Mail accessed with its owner's rights, never more (issue 10, Dovecot's ``mail_uid`` model).

* :mod:`._owner`: whose uid/gid a user's mail is accessed with (``mail_uid``, ``mail_gid``,
  ``first_valid_uid`` ...), and :class:`SameOwnerStore` for a process that is that owner;
* :mod:`._switch`: becoming an owner for good (the server's drop, ``pobox deliver``);
* :mod:`._fsid`: per-thread filesystem credentials (``setfsuid``/``setfsgid``);
* :mod:`._wire` and :mod:`._protocol`: the frames and requests between the serving process
  and the storage helper;
* :mod:`._helper`: the storage helper, a small root process that runs the synchronous Maildir
  core (:class:`pobox.storage.maildir.MaildirAccess`) with each owner's filesystem credentials;
* :mod:`._proxy`: the serving process's store that reaches mail through the helper.

May import: the standard library, :mod:`pobox.errors`, :mod:`pobox.records`,
:mod:`pobox.config` and :mod:`pobox.storage`.
"""

from __future__ import annotations

from pobox.storage.privsep._owner import (
    Owner,
    OwnerPolicy,
    OwnerRefused,
    SameOwnerStore,
    lookup_gid,
    lookup_uid,
)
from pobox.storage.privsep._proxy import HelperStore, StorageHelper
from pobox.storage.privsep._switch import SwitchError, SwitchingStore, switch_process

__all__ = [
    "HelperStore",
    "Owner",
    "OwnerPolicy",
    "OwnerRefused",
    "SameOwnerStore",
    "StorageHelper",
    "SwitchError",
    "SwitchingStore",
    "lookup_gid",
    "lookup_uid",
    "switch_process",
]
