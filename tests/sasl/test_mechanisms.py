"""The SASL mechanisms of the core, with the RFCs' own test vectors (sans-IO, no event loop)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from pobox.auth.schemes import cram_md5_context, hash_password
from pobox.protocol._sasl import (
    Apop,
    Challenge,
    CheckPassword,
    CheckToken,
    CramMD5,
    External,
    Failed,
    Login,
    NeedSecret,
    OAuthBearer,
    Plain,
    Scram,
    ScramKeys,
    Secret,
    Verified,
    XOAuth2,
    b64decode_strict,
    hmac_md5_from_context,
    new_mechanism,
)


def keys(hash_name: str, password: bytes, salt: bytes, iterations: int) -> ScramKeys:
    """Derive SCRAM keys the RFC 5802 §3 way, independently of the code under test."""
    salted = hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    return ScramKeys(
        hash_name,
        iterations,
        salt,
        hashlib.new(hash_name, client_key).digest(),
        hmac.digest(salted, b"Server Key", hash_name),
    )


class TestPlain:
    """PLAIN (RFC 4616)."""

    def test_initial_response(self):
        """An empty authzid, the user and the password ask for a password check."""
        assert CheckPassword("tim", b"tanstaaftanstaaf") == Plain().start(
            b"\0tim\0tanstaaftanstaaf"
        )

    def test_no_initial_response(self):
        """Without an initial response the server sends an empty challenge first."""
        assert Challenge(b"") == Plain().start(None)

    def test_authzid_equal_to_authcid(self):
        """An authzid equal to the user is accepted."""
        assert CheckPassword("tim", b"pw") == Plain().start(b"tim\0tim\0pw")

    def test_authzid_same_user_after_name_format(self):
        """An authzid that the shell's name format makes the user's is the user's."""
        plain = new_mechanism(
            "PLAIN", nonce="n", challenge=b"<c>", external_identity=None, name_format=str.lower
        )
        assert CheckPassword("tim", b"pw") == plain.start(b"TIM\0tim\0pw")

    def test_authzid_case_matters_without_name_format(self):
        """Without a name format (``%u``), TIM is not tim."""
        assert isinstance(Plain().start(b"TIM\0tim\0pw"), Failed)

    def test_other_authzid(self):
        """Acting as another user is refused."""
        assert Failed("tim", "authorization identity 'root' is not the user's") == Plain().start(
            b"root\0tim\0pw"
        )

    def test_malformed(self):
        """A message without two NULs fails."""
        assert isinstance(Plain().start(b"tim\0pw"), Failed)

    def test_empty_password(self):
        """An empty password fails without reaching the shell."""
        assert isinstance(Plain().start(b"\0tim\0"), Failed)


class TestLogin:
    """LOGIN: the user name, then the password."""

    def test_exchange(self):
        """Username: then Password: challenges lead to a password check."""
        mech = Login()
        assert Challenge(b"Username:") == mech.start(None)
        assert Challenge(b"Password:") == mech.step(b"tim")
        assert CheckPassword("tim", b"secret") == mech.step(b"secret")

    def test_initial_response_is_the_user(self):
        """An initial response is taken as the user name."""
        mech = Login()
        assert Challenge(b"Password:") == mech.start(b"tim")
        assert CheckPassword("tim", b"secret") == mech.step(b"secret")


