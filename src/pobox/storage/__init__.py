"""Maildrop storage: the interface (:mod:`pobox.storage.base`) and its backends."""

from __future__ import annotations

from pobox.storage.base import (
    DeleteResult,
    MaildropLocked,
    MailUser,
    MessageGone,
    MessageInfo,
    StorageError,
    StoragePermanentError,
    StorageTemporaryError,
)

__all__ = [
    "DeleteResult",
    "MailUser",
    "MaildropLocked",
    "MessageGone",
    "MessageInfo",
    "StorageError",
    "StoragePermanentError",
    "StorageTemporaryError",
]
