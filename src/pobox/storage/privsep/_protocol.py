"""The requests and responses of the storage helper, and their validation.

Every frame is a JSON object (:mod:`._wire`). A request is ``{"id": N, "op": NAME, ...}``
with a fresh positive integer ``id``; its response carries the same ``id`` and either
``"ok": {...}`` or ``"error": {"kind": KIND, "message": TEXT}``. Requests may be answered
out of order (the helper works on several at once).

======================  ==============================================  ==========================
op (request fields)     ok (response fields)                            descriptors
======================  ==============================================  ==========================
``hello`` (settings)    ``{"pid": helper pid}``                         (first frame only)
``open`` (user, lock)   ``{"handle": H, "messages": [[key, size,        -
                        uidl, header_end], ...]}``; the folder fifth
                        for a message outside the INBOX
``fetch`` (handle, key) ``{"size": octets}``                            the message file, read-only
``delete`` (handle,     ``{"removed": [keys], "failed": [keys]}``       -
keys)
``close`` (handle)      ``{}``                                          -
``deliver`` (user,      ``{"key": name}``                               request: the body (stored
header, quota,                                                          form), a regular file
wire_size, digest)
``usage`` (user)        ``{"octets": N, "messages": N}``                -
``file`` (key)          ``{}``                                          a configuration file named
                                                                        by ``key``, read-only (the
                                                                        log: open for appending)
======================  ==============================================  ==========================

Besides: ``open_folders`` (user, lock, folders) answers as ``open``, with the folders of
``pop3_folders`` merged in; ``seen`` (handle, keys) → ``{"failed": [keys]}``;
``note_retrieved`` (handle, keys, times) → ``{}`` and ``retrieved_before`` (handle, when) →
``{"keys": [keys]}`` for EXPIRE; ``deliver_folder`` is ``deliver`` with a ``folder``.

A ``user`` is ``{"name", "uid", "gid", "home", "mail"}`` (uid/gid/home/mail may be null).
``header`` is the trace header as a string whose code points are its octets (Latin-1).
``quota`` is ``[max_bytes, max_messages]`` or null.

Error kinds: ``locked`` (:class:`~pobox.storage.base.MaildropLocked`), ``gone``
(:class:`~pobox.storage.base.MessageGone`), ``quota``
(:class:`~pobox.storage.base.QuotaExceeded`), ``refused``
(:class:`~pobox.storage.privsep._owner.OwnerRefused`), ``permanent``, ``temporary``, and
``invalid`` for a request the helper refused to read.

The helper parses requests with the functions here as if the serving process were hostile:
every field has its type, bounds and characters checked, unknown fields are refused, and
nothing here ever interprets a value as code.

May import: the standard library, :mod:`pobox.records`, :mod:`pobox.storage` and
:mod:`._owner`.
"""

from __future__ import annotations

from typing import Any, Final

from pobox.records import Quota, User
from pobox.storage.base import (
    INBOX,
    DeleteResult,
    FolderNameError,
    MaildropLocked,
    MailUser,
    MessageGone,
    MessageInfo,
    QuotaExceeded,
    StorageError,
    StoragePermanentError,
    StorageTemporaryError,
    Usage,
    check_folder,
)
from pobox.storage.privsep._owner import OwnerRefused

__all__ = [
    "OPS",
    "InvalidRequest",
    "error_from_wire",
    "error_to_wire",
    "parse_request",
    "user_from_wire",
    "user_to_wire",
]

#: Operations and the fields each request must have (besides ``id`` and ``op``).
OPS: Final[dict[str, frozenset[str]]] = {
    "hello": frozenset({"settings"}),
    "open": frozenset({"user", "lock"}),
    "open_folders": frozenset({"user", "lock", "folders"}),
    "fetch": frozenset({"handle", "key"}),
    "delete": frozenset({"handle", "keys"}),
    "seen": frozenset({"handle", "keys"}),
    "note_retrieved": frozenset({"handle", "keys", "times"}),
    "retrieved_before": frozenset({"handle", "when"}),
    "close": frozenset({"handle"}),
    "deliver": frozenset({"user", "header", "quota", "wire_size", "digest"}),
    "deliver_folder": frozenset({"user", "header", "quota", "wire_size", "digest", "folder"}),
    "usage": frozenset({"user"}),
    "file": frozenset({"key"}),
}
#: Largest uid/gid: ``(uid_t)-1`` is "unchanged" for the kernel, never an owner.
MAX_ID: Final = 2**32 - 2
#: Longest user name, path or key accepted in a request (PATH_MAX).
MAX_TEXT: Final = 4096
#: Longest trace header accepted (two header lines with addresses of RFC 5321's sizes).
MAX_HEADER: Final = 64 * 1024
#: Most keys one delete request may name.
MAX_KEYS: Final = 1_000_000
#: Most folders one ``open_folders`` request may name.
MAX_FOLDERS: Final = 64
#: Largest request id, handle or count (a JSON number that stays exact as a double).
MAX_NUMBER: Final = 2**53

