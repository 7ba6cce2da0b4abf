"""The passwd-file user database, in Dovecot's format, and the edits ``pobox user`` makes.

One line per user, ``user:password:uid:gid:(gecos):home:(shell):extra_fields``:

- Fields may be left off the end, and any may be empty.  Empty lines and lines starting
  with ``#`` or ``:`` are skipped.  When a user appears twice the first line wins, as in
  Dovecot.
- The password is ``{SCHEME}data`` (:mod:`pobox.auth.schemes`), bare data in the default
  scheme, or libpam-pwdfile's ``data[13]`` / ``data[34]`` / ``data[56]``.
- uid and gid are numbers or names, looked up with :mod:`pwd` / :mod:`grp` (``None`` when
  unknown).
- Everything after the shell field is the extra fields, space-separated ``key=value`` (a
  value may contain ``:``).  ``userdb_mail`` or ``mail`` becomes :attr:`User.mail`; the
  others go to :attr:`User.extra` without any ``userdb_`` prefix.  Dovecot's older form,
  an empty eighth field followed by a mail location, is read too.
- ``nologin`` and ``noauthenticate`` refuse the login even with the right password.
  ``nopassword`` lets any password in, but only when the password field is empty (Dovecot
  ignores it otherwise).  A flag counts unless its value is ``n``, ``no``, ``false`` or ``0``.

:class:`PasswdFileAuthenticator` reads the file in a thread and keeps it.  At most once per
``check_interval`` it compares the file's identity (device, inode, size, mtime, ctime) and
reads it again if it changed.  :func:`set_password` and :func:`add_user` rewrite the file
atomically under a lock.

May import: the standard library, :mod:`pobox.auth.base`, :mod:`pobox.auth._check`,
:mod:`pobox.auth.schemes`, :mod:`pobox.errors` and :mod:`pobox.records`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import pwd
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from pobox.auth._check import check_password, commonest, with_scheme
from pobox.auth.base import AuthTemporaryError, HashWorkers, User
from pobox.auth.schemes import SUPPORTED_SCHEMES, UnknownScheme, hash_password
from pobox.errors import PoboxError
from pobox.records import quota_from_fields

__all__ = [
    "PasswdFileAuthenticator",
    "PasswdFileError",
    "UserExists",
    "add_user",
    "delete_user",
    "list_users",
    "set_password",
    "validate_username",
]

logger = logging.getLogger(__name__)

#: Flag values that mean "off"; anything else, including no value at all, means "on".
_FALSE = frozenset({"n", "no", "false", "0"})
#: Dovecot's "old format" puts the mail location in the ninth field after an empty eighth.
_FIRST_EXTRA_FIELD = 7
#: A new file gets no permissions beyond its owner's: it holds password hashes.
_NEW_FILE_MODE = 0o600


class PasswdFileError(PoboxError, ValueError):
    """An edit of a passwd-file was refused: a bad username or a field that cannot be stored."""


class UserExists(PasswdFileError):
    """The user to add is already in the passwd-file."""


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    user: User
    password: str
    any_password: bool  # nopassword with an empty password field
    refused: bool  # nologin or noauthenticate


@dataclass(frozen=True, slots=True)
class _Snapshot:
    identity: tuple[int, int, int, int, int]
    entries: Mapping[str, _Entry]
    dummy: str  # a stored password to verify against for unknown users


def _pam_password(password: str) -> str:
    """Translate libpam-pwdfile's ``data[NN]`` as Dovecot does (db-passwd-file.c)."""
    if len(password) <= 4 or password[0] in "{$" or password[-1] != "]" or password[-4] != "[":
        return password
    data, kind = password[:-4], password[-3:-1]
    if kind == "34":
        return "{PLAIN-MD5}" + data
    if kind == "56":
        return "{DIGEST-MD5}" + data
    return "{CRYPT}" + data


def resolve_id(text: str, by_name: Callable[[str], int]) -> int | None:
    """Return a uid or gid given as digits or a name (``None``: empty or unknown name)."""
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return by_name(text)
    except KeyError:
        return None


def _flag(value: str) -> bool:
    return value.lower() not in _FALSE