class TestCramMD5:
    """CRAM-MD5 with the example of RFC 2195 §2."""

    CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
    RESPONSE = b"tim b913a602c7eda7a495b4e6e7334d3890"

    def test_rfc2195_example_with_plaintext(self):
        """The RFC's response verifies against the plaintext password."""
        mech = CramMD5(self.CHALLENGE)
        assert Challenge(self.CHALLENGE) == mech.start(None)
        assert NeedSecret("tim") == mech.step(self.RESPONSE)
        assert Verified("tim") == mech.secret(Secret(password=b"tanstaaftanstaaf"))

    def test_rfc2195_example_with_stored_context(self):
        """The RFC's response verifies against Dovecot's {CRAM-MD5} stored context."""
        # What `doveadm pw -s CRAM-MD5 -p tanstaaftanstaaf` stores.
        context = cram_md5_context(hash_password(b"tanstaaftanstaaf", "CRAM-MD5"))
        mech = CramMD5(self.CHALLENGE)
        mech.start(None)
        mech.step(self.RESPONSE)
        assert Verified("tim") == mech.secret(Secret(cram_md5_context=context))

    def test_context_gives_hmac(self):
        """HMAC-MD5 from a stored context equals the stdlib HMAC-MD5 (RFC 2104)."""
        context = cram_md5_context(hash_password(b"k" * 70, "CRAM-MD5"))
        assert context is not None
        assert hmac.digest(b"k" * 70, b"m" * 100, "md5") == hmac_md5_from_context(
            context, b"m" * 100
        )

    def test_wrong_password(self):
        """Another password fails."""
        mech = CramMD5(self.CHALLENGE)
        mech.start(None)
        mech.step(self.RESPONSE)
        assert Failed("tim", "wrong CRAM-MD5 digest") == mech.secret(Secret(password=b"x"))

    def test_unknown_user(self):
        """No secret fails."""
        mech = CramMD5(self.CHALLENGE)
        mech.start(None)
        mech.step(self.RESPONSE)
        assert isinstance(mech.secret(None), Failed)

    def test_malformed_response(self):
        """A response without a 32-digit lower-case hex digest fails."""
        mech = CramMD5(self.CHALLENGE)
        mech.start(None)
        assert isinstance(mech.step(b"tim B913A602"), Failed)

    def test_initial_response_refused(self):
        """CRAM-MD5 has no initial response."""
        assert isinstance(CramMD5(self.CHALLENGE).start(b"tim"), Failed)


