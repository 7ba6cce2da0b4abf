"""The connection record: who a connection is from and how it came, built once per connection.

The listener builds one :class:`ConnectionInfo` when a connection is accepted (after its PROXY
header, if it owes one, and after an implicit-TLS handshake) and everything after it reads that
record: the session's log lines and policy (``rip``/``lip``, plaintext allowed, SASL EXTERNAL),
the session registry, the caps.  What the PROXY protocol changes (the client's addresses, TLS
done by HAProxy) is decided here and nowhere else.

May import: the standard library and :mod:`pobox.server._proxy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pobox.server._proxy import Origin

__all__ = ["ConnectionInfo", "client_identity"]


def client_identity(peercert: object) -> str | None:
    """Return the identity of a *verified* TLS client certificate, for SASL EXTERNAL.

    ``peercert`` is what ``SSLObject.getpeercert()`` gives: empty unless the TLS context asked
    for and verified a client certificate.  The identity is the subject's ``emailAddress``,
    else its ``commonName``.
    """
    if not isinstance(peercert, dict):
        return None
    fields = {key: value for rdn in peercert.get("subject", ()) for key, value in rdn}
    identity = fields.get("emailAddress") or fields.get("commonName")
    return identity if isinstance(identity, str) and identity else None


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Where a connection comes from, as every part of the server must see it.

    ``rip``/``lip`` are the client's and the server's addresses: the socket's own, or those a
    trusted HAProxy's header names (:class:`~pobox.server._proxy.Origin`).
    """

    #: The client's address (the one logs, throttles, caps and policies see).
    rip: str
    #: The address the client connected to.
    lip: str
    #: The socket's own peer and local names (HAProxy's, when it relays).
    peername: Any
    sockname: Any
    #: Whether pobox itself speaks TLS on this connection from its first byte (POP3S).
    tls: bool
    #: Whether the client's connection is encrypted (pobox's TLS or HAProxy's).
    secure: bool
    #: The verified client certificate's name for SASL EXTERNAL, if any.
    external_identity: str | None
    #: What the PROXY header said, when a trusted HAProxy relays the connection.
    origin: Origin | None = None
    #: The TLS version (``TLSv1.3``) of pobox's TLS, or the one HAProxy's header names.
    tls_version: str | None = None

    @classmethod
    def of(cls, transport: Any, origin: Origin | None = None) -> ConnectionInfo:  # noqa: ANN401
        """Build the record of a connection from its transport and its PROXY origin.

        Args:
            transport: the accepted connection's transport (``get_extra_info`` is all used).
            origin: what a trusted HAProxy's header said, if it sent one.
        """
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        sock = transport.get_extra_info("sockname") or ("unknown", 0)
        rip, lip = str(peer[0]), str(sock[0])
        ssl_object = transport.get_extra_info("ssl_object")
        tls = ssl_object is not None
        version = ssl_object.version() if tls else None
        if origin is not None:
            rip, lip = origin.rip, origin.lip
        # SASL EXTERNAL: when HAProxy did the TLS, only the certificate name it vouches for
        # counts (a certificate on pobox's own TLS hop would be HAProxy's); else pobox's own.
        identity = (
            client_identity(transport.get_extra_info("peercert"))
            if origin is None or not origin.secure
            else origin.tls_identity
        )
        return cls(
            rip=rip,
            lip=lip,
            peername=peer,
            sockname=sock,
            tls=tls,
            secure=tls or (origin is not None and origin.secure),
            external_identity=identity,
            origin=origin,
            tls_version=(
                origin.header.ssl.version
                if origin is not None and origin.secure and origin.header.ssl is not None
                else version
            ),
        )
