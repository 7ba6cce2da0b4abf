"""AUTH and APOP in :class:`pobox.protocol.ServerConnection`: bytes in, events and bytes out."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest

from pobox.protocol import (
    NEED_DATA,
    PAUSED,
    AuthenticateUser,
    ConnectionClosed,
    FetchSecret,
    LocalProtocolError,
    LoginAccepted,
    LoginFailed,
    LoginRejected,
    OpenMaildrop,
    ScramKeys,
    Secret,
    SecretFound,
    ServerConnection,
    State,
    Trace,
    VerifyToken,
)
from tests.protocol.helpers import run

ALL = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "EXTERNAL", "OAUTHBEARER"]


def fresh(**kwargs: Any) -> ServerConnection:
    """A connection offering every mechanism, greeting taken, with a fixed nonce."""
    kwargs.setdefault("sasl_mechanisms", ALL)
    kwargs.setdefault("sasl_nonce", lambda: "NONCE")
    kwargs.setdefault("hostname", "pop.example")
    conn = ServerConnection(**kwargs)
    run(conn)
    return conn


class TestAuthCommand:
    """AUTH without an exchange: listing, refusals, bad arguments."""

    def test_list_mechanisms(self):
        """AUTH alone lists the mechanisms, one per line."""
        _, out = run(fresh(sasl_mechanisms=["PLAIN", "SCRAM-SHA-256"]), b"AUTH\r\n")

        assert b"+OK\r\nPLAIN\r\nSCRAM-SHA-256\r\n.\r\n" == out

    def test_capa_lists_sasl(self):
        """CAPA shows SASL with the mechanisms before login."""
        _, out = run(fresh(sasl_mechanisms=["PLAIN", "LOGIN"]), b"CAPA\r\n")

        assert b"SASL PLAIN LOGIN\r\n" in out

    def test_capa_hides_plaintext_mechanisms(self):
        """Where plaintext logins are disallowed CAPA leaves PLAIN and LOGIN out."""
        _, out = run(
            fresh(sasl_mechanisms=["PLAIN", "SCRAM-SHA-256"], user_enabled=False), b"CAPA\r\n"
        )

        assert b"SASL SCRAM-SHA-256\r\n" in out
        assert b"PLAIN" not in out

    def test_no_mechanisms(self):
        """Without mechanisms AUTH is not available."""
        _, out = run(fresh(sasl_mechanisms=[]), b"AUTH PLAIN\r\n")

        assert b"-ERR Command not available.\r\n" == out

    def test_unknown_mechanism(self):
        """An unoffered mechanism is refused."""
        _, out = run(fresh(sasl_mechanisms=["PLAIN"]), b"AUTH CRAM-MD5\r\n")

        assert b"-ERR Unsupported authentication mechanism.\r\n" == out

    def test_plaintext_disallowed(self):
        """AUTH PLAIN is refused like USER where plaintext logins are disallowed."""
        conn = fresh(user_enabled=False)
        _, out = run(conn, b"AUTH PLAIN AHRpbQB0YW5zdGFhZg==\r\n")

        assert (
            b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections.\r\n" == out
        )
        assert State.AUTHORIZATION == conn.state

    def test_bad_initial_response(self):
        """Malformed base64 in the initial response gets -ERR."""
        _, out = run(fresh(), b"AUTH PLAIN AHRpbQ!!\r\n")

        assert b"-ERR Invalid base64 data in initial response.\r\n" == out

    def test_after_login(self):
        """AUTH is refused in TRANSACTION."""
        conn = fresh()
        run(conn, b"AUTH PLAIN AHRpbQB0YW5zdGFhZg==\r\n")
        conn.send(LoginAccepted([]))
        run(conn)
        _, out = run(conn, b"AUTH PLAIN\r\n")

        assert b"-ERR Already logged in.\r\n" == out


class TestPlainExchange:
    """AUTH PLAIN with and without an initial response."""

    def test_initial_response(self):
        """An initial response asks the shell to check the password."""
        events, out = run(fresh(), b"AUTH PLAIN AHRpbQB0YW5zdGFhZg==\r\n")

        assert [AuthenticateUser("tim", b"tanstaaf", "PLAIN"), PAUSED] == events
        assert b"" == out

    def test_accepted(self):
        """The shell's LoginAccepted logs in."""
        conn = fresh()
        run(conn, b"AUTH PLAIN AHRpbQB0YW5zdGFhZg==\r\n")
        conn.send(LoginAccepted([]))
        _, out = run(conn)

        assert b"+OK Logged in.\r\n" == out
        assert "tim" == conn.username

    def test_continuation(self):
        """Without an initial response the server sends an empty challenge, "+ "."""
        conn = fresh()
        _, out = run(conn, b"AUTH PLAIN\r\n")
        assert b"+ \r\n" == out
        assert State.SASL == conn.state

        events, _ = run(conn, b"AHRpbQB0YW5zdGFhZg==\r\n")
        assert [AuthenticateUser("tim", b"tanstaaf", "PLAIN"), PAUSED] == events

    def test_empty_initial_response(self):
        """ "=" is an empty initial response, which PLAIN rejects as malformed."""
        events, _ = run(fresh(), b"AUTH PLAIN =\r\n")

        assert [LoginFailed(None, "PLAIN", "malformed PLAIN message"), PAUSED] == events

    def test_rejected(self):
        """LoginRejected answers -ERR [AUTH] and returns to AUTHORIZATION."""
        conn = fresh()
        run(conn, b"AUTH PLAIN AHRpbQB4\r\n")
        conn.send(LoginRejected())
        _, out = run(conn)

        assert b"-ERR [AUTH] Authentication failed.\r\n" == out
        assert State.AUTHORIZATION == conn.state

    def test_cancel(self):
        """ "*" cancels the exchange."""
        conn = fresh()
        run(conn, b"AUTH PLAIN\r\n")
        _, out = run(conn, b"*\r\n")

        assert b"-ERR Authentication aborted by client.\r\n" == out
        assert State.AUTHORIZATION == conn.state

    def test_bad_base64_response(self):
        """A malformed continuation gets -ERR, not an exception."""
        conn = fresh()
        run(conn, b"AUTH PLAIN\r\n")
        _, out = run(conn, b"not base64!\r\n")

        assert b"-ERR Invalid base64 data in continued response.\r\n" == out
        assert State.AUTHORIZATION == conn.state

    def test_long_response_allowed(self):
        """A response longer than 255 octets is accepted during AUTH (RFC 5034 §4)."""
        conn = fresh()
        run(conn, b"AUTH PLAIN\r\n")
        response = base64.b64encode(b"\0tim\0" + b"p" * 1000)
        events, _ = run(conn, response + b"\r\n")

        assert [AuthenticateUser("tim", b"p" * 1000, "PLAIN"), PAUSED] == events

    def test_oversized_response(self):
        """A response over 8 KiB gets -ERR and the command limit is back afterwards."""
        conn = fresh()
        run(conn, b"AUTH PLAIN\r\n")
        _, out = run(conn, b"A" * 10000 + b"\r\n")
        assert b"-ERR Authentication response too long.\r\n" == out

        _, out = run(conn, b"NOOP " + b"x" * 300 + b"\r\n")
        assert b"-ERR Line too long.\r\n" == out

    def test_trace_masks_responses(self):
        """The trace shows neither the initial response nor continuations."""
        conn = fresh(trace=True)
        events, _ = run(conn, b"AUTH LOGIN dGlt\r\n")
        events += run(conn, b"c2VjcmV0\r\n")[0]

        lines = [e.line for e in events if isinstance(e, Trace) and e.direction == "C"]
        assert ["AUTH LOGIN ***", "<SASL response>"] == lines


