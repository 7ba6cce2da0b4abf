"""The LMTP listener (RFC 2033): how an MTA hands mail to pobox, like Dovecot's LMTP.

Per recipient: ``RCPT`` is refused with ``550 5.1.1`` for an unknown user (or ``451 4.3.0``
when the user database is unavailable); after ``DATA`` each accepted recipient gets its own
reply, in ``RCPT`` order (RFC 2033 §4.2): ``250`` once the message is fsynced in its maildir,
``552 5.2.2`` over quota, ``451 4.3.0`` on a temporary failure. The ``handle_DATA`` hook
(called by :class:`~pobox.delivery._protocol.DeliveryProtocol` with the spooled message)
returns one status; :class:`LmtpHandler` returns the replies joined by CRLF, which are
written as they are, one line per recipient.

May import: the standard library, aiosmtpd and :mod:`pobox.delivery`.
"""

from __future__ import annotations

import asyncio
import os

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from pobox.delivery._agent import DeliveryAgent, Outcome, Received
from pobox.delivery._protocol import DeliveryProtocol
from pobox.storage.spool import Spool

__all__ = ["MAX_RECIPIENTS", "LmtpHandler", "LmtpProtocol", "received_from"]

#: Recipients per transaction, like Postfix's ``lmtp_destination_recipient_limit`` default
#: (50) with room to spare; more get ``452 4.5.3`` (RFC 5321 §4.5.3.1.8) and come again.
MAX_RECIPIENTS = 100


class LmtpProtocol(DeliveryProtocol):
    """aiosmtpd's SMTP speaking LMTP: ``LHLO`` instead of ``HELO``/``EHLO``, no greeting name."""

    per_recipient_data_replies = True
    name = "lmtp"

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        """Answer the LMTP greeting (RFC 2033 §4.1) as EHLO."""
        await super().smtp_EHLO(arg)

    async def smtp_HELO(self, arg: str) -> None:
        """Refuse HELO, which LMTP does not have."""
        await self.push('500 5.5.1 Error: command "HELO" not recognized')

    async def smtp_EHLO(self, arg: str) -> None:
        """Refuse EHLO, which LMTP does not have."""
        await self.push('500 5.5.1 Error: command "EHLO" not recognized')


class LmtpHandler:
    """aiosmtpd hooks delivering LMTP mail through a :class:`DeliveryAgent`."""

    def __init__(self, agent: DeliveryAgent) -> None:
        """Deliver with ``agent``."""
        self._agent = agent

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept a recipient that is a user, refuse others (RFC 2033 §4.1)."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        resolved = await self._agent.resolve(address, any_domain=True)
        if isinstance(resolved, Outcome):
            return resolved.reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        body: Spool,
    ) -> str:
        """Deliver ``body`` to every recipient; return one reply per recipient, CRLF-joined."""
        sender = envelope.mail_from or ""
        received = received_from(session, "LMTP", len(envelope.rcpt_tos))
        outcomes = await asyncio.gather(
            *(self._deliver(address, sender, body, received) for address in envelope.rcpt_tos)
        )
        return "\r\n".join(outcome.reply for outcome in outcomes)

    async def _deliver(self, address: str, sender: str, body: Spool, received: Received) -> Outcome:
        """Resolve ``address`` again (the user may be gone since RCPT) and deliver."""
        resolved = await self._agent.resolve(address, any_domain=True)
        if isinstance(resolved, Outcome):
            return self._agent.counted("lmtp", resolved)
        delivered = await self._agent.deliver(resolved, sender, body, received)
        return self._agent.counted("lmtp", delivered)


def received_from(session: Session, protocol: str, recipients: int) -> Received:
    """Describe where a transaction's message came from, for its ``Received:`` header.

    ``protocol`` is ``LMTP`` or ``ESMTP``; ``SMTP`` after HELO and an ``S`` over TLS are
    added here (RFC 3848). The peer is the PROXY header's client behind HAProxy (the
    listener hands aiosmtpd that address); a Unix socket has none.
    """
    if protocol == "ESMTP" and not session.extended_smtp:
        protocol = "SMTP"
    if session.ssl is not None:
        protocol += "S"
    peer = session.peer
    address = str(peer[0]) if isinstance(peer, tuple) and peer else None
    return Received(
        protocol=protocol,
        helo=session.host_name,
        address=address,
        recipients=recipients,
        id=os.urandom(8).hex(),
    )