class TestScramSha1:
    """SCRAM-SHA-1 with the example of RFC 5802 §5."""

    def test_rfc5802_example(self):
        """The RFC's exchange, byte for byte, with its fixed server nonce."""
        mech = Scram("sha1", "3rfcNHYJY1ZVvWVs7j")
        secret = Secret(scram=keys("sha1", b"pencil", base64.b64decode("QSXCR+Q6sek8bf92"), 4096))
        assert NeedSecret("user") == mech.start(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL")
        assert Challenge(
            b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
        ) == mech.secret(secret)
        assert Challenge(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=") == mech.step(
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        )
        assert Verified("user") == mech.step(b"")


class TestScramSha256:
    """SCRAM-SHA-256 with the example of RFC 7677 §3."""

    CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    SERVER_FIRST = (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    CLIENT_FINAL = (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )

    def start(self, secret: Secret | None) -> Scram:
        """Run the exchange up to the server-first message."""
        mech = Scram("sha256", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        mech.start(self.CLIENT_FIRST)
        mech.secret(secret)
        return mech

    def secret(self) -> Secret:
        """The user's stored keys."""
        return Secret(
            scram=keys("sha256", b"pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
        )

    def test_rfc7677_example(self):
        """The RFC's exchange, byte for byte, with its fixed server nonce."""
        mech = Scram("sha256", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        assert NeedSecret("user") == mech.start(self.CLIENT_FIRST)
        assert Challenge(self.SERVER_FIRST) == mech.secret(self.secret())
        assert Challenge(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=") == mech.step(
            self.CLIENT_FINAL
        )
        assert Verified("user") == mech.step(b"")

    def test_wrong_proof(self):
        """A proof made with another password fails."""
        mech = Scram("sha256", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        mech.start(self.CLIENT_FIRST)
        mech.secret(Secret(scram=keys("sha256", b"other", b"salt", 4096)))
        assert Failed("user", "SCRAM nonce does not match") != mech.step(self.CLIENT_FINAL)
        assert isinstance(mech.step(self.CLIENT_FINAL), Failed)

    def test_decoy_keys_look_the_same(self):
        """Decoy keys (empty StoredKey) get a server-first like any; the proof fails."""
        mech = Scram("sha256", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        mech.start(self.CLIENT_FIRST)
        step = mech.secret(Secret(scram=ScramKeys("sha256", 4096, b"decoy-salt-16byt", b"", b"")))
        assert (
            Challenge(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=ZGVjb3ktc2FsdC0xNmJ5dA==,"
                b"i=4096"
            )
            == step
        )
        assert Failed("user", "wrong SCRAM proof") == mech.step(self.CLIENT_FINAL)

    @pytest.mark.parametrize(
        "secret",
        [None, Secret(password=b"pencil"), Secret(scram=keys("sha1", b"pencil", b"s", 4096))],
    )
    def test_no_keys_of_this_hash(self, secret):
        """Without keys of its hash (the shell always sends some) the exchange fails at once."""
        mech = Scram("sha256", "N")
        mech.start(self.CLIENT_FIRST)
        assert Failed("user", "no SCRAM keys for the user") == mech.secret(secret)

    def test_channel_binding_refused(self):
        """p= (channel binding) is not supported: no -PLUS mechanism is offered."""
        mech = Scram("sha256", "N")
        assert isinstance(mech.start(b"p=tls-unique,,n=user,r=abc"), Failed)

    def test_y_flag_accepted(self):
        """y,, (client could bind, thinks the server cannot) is accepted (RFC 5802 §6)."""
        assert NeedSecret("user") == Scram("sha256", "N").start(b"y,,n=user,r=abc")

    def test_saslname_escapes(self):
        """=2C and =3D in the user name decode to , and = (RFC 5802 §5.1)."""
        assert NeedSecret("a,b=c") == Scram("sha256", "N").start(b"n,,n=a=2Cb=3Dc,r=abc")

    def test_bad_escape(self):
        """Any other = escape is malformed."""
        assert isinstance(Scram("sha256", "N").start(b"n,,n=a=41,r=abc"), Failed)

    def test_other_authzid(self):
        """An authzid other than the user is refused."""
        assert isinstance(Scram("sha256", "N").start(b"n,a=root,n=user,r=abc"), Failed)

    def test_nonce_mismatch(self):
        """A client-final with another nonce fails."""
        mech = self.start(self.secret())
        assert Failed("user", "SCRAM nonce does not match") == mech.step(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqOX,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        )

    def test_binding_mismatch(self):
        """c= must repeat the GS2 header of the client-first message."""
        mech = self.start(self.secret())
        assert Failed("user", "SCRAM channel binding data does not match") == mech.step(
            self.CLIENT_FINAL.replace(b"c=biws", b"c=eSws")
        )

    def test_data_after_server_final(self):
        """Anything but an empty response to the server-final message fails."""
        mech = self.start(self.secret())
        mech.step(self.CLIENT_FINAL)
        assert isinstance(mech.step(b"x"), Failed)


class TestExternal:
    """EXTERNAL: the identity of the verified client certificate."""

    def test_identity(self):
        """An empty authzid logs in as the certificate's identity."""
        assert Verified("tim") == External("tim").start(b"")

    def test_same_authzid(self):
        """An authzid equal to the identity is accepted."""
        assert Verified("tim") == External("tim").start(b"tim")

    def test_other_authzid(self):
        """Acting as another user is refused."""
        assert isinstance(External("tim").start(b"root"), Failed)

    def test_no_certificate(self):
        """Without a verified certificate EXTERNAL fails."""
        assert isinstance(External(None).start(None), Failed)


class TestOAuth:
    """OAUTHBEARER (RFC 7628) and XOAUTH2."""

    def test_oauthbearer_rfc7628_example(self):
        """The client response of RFC 7628 §4.1 asks for a token check."""
        response = (
            b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        )
        assert CheckToken("user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==") == (
            OAuthBearer().start(response)
        )

    def test_oauthbearer_error_challenge(self):
        """A rejected token gets the RFC 7628 §3.2.2 error challenge, once."""
        mech = OAuthBearer()
        assert Challenge(b'{"status":"invalid_token","schemes":"bearer","scope":"pop"}') == (
            mech.rejected()
        )
        assert None is mech.rejected()

    def test_oauthbearer_without_user(self):
        """No a= user fails."""
        assert isinstance(OAuthBearer().start(b"n,,\x01auth=Bearer x\x01\x01"), Failed)

    def test_xoauth2(self):
        """user= and auth=Bearer ask for a token check."""
        assert CheckToken("tim@example.com", "tok") == XOAuth2().start(
            b"user=tim@example.com\x01auth=Bearer tok\x01\x01"
        )

    def test_xoauth2_malformed(self):
        """A message without a bearer token fails."""
        assert isinstance(XOAuth2().start(b"user=tim\x01\x01"), Failed)


class TestApop:
    """APOP with the example of RFC 1939 §7."""

    TIMESTAMP = b"<1896.697170952@dbc.mtview.ca.us>"

    def test_rfc1939_example(self):
        """The RFC's digest verifies against the secret "tanstaaf"."""
        mech = Apop(self.TIMESTAMP, "mrose", b"c4c9334bac560ecc979e58001b3e22fb")
        assert NeedSecret("mrose") == mech.start(None)
        assert Verified("mrose") == mech.secret(Secret(password=b"tanstaaf"))

    def test_wrong_password(self):
        """Another password fails."""
        mech = Apop(self.TIMESTAMP, "mrose", b"c4c9334bac560ecc979e58001b3e22fb")
        mech.start(None)
        assert Failed("mrose", "wrong APOP digest") == mech.secret(Secret(password=b"x"))

    def test_no_client_responses(self):
        """APOP takes no SASL responses: one would fail."""
        assert Failed(None, "unexpected response") == Apop(self.TIMESTAMP, "m", b"0" * 32).step(
            b"x"
        )

    def test_no_plaintext(self):
        """A user without a usable (plaintext) password fails like a wrong password."""
        mech = Apop(self.TIMESTAMP, "mrose", b"c4c9334bac560ecc979e58001b3e22fb")
        mech.start(None)
        assert isinstance(mech.secret(Secret(cram_md5_context=b"\0" * 32)), Failed)


class TestBase64:
    """Strict base64 decoding of client responses."""

    def test_valid(self):
        """Padded base64 decodes."""
        assert b"user" == b64decode_strict(b"dXNlcg==")

    def test_invalid(self):
        """Stray characters and missing padding are refused."""
        assert None is b64decode_strict(b"dXNlcg")
        assert None is b64decode_strict(b"dXN!cg==")


class TestMalformed:
    """Malformed client messages fail with a reason, never an exception."""

    @pytest.mark.parametrize(
        ("mechanism", "messages", "reason"),
        [
            (Login, [b"tim", b""], "empty password"),
            (Login, [b"\xff"], "malformed LOGIN user name"),
            (Plain, [b"\0\xff\0pw"], "malformed PLAIN message"),
            (lambda: Scram("sha256", "N"), [b"\xff"], "SCRAM client-first is not UTF-8"),
            (lambda: Scram("sha256", "N"), [b"n,,"], "malformed SCRAM client-first"),
            (lambda: Scram("sha256", "N"), [b"x,,n=u,r=a"], "malformed SCRAM gs2 header"),
            (lambda: Scram("sha256", "N"), [b"n,,r=a,n=u"], "malformed SCRAM client-first"),
            (lambda: Scram("sha256", "N"), [b"n,,n=,r=a"], "malformed SCRAM client-first"),
            (
                lambda: Scram("sha256", "N"),
                [b"n,x,n=u,r=a"],
                "SCRAM authorization identity is not the user's",
            ),
            (OAuthBearer, [b"\xff"], "OAUTHBEARER message is not UTF-8"),
            (OAuthBearer, [b"n,,"], "malformed OAUTHBEARER message"),
            (OAuthBearer, [b"n,a=u,\x01auth\x01\x01"], "malformed OAUTHBEARER message"),
            (
                OAuthBearer,
                [b"n,a=u,\x01auth=Basic x\x01\x01"],
                "OAUTHBEARER without a user and a bearer token",
            ),
            (XOAuth2, [b"\xff"], "XOAUTH2 message is not UTF-8"),
            (lambda: External("tim"), [b"\xff"], "authorization identity is not the certificate's"),
        ],
    )
    def test_fails(self, mechanism, messages, reason):
        """Each malformed message fails with its reason."""
        mech = mechanism()
        step = mech.start(messages[0])
        for message in messages[1:]:
            step = mech.step(message)

        assert reason == step.reason

    def test_scram_client_final_without_proof(self):
        """A client-final without p= fails."""
        mech = Scram("sha256", "N")
        mech.start(b"n,,n=user,r=abc")
        mech.secret(Secret(scram=keys("sha256", b"pencil", b"salt", 4096)))

        assert Failed("user", "malformed SCRAM client-final") == mech.step(b"c=biws,r=abcN")

    def test_scram_same_authzid(self):
        """An a= authzid equal to the user is accepted."""
        assert NeedSecret("user") == Scram("sha256", "N").start(b"n,a=user,n=user,r=abc")

    def test_scram_extensions_kept(self):
        """Unknown extension attributes in client-first are part of the AuthMessage, accepted."""
        assert NeedSecret("user") == Scram("sha1", "N").start(b"n,,n=user,r=abc,x=1")

    def test_oauthbearer_rejected_once(self):
        """Only the first rejection gets an error challenge."""
        mech = OAuthBearer()
        mech.rejected()

        assert None is mech.rejected()

    def test_base_mechanism(self):
        """The base class fails any step and any secret (a shell answering the wrong event)."""
        mech = Plain()

        assert [Failed(None, "no secret expected")] == [mech.secret(None)]

    def test_new_mechanism_unknown(self):
        """An unknown mechanism name is an error of the caller."""
        with pytest.raises(ValueError, match="unknown SASL mechanism 'GSSAPI'"):
            new_mechanism("GSSAPI", nonce="n", challenge=b"<c>", external_identity=None)