class TestLoginExchange:
    """AUTH LOGIN."""

    def test_exchange(self):
        """Username: and Password: challenges, base64-encoded."""
        conn = fresh()
        _, out = run(conn, b"AUTH LOGIN\r\n")
        assert b"+ VXNlcm5hbWU6\r\n" == out
        _, out = run(conn, b"dGlt\r\n")
        assert b"+ UGFzc3dvcmQ6\r\n" == out
        events, _ = run(conn, b"c2VjcmV0\r\n")
        assert [AuthenticateUser("tim", b"secret", "LOGIN"), PAUSED] == events


def scram_as_tim(mechanism: str) -> ServerConnection:
    """A connection in a SCRAM exchange as tim, the server-first sent (decoy keys)."""
    conn = fresh()
    run(conn, f"AUTH {mechanism} ".encode() + base64.b64encode(b"n,,n=tim,r=abc") + b"\r\n")
    hash_name = "sha256" if mechanism == "SCRAM-SHA-256" else "sha1"
    conn.send(SecretFound(Secret(scram=ScramKeys(hash_name, 4096, b"s" * 16, b"", b""))))
    run(conn)
    return conn


class TestAbortAfterAUser:
    """An exchange broken off once the client named a user is a failed login (RFC 5034 §4 "*")."""

    def test_scram_abort_after_client_first(self):
        """'*' after SCRAM's server-first asks the shell to fail the login as tim."""
        conn = scram_as_tim("SCRAM-SHA-256")
        events, out = run(conn, b"*\r\n")

        assert ([LoginFailed("tim", "SCRAM-SHA-256", "Authentication aborted by client."),
                 PAUSED], b"") == (events, out)  # fmt: skip
        conn.send(LoginRejected())
        assert (b"-ERR [AUTH] Authentication failed.\r\n", State.AUTHORIZATION) == (
            run(conn)[1],
            conn.state,
        )

    def test_login_abort_after_user_name(self):
        """'*' instead of LOGIN's password fails the login of the user named."""
        conn = fresh()
        run(conn, b"AUTH LOGIN " + base64.b64encode(b"tim") + b"\r\n")
        events, _ = run(conn, b"*\r\n")

        assert [LoginFailed("tim", "LOGIN", "Authentication aborted by client."), PAUSED] == events

    def test_garbage_after_user_name(self):
        """Malformed base64 after SCRAM's client-first fails the login too, not a bad command."""
        events, _ = run(scram_as_tim("SCRAM-SHA-1"), b"!!\r\n")

        assert [
            LoginFailed("tim", "SCRAM-SHA-1", "Invalid base64 data in continued response."),
            PAUSED,
        ] == events

    def test_abort_before_any_user_is_free(self):
        """'*' before a user is named ends the exchange with -ERR and no event."""
        conn = fresh()
        run(conn, b"AUTH SCRAM-SHA-256\r\n")
        events, out = run(conn, b"*\r\n")

        assert ([NEED_DATA], b"-ERR Authentication aborted by client.\r\n") == (events, out)

    def test_oauthbearer_rejection_not_counted_twice(self):
        """After a rejected token, '*' to the error challenge ends it with no second failure."""
        conn = fresh()
        message = b"n,a=tim,\x01auth=Bearer tok\x01\x01"
        run(conn, b"AUTH OAUTHBEARER " + base64.b64encode(message) + b"\r\n")
        conn.send(LoginRejected())
        run(conn)
        events, out = run(conn, b"*\r\n")

        assert ([NEED_DATA], b"-ERR [AUTH] Authentication failed.\r\n") == (events, out)


