"""The PROXY protocol header parser: bytes in, a header, NEED_DATA or an error out."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import struct

import pytest

from pobox.proxy import (
    NEED_DATA,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    SslInfo,
    crc32c,
    starts_like_header,
)

from . import build


def parse(data: bytes) -> ProxyHeader:
    """Feed ``data`` at once; return the header (failing the test on NEED_DATA)."""
    result = ProxyHeaderParser().feed(data)
    assert isinstance(result, ProxyHeader), result
    return result


def error(data: bytes) -> str:
    """Feed ``data`` at once; return the reason it is refused."""
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderParser().feed(data)
    return info.value.reason


class TestVersion1:
    """The human-readable header (proxy-protocol.txt §2.1)."""

    def test_tcp4(self):
        """A TCP4 line gives both addresses and ports, and its length."""
        line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"

        header = parse(line)

        assert (1, "PROXY") == (header.version, header.command)
        assert ("192.168.0.1", 56324) == header.source
        assert ("192.168.0.11", 443) == header.destination
        assert len(line) == header.length

    def test_tcp6(self):
        """A TCP6 line gives the addresses in their canonical form."""
        header = parse(b"PROXY TCP6 2001:DB8:0:0::7 ::ffff:192.0.2.1 1 65535\r\n")

        assert ("2001:db8::7", 1) == header.source
        assert ("::ffff:c000:201", 65535) == header.destination

    def test_unknown_short_form(self):
        """PROXY UNKNOWN names no address: the connection's own endpoints stand."""
        header = parse(b"PROXY UNKNOWN\r\n")

        assert (None, None, 15) == (header.source, header.destination, header.length)

    def test_unknown_ignores_the_rest(self):
        """After UNKNOWN the rest of the line is ignored, whatever it holds (§2.1)."""
        header = parse(b"PROXY UNKNOWN whatever 1 2\r\n")

        assert header.source is None

    def test_longest_line(self):
        """The worst case of §2.1, 107 octets with the CRLF, is accepted."""
        six = "ffff:" * 7 + "ffff"
        line = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()

        assert 107 == len(line)
        assert 107 == parse(line).length

    def test_line_of_108(self):
        """A line of 108 octets is refused."""
        line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"

        assert 108 == len(line)
        assert "Header line is longer than 107 octets" == error(line)

    def test_no_crlf_within_107(self):
        """107 octets without a CRLF are refused at once, without waiting for more."""
        assert "Header line is longer than 107 octets" == error(b"PROXY " + b"1" * 101)

    @pytest.mark.parametrize(
        "line",
        [
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n",
        ],
    )
    def test_crlf_only(self, line):
        """A lone CR or LF never ends (or sits in) the line."""
        assert "Header line does not end with CRLF" == error(line)

    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "Proxied address is invalid for TCP4"),
            (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "Proxied address is invalid for TCP4"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "Proxied address is invalid for TCP6"),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "Proxied address is invalid for TCP6"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "Proxied port is invalid"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "Proxied port is invalid"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "Proxied port is invalid"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "Header line does not have six fields"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "Header line does not have six fields"),
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "Header line does not have six fields"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "Unknown proxied protocol"),
            (b"PROXY \xff\r\n", "Unknown proxied protocol"),
            (b"PROXY TCP4 1.2.3.\xb9 5.6.7.8 1 2\r\n", "Proxied address is invalid for TCP4"),
        ],
    )
    def test_malformed(self, line, reason):
        """Fields outside §2.1's format are refused, each with its reason."""
        assert reason == error(line)

    def test_rest(self):
        """Bytes after the CRLF are the client's own, kept in rest."""
        parser = ProxyHeaderParser()

        parser.feed(b"PROXY UNKNOWN\r\nUSER alice\r\n")

        assert b"USER alice\r\n" == parser.rest


