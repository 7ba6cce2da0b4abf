"""pobox: a POP3 server, its delivery path and a retrieval client.

The protocol core (:mod:`pobox.protocol`) is sans-IO; storage (:mod:`pobox.storage`) and
user databases (:mod:`pobox.auth`) sit behind small async interfaces; :mod:`pobox.server`
is the asyncio shell and :mod:`pobox.cli` the composition root.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
