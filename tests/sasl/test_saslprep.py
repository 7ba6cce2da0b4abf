"""SASLprep (RFC 4013) of SASL identities and passwords: core mechanisms and password checks.

RFC 6856 §2 (UTF8), RFC 4616 §2 (PLAIN) and RFC 5802 §5.1 (SCRAM) all ask for SASLprep.  The
core prepares names; :mod:`pobox.auth.schemes` prepares passwords on both sides (hashing and
checking), so a password typed in another Unicode form still matches.
"""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import base64
import hashlib
import unicodedata

import pytest
import scramp
from hypothesis import given
from hypothesis import strategies as st

from pobox.auth.schemes import (
    hash_password,
    prepare_password,
    scram_server_keys,
    verify,
)
from pobox.protocol._i18n import _saslprep_profile, saslprep
from pobox.protocol._sasl import (
    Challenge,
    CheckPassword,
    Failed,
    Login,
    NeedSecret,
    Plain,
    Scram,
    Secret,
    Verified,
    new_mechanism,
)

COMPOSED = "pässwörd"  # NFC, as keyboards type it
DECOMPOSED = unicodedata.normalize("NFD", COMPOSED)
FULLWIDTH_BOB = "\uff42\uff4f\uff42"  # "bob" in fullwidth letters
PROHIBITED_NAMES = [
    "a\ue000",  # private use (RFC 3454 C.3)
    "\u0085x",  # a non-ASCII control character (C.2.2)
    "\u0627a\u0628",  # right-to-left text with a left-to-right letter (RFC 3454 §6)
]


class TestPlainNames:
    """PLAIN's authcid and authzid are prepared (RFC 4616 §2)."""

    def test_fullwidth_user(self):
        """Fullwidth letters fold to ASCII (NFKC); the password is passed on as sent."""
        message = b"\0" + FULLWIDTH_BOB.encode() + b"\0" + DECOMPOSED.encode()

        assert CheckPassword("bob", DECOMPOSED.encode()) == Plain().start(message)

    def test_authzid_prepared_before_compared(self):
        """An authzid in another form of the same name is the user's."""
        message = "\uff42ob\0bob\0pw".encode()

        assert CheckPassword("bob", b"pw") == Plain().start(message)

    @pytest.mark.parametrize("name", PROHIBITED_NAMES)
    def test_prohibited_user(self, name):
        """A name SASLprep refuses fails the exchange (the shell answers -ERR [AUTH]); the
        failure names it as sent, for the log."""
        message = b"\0" + name.encode() + b"\0pw"

        assert Failed(name, "PLAIN identity not allowed by SASLprep") == Plain().start(message)

    def test_prohibited_authzid(self):
        """So does an authzid SASLprep refuses."""
        message = "a\ue000\0bob\0pw".encode()

        assert Failed("bob", "PLAIN identity not allowed by SASLprep") == Plain().start(message)

    def test_name_format_after_prep(self):
        """auth_username_format (%Lu) applies to the prepared name (fullwidth BOB)."""
        plain = new_mechanism(
            "PLAIN", nonce="n", challenge=b"<c>", external_identity=None, name_format=str.lower
        )

        assert CheckPassword("BOB", b"pw") == plain.start("bob\0\uff22\uff2f\uff22\0pw".encode())


class TestLoginNames:
    """LOGIN's user name is prepared like PLAIN's."""

    def test_fullwidth_user(self):
        """The fullwidth name is bob."""
        mech = Login()

        assert Challenge(b"Password:") == mech.start(FULLWIDTH_BOB.encode())
        assert CheckPassword("bob", b"pw") == mech.step(b"pw")

    @pytest.mark.parametrize("name", PROHIBITED_NAMES)
    def test_prohibited_user(self, name):
        """A refused name fails at once, before the password is asked for."""
        assert Failed(name, "LOGIN user name not allowed by SASLprep") == Login().start(
            name.encode()
        )


class TestScramNames:
    """SCRAM's n= and a= are prepared (RFC 5802 §5.1)."""

    def test_fullwidth_user(self):
        """n= in fullwidth letters asks for bob's keys."""
        assert NeedSecret("bob") == Scram("sha256", "N").start(
            b"n,,n=" + FULLWIDTH_BOB.encode() + b",r=abc"
        )

    def test_authzid_prepared(self):
        """a= in fullwidth letters with n=bob is the user's own identity."""
        assert NeedSecret("bob") == Scram("sha256", "N").start(
            b"n,a=" + FULLWIDTH_BOB.encode() + b",n=bob,r=abc"
        )

    @pytest.mark.parametrize("name", PROHIBITED_NAMES)
    def test_prohibited_user(self, name):
        """A refused name fails the exchange."""
        assert Failed(name, "SCRAM user name not allowed by SASLprep") == Scram(
            "sha256", "N"
        ).start(b"n,,n=" + name.encode() + b",r=abc")

    def test_prohibited_authzid(self):
        """A refused authzid is not the user's."""
        step = Scram("sha256", "N").start("n,a=a\ue000,n=bob,r=abc".encode())

        assert Failed("bob", "SCRAM authorization identity is not the user's") == step


