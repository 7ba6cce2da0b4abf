"""The retrieval client behind ``pobox fetch``: POP3 (stdlib poplib) into Maildir, mbox or MDA.

Owns: accounts and password sources (``_account``), the per-account seen-UIDL state
(``_state``), local destinations (``_sinks``), the fetch run (``_fetch``), the subcommand
(``cli``).  Safe to interrupt: a message is deleted on the server only after it is stored
locally for good and recorded in the state.

May import: the standard library, rich (cli only) and pobox.errors.
"""

from __future__ import annotations

from pobox.client._account import Account, accounts_from_file, read_password
from pobox.client._fetch import FetchError, FetchResult, Status, fetch_account, retrieve
from pobox.client._sinks import MaildirSink, MboxSink, MdaSink
from pobox.client._state import SeenState

__all__ = [
    "Account",
    "FetchError",
    "FetchResult",
    "MaildirSink",
    "MboxSink",
    "MdaSink",
    "SeenState",
    "Status",
    "accounts_from_file",
    "fetch_account",
    "read_password",
    "retrieve",
]
