"""Getting mail into the maildrops: LMTP and SMTP listeners and the ``pobox deliver`` MDA.

The only user of aiosmtpd. :mod:`.lmtp` (RFC 2033, per-recipient replies), :mod:`.smtp`
(inbound SMTP for local users only), :mod:`.mda` (``pobox deliver``); all deliver through
:class:`DeliveryAgent`, which stores through the storage interface
(:meth:`pobox.storage.base.MaildropStore.deliver`: durable before the acknowledgement).
The listeners share :mod:`._protocol` (DATA streamed into a spool through the sans-IO
:mod:`._data` decoder, deadlines) and :mod:`._listener` (connection caps).

May import: the standard library, aiosmtpd, :mod:`pobox.auth`, :mod:`pobox.config`,
:mod:`pobox.errors`, :mod:`pobox.storage` and :mod:`pobox.server._limits` (the connection
caps POP3 uses too).
"""

from __future__ import annotations

from pobox.delivery._agent import DeliveryAgent, Outcome, Recipient, build_agent, parse_size
from pobox.delivery._listener import DeliveryServer

__all__ = ["DeliveryAgent", "DeliveryServer", "Outcome", "Recipient", "build_agent", "parse_size"]
