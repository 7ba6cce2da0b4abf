"""RFC 6856 in the core: UTF8 (SASLprep'd credentials) and LANG (reply texts), with bytes."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pobox.protocol import (
    NEED_DATA,
    PAUSED,
    AuthenticateUser,
    DeletionsCommitted,
    FetchSecret,
    LoginAccepted,
    LoginRejected,
    ServerConnection,
    State,
    TlsStarted,
)

from .helpers import Msg, Shell, drive, logged_in, pieces, run

#: A digest of the right shape for APOP (its value does not matter before the shell checks).
DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"


def fresh(**kwargs: Any) -> ServerConnection:
    """A connection offering UTF8 and LANG, in AUTHORIZATION, greeting taken."""
    conn = ServerConnection(utf8=True, lang=True, **kwargs)
    run(conn)
    return conn


def utf8_mode(**kwargs: Any) -> ServerConnection:
    """A connection that has accepted UTF8."""
    conn = fresh(**kwargs)
    assert ([NEED_DATA], b"+OK UTF-8 mode on.\r\n") == run(conn, b"UTF8\r\n")
    return conn


def german(**kwargs: Any) -> ServerConnection:
    """A connection switched to German with ``LANG de``."""
    conn = fresh(**kwargs)
    assert ([NEED_DATA], "+OK de Sprache geändert.\r\n".encode()) == run(conn, b"LANG de\r\n")
    return conn


class TestCapa:
    """CAPA names UTF8 USER and LANG when they are offered, and only then."""

    def test_authorization(self):
        """Both are listed before login, between the others and IMPLEMENTATION."""
        _, out = run(fresh(), b"CAPA\r\n")

        assert (
            b"+OK Capability list follows\r\n"
            b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\n"
            b"UTF8 USER\r\nLANG\r\nIMPLEMENTATION pobox\r\n.\r\n"
        ) == out

    def test_transaction(self):
        """Both are still listed after login (RFC 6856: announced in both states)."""
        conn = logged_in(utf8=True, lang=True)

        _, out = run(conn, b"CAPA\r\n")

        assert (
            b"+OK Capability list follows\r\n"
            b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
            b"UTF8 USER\r\nLANG\r\nIMPLEMENTATION pobox\r\n.\r\n"
        ) == out

    @pytest.mark.parametrize("line", [b"UTF8", b"LANG", b"LANG de"])
    def test_not_offered(self, line):
        """Without the options the commands are not available."""
        conn = ServerConnection()
        run(conn)

        _, out = run(conn, line + b"\r\n")

        assert b"-ERR Command not available.\r\n" == out


class TestUtf8Command:
    """The UTF8 command (RFC 6856 §2)."""

    def test_takes_no_argument(self):
        """An argument is refused and the mode stays off."""
        conn = fresh()

        _, out = run(conn, b"UTF8 now\r\n")

        assert (b"-ERR Too many arguments.\r\n", False) == (out, conn.utf8_mode)

    def test_not_in_transaction(self):
        """UTF8 is valid in AUTHORIZATION only."""
        conn = logged_in(utf8=True)

        _, out = run(conn, b"UTF8\r\n")

        assert (b"-ERR Already logged in.\r\n", False) == (out, conn.utf8_mode)

    def test_reset_by_stls(self):
        """UTF8 and LANG sent before STLS are forgotten once TLS is up (RFC 2595 §4)."""
        conn = fresh(tls_available=True)
        run(conn, b"UTF8\r\nLANG de\r\n")

        _, out = run(conn, b"STLS\r\n")
        conn.send(TlsStarted())

        assert b"+OK TLS-Aushandlung jetzt beginnen.\r\n" == out
        assert (False, "en") == (conn.utf8_mode, conn.language)


class TestUtf8Credentials:
    """After UTF8, USER/PASS/APOP arguments are SASLprep'd query strings (RFC 4013)."""

    @pytest.mark.parametrize(
        ("given", "prepared"),
        [
            ("user", "user"),  # RFC 4013 §3 examples
            ("USER", "USER"),
            ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
            ("\u00aa", "a"),  # NFKC
            ("\u2168", "IX"),  # NFKC: ROMAN NUMERAL NINE
            ("ｊｏｓé", "josé"),  # fullwidth letters: NFKC
            ("\u0627\u0628", "\u0627\u0628"),  # right-to-left only: allowed
        ],
    )
    def test_user_prepared(self, given, prepared):
        """USER names reach the shell prepared."""
        conn = utf8_mode()

        _, out = run(conn, b"USER " + given.encode() + b"\r\n")
        events, _ = run(conn, b"PASS secret\r\n")

        assert (b"+OK\r\n", [AuthenticateUser(prepared, b"secret"), PAUSED]) == (out, events)

    @pytest.mark.parametrize(
        "given",
        [
            "\u0085x",  # a non-ASCII control character (C.2.2)
            "a\ue000",  # private use (C.3)
            "\u0627\u0031",  # RFC 4013 §3: right-to-left text ending in a digit
            "\u0627a\u0628",  # right-to-left text with a left-to-right letter
            "\u00ad",  # nothing left after mapping
        ],
    )
    def test_user_refused(self, given):
        """A USER name SASLprep refuses gets -ERR and no user is remembered."""
        conn = utf8_mode()

        _, out = run(conn, b"USER " + given.encode() + b"\r\n")
        _, after = run(conn, b"PASS secret\r\n")

        assert (
            b"-ERR [AUTH] User name not allowed by SASLprep (RFC 4013).\r\n",
            b"-ERR No user name given; send USER first.\r\n",
        ) == (out, after)

    def test_user_not_utf8(self):
        """A user name that is not UTF-8 is refused in UTF8 mode too."""
        _, out = run(utf8_mode(), b"USER \xff\xfe\r\n")

        assert b"-ERR User name is not valid UTF-8.\r\n" == out

    def test_password_prepared(self):
        """PASS is prepared: a non-ASCII space becomes SPACE, NFKC applies, spaces kept."""
        conn = utf8_mode()

        events, _ = run(conn, "USER alice\r\nPASS \uff50a\u2003ss word\r\n".encode())

        assert [AuthenticateUser("alice", b"pa ss word"), PAUSED] == events

    @pytest.mark.parametrize(
        ("password", "reply"),
        [
            (b"\xc3(", b"-ERR Password is not valid UTF-8.\r\n"),
            (
                "se\ue000cret".encode(),
                b"-ERR [AUTH] Password not allowed by SASLprep (RFC 4013).\r\n",
            ),
        ],
    )
    def test_password_refused(self, password, reply):
        """A password that is not UTF-8 or that SASLprep refuses: -ERR, still unauthenticated."""
        conn = utf8_mode()
        run(conn, b"USER alice\r\n")

        events, out = run(conn, b"PASS " + password + b"\r\n")

        assert ([NEED_DATA], reply, State.AUTHORIZATION) == (events, out, conn.state)

    def test_before_utf8_unchanged(self):
        """Before UTF8, names and passwords are passed on as today: decoded, not prepared."""
        conn = fresh()

        events, _ = run(conn, "USER ｊｏｓé\r\nPASS \uff50a\u2003ss\r\n".encode())

        assert [AuthenticateUser("ｊｏｓé", "\uff50a\u2003ss".encode()), PAUSED] == events

    def test_before_utf8_8bit_refused(self):
        """Before UTF8, a user name that is not UTF-8 gets today's -ERR."""
        _, out = run(fresh(), b"USER caf\xe9\r\n")

        assert b"-ERR User name is not valid UTF-8.\r\n" == out

    def test_apop_user_prepared(self):
        """APOP's user name is prepared too (RFC 6856 §2)."""
        conn = utf8_mode(apop_timestamp="<1.2@h>")

        events, _ = run(conn, b"APOP " + "\u2168".encode() + b" " + DIGEST + b"\r\n")

        assert [FetchSecret("IX", "APOP"), PAUSED] == events

    def test_apop_user_refused(self):
        """An APOP user name SASLprep refuses gets -ERR."""
        conn = utf8_mode(apop_timestamp="<1.2@h>")

        _, out = run(conn, b"APOP " + "a\ue000".encode() + b" " + DIGEST + b"\r\n")

        assert b"-ERR [AUTH] User name not allowed by SASLprep (RFC 4013).\r\n" == out


