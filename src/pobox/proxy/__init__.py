"""The PROXY protocol (HAProxy's ``send-proxy`` / ``send-proxy-v2``), sans-IO.

Public API: :class:`ProxyHeaderParser`, its results :class:`ProxyHeader` and
:class:`SslInfo`, the sentinel :data:`NEED_DATA`, :class:`ProxyHeaderError`, and
:func:`starts_like_header` for spotting a header where none may be sent.  The listeners'
asyncio side is :mod:`pobox.server._proxy`.

May import: the standard library only (no asyncio, socket, ssl or logging) and
:mod:`pobox.errors`.
"""

from __future__ import annotations

from pobox.proxy._header import (
    MAX_V1_HEADER,
    MAX_V2_HEADER,
    NEED_DATA,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    V1_PREFIX,
    V2_SIGNATURE,
    NeedData,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    SslInfo,
    crc32c,
    starts_like_header,
)

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