def _parse_line(fields: list[str]) -> _Entry:
    """Build the entry of one line, already split on ``:``."""
    fields += [""] * (_FIRST_EXTRA_FIELD - len(fields))
    password = _pam_password(fields[1])
    rest = fields[_FIRST_EXTRA_FIELD:]
    if rest and not rest[0]:  # old format: empty field, then the mail location
        mail_location = ":".join(rest[1:])
        extras = [f"userdb_mail={mail_location}"] if mail_location else []
    else:
        extras = ":".join(rest).split(" ")
    mail = None
    extra: dict[str, str] = {}
    flags: set[str] = set()
    for item in extras:
        if not item:
            continue
        key, _, value = item.partition("=")
        if _flag(value):
            flags.add(key)
        key = key.removeprefix("userdb_")
        if key == "mail":
            mail = value
        else:
            extra[key] = value
    quota_bytes, quota_messages, problems = quota_from_fields(extra)
    for problem in problems:
        logger.warning("passwd-file: user %s: bad quota field ignored: %s", fields[0], problem)
    refused = bool(flags & {"nologin", "noauthenticate"})
    user = User(
        name=fields[0],
        uid=resolve_id(fields[2], lambda name: pwd.getpwnam(name).pw_uid),
        gid=resolve_id(fields[3], lambda name: grp.getgrnam(name).gr_gid),
        home=fields[5] or None,
        mail=mail,
        quota_bytes=quota_bytes,
        quota_messages=quota_messages,
        may_login=not refused,
        extra=MappingProxyType(extra),
    )
    return _Entry(
        user=user,
        password=password,
        any_password="nopassword" in flags and not password,
        refused=refused,
    )


def _lines(text: str) -> list[str]:
    """Split on LF, dropping a CR before it (CRLF files), as Dovecot's line reader does."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _is_entry(line: str) -> bool:
    return bool(line) and line[0] not in "#:"


def _parse(text: str) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for line in _lines(text):
        if _is_entry(line):
            fields = line.split(":")
            if fields[0] not in entries:  # the first line of a user wins
                entries[fields[0]] = _parse_line(fields)
    return entries


def _pick_dummy(entries: Mapping[str, _Entry], default_scheme: str) -> str:
    """Return the dummy for unknown users: a password of the file's commonest scheme."""
    return commonest((entry.password for entry in entries.values()), default_scheme)


def _load(
    path: Path,
    previous: _Snapshot | None,
    default_scheme: str,
    opener: Callable[[], BinaryIO] | None = None,
) -> _Snapshot:
    """Return the file's users, re-using ``previous`` if the file has not changed."""
    try:
        with path.open("rb") if opener is None else opener() as file:
            st = os.fstat(file.fileno())
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if previous is not None and previous.identity == identity:
                return previous
            text = file.read().decode("utf-8", "surrogateescape")
    except OSError as exc:
        msg = f"passwd-file {path}: cannot read it: {exc.strerror or exc}"
        raise AuthTemporaryError(msg) from exc
    entries = _parse(text)
    return _Snapshot(identity, entries, _pick_dummy(entries, default_scheme))