class TestPrepare:
    """prepare_password: SASLprep where it applies, the octets as sent where not."""

    @pytest.mark.parametrize(
        ("given", "prepared"),
        [
            (DECOMPOSED.encode(), COMPOSED.encode()),  # NFKC composes
            ("\uff50w".encode(), b"pw"),  # fullwidth
            ("a\u00a0b".encode(), b"a b"),  # a non-ASCII space is SPACE
            ("a\u00adb".encode(), b"ab"),  # SOFT HYPHEN is mapped to nothing
            (b"caf\xe9", b"caf\xe9"),  # Latin-1, not UTF-8: as sent
            ("a\ue000".encode(), "a\ue000".encode()),  # prohibited: as sent
            (b"tab\there", b"tab\there"),  # an ASCII control character: as sent
        ],
    )
    def test_forms(self, given, prepared):
        """Each form comes out as the RFC says, and nothing raises."""
        assert prepared == prepare_password(given)


class TestAsciiShortcut:
    """saslprep returns printable ASCII as it is, which is what the whole profile gives."""

    @given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1))
    def test_same_as_the_profile(self, text):
        """For every printable ASCII string the shortcut and the profile agree."""
        assert _saslprep_profile(text) == saslprep(text) == text

    @pytest.mark.parametrize("text", ["", "tab\there", "bell\x07", "del\x7f"])
    def test_refused_as_by_the_profile(self, text):
        """Empty strings and ASCII controls are not taken by the shortcut: still refused."""
        with pytest.raises(ValueError, match=r"empty|prohibited"):
            _saslprep_profile(text)
        with pytest.raises(ValueError, match=r"empty|prohibited"):
            saslprep(text)


class TestVerify:
    """A password in any form matches the stored one (PLAIN entries and pobox's hashes)."""

    @pytest.mark.parametrize("typed", [COMPOSED, DECOMPOSED])
    @pytest.mark.parametrize("stored", [COMPOSED, DECOMPOSED])
    def test_plain_entry(self, stored, typed):
        """{PLAIN}: composed and decomposed match each other, both ways."""
        assert verify("{PLAIN}" + stored, typed.encode())

    @pytest.mark.parametrize("typed", [COMPOSED, DECOMPOSED, "\uff50ässwörd"])
    @pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "SSHA256", "SCRAM-SHA-256"])
    def test_hash_made_by_pobox(self, scheme, typed):
        """A hash pobox made from the decomposed form matches every form of the password."""
        stored = hash_password(DECOMPOSED.encode(), scheme, rounds=None)

        assert verify(stored, typed.encode())

    def test_wrong_password_still_wrong(self):
        """Preparing never makes another password match."""
        stored = hash_password(COMPOSED.encode(), "SSHA256")

        assert (False, False) == (
            verify(stored, "passwörd".encode()),
            verify("{PLAIN}" + COMPOSED, "passwörd".encode()),
        )

    def test_hash_made_elsewhere_from_raw_octets(self):
        """A hash of the octets as typed (``doveadm pw`` does not prepare) still matches them."""
        raw = "\uff50w".encode()  # fullwidth p, then w
        stored = "{SHA256}" + base64.b64encode(hashlib.sha256(raw).digest()).decode()

        assert (True, False) == (verify(stored, raw), verify(stored, b"pw"))

    def test_prohibited_password_compared_as_sent(self):
        """A password SASLprep refuses matches only itself, octet for octet."""
        password = "se\ue000cret".encode()
        stored = hash_password(password, "SSHA256")

        assert (True, False) == (verify(stored, password), verify(stored, b"secret"))

    def test_nul_never_matches_plain(self):
        """A password with NUL matches no {PLAIN} entry, in either form."""
        assert not verify("{PLAIN}ab", b"a\0b")


class TestScram:
    """SCRAM keys derived from a {PLAIN} entry are those of the prepared password."""

    def test_decomposed_plain_entry_with_a_real_client(self):
        """scramp (which SASLprep's the password, RFC 5802) logs in against a decomposed entry."""
        salt = b"0123456789abcdef"
        creds = scram_server_keys("{PLAIN}" + DECOMPOSED, "SCRAM-SHA-256", salt)
        client = scramp.ScramClient(["SCRAM-SHA-256"], "bob", COMPOSED)
        mech = Scram("sha256", "servernonce")

        assert NeedSecret("bob") == mech.start(client.get_client_first().encode())
        server_first = mech.secret(Secret(scram=creds))
        assert isinstance(server_first, Challenge)
        client.set_server_first(server_first.data.decode())
        server_final = mech.step(client.get_client_final().encode())
        assert isinstance(server_final, Challenge)
        client.set_server_final(server_final.data.decode())  # raises if the server lied
        assert Verified("bob") == mech.step(b"")
