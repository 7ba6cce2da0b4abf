"""``pobox deliver``: the mail delivery agent an MTA runs, like ``dovecot-lda``.

It reads one message on standard input and stores it in a user's maildir (see
:mod:`pobox.delivery._agent`), then exits with a sysexits.h code that Postfix's ``pipe(8)``
and ``mailbox_command``, and Exim's ``pipe`` transport, understand: 0 delivered, 65 the input
is unusable, 67 unknown user, 73 over quota or the maildir cannot be created, 75 temporary
failure (the MTA keeps the message and tries again). A leading mbox ``From `` line, which
some MTAs put before the message, is dropped, as ``dovecot-lda`` drops it.

May import: the standard library, :mod:`pobox.auth`, :mod:`pobox.config`,
:mod:`pobox.storage` and :mod:`pobox.delivery`.
"""

from __future__ import annotations

from typing import BinaryIO

from pobox.delivery._agent import EX_DATAERR, DeliveryAgent, Outcome, Received
from pobox.storage.base import INBOX
from pobox.storage.spool import Spool

__all__ = ["deliver_stdin", "read_message"]

#: Where the envelope sender is unknown: the null reverse-path (RFC 5321 §4.5.5).
_NULL_SENDER = ""
#: Octets read from standard input at a time.
_READ_SIZE = 64 * 1024


def read_message(stream: BinaryIO, limit: int, *, spool_dir: str | None = None) -> Spool | None:
    """Spool a whole message from ``stream``; ``None`` if it is over ``limit`` octets (0: none).

    A leading mbox ``From `` line is dropped. Memory stays bounded: a large message goes to
    the spool's temporary file in ``spool_dir`` (``mail_temp_dir``) as it is read.
    """
    spool = Spool(directory=spool_dir)
    try:
        total = 0
        first = True
        while True:
            chunk = stream.read(_READ_SIZE)
            if first and chunk.startswith(b"From "):
                while b"\n" not in chunk:  # a From line longer than one read
                    more = stream.read(_READ_SIZE)
                    if not more:
                        break
                    chunk += more
                _, _, chunk = chunk.partition(b"\n")
            first = False
            if not chunk:
                break
            total += len(chunk)
            if limit and total > limit:
                spool.close()
                return None
            spool.write(chunk)
        spool.finish()
    except BaseException:
        spool.close()
        raise
    return spool


async def deliver_stdin(
    agent: DeliveryAgent,
    user: str,
    sender: str | None,
    stream: BinaryIO,
    *,
    limit: int = 0,
    spool_dir: str | None = None,
    folder: str = INBOX,
) -> tuple[int, str]:
    """Deliver the message on ``stream`` to ``user``; return the exit status and a message.

    Args:
        folder: the folder to file it into (``-m``, as ``dovecot-lda -m``; checked by the
            caller with :func:`~pobox.storage.base.check_folder`).
        agent: the delivery agent, on the backends the configuration names.
        limit: the largest message accepted, in octets (``max_message_size``; 0: none).
        spool_dir: where a large message is spooled (``mail_temp_dir``; ``None``: the
            system's temporary directory).
    """
    body = read_message(stream, limit, spool_dir=spool_dir)
    if body is None:
        return EX_DATAERR, f"message over max_message_size ({limit} octets)"
    with body:
        if not body.size:
            return EX_DATAERR, "empty message on standard input"
        resolved = await agent.resolve(user, any_domain=True)
        if isinstance(resolved, Outcome):
            return resolved.exit_code, f"{user}: {resolved.reply}"
        outcome = await agent.deliver(
            resolved, sender or _NULL_SENDER, body, Received(protocol="local"), folder=folder
        )
    return outcome.exit_code, f"{user}: {outcome.reply}"
