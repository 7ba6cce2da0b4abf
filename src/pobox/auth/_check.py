"""The password check every user database makes: one path and one cost for everyone.

A backend checks the client's password against the user's stored hash, or against a dummy
(:func:`commonest`: a real stored password of the backend's commonest scheme) for an unknown
user or one without a password, and decides afterwards. A single digest is checked in the
event loop (cheaper than the hop to a thread); anything iterated in :class:`HashWorkers`.

May import: the standard library, :mod:`pobox.auth.base` and :mod:`pobox.auth.schemes`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pobox.auth.base import HashWorkers
from pobox.auth.schemes import DUMMY_HASH, identify_scheme, is_cheap, verify

__all__ = ["check_password", "commonest", "with_scheme"]


async def check_password(
    workers: HashWorkers, stored: str, password: bytes, *, default_scheme: str, username: str
) -> bool:
    """Return whether ``password`` matches ``stored``, checked where its cost belongs."""
    if is_cheap(stored, default_scheme=default_scheme):
        return verify(stored, password, default_scheme=default_scheme, username=username)
    return await workers.run(
        verify, stored, password, default_scheme=default_scheme, username=username
    )


def commonest(passwords: Iterable[str], default_scheme: str) -> str:
    """Return the first stored password of the commonest scheme (the built-in dummy if none).

    A real entry, not a hash made up here: it has the scheme *and* the cost parameters
    (rounds, memory) the users have. Users of a rarer scheme cost what their own scheme costs;
    the session's failure delay, measured from the attempt, hides that.
    """
    found = [password for password in passwords if password]
    if not found:
        return DUMMY_HASH
    counts = Counter(identify_scheme(p, default_scheme=default_scheme) for p in found)
    common = counts.most_common(1)[0][0]
    return next(p for p in found if identify_scheme(p, default_scheme=default_scheme) == common)


def with_scheme(stored: str, default_scheme: str) -> str:
    """Return ``stored`` as ``{SCHEME}data`` (bare data gets the scheme it is in)."""
    if stored.startswith("{"):
        return stored
    return "{" + identify_scheme(stored, default_scheme=default_scheme) + "}" + stored