class TestVersion2:
    """The binary header (proxy-protocol.txt §2.2)."""

    def test_tcp4(self):
        """A TCP over IPv4 PROXY header gives both addresses and ports."""
        header = parse(build.v2_tcp("203.0.113.7", "192.0.2.1", 50123, 995))

        assert (2, "PROXY") == (header.version, header.command)
        assert ("203.0.113.7", 50123) == header.source
        assert ("192.0.2.1", 995) == header.destination
        assert 28 == header.length

    def test_tcp6(self):
        """A TCP over IPv6 PROXY header gives both addresses and ports."""
        header = parse(build.v2_tcp("2001:db8::7", "2001:db8::1", 1, 110))

        assert (("2001:db8::7", 1), ("2001:db8::1", 110)) == (header.source, header.destination)
        assert 52 == header.length

    def test_local(self):
        """LOCAL (a health check) names no address, whatever its block holds (§2.2)."""
        _, block = build.addresses("1.2.3.4", "5.6.7.8", 1, 2)

        header = parse(build.v2(0, 0x11, block))

        assert ("LOCAL", None, None) == (header.command, header.source, header.destination)

    def test_local_with_any_family(self):
        """LOCAL's family octet is ignored, even one no PROXY header may carry."""
        assert "LOCAL" == parse(build.v2(0, 0x77)).command

    @pytest.mark.parametrize("family", [0x00, 0x31])
    def test_unspec_and_unix(self, family):
        """AF_UNSPEC and AF_UNIX give no address: the connection's own endpoints stand."""
        block = b"\x00" * (216 if family == 0x31 else 0)

        assert parse(build.v2(1, family, block)).source is None

    @pytest.mark.parametrize("family", [0x12, 0x22])
    def test_udp(self, family):
        """UDP is refused: POP3 and LMTP run over TCP."""
        _, block = build.addresses("1.2.3.4", "5.6.7.8", 1, 2)

        assert error(build.v2(1, family, block)).startswith("Not using TCP")

    @pytest.mark.parametrize("family", [0x01, 0x10, 0x13, 0x41, 0xFF])
    def test_unknown_family(self, family):
        """Families and protocols §2.2 does not list are refused."""
        assert error(build.v2(1, family, b"\x00" * 36)).startswith("Unknown address family")

    @pytest.mark.parametrize("version", [1, 3, 0])
    def test_version(self, version):
        """Only version 2 is accepted in the binary format."""
        with pytest.raises(ProxyHeaderError) as info:
            ProxyHeaderParser().feed(build.v2(version=version)[:13])

        assert info.value.reason.startswith("Unsupported protocol version")

    def test_command(self):
        """Commands other than LOCAL and PROXY are refused at the 13th octet."""
        assert "Invalid command (cmd=02)" == error(build.v2(2)[:13])

    def test_address_block_too_short(self):
        """A length shorter than the family's address block is refused."""
        assert "Address block is incomplete" == error(build.v2(1, 0x21, b"\x00" * 35))

    def test_too_long(self):
        """A length over 4096 octets in all is refused at the 16th octet."""
        assert "Header is longer than 4096 octets" == error(build.v2(1, 0x00, length=4081))

    def test_longest(self):
        """A header of exactly 4096 octets is accepted."""
        padding = build.tlv(build.NOOP, b"\x00" * (4096 - 16 - 3))

        assert 4096 == parse(build.v2(1, 0x00, tlvs=padding)).length

    def test_truncated(self):
        """Until its length is all there, a header needs more data."""
        data = build.v2_tcp("1.2.3.4", "5.6.7.8", 1, 2)
        parser = ProxyHeaderParser()

        assert NEED_DATA is parser.feed(data[:-1])
        assert ("1.2.3.4", 1) == parser.feed(data[-1:]).source  # type: ignore[union-attr]

    @pytest.mark.parametrize("index", range(12))
    def test_signature_mismatch(self, index):
        """Any octet of the signature wrong is refused as soon as it arrives."""
        data = bytearray(build.v2_tcp("1.2.3.4", "5.6.7.8", 1, 2))
        data[index] ^= 0x40
        if index == 0:  # no longer starts like version 2 either
            data[0] = 0x0C

        assert "No valid proxy header found" == error(bytes(data[: index + 1]))


