"""Brute-force defence: slow down, then refuse, the *address* that keeps failing.

The policy, and why no stranger can lock a user out with it
------------------------------------------------------------
- A failed login waits ``auth_failure_delay`` seconds, doubled for each earlier failure from
  the same address still remembered, up to ``auth_failure_delay_max``.  Dovecot's auth
  penalty grows per address the same way.
- Once an address has ``auth_failures_per_ip`` failures within ``auth_failure_window``,
  every login *from that address* gets ``-ERR [LOGIN-DELAY]`` until the window has passed
  since its first failure, right password or not (Dovecot refuses nothing, it only delays;
  pobox refuses, which also spares the hashing work a brute-forcer would cost).
- Failures are counted per user name too, from every address, but that count only ever
  adds delay: once a name has ``auth_failures_per_user`` failures within the window, each
  further failure *for that name* waits ``auth_failure_delay_max``.  It never refuses a
  login: the right password from an address that is not failing gets in, however many
  strangers are guessing the same user's password elsewhere.
- A successful login forgets the failures of its address (as Dovecot resets its penalty);
  the user name's count stays, so a user logging in does not reset a stranger's delay.

Addresses are counted as :func:`address_group` says: an IPv4 address on its own (an
IPv4-mapped IPv6 address as the IPv4 address it maps), an IPv6 address by its /64. One
subscriber (one home router, one cloud instance) is routinely given a whole /64, so
counting per /128 would let one attacker fail from 2**64 "addresses", each under the
limit. Dovecot's auth penalty groups IPv6 addresses too, by /48
(``PENALTY_IPV6_MASK_BITS``); pobox takes /64 because it also *refuses* a failing group,
which at /48 would refuse a whole site for one host's failures. The connection caps
(:mod:`._limits`) count by the same groups.

The counters live behind :class:`~pobox.state.base.FailureCounters` (in memory on one node, in
PostgreSQL shared by every node); this module is only the policy that reads them.

Where the session registry can check an address's failures as it registers the session
(PostgreSQL: :class:`~pobox.state.base.CheckingRegistry`), an address this node has not seen
fail within the window is not asked about before the password: the right password is then
refused by the registration itself, and a wrong one asks the counters before counting it.
Either way the answer is the one the check before the password would have given; what the
shared check no longer spares is one password check per node for an address that failed
only on other nodes (after it, this node remembers the address, :meth:`LoginThrottle.suspect`).

May import: the standard library and :mod:`pobox.state`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from pobox.state.base import FailureCounters

__all__ = ["IPV6_GROUP_PREFIX", "LoginThrottle", "address_group"]

#: IPv6 addresses count per network of this prefix: a /64 is what one subscriber gets
#: (RFC 6177 recommends /48 to /64 per site; SLAAC needs a /64).
IPV6_GROUP_PREFIX: Final = 64
_IPV6_GROUP_MASK: Final = ((1 << IPV6_GROUP_PREFIX) - 1) << (128 - IPV6_GROUP_PREFIX)

#: User names up to this many octets (and printable) are counter keys as they are; longer
#: ones are hashed (:func:`user_key`).  Real names are far shorter; Dovecot's default
#: ``auth_username_chars`` and common MTAs allow 64-octet local parts.
MAX_PLAIN_KEY: Final = 64

#: Addresses (groups) this node remembers as failing, at most; the oldest go first.  One
#: forgotten costs a password check before the shared check refuses its next login.
MAX_SUSPECTS: Final = 100_000

#: The doubling stops here (2**32 times the base delay is far beyond any cap).
_MAX_DOUBLINGS: Final = 32


@functools.lru_cache(maxsize=4096)
def address_group(ip: str) -> str:
    """Return what ``ip`` is counted as: itself (IPv4), its /64 (IPv6), the IPv4 it maps.

    Anything that is not an IP address (a test's made-up peer) is its own group. Cached: a
    login asks three times (throttle, limits, registry), and parsing is most of the cost; the
    cache is bounded, so addresses a stranger varies only evict each other.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    network = ipaddress.IPv6Address(int(address) & _IPV6_GROUP_MASK)
    return f"{network}/{IPV6_GROUP_PREFIX}"


def address_key(ip: str) -> str:
    """The counter key of a source address (its :func:`address_group`)."""
    return "ip:" + address_group(ip)


def user_key(user: str) -> str:
    """The counter key of a user name (as the client gave it).

    A short printable name is its own key (``user:alice``, readable in the shared table).
    Any other name, which only a stranger sends (up to 6 KiB through AUTH PLAIN or LOGIN,
    NUL and controls through LOGIN), is keyed by its hash (``user#`` and 32 hex digits):
    a key in PostgreSQL can be neither longer than a btree index row (2704 octets) nor hold
    NUL, and either error would make every login fall back to per-node state
    (:class:`~pobox.state.base.StateUnavailable`) whenever a stranger likes; nor may such
    names fill the memory counters at 6 KiB a key.
    """
    if len(user) <= MAX_PLAIN_KEY and user.isprintable() and len(user.encode()) <= MAX_PLAIN_KEY:
        return "user:" + user
    return (
        "user#" + hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    )


class LoginThrottle:
    """The failed-login policy shared by all sessions of a server.

    Args:
        counters: where failures are counted; its window is ``auth_failure_window``.
        delay: the delay after a first failure, in seconds.
        delay_max: the cap of the growing delay.
        per_ip: failures from one address after which its logins are refused.
        per_user: failures for one user name after which its failures wait ``delay_max``.
        window: seconds a failure counts (``auth_failure_window``): how long this node
            remembers an address it saw fail (:meth:`suspect`).
        clock: a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        counters: FailureCounters,
        *,
        delay: float,
        delay_max: float,
        per_ip: int,
        per_user: int,
        window: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters
        self.delay = delay
        self.delay_max = max(delay, delay_max)
        self.per_ip = per_ip
        self.per_user = per_user
        self.window = window
        self._clock = clock
        #: Address group -> when this node last saw it fail (or found it with failures).
        self._suspects: OrderedDict[str, float] = OrderedDict()

    def suspect(self, ip: str) -> bool:
        """Tell whether this node saw ``ip`` fail within the window: check it before the
        password even where the registration checks it too."""
        seen = self._suspects.get(address_group(ip))
        return seen is not None and self._clock() - seen < self.window

    def _note(self, ip: str, failures: int) -> None:
        """Remember ``ip`` as failing if it has ``failures``, forget it otherwise."""
        group = address_group(ip)
        self._suspects.pop(group, None)
        if failures:
            self._suspects[group] = self._clock()
            if len(self._suspects) > MAX_SUSPECTS:
                self._suspects.popitem(last=False)

    def found(self, ip: str, failures: int) -> None:
        """Take note of the ``failures`` of ``ip`` found by a registration that checked them."""
        self._note(ip, failures)

    async def failures(self, ip: str) -> int:
        """Return the failures remembered for ``ip``: what :meth:`refuses` and
        :meth:`succeeded` take."""
        found = (await self.counters.counts([address_key(ip)]))[0]
        self._note(ip, found)
        return found

    def refuses(self, failures: int) -> bool:
        """Return whether an address with ``failures`` may not log in for now."""
        return failures >= self.per_ip

    async def failed(self, ip: str, user: str | None) -> float:
        """Record a failed login; return the seconds to wait before answering it."""
        if user is None:
            (from_ip,) = await self.counters.add([address_key(ip)])
            for_user = 0
        else:
            from_ip, for_user = await self.counters.add([address_key(ip), user_key(user)])
        self._note(ip, from_ip)
        doublings = from_ip - 1 if for_user < self.per_user else _MAX_DOUBLINGS
        return float(min(self.delay * (1 << min(doublings, _MAX_DOUBLINGS)), self.delay_max))

    async def succeeded(self, ip: str, failures: int) -> None:
        """Forget the failures of an address that just logged in.

        ``failures`` is what :meth:`failures` said before the login: with none there is
        nothing to forget and no round trip to make.
        """
        if failures:
            self._note(ip, 0)
            await self.counters.clear([address_key(ip)])
