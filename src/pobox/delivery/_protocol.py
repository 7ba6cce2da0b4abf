"""What the LMTP and SMTP listeners share: the aiosmtpd base class with pobox's replies.

aiosmtpd answers a few situations with its own texts; pobox gives them RFC 3463 enhanced
status codes (``552 5.3.4`` for a message over the size limit), by rewriting the reply in
:meth:`DeliveryProtocol.push`, the method every reply goes through. For LMTP, a reply that
ends the DATA phase is repeated once per accepted recipient (RFC 2033 §4.2).

May import: the standard library, aiosmtpd and :mod:`pobox.delivery`.
"""

from __future__ import annotations

from typing import AnyStr

from aiosmtpd.smtp import SMTP

__all__ = ["DATA_ERRORS", "LINE_LENGTH_LIMIT", "DeliveryProtocol"]

#: RFC 5321 §4.5.3.1.6 allows 1000 octets per line, but real mail breaks that and MTAs pass
#: it on (Dovecot's LMTP and Postfix take any length); a line is held in memory while read.
LINE_LENGTH_LIMIT = 64 * 1024

#: aiosmtpd's reply → pobox's. Those sent after the end of DATA are marked ``True``.
_REWRITES: dict[str, tuple[str, bool]] = {
    "552 Error: Too much mail data": ("552 5.3.4 Message too big for system", True),
    "500 Line too long (see RFC5321 4.5.3.1.6)": ("500 5.5.2 Line too long", True),
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size",
        False,
    ),
}

#: The rewritten replies that end a DATA phase.
DATA_ERRORS = frozenset(new for new, after_data in _REWRITES.values() if after_data)


class DeliveryProtocol(SMTP):
    """aiosmtpd's SMTP with pobox's limits and reply texts."""

    line_length_limit = LINE_LENGTH_LIMIT
    #: RFC 2033 §4.2: LMTP answers DATA once per recipient.
    per_recipient_data_replies = False

    async def push(self, status: AnyStr) -> None:
        """Send a reply, rewriting aiosmtpd's texts (see the module documentation)."""
        if isinstance(status, str) and status in _REWRITES:
            reply, after_data = _REWRITES[status]
            count = 1
            if after_data and self.per_recipient_data_replies and self.envelope is not None:
                count = max(1, len(self.envelope.rcpt_tos))
            await super().push("\r\n".join([reply] * count))
            return
        await super().push(status)
