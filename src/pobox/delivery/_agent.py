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
:mod:`pobox._logevents`, :mod:`pobox.names`, :mod:`pobox.metrics` and :mod:`pobox.config`.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
from dataclasses import dataclass
from email.utils import formatdate

from pobox import _logevents as events
from pobox.auth.base import Authenticator, AuthError, User
from pobox.config import Config
from pobox.metrics import Metrics
from pobox.names import DEFAULT_FORMAT, UsernameFormat, parse_format
from pobox.records import Quota, parse_size
from pobox.storage.base import (
    INBOX,
    IncomingMessage,
    MaildropFolders,
    MaildropStore,
    QuotaExceeded,
    StorageError,
    StoragePermanentError,
)
from pobox.storage.spool import Spool

__all__ = [
    "DeliveryAgent",
    "Outcome",
    "Received",
    "Recipient",
    "build_agent",
    "parse_size",
    "received_header",
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


@dataclass(frozen=True, slots=True)
class Received:
    """Where a message came from: what its ``Received:`` header says (RFC 5321 §4.4).

    ``protocol`` is the RFC 3848 ``with`` keyword: ``LMTP``, ``ESMTP``, ``ESMTPS``, ``SMTP``
    (after HELO), or ``local`` for ``pobox deliver``. ``helo`` and ``address`` are what the
    client said and where it connected from (the PROXY header's client behind HAProxy);
    ``None`` for a local delivery or a Unix socket.
    """

    protocol: str
    helo: str | None = None
    address: str | None = None
    #: Recipients of the transaction: ``for <rcpt>`` is written only when there is one, so a
    #: copy never names the other (perhaps blind) recipients.
    recipients: int = 1
    #: The transaction's id in the header and the log; a fresh one if empty.
    id: str = ""


#: Octets of a client-supplied name kept in a Received header (a domain is at most 255).
_MAX_HEADER_NAME = 255


def _header_safe(text: str, allowed: frozenset[str]) -> str:
    """Return ``text`` with every character outside ``allowed`` (and past 255) as ``?``.

    What a client sends ends up inside a header line: a CR, LF or other control byte would
    start a header of its own, a parenthesis or ``;`` would change what the line says.
    """
    return "".join(c if c in allowed else "?" for c in text[:_MAX_HEADER_NAME])


#: RFC 5321 §4.1.2 Domain and address literals: letters, digits, ``-``, ``.``, ``[``, ``]``,
#: ``:`` (IPv6); ``_`` is common in the wild.
_HELO_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._[]:")


def _address_safe(address: str) -> str:
    """Return an envelope address fit for ``for <...>``: printable, no ``<>;()`` or controls."""
    return "".join(
        "?" if (not c.isprintable() or c in "<>;()\\") else c for c in address[:_MAX_HEADER_NAME]
    )


def received_header(
    received: Received, hostname: str, recipient: str, *, date: str | None = None
) -> str:
    """Return the ``Received:`` header (folded, LF line ends) for one recipient's copy.

    ``from HELO ([IP]) by hostname (pobox) with PROTO id ID for <rcpt>; date``: no reverse
    DNS lookup is made (it would cost a query per connection and proves nothing), so the
    comment holds the address only. Everything the client chose is sanitised.
    """
    lines = []
    first = "Received:"
    if received.helo is not None or received.address is not None:
        helo = _header_safe(received.helo or "", _HELO_CHARS) or "unknown"
        address = _header_safe(received.address or "", _HELO_CHARS)
        first += f" from {helo}" + (f" ([{address}])" if address else "")
        lines.append(first)
        first = ""
    ident = _header_safe(received.id, _HELO_CHARS) if received.id else os.urandom(8).hex()
    by = f"by {_header_safe(hostname, _HELO_CHARS)} (pobox) with {received.protocol} id {ident}"
    if first:
        by = f"{first} {by}"
    lines.append(by)
    stamp = date or formatdate(localtime=True)
    if received.recipients == 1 and recipient:
        lines.append(f"for <{_address_safe(recipient)}>; {stamp}")
    else:
        lines[-1] += f"; {stamp}"
    return "\n\t".join(lines) + "\n"


class DeliveryAgent:
    """Resolves recipients and stores messages in their maildirs."""

    def __init__(
        self,
        authenticator: Authenticator,
        store: MaildropStore,
        *,
        quota: Quota | None = None,
        local_domains: tuple[str, ...] = (),
        username_format: UsernameFormat | None = None,
        hostname: str = "",
    ) -> None:
        """Create an agent.

        Args:
            authenticator: where users are looked up (``lookup()``).
            store: where messages are stored.
            quota: the default quota, for users whose record sets none (none by default).
            local_domains: domains whose local part names a user (``alice@<domain>`` is the
                user ``alice`` when no user ``alice@<domain>`` exists).
            username_format: ``auth_username_format``, applied to every name looked up
                (Dovecot's ``%Lu`` by default: ``ALICE@dom`` is ``alice@dom``).
            hostname: this host's name in ``Received:`` headers (default: the system's).
        """
        self._authenticator = authenticator
        self._store = store
        self._quota = quota or Quota()
        self._local_domains = frozenset(domain.lower() for domain in local_domains)
        self._format = username_format or parse_format(DEFAULT_FORMAT)
        self._hostname = hostname or socket.gethostname()
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
        candidates = [self._format(address)]
        is_local = not domain or any_domain or domain.lower() in self._local_domains
        if domain and is_local and local:
            candidates.append(self._format(local))
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
            events.delivery_failed(logger, logging.WARNING, recipient.user.name, exc)
            return Outcome.TEMPORARY
        if (quota.max_messages and usage.messages >= quota.max_messages) or (
            quota.max_bytes and usage.octets >= quota.max_bytes
        ):
            return Outcome.OVER_QUOTA
        return None

    async def deliver(
        self,
        recipient: Recipient,
        sender: str,
        body: Spool,
        received: Received | None = None,
        *,
        folder: str = INBOX,
    ) -> Outcome:
        """Store ``body`` for ``recipient`` with trace headers; return how it went.

        ``received`` says where the message came from, for its ``Received:`` header (none:
        no such header). ``folder`` files it into that folder (``pobox deliver -m``), on a
        store with folders (:class:`~pobox.storage.base.MaildropFolders`; other stores fail
        with a permanent storage error). The message is durable (fsynced, committed) when
        this returns :attr:`Outcome.DELIVERED`. Only the recipient's own header lines differ
        between the copies of one transaction: a store that keeps bodies once still does.
        """
        headers = trace_headers(sender, recipient.address)
        if received is not None:
            line = received_header(received, self._hostname, recipient.address)
            headers += line.encode("utf-8", "surrogateescape")
        message = IncomingMessage(headers, body)
        try:
            quota = recipient.user.quota(self._quota)
            if folder == INBOX:
                key = await self._store.deliver(recipient.user, message, quota=quota)
            elif isinstance(self._store, MaildropFolders):
                key = await self._store.deliver_to_folder(
                    recipient.user, message, folder, quota=quota
                )
            else:
                msg = f"this mail store has no folders: cannot deliver into {folder!r}"
                raise StoragePermanentError(msg)
        except QuotaExceeded as exc:
            events.delivery_failed(logger, logging.INFO, recipient.user.name, exc)
            return Outcome.OVER_QUOTA
        except StorageError as exc:
            if self.metrics is not None:
                self.metrics.storage_error("deliver")
            if isinstance(exc, StoragePermanentError):
                events.delivery_failed(logger, logging.ERROR, recipient.user.name, exc)
                return Outcome.PERMANENT_STORAGE
            events.delivery_failed(logger, logging.WARNING, recipient.user.name, exc)
            return Outcome.TEMPORARY
        except Exception:
            # A bug or an unforeseen failure for this recipient: its own 451 (not stored, so
            # the MTA retries it), never an exception that ends the whole LMTP transaction
            # without the other recipients' replies.
            events.delivery_failed(
                logger, logging.ERROR, recipient.user.name, "unexpected failure", exc_info=True
            )
            return Outcome.TEMPORARY
        events.delivered(logger, recipient.user.name, key, message.size, sender)
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
    hostname = config.hostname or socket.gethostname()
    local_domains = (*config.local_domains, hostname, "localhost")
    return DeliveryAgent(
        authenticator,
        store,
        quota=Quota(max_bytes=config.quota_bytes, max_messages=config.quota_messages),
        local_domains=local_domains,
        username_format=parse_format(config.auth_username_format),
        hostname=hostname,
    )
