"""The server's secret key in a file of its own, made once and kept (``scram_secret_file``).

SCRAM shows every client the salt of the name it gives; for names without stored SCRAM keys
pobox derives that salt from this key (:func:`pobox.auth.schemes.scram_salt`), so it must not
change across restarts (clients cache salted passwords, and a changing salt would tell known
names from unknown ones) and must not be guessable.  Every node serving the same users needs
the same file.

The file holds 64 hexadecimal digits (32 random bytes) and a newline.  It is created, mode
0600, only when it does not exist: written to a temporary file, synced, then hard-linked into
place, so a reader never sees it half written and two servers starting at once agree on one
key.  It is read before pobox drops its privileges.

May import: the standard library and :mod:`pobox.errors`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Final

from pobox.errors import ConfigError

__all__ = ["KEY_BYTES", "load_secret"]

#: Random bytes in a new key.
KEY_BYTES: Final = 32
#: A key read from a file must have at least this many bytes (128 bits).
MIN_KEY_BYTES: Final = 16


def _create(path: Path) -> None:
    """Write a new key to ``path`` unless a file is already there."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:  # mkstemp makes it 0600
            file.write(secrets.token_hex(KEY_BYTES) + "\n")
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):  # someone else's key won the race
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_secret(path: str | os.PathLike[str], *, key: str = "scram_secret_file") -> bytes:
    """Return the key in ``path``, creating the file with a new random key if it is missing.

    Raises:
        ConfigError: naming ``key``, when the file cannot be made or read, or holds no key.
    """
    path = Path(path)
    try:
        if not path.exists():
            _create(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            text = file.read(4096).strip()
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: {exc.strerror or exc}") from exc
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except ValueError:
        secret = b""
    if len(secret) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{key}: {path} must hold at least {2 * MIN_KEY_BYTES} hexadecimal digits "
            "(delete it and pobox makes a new one)"
        )
    return secret