class TestTlvs:
    """Type-length-value fields after the addresses (§2.2.1-§2.2.8)."""

    def header(self, tlvs: bytes) -> ProxyHeader:
        """Parse a TCP4 PROXY header carrying ``tlvs``."""
        return parse(build.v2_tcp("203.0.113.7", "192.0.2.1", 1, 110, tlvs))

    def test_ssl(self):
        """The SSL TLV gives the client bits, verify, version, CN and cipher."""
        tlvs = build.ssl_tlv(7, 0, version="TLSv1.3", cn="alice", cipher="TLS_AES_256_GCM_SHA384")

        assert SslInfo(7, 0, "TLSv1.3", "alice", "TLS_AES_256_GCM_SHA384") == self.header(tlvs).ssl

    def test_unknown_ssl_sub_tlv_is_skipped(self):
        """A sub-TLV pobox does not use (0x25, the key algorithm) is passed over."""
        body = struct.pack("!BI", 1, 0) + build.tlv(0x25, b"RSA2048") + build.tlv(0x22, b"bob")
        assert SslInfo(1, 0, None, "bob", None) == self.header(build.tlv(0x20, body)).ssl

    def test_need_data_names_itself(self):
        """The NEED_DATA sentinel shows its name in a repr (test output, logs)."""
        assert "NEED_DATA" == repr(NEED_DATA)

    @pytest.mark.parametrize(
        ("client", "verify", "expected"),
        [
            (build.CLIENT_SSL | build.CERT_CONN, 0, "alice"),
            (build.CLIENT_SSL | build.CERT_SESS, 0, "alice"),
            (build.CLIENT_SSL | build.CERT_CONN | build.CERT_SESS, 0, "alice"),
            (build.CLIENT_SSL, 0, None),  # no certificate: HAProxy leaves verify at 0
            (build.CLIENT_SSL | build.CERT_CONN, 20, None),  # X509_V_ERR_..._LOCAL_ISSUER
            (build.CERT_CONN | build.CERT_SESS, 0, None),  # not over TLS at all
        ],
    )
    def test_verified_cn(self, client, verify, expected):
        """The CN counts only for a certificate presented over TLS and verified."""
        ssl = self.header(build.ssl_tlv(client, verify, version="TLSv1.3", cn="alice")).ssl

        assert ssl is not None
        assert expected == ssl.verified_cn

    def test_verified_without_cn(self):
        """A verified certificate without a CN TLV names no one."""
        ssl = self.header(build.ssl_tlv(3, 0, version="TLSv1.3")).ssl

        assert ssl is not None
        assert ssl.verified_cn is None

    @pytest.mark.parametrize(("client", "expected"), [(1, True), (0, False), (6, False)])
    def test_client_ssl(self, client, expected):
        """The client reached the proxy over TLS exactly when PP2_CLIENT_SSL is set."""
        ssl = self.header(build.ssl_tlv(client)).ssl

        assert ssl is not None
        assert expected == ssl.client_ssl

    def test_other_tlvs_kept(self):
        """TLVs pobox does not read are kept, in order, with their values."""
        tlvs = build.tlv(build.ALPN, b"pop3") + build.tlv(build.UNIQUE_ID, b"id-1")
        tlvs += build.tlv(0xE0, b"") + build.tlv(build.AUTHORITY, b"mail.example.org")

        header = self.header(tlvs)

        expected = ((1, b"pop3"), (5, b"id-1"), (0xE0, b""), (2, b"mail.example.org"))
        assert expected == header.tlvs
        assert header.ssl is None

    @pytest.mark.parametrize(
        ("tlvs", "reason"),
        [
            (b"\x20", "TLV is truncated"),
            (b"\x20\x00", "TLV is truncated"),
            (b"\x20\x00\x05\x01\x00", "TLV is truncated"),
            (build.tlv(build.SSL, b"\x01\x00\x00\x00"), "SSL TLV is shorter than 5 octets"),
            (build.ssl_tlv(1) + build.ssl_tlv(1), "More than one SSL TLV"),
            (build.tlv(build.SSL, b"\x01\x00\x00\x00\x00\x21\x00\x09TLS"), "TLV is truncated"),
            (
                build.tlv(build.SSL, b"\x03\x00\x00\x00\x00\x22\x00\x01\xff"),
                "SSL sub-TLV 22 is not text",
            ),
            (
                build.tlv(build.SSL, b"\x03\x00\x00\x00\x00\x21\x00\x01\xe9"),
                "SSL sub-TLV 21 is not text",
            ),
        ],
    )
    def test_malformed(self, tlvs, reason):
        """A TLV that does not fit, or an SSL TLV out of shape, is refused."""
        with pytest.raises(ProxyHeaderError) as info:
            self.header(tlvs)

        assert reason == info.value.reason

    def test_crc32c_check_value(self):
        """CRC-32C of "123456789" is RFC 3720's check value, 0xE3069283."""
        assert 0xE3069283 == crc32c(b"123456789")

    def test_crc32c_accepted(self):
        """A header whose CRC32C TLV matches is accepted; the TLV is not kept."""
        data = build.with_crc32c(build.v2_tcp("203.0.113.7", "192.0.2.1", 1, 110))

        header = parse(data)

        assert (("203.0.113.7", 1), ()) == (header.source, header.tlvs)

    @pytest.mark.parametrize("index", [16, 20, 27, -1])
    def test_crc32c_mismatch(self, index):
        """One bit changed anywhere, the checksum included, and the header is refused."""
        data = bytearray(build.with_crc32c(build.v2_tcp("203.0.113.7", "192.0.2.1", 1, 110)))
        data[index] ^= 0x01

        assert "CRC32C checksum does not match" == error(bytes(data))

    def test_crc32c_length(self):
        """A CRC32C TLV of other than 4 octets is refused."""
        assert "CRC32C TLV is not 4 octets" == error(
            build.v2_tcp("1.2.3.4", "5.6.7.8", 1, 2, build.tlv(build.CRC32C, b"\x00\x00\x00"))
        )


