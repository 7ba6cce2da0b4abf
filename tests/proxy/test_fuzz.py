"""Properties of the PROXY header parser over generated, mutated and random input.

Like h11's fuzzer: the same bytes fed whole or one octet at a time give the same outcome, and
nothing but ProxyHeaderError ever escapes.  And a reader that asks for ``wanted`` octets at
a time never takes one past a valid header, so TLS may start right after it.
"""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from pobox.proxy import NEED_DATA, ProxyHeader, ProxyHeaderError, ProxyHeaderParser

from . import build


def octets(max_size: int, min_size: int = 0) -> st.SearchStrategy[bytes]:
    """Any bytes, drawn as integers (st.binary() trips python -bb inside Hypothesis's cache,
    see tests/protocol/test_properties.py)."""
    return st.lists(st.integers(0, 255), min_size=min_size, max_size=max_size).map(bytes)


ports = st.integers(0, 65535)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))


@st.composite
def v1_headers(draw: st.DrawFn) -> bytes:
    """Valid version 1 lines."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN", "UNKNOWN-short"]))
    if kind == "UNKNOWN-short":
        return build.v1("UNKNOWN")
    addresses = ipv4 if kind == "TCP4" else ipv6
    src, dst = draw(addresses), draw(addresses)
    return build.v1(kind, src, dst, draw(ports), draw(ports))


@st.composite
def v2_headers(draw: st.DrawFn) -> bytes:
    """Valid version 2 headers, with TLVs and sometimes a CRC32C."""
    tlvs = b"".join(
        draw(
            st.lists(
                st.one_of(
                    st.builds(
                        build.ssl_tlv,
                        st.integers(0, 7),
                        st.integers(0, 2**32 - 1),
                        version=st.sampled_from(["TLSv1.2", "TLSv1.3"]),
                        cn=st.text(min_size=1, max_size=20),
                    ),
                    st.builds(
                        build.tlv,
                        st.sampled_from([1, 2, 4, 5, 0x30, 0xE0, 0xF0]),
                        octets(40),
                    ),
                ),
                max_size=3,
                unique_by=lambda t: t[0] if t[0] == build.SSL else t,
            )
        )
    )
    command = draw(st.sampled_from(["v4", "v6", "local", "unspec"]))
    if command == "local":
        header = build.v2(0, 0x00, b"", tlvs)
    elif command == "unspec":
        header = build.v2(1, 0x00, b"", tlvs)
    else:
        addresses = ipv4 if command == "v4" else ipv6
        header = build.v2_tcp(draw(addresses), draw(addresses), draw(ports), draw(ports), tlvs)
    if command != "local" and draw(st.booleans()):
        header = build.with_crc32c(header)
    return header


valid = st.one_of(v1_headers(), v2_headers())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid header with one octet changed, some cut off, or some inserted."""
    data = bytearray(draw(valid))
    index = draw(st.integers(0, len(data) - 1))
    how = draw(st.sampled_from(["flip", "cut", "insert"]))
    if how == "flip":
        data[index] ^= draw(st.integers(1, 255))
    elif how == "cut":
        del data[index:]
    else:
        data[index:index] = draw(octets(4, min_size=1))
    return bytes(data) + draw(octets(8))


anything = st.one_of(
    valid.flatmap(lambda h: octets(20).map(lambda rest: h + rest)),
    mutated(),
    octets(200),
    octets(120).map(lambda b: b"PROXY " + b),
    octets(120).map(lambda b: build.SIGNATURE + b),
)


def outcome(chunks: list[bytes]) -> tuple[object, ...]:
    """Feed ``chunks`` in order; describe what came of it."""
    parser = ProxyHeaderParser()
    result: object = NEED_DATA
    try:
        for chunk in chunks:
            result = parser.feed(chunk)
    except ProxyHeaderError as exc:
        return ("error", exc.reason, exc.version)
    if result is NEED_DATA:
        return ("need-data",)
    return ("header", result, parser.rest)


class TestSplitting:
    """How the bytes are split does not change the outcome."""

    @settings(max_examples=500)
    @given(anything)
    def test_whole_or_one_octet_at_a_time(self, data):
        """Fed whole or one octet at a time, the same header, rest, or error."""
        assert outcome([data]) == outcome([data[i : i + 1] for i in range(len(data))])

    @settings(max_examples=300)
    @given(anything, st.lists(st.integers(1, 50), min_size=1))
    def test_any_split(self, data, sizes):
        """Fed in chunks of any sizes, the same outcome as whole."""
        chunks, pos = [], 0
        while pos < len(data):
            size = sizes[len(chunks) % len(sizes)]
            chunks.append(data[pos : pos + size])
            pos += size

        assert outcome([data]) == outcome(chunks)


class TestReadingWhatIsWanted:
    """A reader taking ``wanted`` octets at a time stops exactly at the header's end."""

    @settings(max_examples=500)
    @given(valid, octets(64, min_size=1))
    def test_never_past_the_header(self, header, after):
        """Reading as asked, the header is complete with no byte of what follows taken."""
        stream = header + after
        parser = ProxyHeaderParser()
        taken = 0
        result: object = NEED_DATA
        while result is NEED_DATA:
            want = parser.wanted
            assert want >= 1
            result = parser.feed(stream[taken : taken + want])
            taken += want

        assert isinstance(result, ProxyHeader)
        assert (len(header), len(header), b"") == (taken, result.length, parser.rest)


class TestOnlyItsOwnError:
    """Nothing but ProxyHeaderError escapes, whatever the input."""

    @settings(max_examples=1000)
    @given(anything)
    def test_only_proxy_header_error(self, data):
        """Random, mutated and valid input ends in a header, NEED_DATA or ProxyHeaderError."""
        assert outcome([data])[0] in ("header", "need-data", "error")

    @given(v1_headers())
    def test_version1_bounded(self, header):
        """A version 1 line is never longer than 107 octets when accepted."""
        assert outcome([header])[0] == "header"
        assert len(header) <= 107