class TestLang:
    """The LANG command (RFC 6856 §3)."""

    def test_list(self):
        """LANG alone lists 'tag description' lines."""
        assert (
            [NEED_DATA],
            b"+OK Language listing follows\r\nen English\r\nde Deutsch\r\n.\r\n",
        ) == run(fresh(), b"LANG\r\n")

    def test_list_in_german(self):
        """The listing's status text follows the language; the lines do not change."""
        _, out = run(german(), b"LANG\r\n")

        assert b"+OK Liste der Sprachen folgt\r\nen English\r\nde Deutsch\r\n.\r\n" == out

    @pytest.mark.parametrize(
        ("arg", "reply"),
        [
            (b"de", "+OK de Sprache geändert.\r\n"),
            (b"DE-ch", "+OK de Sprache geändert.\r\n"),  # RFC 4647 lookup, any case
            (b"en-GB", "+OK en Language changed.\r\n"),
            (b"*", "+OK en Language changed.\r\n"),  # the default
        ],
    )
    def test_switch(self, arg, reply):
        """LANG with a range picks a language; the +OK names it, in it."""
        _, out = run(fresh(), b"LANG " + arg + b"\r\n")

        assert reply.encode() == out

    @pytest.mark.parametrize("arg", [b"uga", b"1x", b"en-", b"x" * 9])
    def test_unknown(self, arg):
        """An unknown or malformed range: -ERR, and the language stays as it was."""
        conn = german()

        _, out = run(conn, b"LANG " + arg + b"\r\n")
        _, after = run(conn, b"NOOP\r\n")

        assert "-ERR Nicht unterstützte Sprache: ".encode() + arg + b"\r\n" == out
        assert b"-ERR Nicht angemeldet.\r\n" == after

    def test_unknown_in_english(self):
        """The refusal in English."""
        _, out = run(fresh(), b"LANG uga\r\n")

        assert b"-ERR Unsupported language: uga\r\n" == out

    def test_too_many_arguments(self):
        """LANG takes one language range at most."""
        _, out = run(fresh(), b"LANG de en\r\n")

        assert b"-ERR Too many arguments.\r\n" == out

    def test_back_to_default(self):
        """LANG * after LANG de brings the English texts back."""
        conn = german()

        _, out = run(conn, b"LANG *\r\nFOO\r\n")

        assert b"+OK en Language changed.\r\n-ERR Unknown command.\r\n" == out


