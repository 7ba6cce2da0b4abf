"""The asyncio shell around the protocol core: listeners and sessions."""

from __future__ import annotations

from pobox.server._listener import Pop3Server
from pobox.server._privileges import drop_privileges
from pobox.server._session import Session, SessionContext

__all__ = ["Pop3Server", "Session", "SessionContext", "drop_privileges"]