class TestGarbage:
    """Bytes that are no header at all."""

    @pytest.mark.parametrize(
        "data",
        [b"USER alice\r\n", b"\x16\x03\x01\x02\x00\x01", b"P\x00", b"PROXX", b"PROXY\r\n", b"\x00"],
    )
    def test_refused_early(self, data):
        """A POP3 command, a TLS ClientHello, or a near miss is refused at the first wrong octet."""
        assert "No valid proxy header found" == error(data)

    def test_nothing_yet(self):
        """No bytes yet is no verdict yet."""
        assert NEED_DATA is ProxyHeaderParser().feed(b"")


class TestWanted:
    """How many octets may be read without reading past the header."""

    def test_first_read(self):
        """Before anything arrives: 15, the shortest header (PROXY UNKNOWN CRLF)."""
        assert 15 == ProxyHeaderParser().wanted

    def test_version2_reads_its_length(self):
        """Once the 16-octet preamble is in, version 2 asks for exactly the rest."""
        data = build.v2_tcp("1.2.3.4", "5.6.7.8", 1, 2, build.ssl_tlv(1, version="TLSv1.3"))
        parser = ProxyHeaderParser()
        parser.feed(data[:15])

        assert 1 == parser.wanted
        parser.feed(data[15:16])
        assert len(data) - 16 == parser.wanted

    def test_version1_shortest_line(self):
        """After "PROXY TCP4 " the line is at least 32 octets long."""
        parser = ProxyHeaderParser()
        parser.feed(b"PROXY TCP4 1.2")

        assert 32 - 14 == parser.wanted

    @pytest.mark.parametrize(("fed", "expected"), [(b"1", 2), (b"1\r", 1)])
    def test_version1_tail(self, fed, expected):
        """Past the shortest line: two octets at a time, one after a CR."""
        parser = ProxyHeaderParser()
        parser.feed(b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 100" + fed)

        assert expected == parser.wanted

    def test_after_the_header(self):
        """Once the header is complete every further octet is the client's."""
        parser = ProxyHeaderParser()
        header = parser.feed(b"PROXY UNKNOWN\r\n")

        assert 1 == parser.wanted
        assert header is parser.feed(b"CAPA\r\n")
        assert b"CAPA\r\n" == parser.rest


class TestStartsLikeHeader:
    """Spotting a header where none may be sent."""

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nUSER a\r\n", True),
            (build.v2_tcp("1.2.3.4", "5.6.7.8", 1, 2), True),
            (build.v2(0), True),
            (b"PROXYUSER\r\n", False),
            (b"PRO", False),
            (b"USER PROXY \r\n", False),
            (b"\r\n\r\n\x00\r\nQUI", False),
            (b"", False),
        ],
    )
    def test_starts_like_header(self, data, expected):
        """Only a whole "PROXY " or version 2 signature at the very start counts."""
        assert expected == starts_like_header(data)