class TestDefaultLanguage:
    """The server's default language (``pop3_language``): greeting, LANG * and STLS."""

    def test_greeting_and_replies(self):
        """With German as the default, the first replies are German, before any LANG."""
        conn = ServerConnection(lang=True, language="de")

        _, greeting = run(conn)
        _, out = run(conn, b"FOO\r\n")

        assert (b"+OK pobox bereit.\r\n", b"-ERR Unbekannter Befehl.\r\n") == (greeting, out)

    def test_star_picks_the_default(self):
        """LANG * goes back to the configured default, not to English."""
        conn = fresh(language="de")
        run(conn, b"LANG en\r\n")

        _, out = run(conn, b"LANG *\r\n")

        assert "+OK de Sprache geändert.\r\n".encode() == out

    def test_stls_goes_back_to_the_default(self):
        """After STLS the language is the default again, whatever LANG chose in plaintext."""
        conn = fresh(language="de", tls_available=True)
        run(conn, b"LANG en\r\nSTLS\r\n")

        conn.send(TlsStarted())

        assert "de" == conn.language

    def test_without_lang_command(self):
        """The default applies when LANG itself is not offered; CAPA does not list LANG."""
        conn = ServerConnection(language="de")
        run(conn)

        _, out = run(conn, b"CAPA\r\nLANG en\r\n")

        assert b"\r\nLANG\r\n" not in out
        assert out.endswith("-ERR Befehl nicht verfügbar.\r\n".encode())

    def test_unknown_language_refused(self):
        """A default that is not in the catalogue is a programming error: ValueError."""
        with pytest.raises(ValueError, match="language must be one of"):
            ServerConnection(language="fr")


class TestGermanReplies:
    """In German only the texts change: indicators, codes and numbers stay."""

    def test_login_rejected_keeps_code(self):
        """A shell's rejection keeps its [AUTH] code; its text is translated."""
        conn = german()
        run(conn, b"USER alice\r\nPASS wrong\r\n")

        conn.send(LoginRejected())

        assert b"-ERR [AUTH] Anmeldung fehlgeschlagen.\r\n" == run(conn)[1]

    def test_unknown_text_stays_english(self):
        """A text without a translation is sent as it is."""
        conn = german()
        run(conn, b"USER alice\r\nPASS wrong\r\n")

        conn.send(LoginRejected("Go away.", "SYS/PERM"))

        assert b"-ERR [SYS/PERM] Go away.\r\n" == run(conn)[1]

    def test_transaction(self):
        """LANG works after login; STAT and LIST stay as they are, DELE's text changes."""
        conn = ServerConnection(utf8=True, lang=True)
        run(conn, b"LANG de\r\nUSER alice\r\nPASS secret\r\n")
        conn.send(LoginAccepted([Msg(10, "u1"), Msg(20, "u2")]))
        assert b"+OK Angemeldet.\r\n" == run(conn)[1]

        _, out = run(conn, b"STAT\r\nLIST 2\r\nDELE 1\r\nRETR 1\r\nRSET\r\nLANG en\r\nNOOP\r\n")

        assert (
            "+OK 2 30\r\n"
            "+OK 2 20\r\n"
            "+OK Nachricht 1 zum Löschen markiert.\r\n"
            "-ERR Nachricht 1 ist gelöscht.\r\n"
            "+OK Postfach hat 2 Nachrichten (30 Oktette)\r\n"
            "+OK en Language changed.\r\n"
            "+OK\r\n"
        ).encode() == out

    def test_failed_deletions_keep_code(self):
        """The UPDATE failure keeps [SYS/TEMP] and its count."""
        conn = ServerConnection(lang=True)
        run(conn, b"LANG de\r\nUSER alice\r\nPASS secret\r\n")
        conn.send(LoginAccepted([Msg(10, "u1")]))
        run(conn, b"DELE 1\r\nQUIT\r\n")

        conn.send(DeletionsCommitted(failed=1))

        assert (
            "-ERR [SYS/TEMP] Abmeldung, aber 1 Nachricht(en) konnten nicht gelöscht werden.\r\n"
        ).encode() == run(conn)[1]

    def test_sasl_challenge_untouched(self):
        """A SASL continuation line ('+ ...') is no status line and is left alone."""
        conn = german(sasl_mechanisms=["PLAIN"])

        _, out = run(conn, b"AUTH PLAIN\r\n")

        assert b"+ \r\n" == out

    def test_bad_message_number(self):
        """Texts that echo the client's argument are translated around it."""
        _, out = run(logged_in([Msg(10, "u1")], lang=True), b"LANG de\r\nDELE x1\r\nRETR 7\r\n")

        assert (
            "+OK de Sprache geändert.\r\n"
            "-ERR Ungültige Nachrichtennummer: x1\r\n"
            "-ERR Es gibt keine Nachricht 7.\r\n"
        ).encode() == out


