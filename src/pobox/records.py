"""Plain-data records shared by the user databases, the stores and delivery.

A user database (:mod:`pobox.auth`) answers with a :class:`User`; a store
(:mod:`pobox.storage`) and the delivery agent read it. These records hold plain values only
(strings, numbers, tuples), so they cross a process boundary as they are: the storage helper
that opens mail with a user's uid receives them over a socket.

May import: the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Quota", "User", "parse_size", "quota_from_fields"]

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True, slots=True)
class Quota:
    """A maildrop's limits; 0 means no limit.

    Attributes:
        max_bytes: octets of all stored messages, a new one included.
        max_messages: number of messages, a new one included.
    """

    max_bytes: int = 0
    max_messages: int = 0

    @property
    def unlimited(self) -> bool:
        """Tell whether neither limit is set."""
        return not self.max_bytes and not self.max_messages


@dataclass(frozen=True, slots=True)
class User:
    """A user record: what every user database returns.

    Attributes:
        name: the login name (``%u``).
        uid, gid: the owner mail is accessed and written with, if the database sets one
            (Dovecot's ``userdb`` ``uid``/``gid``); ``None`` means the configured
            ``mail_uid``/``mail_gid``.
        home: home directory (``%h``, ``~``), if set.
        mail: per-user mail location overriding the configured one (``userdb_mail``).
        quota_bytes, quota_messages: the user's own limits (0: none), or ``None`` for the
            configured default (:meth:`quota`).
        may_login: ``False`` for users who receive mail but may not log in (Dovecot's
            ``nologin``/``noauthenticate``).
        extra: any other fields of the database, ``key=value``.
    """

    name: str
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    mail: str | None = None
    quota_bytes: int | None = None
    quota_messages: int | None = None
    may_login: bool = True
    extra: Mapping[str, str] = field(default_factory=dict)

    def quota(self, default: Quota) -> Quota:
        """Return the user's quota: their own limits, the configured ``default`` for the rest."""
        return Quota(
            max_bytes=default.max_bytes if self.quota_bytes is None else self.quota_bytes,
            max_messages=(
                default.max_messages if self.quota_messages is None else self.quota_messages
            ),
        )


def parse_size(text: str) -> int:
    """Parse a size like Dovecot's: digits with an optional unit ``b``, ``k``, ``M``, ``G``, ``T``.

    Raises:
        ValueError: not a size.
    """
    text = text.strip()
    digits = text.rstrip("bBkKmMgGtT")
    unit = text[len(digits) :].lower()
    if not digits.isascii() or not digits.isdigit() or unit not in _UNITS:
        msg = f"{text!r} is not a size (digits with an optional b, k, M, G or T)"
        raise ValueError(msg)
    return int(digits) * _UNITS[unit]


def quota_from_fields(fields: Mapping[str, str]) -> tuple[int | None, int | None, list[str]]:
    """Return the quota limits that userdb fields set, and what was wrong with them.

    Recognised fields: ``quota_bytes=<size>``, ``quota_messages=<n>``, and Dovecot's
    ``quota_rule=*:storage=<size>:messages=<n>``; ``quota_bytes``/``quota_messages`` win over
    the rule. A limit that is not set, or set to a malformed value, is ``None`` (the default).

    Returns:
        ``(max_bytes, max_messages, problems)``, each problem a sentence naming the field.
    """
    limits: dict[str, int | None] = {"bytes": None, "messages": None}
    problems: list[str] = []

    def take(kind: str, name: str, value: str) -> None:
        try:
            limits[kind] = parse_size(value) if kind == "bytes" else _count(value)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")

    rule = fields.get("quota_rule")
    if rule is not None:
        mailbox, _, rest = rule.partition(":")
        if mailbox in ("*", "?"):
            for item in rest.split(":"):
                key, _, value = item.partition("=")
                if key == "storage":
                    take("bytes", "quota_rule", value)
                elif key == "messages":
                    take("messages", "quota_rule", value)
    if "quota_bytes" in fields:
        take("bytes", "quota_bytes", fields["quota_bytes"])
    if "quota_messages" in fields:
        take("messages", "quota_messages", fields["quota_messages"])
    return limits["bytes"], limits["messages"], problems


def _count(text: str) -> int:
    """Parse a message count.

    Raises:
        ValueError: not a non-negative decimal number.
    """
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        msg = f"{text!r} is not a number of messages"
        raise ValueError(msg)
    return int(text)