_ERROR_KINDS: Final[tuple[tuple[type[StorageError], str], ...]] = (
    (MaildropLocked, "locked"),
    (MessageGone, "gone"),
    (QuotaExceeded, "quota"),
    (OwnerRefused, "refused"),
    (StoragePermanentError, "permanent"),
    (StorageTemporaryError, "temporary"),
)


class InvalidRequest(StoragePermanentError):
    """A request the helper refuses to read (wrong fields, types or values).

    Attributes:
        request_id: the id of the request, when it could be read (else 0).
    """

    def __init__(self, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.request_id = request_id


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(message)


def _number(value: object, what: str, *, low: int = 0, high: int = MAX_NUMBER) -> int:
    if type(value) is not int or not low <= value <= high:
        msg = f"{what}: expected an integer in {low}..{high}"
        raise _fail(msg)
    return value


def _text(value: object, what: str, *, limit: int = MAX_TEXT) -> str:
    if type(value) is not str or not value or len(value) > limit or "\0" in value:
        msg = f"{what}: expected a non-empty string without NUL, at most {limit} long"
        raise _fail(msg)
    return value


def _optional_text(value: object, what: str) -> str | None:
    return None if value is None else _text(value, what)


def _optional_id(value: object, what: str) -> int | None:
    return None if value is None else _number(value, what, high=MAX_ID)


def user_to_wire(user: MailUser) -> dict[str, Any]:
    """Return the fields of ``user`` the helper needs, as JSON-ready data."""
    return {
        "name": user.name,
        "uid": user.uid,
        "gid": user.gid,
        "home": user.home,
        "mail": user.mail,
    }


def user_from_wire(value: object) -> User:
    """Return the user record of a request.

    Raises:
        InvalidRequest: not a user record of the expected shape.
    """
    if not isinstance(value, dict) or set(value) != {"name", "uid", "gid", "home", "mail"}:
        msg = "user: expected an object with exactly name, uid, gid, home and mail"
        raise _fail(msg)
    return User(
        name=_text(value["name"], "user.name"),
        uid=_optional_id(value["uid"], "user.uid"),
        gid=_optional_id(value["gid"], "user.gid"),
        home=_optional_text(value["home"], "user.home"),
        mail=_optional_text(value["mail"], "user.mail"),
    )


def parse_request(frame: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """Check a request frame; return its id, op and fields, each value validated.

    Raises:
        InvalidRequest: a missing or extra field, a wrong type or an out-of-range value
            (the message says which); the id is in ``args[1]`` when it was readable.
    """
    request_id = frame.get("id")
    if type(request_id) is not int or not 0 < request_id <= MAX_NUMBER:
        msg = "id: expected a positive integer"
        raise _fail(msg)
    try:
        op = frame.get("op")
        if not isinstance(op, str) or op not in OPS:
            msg = f"op: expected one of {sorted(OPS)}"
            raise _fail(msg)
        fields = {k: v for k, v in frame.items() if k not in ("id", "op")}
        if set(fields) != OPS[op]:
            msg = f"{op}: expected the fields {sorted(OPS[op])}, got {sorted(fields)}"
            raise _fail(msg)
        return request_id, op, _parse_fields(op, fields)
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc), request_id) from None


