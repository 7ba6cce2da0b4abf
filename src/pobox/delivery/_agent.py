"""The delivery agent: from an envelope recipient to a message stored in a maildir.

Shared by the LMTP and SMTP listeners and by ``pobox deliver``: it resolves a recipient
address to a user of the passwd-file, works out the user's quota, adds the trace headers and
stores the message (:func:`pobox.storage.maildir._deliver.deliver_message`, in a worker
thread). Every outcome is a :class:`Outcome` carrying the SMTP reply (RFC 5321, with the
RFC 3463 enhanced status code) and the sysexits code ``pobox deliver`` exits with.

Delivery never takes the POP3 session lock, so it never waits for a POP3 session.

May import: the standard library, :mod:`pobox.auth`, :mod:`pobox.storage` and :mod:`pobox.config`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from pobox.auth.base import Authenticator, AuthError, User
from pobox.config import Config
from pobox.storage.base import StorageError, StoragePermanentError
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._deliver import (
    Quota,
    QuotaExceeded,
    deliver_message,
    maildir_usage,
)

__all__ = [
    "DeliveryAgent",
    "Outcome",
    "Recipient",
    "build_agent",
    "parse_size",
    "trace_headers",
    "user_quota",
]

logger = logging.getLogger(__name__)

#: sysexits.h codes (what dovecot-lda and Postfix's pipe(8) agree on).
EX_OK, EX_DATAERR, EX_NOUSER, EX_CANTCREAT, EX_TEMPFAIL = 0, 65, 67, 73, 75

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class Outcome(enum.Enum):
    """The result of a delivery step: an SMTP reply and a sysexits code."""

    #: Stored durably.
    DELIVERED = ("250 2.0.0 Ok: delivered", EX_OK)
    #: RFC 3463 5.1.1: bad destination mailbox address.
    UNKNOWN_USER = ("550 5.1.1 User unknown", EX_NOUSER)
    #: RFC 3463 5.7.1: the SMTP listener is no relay.
    RELAY_DENIED = ("550 5.7.1 Relaying denied", EX_NOUSER)
    #: RFC 3463 5.2.2: mailbox full.
    OVER_QUOTA = ("552 5.2.2 Mailbox full: quota exceeded", EX_CANTCREAT)
    #: RFC 3463 4.3.0: other or undefined mail system status, temporary.
    TEMPORARY = ("451 4.3.0 Temporary failure, try again later", EX_TEMPFAIL)
    #: A failure that needs an administrator (permissions): still 4xx, so no mail bounces.
    PERMANENT_STORAGE = ("451 4.3.0 Mailbox unavailable, try again later", EX_CANTCREAT)

    @property
    def reply(self) -> str:
        """The SMTP/LMTP reply line."""
        return self.value[0]

    @property
    def exit_code(self) -> int:
        """The ``pobox deliver`` exit status (sysexits.h)."""
        return self.value[1]


@dataclass(frozen=True, slots=True)
class Recipient:
    """An envelope recipient resolved to a user."""

    address: str
    user: User


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


def user_quota(user: User, default: Quota) -> Quota:
    """Return ``user``'s quota: passwd-file extra fields over the configured default.

    Recognised extra fields (``userdb_`` prefix already removed by the passwd-file reader):
    ``quota_bytes=<size>``, ``quota_messages=<n>``, and Dovecot's
    ``quota_rule=*:storage=<size>:messages=<n>``. A malformed value is ignored (logged).
    """
    max_bytes, max_messages = default.max_bytes, default.max_messages
    extra = user.extra
    try:
        rule = extra.get("quota_rule")
        if rule is not None:
            mailbox, _, limits = rule.partition(":")
            if mailbox in ("*", "?"):
                for item in limits.split(":"):
                    key, _, value = item.partition("=")
                    if key == "storage":
                        max_bytes = parse_size(value)
                    elif key == "messages":
                        max_messages = int(value)
        if "quota_bytes" in extra:
            max_bytes = parse_size(extra["quota_bytes"])
        if "quota_messages" in extra:
            max_messages = int(extra["quota_messages"])
    except ValueError as exc:
        logger.warning("delivery: user %s: bad quota field ignored: %s", user.name, exc)
    return Quota(max_bytes=max(0, max_bytes), max_messages=max(0, max_messages))


class DeliveryAgent:
    """Resolves recipients and stores messages in their maildirs."""

    def __init__(
        self,
        authenticator: Authenticator,
        store: MaildirStore,
        *,
        quota: Quota | None = None,
        local_domains: tuple[str, ...] = (),
    ) -> None:
        """Create an agent.

        Args:
            authenticator: where users are looked up (``lookup()``).
            store: gives each user's maildir path.
            quota: the default quota (none by default).
            local_domains: domains whose local part names a user (``alice@<domain>`` is the
                user ``alice`` when no user ``alice@<domain>`` exists).
        """
        self._authenticator = authenticator
        self._store = store
        self._quota = quota or Quota()
        self._local_domains = frozenset(domain.lower() for domain in local_domains)

    async def resolve(self, address: str, *, any_domain: bool) -> Recipient | Outcome:
        """Find the user an envelope address delivers to.

        The whole address is tried first, then its local part when the domain is local (any
        domain if ``any_domain``: an LMTP client has routed the mail here already).

        Returns:
            The recipient, or :attr:`Outcome.UNKNOWN_USER`, :attr:`Outcome.RELAY_DENIED`
            (SMTP, a foreign domain) or :attr:`Outcome.TEMPORARY` (the user database is down).
        """
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        candidates = [address]
        is_local = not domain or any_domain or domain.lower() in self._local_domains
        if domain and is_local and local:
            candidates.append(local)
        try:
            for candidate in candidates:
                user = await self._authenticator.lookup(candidate)
                if user is not None:
                    return Recipient(address=address, user=user)
        except AuthError as exc:
            logger.warning("delivery: lookup of %r failed: %s", address, exc)
            return Outcome.TEMPORARY
        return Outcome.UNKNOWN_USER if is_local else Outcome.RELAY_DENIED

    async def over_quota(self, recipient: Recipient) -> Outcome | None:
        """Return :attr:`Outcome.OVER_QUOTA` if ``recipient`` has no room for one more octet.

        Also :attr:`Outcome.TEMPORARY` if the maildir cannot be read; ``None`` if there is room.
        """
        quota = user_quota(recipient.user, self._quota)
        if quota.unlimited:
            return None
        try:
            root = self._store.maildir_path(recipient.user)
            octets, count = await asyncio.to_thread(maildir_usage, root)
        except StorageError as exc:
            logger.warning("delivery: %s: %s", recipient.user.name, exc)
            return Outcome.TEMPORARY
        if (quota.max_messages and count >= quota.max_messages) or (
            quota.max_bytes and octets >= quota.max_bytes
        ):
            return Outcome.OVER_QUOTA
        return None

    async def deliver(self, recipient: Recipient, sender: str, message: bytes) -> Outcome:
        """Store ``message`` for ``recipient`` with trace headers; return how it went.

        The message is on disk (fsynced, in ``new/``) when this returns
        :attr:`Outcome.DELIVERED`.
        """
        data = trace_headers(sender, recipient.address) + message
        try:
            root = self._store.maildir_path(recipient.user)
            quota = user_quota(recipient.user, self._quota)
            name = await asyncio.to_thread(deliver_message, root, data, quota=quota)
        except QuotaExceeded as exc:
            logger.info("delivery: %s: %s", recipient.user.name, exc)
            return Outcome.OVER_QUOTA
        except StoragePermanentError as exc:
            logger.error("delivery: %s: %s", recipient.user.name, exc)
            return Outcome.PERMANENT_STORAGE
        except StorageError as exc:
            logger.warning("delivery: %s: %s", recipient.user.name, exc)
            return Outcome.TEMPORARY
        logger.info(
            "delivery: %s: saved %s (%d octets) from <%s>",
            recipient.user.name,
            Path(name).name,
            len(data),
            sender,
        )
        return Outcome.DELIVERED


def trace_headers(sender: str, recipient: str) -> bytes:
    """Return the ``Return-Path`` and ``Delivered-To`` lines added on top, like Dovecot's LDA.

    CR and LF are dropped from the addresses so they cannot forge further headers.
    """
    clean_sender = sender.replace("\r", "").replace("\n", "")
    clean_recipient = recipient.replace("\r", "").replace("\n", "")
    text = f"Return-Path: <{clean_sender}>\nDelivered-To: {clean_recipient}\n"
    return text.encode("utf-8", "surrogateescape")


def build_agent(config: Config, authenticator: Authenticator) -> DeliveryAgent:
    """Build the delivery agent a configuration describes."""
    local_domains = (*config.local_domains, config.hostname or socket.gethostname(), "localhost")
    return DeliveryAgent(
        authenticator,
        MaildirStore(config.mail_location),
        quota=Quota(max_bytes=config.quota_bytes, max_messages=config.quota_messages),
        local_domains=local_domains,
    )
