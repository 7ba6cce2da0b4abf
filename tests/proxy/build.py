"""Build PROXY protocol headers byte by byte, from the specification (proxy-protocol.txt).

Written for the tests, independently of :mod:`pobox.proxy`: a header here is what a sender
such as HAProxy puts on the wire.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# §2.2: TLV types.
ALPN, AUTHORITY, CRC32C, NOOP, UNIQUE_ID, SSL = 0x01, 0x02, 0x03, 0x04, 0x05, 0x20
SSL_VERSION, SSL_CN, SSL_CIPHER = 0x21, 0x22, 0x23
# §2.2.6: the SSL TLV's client bits.
CLIENT_SSL, CERT_CONN, CERT_SESS = 0x01, 0x02, 0x04


def v1(protocol: str, src: str = "", dst: str = "", sport: int = 0, dport: int = 0) -> bytes:
    """A version 1 line; ``protocol`` UNKNOWN with no addresses gives the short form."""
    if protocol == "UNKNOWN" and not src:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    """One TLV: type, 16-bit length, value."""
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(client: int, verify: int = 0, **subs: str) -> bytes:
    """A PP2_TYPE_SSL TLV with sub-TLVs ``version``, ``cn``, ``cipher``."""
    kinds = {"version": SSL_VERSION, "cn": SSL_CN, "cipher": SSL_CIPHER}
    body = struct.pack("!BI", client, verify)
    body += b"".join(tlv(kinds[name], text.encode()) for name, text in subs.items())
    return tlv(SSL, body)


def addresses(src: str, dst: str, sport: int, dport: int) -> tuple[int, bytes]:
    """The family/protocol octet (TCP) and address block of two addresses."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    return family, a.packed + b.packed + struct.pack("!HH", sport, dport)


def v2(
    command: int = 1,
    family: int = 0x11,
    block: bytes = b"",
    tlvs: bytes = b"",
    *,
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """A version 2 header; ``length`` overrides the length field."""
    body = block + tlvs
    size = len(body) if length is None else length
    return SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


def v2_tcp(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    """A version 2 PROXY header for a TCP connection from ``src`` to ``dst``."""
    family, block = addresses(src, dst, sport, dport)
    return v2(1, family, block, tlvs)


def crc32c(data: bytes) -> int:
    """CRC-32C, bit by bit (RFC 3720 App. B.4: reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for octet in data:
        crc ^= octet
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def with_crc32c(header: bytes) -> bytes:
    """Append a PP2_TYPE_CRC32C TLV to a version 2 header and fill in its checksum."""
    grown = header + tlv(CRC32C, b"\x00\x00\x00\x00")
    grown = grown[:14] + struct.pack("!H", len(grown) - 16) + grown[16:]
    return grown[:-4] + struct.pack("!I", crc32c(grown))