class PasswdFileAuthenticator:
    """An :class:`~pobox.auth.base.Authenticator` backed by a Dovecot passwd-file.

    Args:
        path: the passwd-file.
        default_scheme: the scheme of passwords without a ``{SCHEME}`` prefix (Dovecot's
            ``default_pass_scheme``).
        check_interval: seconds between checks whether the file changed.
        workers: where costly hashes are checked (shared with the SASL shell); a new
            :class:`~pobox.auth.base.HashWorkers` when not given.
        opener: opens the file for a process that may not open it by path (the server
            after dropping root gets it from the storage helper); default: by path.

    Raises:
        UnknownScheme: ``default_scheme`` is not a supported scheme.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        default_scheme: str = "CRYPT",
        check_interval: float = 1.0,
        workers: HashWorkers | None = None,
        opener: Callable[[], BinaryIO] | None = None,
    ) -> None:
        if default_scheme.upper().split(".")[0] not in SUPPORTED_SCHEMES:
            raise UnknownScheme(default_scheme)
        self.path = Path(path)
        self.default_scheme = default_scheme
        self._check_interval = check_interval
        self._opener = opener
        self._snapshot: _Snapshot | None = None
        self._checked_at = 0.0
        self._lock = asyncio.Lock()
        self.workers = workers or HashWorkers()

    async def authenticate(self, username: str, password: bytes) -> User | None:
        """Return the user if ``password`` is right, else ``None`` (also for unknown users).

        Known and unknown users take one path: the client's password is checked against a
        stored hash, the user's own or, for an unknown user (or one without a password),
        the file's dummy, a real entry of its commonest scheme and cost (so the check costs
        what a real one costs, the password's length included); a single digest in the
        event loop, anything iterated in :attr:`workers`, decided by that stored hash alone.

        Raises:
            AuthTemporaryError: the file cannot be read.
        """
        snapshot = await self._current()
        entry = snapshot.entries.get(username)
        if entry is not None and entry.any_password:
            return None if entry.refused else entry.user
        real = entry is not None and bool(entry.password)
        stored = entry.password if entry is not None and real else snapshot.dummy
        matched = await check_password(
            self.workers, stored, password, default_scheme=self.default_scheme, username=username
        )
        if entry is None or not real or entry.refused:
            return None
        return entry.user if matched else None

    async def lookup(self, username: str) -> User | None:
        """Return the user record without checking a password (for delivery).

        Users with ``nologin`` are found too: they may not log in, but they get mail.

        Raises:
            AuthTemporaryError: the file cannot be read.
        """
        entry = (await self._current()).entries.get(username)
        return None if entry is None else entry.user

    async def credentials(self, username: str) -> str | None:
        """Return the stored password of ``username`` as ``{SCHEME}data``, if it may log in.

        Bare data gets the ``default_scheme`` prefix.  ``None`` for unknown users, users with
        ``nologin``/``noauthenticate``, and ``nopassword`` users (no secret to check against).

        Raises:
            AuthTemporaryError: the file cannot be read.
        """
        entry = (await self._current()).entries.get(username)
        if entry is None or entry.refused or entry.any_password or not entry.password:
            return None
        return with_scheme(entry.password, self.default_scheme)

    async def _current(self) -> _Snapshot:
        async with self._lock:
            now = time.monotonic()
            if self._snapshot is None or now - self._checked_at >= self._check_interval:
                # In the auth threads: the default executor's may all be busy with maildirs.
                self._snapshot = await self.workers.run(
                    _load, self.path, self._snapshot, self.default_scheme, self._opener
                )
                self._checked_at = now
            return self._snapshot


# --- writing --------------------------------------------------------------------------------


def validate_username(username: str) -> None:
    """Check that ``username`` can be written to a passwd-file and found again.

    Raises:
        PasswdFileError: it is empty, starts with ``#``, or contains ``:``, whitespace or a
            control character.
    """
    if not username or username[0] == "#":
        msg = f"invalid username {username!r}: empty or starting with '#'"
        raise PasswdFileError(msg)
    for char in username:
        if char == ":" or char.isspace() or unicodedata.category(char) in {"Cc", "Cs"}:
            msg = f"invalid username {username!r}: contains {char!r}"
            raise PasswdFileError(msg)


def _check_field(value: str, what: str, forbidden: str) -> str:
    """Return ``value`` if it cannot break its line; the message never shows the value."""
    for char in value:
        if char in forbidden:
            msg = f"the {what} cannot be stored in a passwd-file: it contains {char!r}"
            raise PasswdFileError(msg)
    return value


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` so that concurrent edits do not lose updates.

    The passwd-file itself cannot carry the lock: it is replaced by rename, and a writer
    waiting on the old inode would then edit a stale copy.
    """
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, _NEW_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes, like: os.stat_result | None) -> None:
    """Replace ``path`` with ``data`` via a synced temporary file, keeping mode and owner."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), _NEW_FILE_MODE if like is None else like.st_mode & 0o7777)
            if like is not None:
                mine = os.fstat(file.fileno())
                if (mine.st_uid, mine.st_gid) != (like.st_uid, like.st_gid):
                    os.fchown(file.fileno(), like.st_uid, like.st_gid)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _rewrite(
    path: str | os.PathLike[str],
    username: str,
    *,
    change: Callable[[str], str | None] | None,
    add: str | None,
) -> bool:
    """Replace the user's line by ``change(line)``, or append ``add`` if the user has none.

    Nothing is written when the needed one of ``change`` and ``add`` is ``None``; a
    ``change`` that returns ``None`` removes the line.

    Returns:
        Whether the user had a line.
    """
    real = Path(os.path.realpath(path))  # rewrite a symlink's target, not the link
    if add is None and not real.exists():
        return False
    with _locked(real):
        try:
            like: os.stat_result | None = real.stat()
            text = real.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            if add is None:
                return False
            like, text = None, ""
        lines = text.split("\n")  # the last item is "" when the file ends with LF
        for index, line in enumerate(lines):
            bare = line.removesuffix("\r")
            if _is_entry(bare) and bare.split(":", 1)[0] == username:
                if change is None:
                    return True
                changed = change(bare)
                if changed is None:
                    del lines[index]
                else:
                    lines[index] = changed + line[len(bare) :]
                found = True
                break
        else:
            if add is None:
                return False
            if lines[-1]:
                lines.append("")
            lines.insert(len(lines) - 1, add)
            found = False
        _write_atomically(real, "\n".join(lines).encode("utf-8", "surrogateescape"), like)
    return found


def set_password(
    path: str | os.PathLike[str],
    username: str,
    password: bytes,
    scheme: str = "ARGON2ID",
    *,
    create: bool = True,
) -> bool:
    """Set a user's password, adding the user if needed; keep every other field.

    The file is rewritten atomically (temporary file, fsync, rename) and keeps its mode and
    owner; a new file gets mode 0600.

    Args:
        path: the passwd-file.
        username: the login name.
        password: the new password.
        scheme: the scheme to hash it with (:func:`pobox.auth.schemes.hash_password`).
        create: add the user (and the file) when missing; if false, a missing user (or
            file) leaves everything as it is.

    Returns:
        ``True`` if the user existed, ``False`` if not (and a line was added if ``create``).

    Raises:
        PasswdFileError: the username is invalid, or the hashed password cannot be stored
            in the file (a ``PLAIN`` password containing ``:``; ``PLAIN.B64`` can be).
        SchemeError: the password cannot be hashed with ``scheme`` (``UnknownScheme`` if
            the scheme is not supported).
    """
    validate_username(username)
    stored = _check_field(hash_password(password, scheme, username=username), "password", ":\n\r")

    def change(old: str) -> str:
        name, _, rest = old.partition(":")
        _, colon, tail = rest.partition(":")
        return f"{name}:{stored}{colon}{tail}"

    return _rewrite(path, username, change=change, add=f"{username}:{stored}" if create else None)


def add_user(
    path: str | os.PathLike[str],
    username: str,
    password: bytes,
    scheme: str = "ARGON2ID",
    *,
    home: str | None = None,
    mail: str | None = None,
    uid: int | str | None = None,
    gid: int | str | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Add a user line ``user:password:uid:gid::home::userdb_mail=mail extra...``.

    Args:
        path: the passwd-file; created with mode 0600 if missing.
        username: the login name.
        password: the password.
        scheme: the scheme to hash it with.
        home: the home directory.
        mail: the mail location, written as ``userdb_mail=``.
        uid, gid: the owner of the user's mail, as numbers or names.
        extra: more extra fields, ``key=value`` or a bare flag (``quota_bytes=100M``,
            ``nologin``).

    Raises:
        UserExists: the user is already in the file (which is left as it is).
        PasswdFileError: the username or another field cannot be stored in the file.
        SchemeError: the password cannot be hashed with ``scheme``.
    """
    validate_username(username)
    if any(isinstance(value, int) and value < 0 for value in (uid, gid)):
        msg = f"uid and gid cannot be negative: {uid}, {gid}"
        raise PasswdFileError(msg)
    ids = ["" if value is None else str(value) for value in (uid, gid)]
    for value in ids:
        _check_field(value, "uid/gid", ": \t\n\r")
    extras = [] if mail is None else ["userdb_mail=" + _check_field(mail, "mail", " \t\n\r")]
    extras += [_check_field(item, "extra field", " \t\n\r") for item in extra if item]
    fields = [
        username,
        _check_field(hash_password(password, scheme, username=username), "password", ":\n\r"),
        *ids,
        "",
        _check_field(home or "", "home", ":\n\r"),
        "",
        " ".join(extras),
    ]
    while not fields[-1]:
        fields.pop()

    if _rewrite(path, username, change=None, add=":".join(fields)):
        msg = f"user {username!r} already exists in {path}"
        raise UserExists(msg)


def delete_user(path: str | os.PathLike[str], username: str) -> bool:
    """Remove the user's line (the first one, the one that counts); keep every other line.

    The file is rewritten atomically and keeps its mode and owner.

    Returns:
        Whether the user had a line.
    """
    return _rewrite(path, username, change=lambda _line: None, add=None)


def list_users(path: str | os.PathLike[str]) -> list[str]:
    """Return the users of a passwd-file, sorted by code point.

    Raises:
        AuthTemporaryError: the file cannot be read.
    """
    return sorted(_load(Path(path), None, "CRYPT").entries)