def _parse_fields(op: str, fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "user":
            out[name] = user_from_wire(value)
        elif name == "lock":
            if type(value) is not bool:
                raise _fail("lock: expected true or false")
            out[name] = value
        elif name == "handle":
            out[name] = _number(value, "handle", low=1)
        elif name == "key":
            out[name] = _text(value, "key")
        elif name == "keys":
            if not isinstance(value, list) or len(value) > MAX_KEYS:
                raise _fail(f"keys: expected a list of at most {MAX_KEYS} keys")
            out[name] = tuple(_text(key, "keys[]") for key in value)
        elif name == "folder":
            try:
                out[name] = check_folder(_text(value, "folder"))
            except FolderNameError as exc:
                raise _fail(f"folder: {exc}") from None
        elif name == "folders":
            if not isinstance(value, list) or not 0 < len(value) <= MAX_FOLDERS:
                raise _fail(f"folders: expected a list of 1 to {MAX_FOLDERS} folder names")
            names = []
            for item in value:
                try:
                    names.append(check_folder(_text(item, "folders[]")))
                except FolderNameError as exc:
                    raise _fail(f"folders: {exc}") from None
            out[name] = tuple(names)
        elif name == "header":
            if type(value) is not str or len(value) > MAX_HEADER:
                raise _fail(f"header: expected a string of at most {MAX_HEADER} characters")
            try:
                out[name] = value.encode("latin-1")
            except UnicodeEncodeError:
                raise _fail("header: characters above U+00FF") from None
        elif name == "times":
            if not isinstance(value, list) or len(value) > MAX_KEYS:
                raise _fail(f"times: expected a list of at most {MAX_KEYS} times")
            out[name] = tuple(_number(when, "times[]") for when in value)
        elif name == "when":
            out[name] = _number(value, "when")
        elif name == "quota":
            out[name] = _quota(value)
        elif name == "wire_size":
            out[name] = _number(value, "wire_size")
        elif name == "digest":
            if type(value) is not str or len(value) != 64 or value.strip("0123456789abcdef"):
                raise _fail("digest: expected a SHA-256 in lower-case hexadecimal")
            out[name] = value
        elif name == "settings":
            if not isinstance(value, dict):
                raise _fail("settings: expected an object")
            out[name] = value
    return out


def _quota(value: object) -> Quota | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise _fail("quota: expected [max_bytes, max_messages] or null")
    return Quota(_number(value[0], "quota[0]"), _number(value[1], "quota[1]"))


def quota_to_wire(quota: Quota | None) -> list[int] | None:
    """Return ``quota`` as a request field."""
    return None if quota is None else [quota.max_bytes, quota.max_messages]


def messages_to_wire(messages: tuple[MessageInfo, ...] | list[MessageInfo]) -> list[list[Any]]:
    """Return a snapshot as ``[[key, size, uidl, header_end], ...]``, with the folder fifth
    for a message outside the INBOX (``[key, size, uidl, header_end, folder]``)."""
    return [
        [info.key, info.size, info.uidl, info.header_end]
        if info.folder == INBOX
        else [info.key, info.size, info.uidl, info.header_end, info.folder]
        for info in messages
    ]


def messages_from_wire(value: object) -> tuple[MessageInfo, ...]:
    """Return the snapshot of an ``open`` response.

    Raises:
        StorageTemporaryError: the response is malformed.
    """
    try:
        assert isinstance(value, list)
        return tuple(_message_from_wire(*item) for item in value)
    except (AssertionError, TypeError, ValueError):
        msg = "storage helper: malformed snapshot"
        raise StorageTemporaryError(msg) from None


def _message_from_wire(
    key: str, size: int, uidl: str, header_end: bool | None, folder: str = INBOX
) -> MessageInfo:
    if not all(isinstance(text, str) for text in (key, uidl, folder)) or type(size) is not int:
        raise TypeError
    if header_end is not None and type(header_end) is not bool:
        raise TypeError
    return MessageInfo(key, size, uidl, header_end=header_end, folder=folder)


def delete_result_from_wire(value: dict[str, Any]) -> DeleteResult:
    """Return the result of a ``delete`` response."""
    return DeleteResult(removed=tuple(value["removed"]), failed=tuple(value["failed"]))


def usage_from_wire(value: dict[str, Any]) -> Usage:
    """Return the result of a ``usage`` response."""
    return Usage(octets=int(value["octets"]), messages=int(value["messages"]))


def error_to_wire(exc: BaseException) -> dict[str, str]:
    """Return the ``error`` field for an exception raised while serving a request.

    Anything but a storage error is reported as ``temporary`` with its type only: its text
    may hold paths and values the client should never see.
    """
    if isinstance(exc, InvalidRequest):
        return {"kind": "invalid", "message": str(exc)}
    for cls, kind in _ERROR_KINDS:
        if isinstance(exc, cls):
            return {"kind": kind, "message": str(exc)}
    if isinstance(exc, StorageError):
        return {"kind": "temporary", "message": str(exc)}
    return {"kind": "temporary", "message": f"storage helper: {type(exc).__name__}"}


def error_from_wire(value: object) -> StorageError:
    """Return the exception an ``error`` field describes (a temporary error if malformed)."""
    if not isinstance(value, dict):
        return StorageTemporaryError("storage helper: malformed error")
    kind, message = value.get("kind"), str(value.get("message", ""))
    for cls, name in _ERROR_KINDS:
        if kind == name:
            return cls(message)
    if kind == "invalid":
        return InvalidRequest(message)
    return StorageTemporaryError(message)
