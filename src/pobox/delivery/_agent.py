"""The delivery agent: from an envelope recipient to a message stored in a maildrop.

Shared by the LMTP and SMTP listeners and by ``pobox deliver``: it resolves a recipient
address to a user of the user database, works out the user's quota (the user record's own
limits over the configured default), adds the trace headers and stores the message through
the storage interface (:meth:`pobox.storage.base.MaildropStore.deliver`), so delivery works
the same on every store. Every outcome is a :class:`Outcome` carrying the SMTP reply
(RFC 5321, with the RFC 3463 enhanced status code) and the sysexits code ``pobox deliver``
exits with.

Delivery never takes the POP3 session lock, so it never waits for a POP3 session.

May import: the standard library, :mod:`pobox.auth`, :mod:`pobox.storage`, :mod:`pobox.records`,
:mod:`pobox.metrics` and :mod:`pobox.config`.
"""

from __future__ import annotations

import enum
import logging
import socket
from dataclasses import dataclass

from pobox.auth.base import Authenticator, AuthError, User
from pobox.config import Config
from pobox.metrics import Metrics
from pobox.records import Quota, parse_size
from pobox.storage.base import (
    IncomingMessage,
    MaildropStore,
    QuotaExceeded,
    StorageError,
    StoragePermanentError,
)
from pobox.storage.spool import Spool

__all__ = [
    "DeliveryAgent",
    "Outcome",
    "Recipient",
    "build_agent",
    "parse_size",
    "trace_headers",
]

logger = logging.getLogger(__name__)

#: sysexits.h codes (what dovecot-lda and Postfix's pipe(8) agree on).
EX_OK, EX_DATAERR, EX_NOUSER, EX_CANTCREAT, EX_TEMPFAIL = 0, 65, 67, 73, 75


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


class DeliveryAgent:
    """Resolves recipients and stores messages in their maildirs."""

    def __init__(
        self,
        authenticator: Authenticator,
        store: MaildropStore,
        *,
        quota: Quota | None = None,
        local_domains: tuple[str, ...] = (),
    ) -> None:
        """Create an agent.

        Args:
            authenticator: where users are looked up (``lookup()``).
            store: where messages are stored.
            quota: the default quota, for users whose record sets none (none by default).
            local_domains: domains whose local part names a user (``alice@<domain>`` is the
                user ``alice`` when no user ``alice@<domain>`` exists).
        """
        self._authenticator = authenticator
        self._store = store
        self._quota = quota or Quota()
        self._local_domains = frozenset(domain.lower() for domain in local_domains)
        #: Where the listeners count deliveries and storage errors (``metrics_listen``).
        self.metrics: Metrics | None = None

    def counted(self, protocol: str, outcome: Outcome) -> Outcome:
        """Count the delivery to one recipient over ``protocol`` (metrics on); return it."""
        if self.metrics is not None:
            self.metrics.delivery(protocol, outcome.reply)
        return outcome

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

        Also :attr:`Outcome.TEMPORARY` if the maildrop cannot be read; ``None`` if there is room.
        """
        quota = recipient.user.quota(self._quota)
        if quota.unlimited:
            return None
        try:
            usage = await self._store.usage(recipient.user)
        except StorageError as exc:
            logger.warning("delivery: %s: %s", recipient.user.name, exc)
            return Outcome.TEMPORARY
        if (quota.max_messages and usage.messages >= quota.max_messages) or (
            quota.max_bytes and usage.octets >= quota.max_bytes
        ):
            return Outcome.OVER_QUOTA
        return None

    async def deliver(self, recipient: Recipient, sender: str, body: Spool) -> Outcome:
        """Store ``body`` for ``recipient`` with trace headers; return how it went.

        The message is durable (fsynced, committed) when this returns
        :attr:`Outcome.DELIVERED`.
        """
        message = IncomingMessage(trace_headers(sender, recipient.address), body)
        try:
            quota = recipient.user.quota(self._quota)
            key = await self._store.deliver(recipient.user, message, quota=quota)
        except QuotaExceeded as exc:
            logger.info("delivery: %s: %s", recipient.user.name, exc)
            return Outcome.OVER_QUOTA
        except StorageError as exc:
            if self.metrics is not None:
                self.metrics.storage_error("deliver")
            if isinstance(exc, StoragePermanentError):
                logger.error("delivery: %s: %s", recipient.user.name, exc)
                return Outcome.PERMANENT_STORAGE
            logger.warning("delivery: %s: %s", recipient.user.name, exc)
            return Outcome.TEMPORARY
        except Exception:
            # A bug or an unforeseen failure for this recipient: its own 451 (not stored, so
            # the MTA retries it), never an exception that ends the whole LMTP transaction
            # without the other recipients' replies.
            logger.exception("delivery: %s: unexpected failure", recipient.user.name)
            return Outcome.TEMPORARY
        logger.info(
            "delivery: %s: saved %s (%d octets) from <%s>",
            recipient.user.name,
            key,
            message.size,
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


def build_agent(
    config: Config, authenticator: Authenticator, store: MaildropStore
) -> DeliveryAgent:
    """Build the delivery agent a configuration describes, on the backends given."""
    local_domains = (*config.local_domains, config.hostname or socket.gethostname(), "localhost")
    return DeliveryAgent(
        authenticator,
        store,
        quota=Quota(max_bytes=config.quota_bytes, max_messages=config.quota_messages),
        local_domains=local_domains,
    )