SNAPSHOT = [Msg(25, "u1"), Msg(7, "u2")]
#: Arguments: tags, ranges, UTF-8 text SASLprep maps or refuses, and raw octets.
ARGS = st.one_of(
    st.sampled_from([b"de", b"en", b"*", b"DE-at", b"uga", b"1", b"x" * 9, b"\xff"]),
    st.text(max_size=12).map(str.encode).filter(lambda b: b"\n" not in b and b"\r" not in b),
    # Raw octets from integers, not st.binary: Hypothesis keys its cache by the choices made,
    # and a bytes choice equal-hashed with st.text's str one is a BytesWarning under -bb.
    st.lists(st.integers(0, 255), max_size=30).map(bytes).filter(lambda b: b"\n" not in b),
)


class TestProperties:
    """With UTF8 and LANG on, every reply is still a proper status line, split or whole."""

    @settings(max_examples=200, deadline=None)
    @given(
        setup=st.sampled_from([b"", b"UTF8\r\n", b"LANG de\r\n", b"UTF8\r\nLANG de\r\n"]),
        verb=st.sampled_from(b"UTF8 LANG USER PASS APOP DELE RETR NOOP BOGUS".split()),
        args=st.lists(ARGS, max_size=3),
        logged=st.booleans(),
    )
    def test_status_line(self, setup, verb, args, logged):
        """The first reply line is +OK or -ERR, UTF-8, at most 512 octets (RFC 2449 §4)."""
        line = b" ".join([verb, *args])[:253] + b"\r\n"
        new = ServerConnection(utf8=True, lang=True, apop_timestamp="<1.2@h>")
        conn = logged_in(SNAPSHOT, utf8=True, lang=True) if logged else new
        drive(conn, [setup], Shell(messages=SNAPSHOT), eof=False)

        _, out = drive(conn, [line], Shell(messages=SNAPSHOT))

        status = out.split(b"\r\n")[0]
        assert status.startswith((b"+OK", b"-ERR"))
        status.decode("utf-8")
        assert len(status) + 2 <= 512

    @settings(max_examples=150, deadline=None)
    @given(
        commands=st.lists(
            st.one_of(
                st.sampled_from(
                    [
                        b"UTF8",
                        b"LANG",
                        b"LANG de",
                        b"LANG *",
                        b"LANG xx",
                        b"USER alice",
                        "USER \u2168".encode(),
                        b"PASS secret",
                        "PASS s\u00adecret".encode(),
                        b"PASS \xff",
                        b"STAT",
                        b"DELE 1",
                        b"RETR 9",
                        b"BOGUS",
                    ]
                ),
                ARGS,
            ).map(lambda c: c + b"\r\n"),
            max_size=15,
        ).map(b"".join),
        cut_at=st.lists(st.integers(0, 300), max_size=10),
    )
    def test_same_result_split(self, commands, cut_at):
        """Whole, one byte at a time, or in pieces: the same events and output."""
        shell = Shell(messages=SNAPSHOT)

        def new() -> ServerConnection:
            return ServerConnection(utf8=True, lang=True)

        whole = drive(new(), [commands], shell)
        one_by_one = drive(new(), [commands[i : i + 1] for i in range(len(commands))], shell)
        split = drive(new(), pieces(commands, cut_at), shell)

        assert whole == one_by_one
        assert whole == split
