"""The inbound SMTP listener (RFC 5321) for a small single-host setup: local mail only.

This is no relay: ``RCPT`` to a foreign domain gets ``550 5.7.1``, to an unknown local user
``550 5.1.1``; a message over ``max_message_size`` gets ``552 5.3.4`` (at ``MAIL`` when the
client announced its ``SIZE``, else after ``DATA``). SMTP has one reply for ``DATA``: ``250``
only when every recipient has the message on disk; if a delivery failed temporarily, or some
recipients got the message and others did not, the reply is ``451 4.3.0`` and the client
sends again (the recipients already served get it twice, which is better than losing it);
otherwise the first failure is the reply.
Quota is checked at ``RCPT`` too, so a full mailbox is usually refused before any delivery.

May import: the standard library, aiosmtpd and :mod:`pobox.delivery`.
"""

from __future__ import annotations

from aiosmtpd.smtp import SMTP, Envelope, Session

from pobox.delivery._agent import DeliveryAgent, Outcome
from pobox.delivery._protocol import DeliveryProtocol
from pobox.delivery.lmtp import MAX_RECIPIENTS, received_from
from pobox.storage.spool import Spool

__all__ = ["SmtpHandler", "SmtpProtocol"]


class SmtpProtocol(DeliveryProtocol):
    """aiosmtpd's SMTP with pobox's limits and replies."""


class SmtpHandler:
    """aiosmtpd hooks delivering inbound SMTP mail to local users only."""

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
        """Accept a local user with room for the message; refuse everything else."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        resolved = await self._agent.resolve(address, any_domain=False)
        if isinstance(resolved, Outcome):
            return resolved.reply
        full = await self._agent.over_quota(resolved)
        if full is not None:
            return full.reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        body: Spool,
    ) -> str:
        """Deliver ``body`` to every recipient; answer with one reply for all (module doc)."""
        sender = envelope.mail_from or ""
        received = received_from(session, "ESMTP", len(envelope.rcpt_tos))
        outcomes: list[Outcome] = []
        for address in envelope.rcpt_tos:
            resolved = await self._agent.resolve(address, any_domain=False)
            if isinstance(resolved, Outcome):
                outcomes.append(self._agent.counted("smtp", resolved))
            else:
                delivered = await self._agent.deliver(resolved, sender, body, received)
                outcomes.append(self._agent.counted("smtp", delivered))
        failures = [outcome for outcome in outcomes if outcome is not Outcome.DELIVERED]
        if not failures:
            return "250 2.0.0 Ok: delivered"
        if Outcome.TEMPORARY in failures or len(failures) < len(outcomes):
            return Outcome.TEMPORARY.reply
        return failures[0].reply
