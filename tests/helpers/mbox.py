"""Write mbox spools as an MTA does, for the mbox store's tests.

:func:`append` is written from the mbox format's description (``mbox(5)``), not with the
code under test: a From_ line, the message with ``From `` at a line start quoted as
``>From ``, and one line feed as the separator.
"""

from __future__ import annotations

import re
from pathlib import Path

#: A fixed From_ line date, so that tests know the stored bytes exactly.
DATE = "Mon Dec  7 15:00:00 2026"


def quote(data: bytes) -> bytes:
    """Return ``data`` with ``From `` at the start of each line quoted as ``>From ``."""
    return re.sub(rb"(?m)^From ", b">From ", data)


def append(spool: Path, data: bytes, sender: str = "sender@example.org") -> None:
    """Append ``data`` to the mbox ``spool`` (created mode 0600 if missing)."""
    entry = f"From {sender} {DATE}\n".encode() + quote(data) + b"\n"
    with spool.open("ab") as out:
        out.write(entry)
    spool.chmod(0o600)
