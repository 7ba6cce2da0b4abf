"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-IO.

Theory of operation
-------------------
A load balancer in TCP mode (HAProxy's ``send-proxy`` / ``send-proxy-v2``) opens its own
connection to pobox, so the socket's peer is the balancer, not the client.  It therefore
starts the connection with one header that says who the client really is, and only then
relays the client's bytes: a line of text (version 1, at most 107 octets with its CRLF) or a
binary block (version 2: a 16-octet preamble whose last two octets give the length of the
rest; TLVs after the addresses may say the client came over TLS and which certificate it
showed).

:class:`ProxyHeaderParser` is fed what arrives and answers :data:`NEED_DATA` until the header
is complete, then a :class:`ProxyHeader`; anything that is not a valid header raises
:class:`ProxyHeaderError` as soon as it is seen (the specification asks receivers to abort
early).  Nothing else ever escapes it, and it never holds more than one header: version 1 is
refused past 107 octets without CRLF, version 2 past :data:`MAX_V2_HEADER` octets.

:attr:`ProxyHeaderParser.wanted` tells the caller how many octets it may still read without
reading past the header.  That matters when TLS starts right after the header (implicit TLS
behind HAProxy in TCP mode): bytes of the ClientHello taken by mistake could not be handed to
the TLS layer afterwards.  Version 2 says its length up front; for version 1 the bound is the
shortest line the fields seen so far still allow, then two octets (or one after a CR) at a
time until the CRLF.

Whether a header is believed at all is not decided here: the shell accepts one only from
``haproxy_trusted_networks`` (see :mod:`pobox.server._proxy`).

May import: the standard library only (no asyncio, socket, ssl or logging) and
:mod:`pobox.errors`; ``tests/proxy/test_boundary.py`` checks it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

from pobox.errors import PoboxError

__all__ = [
    "MAX_V1_HEADER",
    "MAX_V2_HEADER",
    "NEED_DATA",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "NeedData",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderParser",
    "SslInfo",
    "crc32c",
    "starts_like_header",
]

#: Version 1 starts with these six octets ("PROXY" and exactly one space).
V1_PREFIX: Final = b"PROXY "

#: Version 2 starts with these twelve octets (proxy-protocol.txt §2.2).
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

#: proxy-protocol.txt §2.1: the worst case, "PROXY UNKNOWN" with two IPv6 addresses and two
#: ports, is 107 octets with its CRLF; no longer line is a header.
MAX_V1_HEADER: Final = 107

#: The shortest valid version 1 line: ``PROXY UNKNOWN\r\n``.  A version 2 header is at least
#: 16 octets, so this many may always be read first.
MIN_HEADER: Final = 15

#: Version 2 headers longer than this are refused.  HAProxy's stay under 1 KiB: 36 octets of
#: IPv6 addresses, a unique id of at most 128 (§2.2.5), the SNI (at most 255), the TLS TLVs
#: (version, cipher, algorithms, the certificate's CN) of some 200.  The cap bounds what even
#: a trusted sender can make pobox hold before the session starts.
MAX_V2_HEADER: Final = 4096

#: §2.2: the version 2 preamble: signature, version/command, family/protocol, length.
V2_PREAMBLE: Final = 16

#: §2.2.6: bits of the PP2_TYPE_SSL ``client`` field.
PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

# §2.2: TLV types pobox reads (the others are kept as they are, in ProxyHeader.tlvs).
_PP2_TYPE_CRC32C: Final = 0x03
_PP2_TYPE_SSL: Final = 0x20
_PP2_SUBTYPE_SSL_VERSION: Final = 0x21
_PP2_SUBTYPE_SSL_CN: Final = 0x22
_PP2_SUBTYPE_SSL_CIPHER: Final = 0x23

#: §2.2: version 2 family/protocol octets and the size of their address block; AF_UNSPEC and
#: AF_UNIX carry no address pobox can use, so the connection's own endpoints stand.
_V2_FAMILIES: Final[dict[int, int]] = {
    0x00: 0,  # UNSPEC
    0x11: 12,  # TCP over IPv4
    0x12: 12,  # UDP over IPv4
    0x21: 36,  # TCP over IPv6
    0x22: 36,  # UDP over IPv6
    0x31: 216,  # UNIX stream
    0x32: 216,  # UNIX datagram
}

#: The shortest line each version 1 protocol allows, for :attr:`ProxyHeaderParser.wanted`:
#: "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n" and "PROXY TCP6 :: :: 0 0\r\n".
_V1_MIN_LINE: Final = {b"TCP4": 32, b"TCP6": 22, b"UNKNOWN": 15}


class NeedData:
    """The type of :data:`NEED_DATA`."""

    __slots__ = ()

    def __repr__(self) -> str:
        """Return the sentinel's name."""
        return "NEED_DATA"


#: What :meth:`ProxyHeaderParser.feed` returns until the header is complete.
NEED_DATA: Final = NeedData()


class ProxyHeaderError(PoboxError):
    """The bytes are not a valid PROXY protocol header; the connection must be closed.

    Args:
        reason: what is wrong, for the log (never sent to the peer).
        version: the header version seen (1 or 2), or ``None`` if not even that.
    """

    def __init__(self, reason: str, version: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.version = version


@dataclass(frozen=True, slots=True)
class SslInfo:
    """The PP2_TYPE_SSL TLV (§2.2.6): what the proxy knows of the client's TLS."""

    #: the ``client`` bit field (:data:`PP2_CLIENT_SSL`, ``_CERT_CONN``, ``_CERT_SESS``).
    client: int
    #: the ``verify`` field: zero when a certificate was presented and verified.
    verify: int
    #: PP2_SUBTYPE_SSL_VERSION, e.g. ``"TLSv1.3"``.
    version: str | None = None
    #: PP2_SUBTYPE_SSL_CN: the client certificate's Common Name (``send-proxy-v2-ssl-cn``).
    cn: str | None = None
    #: PP2_SUBTYPE_SSL_CIPHER.
    cipher: str | None = None

    @property
    def client_ssl(self) -> bool:
        """Whether the client reached the proxy over TLS (PP2_CLIENT_SSL)."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def verified_cn(self) -> str | None:
        """Return the CN only if the proxy says it verified the certificate carrying it.

        That is: the client came over TLS, presented a certificate on this connection or
        its TLS session (PP2_CLIENT_CERT_CONN or _SESS), and ``verify`` is zero.  A zero
        alone is not enough: HAProxy leaves ``verify`` at zero when no certificate was
        presented at all.
        """
        if not self.client_ssl or not self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS):
            return None
        return self.cn if self.verify == 0 and self.cn else None


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete, valid PROXY protocol header."""

    #: 1 (text) or 2 (binary).
    version: int
    #: ``"PROXY"``: relayed for a client; ``"LOCAL"``: the proxy's own connection (v2 health
    #: checks), whose real endpoints are the connection's.
    command: Literal["PROXY", "LOCAL"]
    #: the client's ``(address, port)``, or ``None`` when the header names no usable address
    #: (LOCAL, v1 ``UNKNOWN``, v2 AF_UNSPEC or AF_UNIX): the connection's own endpoints stand.
    source: tuple[str, int] | None
    #: the ``(address, port)`` the client connected to (on the proxy), or ``None`` likewise.
    destination: tuple[str, int] | None
    #: octets of the header on the wire.
    length: int
    #: the PP2_TYPE_SSL TLV, if the proxy sent one (``send-proxy-v2-ssl``).
    ssl: SslInfo | None = None
    #: every other TLV as ``(type, value)``, in order (v2 only).
    tlvs: tuple[tuple[int, bytes], ...] = ()


def starts_like_header(data: bytes) -> bool:
    """Whether ``data``, the first bytes a client sent, begin a PROXY protocol header.

    For refusing (and logging) a header from a peer that may not send one.  Only a whole
    ``"PROXY "`` or version 2 signature counts: a sender writes its header in one piece.
    """
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC-32C (Castagnoli, RFC 3720 App. B.4) of ``data``, for PP2_TYPE_CRC32C."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for octet in data:
        crc = table[(crc ^ octet) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class ProxyHeaderParser:
    """Read one PROXY protocol header from the first bytes of a connection.

    Feed it what arrives with :meth:`feed` until it returns a :class:`ProxyHeader`; read at
    most :attr:`wanted` octets at a time to never take a byte past the header.  Bytes fed
    beyond the header are kept in :attr:`rest`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: ProxyHeader | None = None
        self._rest = bytearray()

    @property
    def rest(self) -> bytes:
        """Return what was fed after the header (the client's own first bytes)."""
        return bytes(self._rest)

    @property
    def wanted(self) -> int:
        """How many more octets may be read without reading past the header (at least 1)."""
        if self._header is not None:
            return 1
        buf = self._buf
        have = len(buf)
        if not have:
            return MIN_HEADER
        if buf[0] == V2_SIGNATURE[0]:
            if have < V2_PREAMBLE:
                return V2_PREAMBLE - have
            return max(V2_PREAMBLE + int.from_bytes(buf[14:16], "big") - have, 1)
        protocol = bytes(buf[6:].partition(b" ")[0])
        shortest = max(_V1_MIN_LINE.get(protocol, MIN_HEADER), MIN_HEADER) - have
        if shortest > 0:
            return shortest
        return 1 if buf.endswith(b"\r") else 2

    def feed(self, data: bytes) -> ProxyHeader | NeedData:
        """Add bytes read from the connection.

        Returns:
            the header once it is complete (and again on later calls, whose bytes go to
            :attr:`rest`), else :data:`NEED_DATA`.

        Raises:
            ProxyHeaderError: the bytes are not a valid header.
        """
        if self._header is not None:
            self._rest += data
            return self._header
        self._buf += data
        buf = self._buf
        header = self._v2(buf) if buf[:1] == V2_SIGNATURE[:1] else self._v1(buf)
        if header is None:
            return NEED_DATA
        self._header = header
        self._rest += buf[header.length :]
        del buf[header.length :]
        return header

    # ----------------------------------------------------------------- version 1

    @staticmethod
    def _v1(buf: bytearray) -> ProxyHeader | None:
        have = min(len(buf), len(V1_PREFIX))
        if buf[:have] != V1_PREFIX[:have]:
            raise ProxyHeaderError("No valid proxy header found")
        # Only the first 107 octets can hold the line; looking no further makes the outcome
        # the same however the bytes were split when they were fed.
        window = bytes(buf[:MAX_V1_HEADER])
        cr, lf = window.find(b"\r"), window.find(b"\n")
        lone_cr = cr != -1 and window[cr + 1 : cr + 2] not in (b"", b"\n")
        if lone_cr or (lf != -1 and lf != cr + 1):
            raise ProxyHeaderError("Header line does not end with CRLF", 1)
        if lf == -1:
            if len(buf) >= MAX_V1_HEADER:
                raise ProxyHeaderError("Header line is longer than 107 octets", 1)
            return None
        return _parse_v1_line(window[:cr], lf + 1)

    # ----------------------------------------------------------------- version 2

    @staticmethod
    def _v2(buf: bytearray) -> ProxyHeader | None:
        have = min(len(buf), len(V2_SIGNATURE))
        if buf[:have] != V2_SIGNATURE[:have]:
            raise ProxyHeaderError("No valid proxy header found")
        if len(buf) > 12:
            if buf[12] >> 4 != 2:
                raise ProxyHeaderError(f"Unsupported protocol version (version={buf[12] >> 4})")
            if buf[12] & 0x0F not in (0, 1):
                raise ProxyHeaderError(f"Invalid command (cmd={buf[12] & 0x0F:02x})", 2)
        if len(buf) < V2_PREAMBLE:
            return None
        total = V2_PREAMBLE + int.from_bytes(buf[14:16], "big")
        if total > MAX_V2_HEADER:
            raise ProxyHeaderError(f"Header is longer than {MAX_V2_HEADER} octets", 2)
        if len(buf) < total:
            return None
        return _parse_v2(bytes(buf[:total]))


def _parse_v1_line(line: bytes, length: int) -> ProxyHeader:
    """Parse a complete version 1 line (without its CRLF)."""
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":  # §2.1: the rest of the line is to be ignored
        return ProxyHeader(1, "PROXY", None, None, length)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("Unknown proxied protocol", 1)
    if len(fields) != 6:
        raise ProxyHeaderError("Header line does not have six fields", 1)
    version = 4 if protocol == b"TCP4" else 6
    source = _v1_address(fields[2], version), _v1_port(fields[4])
    destination = _v1_address(fields[3], version), _v1_port(fields[5])
    return ProxyHeader(1, "PROXY", source, destination, length)


def _v1_address(field: bytes, version: int) -> str:
    """Return a version 1 address in its canonical text, if it is one of ``version``."""
    try:
        text = field.decode("ascii")
        if version == 4:
            return str(ipaddress.IPv4Address(text))  # refuses leading zeros, as §2.1 does
        if "%" in text:  # a scope id is no address of a remote client
            raise ValueError(text)
        return str(ipaddress.IPv6Address(text))
    except ValueError:  # UnicodeDecodeError is one
        raise ProxyHeaderError(f"Proxied address is invalid for TCP{version}", 1) from None


def _v1_port(field: bytes) -> int:
    """Return a version 1 port: decimal, 0-65535, no leading zero (§2.1)."""
    if not field.isdigit() or len(field) > 5 or (len(field) > 1 and field[:1] == b"0"):
        raise ProxyHeaderError("Proxied port is invalid", 1)
    port = int(field)
    if port > 65535:
        raise ProxyHeaderError("Proxied port is invalid", 1)
    return port


def _parse_v2(header: bytes) -> ProxyHeader:
    """Parse a complete version 2 header (preamble checked already)."""
    length = len(header)
    if header[12] & 0x0F == 0:
        # §2.2 LOCAL: "the receiver must accept this connection as valid and must use the
        # real connection endpoints and discard the protocol block including the family".
        return ProxyHeader(2, "LOCAL", None, None, length)
    family = header[13]
    if family not in _V2_FAMILIES:
        raise ProxyHeaderError(f"Unknown address family (family={family:02x})", 2)
    if family in (0x12, 0x22):
        raise ProxyHeaderError(f"Not using TCP (type={family & 0x0F:02x})", 2)
    size = _V2_FAMILIES[family]
    body = header[V2_PREAMBLE:]
    if len(body) < size:
        raise ProxyHeaderError("Address block is incomplete", 2)
    source = destination = None
    if family == 0x11:
        source = str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big")
        destination = str(ipaddress.IPv4Address(body[4:8])), int.from_bytes(body[10:12], "big")
    elif family == 0x21:
        source = str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big")
        destination = str(ipaddress.IPv6Address(body[16:32])), int.from_bytes(body[34:36], "big")
    ssl: SslInfo | None = None
    tlvs: list[tuple[int, bytes]] = []
    for start, kind, value in _tlvs(body, V2_PREAMBLE + size):
        if kind == _PP2_TYPE_CRC32C:
            _check_crc32c(header, start, value)
        elif kind == _PP2_TYPE_SSL:
            if ssl is not None:
                raise ProxyHeaderError("More than one SSL TLV", 2)
            ssl = _ssl_info(value)
        else:
            tlvs.append((kind, value))
    return ProxyHeader(2, "PROXY", source, destination, length, ssl, tuple(tlvs))


def _tlvs(body: bytes, offset: int) -> list[tuple[int, int, bytes]]:
    """Split the TLV area of ``body`` (from ``offset - 16``) into ``(start, type, value)``.

    ``start`` is the value's offset in the whole header.

    Raises:
        ProxyHeaderError: a TLV does not fit in what is left.
    """
    out = []
    pos = offset - V2_PREAMBLE
    while pos < len(body):
        if pos + 3 > len(body):
            raise ProxyHeaderError("TLV is truncated", 2)
        size = int.from_bytes(body[pos + 1 : pos + 3], "big")
        if pos + 3 + size > len(body):
            raise ProxyHeaderError("TLV is truncated", 2)
        out.append((V2_PREAMBLE + pos + 3, body[pos], body[pos + 3 : pos + 3 + size]))
        pos += 3 + size
    return out


def _check_crc32c(header: bytes, start: int, value: bytes) -> None:
    """§2.2.3: the checksum of the header with the checksum's own four octets zeroed."""
    if len(value) != 4:
        raise ProxyHeaderError("CRC32C TLV is not 4 octets", 2)
    zeroed = header[:start] + b"\x00\x00\x00\x00" + header[start + 4 :]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyHeaderError("CRC32C checksum does not match", 2)


def _ssl_info(value: bytes) -> SslInfo:
    """Parse a PP2_TYPE_SSL value: client, verify, then sub-TLVs (§2.2.6)."""
    if len(value) < 5:
        raise ProxyHeaderError("SSL TLV is shorter than 5 octets", 2)
    fields: dict[int, str] = {}
    for _, kind, sub in _tlvs(value, V2_PREAMBLE + 5):
        if kind in (_PP2_SUBTYPE_SSL_VERSION, _PP2_SUBTYPE_SSL_CN, _PP2_SUBTYPE_SSL_CIPHER):
            try:
                fields[kind] = sub.decode("utf-8" if kind == _PP2_SUBTYPE_SSL_CN else "ascii")
            except UnicodeDecodeError:
                raise ProxyHeaderError(f"SSL sub-TLV {kind:02x} is not text", 2) from None
    return SslInfo(
        client=value[0],
        verify=int.from_bytes(value[1:5], "big"),
        version=fields.get(_PP2_SUBTYPE_SSL_VERSION),
        cn=fields.get(_PP2_SUBTYPE_SSL_CN),
        cipher=fields.get(_PP2_SUBTYPE_SSL_CIPHER),
    )
