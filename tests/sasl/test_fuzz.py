"""Hypothesis over AUTH and APOP: any input, split any way, gives the same events and bytes.

Nothing but the documented events and ``-ERR`` replies may come out: no exception escapes
the core whatever the client sends during a SASL exchange.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from pobox.protocol import (
    FetchSecret,
    LoginAccepted,
    LoginFailed,
    LoginRejected,
    OpenMaildrop,
    Secret,
    SecretFound,
    ServerConnection,
    VerifyToken,
)
from tests.protocol.helpers import Shell, drive, pieces

MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "EXTERNAL"]
MECHANISMS += ["OAUTHBEARER", "XOAUTH2"]


@dataclass
class SaslShell(Shell):
    """A shell that also answers the SASL events: alice/secret, stored as plaintext."""

    def answer(self, conn: ServerConnection, event: object) -> None:
        """Answer ``event`` at once."""
        if isinstance(event, FetchSecret):
            known = event.username == "alice"
            conn.send(SecretFound(Secret(password=b"secret") if known else None))
        elif isinstance(event, OpenMaildrop | VerifyToken):
            conn.send(LoginAccepted(self.messages))
        elif isinstance(event, LoginFailed):
            conn.send(LoginRejected())
        else:  # AuthenticateUser, RetrieveMessage, CommitDeletions
            super().answer(conn, event)


def b64(data: bytes) -> bytes:
    """Base64 as a client sends it."""
    return base64.b64encode(data)


LINES = st.sampled_from(
    [
        *(b"AUTH " + m.encode() for m in MECHANISMS),
        b"AUTH",
        b"AUTH PLAIN =",
        b"AUTH PLAIN " + b64(b"\0alice\0secret"),
        b"AUTH LOGIN " + b64(b"alice"),
        b"AUTH SCRAM-SHA-256 " + b64(b"n,,n=alice,r=abc"),
        b"AUTH SCRAM-SHA-1 " + b64(b"y,,n=bob,r=x"),
        b"AUTH OAUTHBEARER " + b64(b"n,a=alice,\x01auth=Bearer t\x01\x01"),
        b"AUTH XOAUTH2 " + b64(b"user=alice\x01auth=Bearer t\x01\x01"),
        b"APOP alice 0123456789abcdef0123456789abcdef",
        b64(b"alice"),
        b64(b"secret"),
        b64(b"alice 0123456789abcdef0123456789abcdef"),
        b64(b"c=biws,r=abc,p=AAAA"),
        b"*",
        b"",
        b"=",
        b"!!",
        b"AQ==",
        b"STAT",
        b"QUIT",
        b"CAPA",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(
        st.one_of(LINES, st.lists(st.integers(0, 255), max_size=40).map(bytes)), max_size=12
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
)
def test_split_input_same_result(lines: list[bytes], cuts: list[int]) -> None:
    """Any AUTH dialogue gives the same events and output whole as split at random places."""
    data = b"".join(line.replace(b"\n", b"") + b"\r\n" for line in lines)

    def connection() -> ServerConnection:
        conn = ServerConnection(
            sasl_mechanisms=MECHANISMS,
            apop_timestamp="<1.2@h>",
            sasl_nonce=lambda: "NONCE",
        )
        conn.external_identity = "alice"
        return conn

    whole = drive(connection(), [data], SaslShell())
    split = drive(connection(), pieces(data, cuts), SaslShell())

    assert whole == split
