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

from pobox.auth.passwdfile import PasswdFileAuthenticator
from pobox.config import Config
from pobox.delivery._agent import EX_DATAERR, DeliveryAgent, Outcome, build_agent

__all__ = ["deliver_stdin", "read_message"]

#: Where the envelope sender is unknown: the null reverse-path (RFC 5321 §4.5.5).
_NULL_SENDER = ""


def read_message(stream: BinaryIO, limit: int) -> bytes | None:
    """Read a whole message from ``stream``; ``None`` if it is over ``limit`` octets (0: none).

    A leading mbox ``From `` line is dropped.
    """
    data = stream.read(limit + 1) if limit else stream.read()
    if limit and len(data) > limit:
        return None
    if data.startswith(b"From "):
        _, _, data = data.partition(b"\n")
    return data


async def deliver_stdin(
    config: Config, user: str, sender: str | None, stream: BinaryIO
) -> tuple[int, str]:
    """Deliver the message on ``stream`` to ``user``; return the exit status and a message."""
    message = read_message(stream, config.max_message_size)
    if message is None:
        return EX_DATAERR, f"message over max_message_size ({config.max_message_size} octets)"
    if not message:
        return EX_DATAERR, "empty message on standard input"
    agent: DeliveryAgent = build_agent(
        config,
        PasswdFileAuthenticator(config.passwd_file, default_scheme=config.default_pass_scheme),
    )
    resolved = await agent.resolve(user, any_domain=True)
    if isinstance(resolved, Outcome):
        return resolved.exit_code, f"{user}: {resolved.reply}"
    outcome = await agent.deliver(resolved, sender or _NULL_SENDER, message)
    return outcome.exit_code, f"{user}: {outcome.reply}"