class TestCramMD5Exchange:
    """AUTH CRAM-MD5 through the connection, with the RFC 2195 numbers."""

    def test_exchange(self):
        """Challenge, response, secret, then the maildrop is opened."""
        conn = fresh()
        _, out = run(conn, b"AUTH CRAM-MD5\r\n")
        assert b"+ PE5PTkNFQHBvcC5leGFtcGxlPg==\r\n" == out  # <NONCE@pop.example>

        digest = hmac.digest(b"tanstaaftanstaaf", b"<NONCE@pop.example>", "md5").hex()
        events, _ = run(conn, base64.b64encode(b"tim " + digest.encode()) + b"\r\n")
        assert [FetchSecret("tim", "CRAM-MD5"), PAUSED] == events

        conn.send(SecretFound(Secret(password=b"tanstaaftanstaaf")))
        events, _ = run(conn)
        assert [OpenMaildrop("tim", "CRAM-MD5"), PAUSED] == events

    def test_unknown_user(self):
        """No secret for the user: LoginFailed for the shell to log and delay."""
        conn = fresh()
        run(conn, b"AUTH CRAM-MD5\r\n")
        run(conn, b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n")
        conn.send(SecretFound(None))
        events, _ = run(conn)

        assert [
            LoginFailed("tim", "CRAM-MD5", "no CRAM-MD5 credentials for the user"),
            PAUSED,
        ] == events


class TestScramExchange:
    """AUTH SCRAM-SHA-256 with the RFC 7677 §3 exchange, the nonce injected."""

    def test_rfc7677_over_pop3(self):
        """The RFC's messages, base64 on the wire; the server-final is a last challenge."""

        conn = fresh(sasl_nonce=lambda: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        events, _ = run(
            conn,
            b"AUTH SCRAM-SHA-256 "
            + base64.b64encode(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            + b"\r\n",
        )
        assert [FetchSecret("user", "SCRAM-SHA-256"), PAUSED] == events

        salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
        salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
        keys = ScramKeys(
            "sha256",
            4096,
            salt,
            hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest(),
            hmac.digest(salted, b"Server Key", "sha256"),
        )
        conn.send(SecretFound(Secret(scram=keys)))
        _, out = run(conn)
        assert (
            b"+ "
            + base64.b64encode(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
            )
            + b"\r\n"
        ) == out

        final = (
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        )
        _, out = run(conn, base64.b64encode(final) + b"\r\n")
        assert (
            b"+ " + base64.b64encode(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=") + b"\r\n"
            == out
        )

        events, _ = run(conn, b"\r\n")
        assert [OpenMaildrop("user", "SCRAM-SHA-256"), PAUSED] == events


class TestExternalExchange:
    """AUTH EXTERNAL with the identity the shell set."""

    def test_identity(self):
        """A verified identity and an empty authzid open that user's maildrop."""
        conn = fresh()
        conn.external_identity = "tim"

        events, _ = run(conn, b"AUTH EXTERNAL =\r\n")

        assert [OpenMaildrop("tim", "EXTERNAL"), PAUSED] == events

    def test_no_certificate(self):
        """Without an identity EXTERNAL fails."""
        events, _ = run(fresh(), b"AUTH EXTERNAL =\r\n")

        assert [LoginFailed(None, "EXTERNAL", "no verified client certificate"), PAUSED] == events


class TestOAuthBearerExchange:
    """AUTH OAUTHBEARER: the token goes to the shell; a rejection gets the error challenge."""

    RESPONSE = b"bixhPXRpbSwBYXV0aD1CZWFyZXIgdG9rAQE="  # n,a=tim,^Aauth=Bearer tok^A^A

    def test_rejected_token(self):
        """A rejected token gets a JSON error challenge, then -ERR after the client's ^A."""
        conn = fresh()
        events, _ = run(conn, b"AUTH OAUTHBEARER " + self.RESPONSE + b"\r\n")
        assert [VerifyToken("tim", "tok", "OAUTHBEARER"), PAUSED] == events

        conn.send(LoginRejected())
        _, out = run(conn)
        assert (
            b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NoZW1lcyI6ImJlYXJlciIs"
            b"InNjb3BlIjoicG9wIn0=\r\n" == out
        )
        _, out = run(conn, b"AQ==\r\n")
        assert b"-ERR [AUTH] Authentication failed.\r\n" == out
        assert State.AUTHORIZATION == conn.state


class TestApop:
    """APOP (RFC 1939 §7)."""

    def test_greeting_carries_timestamp(self):
        """With a timestamp the greeting ends with it."""
        conn = ServerConnection(apop_timestamp="<1896.697170952@dbc.mtview.ca.us>")

        assert b"+OK pobox ready. <1896.697170952@dbc.mtview.ca.us>\r\n" == run(conn)[1]

    def test_no_timestamp_by_default(self):
        """Without APOP the greeting has no timestamp and APOP is not available."""
        conn = ServerConnection()
        assert b"+OK pobox ready.\r\n" == run(conn)[1]

        _, out = run(conn, b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n")
        assert b"-ERR Command not available.\r\n" == out

    def test_rfc1939_example(self):
        """The RFC's APOP command verifies against the secret "tanstaaf"."""
        conn = fresh(apop_timestamp="<1896.697170952@dbc.mtview.ca.us>")
        events, _ = run(conn, b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n")
        assert [FetchSecret("mrose", "APOP"), PAUSED] == events

        conn.send(SecretFound(Secret(password=b"tanstaaf")))
        events, _ = run(conn)
        assert [OpenMaildrop("mrose", "APOP"), PAUSED] == events

    def test_wrong_digest(self):
        """A wrong digest is a LoginFailed, answered like a wrong password."""
        conn = fresh(apop_timestamp="<1896.697170952@dbc.mtview.ca.us>")
        run(conn, b"APOP mrose 00000000000000000000000000000000\r\n")
        conn.send(SecretFound(Secret(password=b"tanstaaf")))
        events, _ = run(conn)
        assert [LoginFailed("mrose", "APOP", "wrong APOP digest"), PAUSED] == events

        conn.send(LoginRejected())
        assert b"-ERR [AUTH] Authentication failed.\r\n" == run(conn)[1]

    @pytest.mark.parametrize("line", [b"APOP mrose", b"APOP mrose abc", b"APOP a b c"])
    def test_bad_arguments(self, line):
        """APOP needs a name and a 32-character digest."""
        _, out = run(fresh(apop_timestamp="<1.2@h>"), line + b"\r\n")

        assert b"-ERR APOP takes two arguments: a user name and an MD5 digest.\r\n" == out


class TestNoExceptions:
    """Nothing a client sends during AUTH raises."""

    @pytest.mark.parametrize(
        "lines",
        [
            [b"AUTH SCRAM-SHA-256 bixuPQ==", b""],
            [b"AUTH SCRAM-SHA-1", b"eCx5LHo=", b"*"],
            [b"AUTH LOGIN", b"", b""],
            [b"AUTH XOAUTH2 =", b""],
            [b"AUTH CRAM-MD5 dGlt"],
            [b"AUTH PLAIN", b"="],
            [b"AUTH OAUTHBEARER", b"/w=="],
        ],
    )
    def test_garbage(self, lines):
        """Odd exchanges end in events or -ERR, never an exception."""
        conn = fresh(sasl_mechanisms=[*ALL, "XOAUTH2"])
        for line in lines:
            events, _ = run(conn, line + b"\r\n")
            for event in events:
                if isinstance(event, LoginFailed | AuthenticateUser | FetchSecret):
                    conn.send(LoginRejected())
                    run(conn)
        assert conn.state in (State.AUTHORIZATION, State.SASL)


class TestBadResponses:
    """Garbage during AUTH counts as bad commands; framing does not depend on how bytes arrive."""

    def test_garbage_closes_after_max_bad_commands(self):
        """Malformed base64 responses count towards max_bad_commands."""
        conn = fresh(max_bad_commands=2)
        run(conn, b"AUTH PLAIN\r\n!!\r\n")
        events, out = run(conn, b"AUTH PLAIN\r\n!!\r\n")

        assert b"+ \r\n-ERR Too many bad commands.\r\n" == out
        assert ConnectionClosed("too-many-bad-commands") == events[-1]

    def test_byte_at_a_time(self):
        """An AUTH LOGIN exchange fed one byte at a time gives the same output as whole."""
        data = b"AUTH LOGIN\r\ndGlt\r\nc2VjcmV0\r\n"
        whole = fresh()
        whole_events, whole_out = run(whole, data)
        split = fresh()
        split_out = b""
        split_events: list[object] = []
        for i in range(len(data)):
            events, out = run(split, data[i : i + 1])
            split_out += out
            split_events += [e for e in events if e is not NEED_DATA]

        assert whole_out == split_out
        assert [e for e in whole_events if e is not NEED_DATA] == split_events


class TestShellMistakes:
    """A shell answering the wrong event is an error of the shell, or a failed login."""

    def test_secret_found_unasked(self):
        """SecretFound outside an exchange raises LocalProtocolError."""
        with pytest.raises(LocalProtocolError):
            fresh().send(SecretFound(None))

    def test_secret_found_for_a_password_check(self):
        """SecretFound in answer to a password check fails the login."""
        conn = fresh()
        run(conn, b"AUTH PLAIN AHRpbQB4\r\n")
        conn.send(SecretFound(None))

        assert [LoginFailed(None, "PLAIN", "no secret expected"), PAUSED] == run(conn)[0]

    def test_unknown_mechanism_configured(self):
        """An unknown mechanism name is refused at construction."""
        with pytest.raises(ValueError, match="unknown SASL mechanisms"):
            ServerConnection(sasl_mechanisms=["GSSAPI"])

    def test_too_many_arguments(self):
        """AUTH with three arguments is a bad command."""
        _, out = run(fresh(), b"AUTH PLAIN a b\r\n")

        assert b"-ERR AUTH takes a mechanism and an optional initial response.\r\n" == out

    def test_apop_user_not_utf8(self):
        """An APOP user name that is not UTF-8 is a bad command."""
        _, out = run(fresh(apop_timestamp="<1@h>"), b"APOP \xff " + b"0" * 32 + b"\r\n")

        assert b"-ERR User name is not valid UTF-8.\r\n" == out

    def test_capa_all_plaintext_hidden(self):
        """With only plaintext mechanisms and plaintext disallowed, CAPA has no SASL line."""
        _, out = run(fresh(sasl_mechanisms=["PLAIN"], user_enabled=False), b"CAPA\r\n")

        assert b"SASL" not in out
