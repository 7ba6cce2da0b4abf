"""Tests for pobox.auth.schemes: Dovecot's password schemes, verified and made."""

# House style puts the expected value first (STYLE.md §3.11), which SIM300 calls Yoda.

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import subprocess

import argon2
import bcrypt
import nacl.exceptions
import nacl.pwhash
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pobox.auth import schemes
from pobox.auth.schemes import (
    DUMMY_HASH,
    SUPPORTED_SCHEMES,
    SchemeError,
    ScramCredentials,
    UnknownScheme,
    cram_md5_context,
    hash_password,
    identify_scheme,
    scram_credentials,
    scram_salt,
    scram_server_keys,
    verify,
)

#: Hashes of "secret" made by doveadm pw (Dovecot 2.3.19) with the scheme in the prefix.
SHA512_CRYPT = (
    "{SHA512-CRYPT}$6$EPUu0eMBnOfDs3Zf$UowAOl64XvvZdUHm/bOU1AQ7S8IHb5gLRzaWuhjXe.ml6mCWO6CYESTmP"
    "ekUl6.IJTrKXHjnzzaNvtvmM3MgF0"
)
BLF_CRYPT = "{BLF-CRYPT}$2y$05$/mwp77iVnXkLa3HixlYPTuD0ukvRa1ravvv5zHTTczRX8D8Ro6oki"
ARGON2ID = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$rw1oNoxEAdo68J8huXfoHA$RfaM74vwS5kjw0vjEO9COMrYrkd"
    "CDpxYCGaDcs7yKPE"
)
ARGON2I = (
    "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$qfz6oIH2bmoRsYMj/rs49g$QrgwyNybM25WpoCzyxUtQJaTXFpgF"
    "G5TlgWEwoOC9IE"
)
SCRAM_SHA_1 = (
    "{SCRAM-SHA-1}4096,24rGd1UW6O2LGKEdHrmHLg==,NBqNPvVzqNXdMvtyxIMsq50+9Xk=,"
    "nG14w6hlA7ZHi28E985vZbzN96U="
)
SCRAM_SHA_256 = (
    "{SCRAM-SHA-256}4096,HPyOXGGzOTJg6J6zq5oXxw==,NeSSK9y583Iw4M6D+rE+gYgApP/p+4MzBv8Z1D7JcAk=,"
    "BnBcslrVRamDV2cYN+wQHO5ZJaXdQrryndM6Ijj6UM0="
)
DOVEADM_SECRET = [
    SHA512_CRYPT,
    "{SHA512-CRYPT}$6$rounds=6000$iQTus6CzXXeo/Xn9$CM87D/PP4V97GWmlSIKcH51mF9NABKJ0ReXAcL.vXUeMdZ"
    "0dPt0623x//f//daAMZZLMMFV5HpKedHUHFNmMU1",
    "{SHA256-CRYPT}$5$nf0b6l.3oeZtCj.H$BRrh7pYOUIwiQkds0Psmt/FHsHsAqSt88XY8cqyxPA0",
    "{MD5-CRYPT}$1$aOeaKNdi$.2ZCdMSldiHXD9Wdr11nT/",
    "{MD5}$1$5QRBbZij$LFR0USEXPfiHRdgZD/GNW0",
    BLF_CRYPT,
    "{CRYPT}$2y$05$9ECo4QnMKCVEXAPHdrDIReuD2L22vnHyJ9OmvgkmgkxDfqPj3nT2q",
    "{DES-CRYPT}L5cgLz8pwXVFE",
    "{CRYPT}L5cgLz8pwXVFE",
    ARGON2I,
    ARGON2ID,
    "{SSHA}6+6Th/f6wR1aQ/WNqqBLaJlRHzzrxlFW",
    "{SSHA256}E3QFC7YTfdwMRPNecJwbVbhFYFd7xuFAuSvUpUjYMeqvgAe4",
    "{SSHA512}lj9yiglBP+7HgexEXrqoVCKPaZ48wfsfQEPsBXl2CCzHc/nJiF0jO1rq8u/fAswr/KUYmxE7JF9wtrAWF+J"
    "JkZuG5mY=",
    "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
    "{SHA1}5en6G6MezRroT3XKqkdPOmY/BfQ=",
    "{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=",
    "{SHA512}vSsar3708Jvp9Szi2NWZZ02Bqp1qRCFpbcTZPdBhnWgs5WtNZKnvCXdhztmeD2cmW192CF5bDufKRpayrW/isg==",
    "{PBKDF2}$1$Z0V2Te63fWHVnx.f$5000$290bc91443122772360fb5ab2969d179a6277406",
    SCRAM_SHA_1,
    SCRAM_SHA_256,
    "{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56",
    "{SMD5}Bc8ALQ6E5yrKAmsjpTqhIFNpy3s=",
    "{LDAP-MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==",
    "{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee69",
    "{MD5}5ebe2294ecd0e0f08eab7690d2a6ee69",
    "{SSHA.HEX}3d5df3a6a07029508f9ee2b79d959014dc505e2ed563b96e",
    "{SHA256.HEX}2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
    "{PLAIN.B64}c2VjcmV0",
    "{PLAIN}secret",
    "{CLEAR}secret",
    "{CLEARTEXT}secret",
]


class TestVerify:
    """verify() against stored passwords written by Dovecot."""

    @pytest.mark.parametrize("stored", DOVEADM_SECRET)
    def test_right_password(self, stored):
        """The password a hash was made from matches it."""
        assert True is verify(stored, b"secret")

    @pytest.mark.parametrize("stored", DOVEADM_SECRET)
    def test_wrong_password(self, stored):
        """Any other password does not match."""
        assert False is verify(stored, b"Secret")

    def test_digest_md5_uses_username_and_realm(self):
        """DIGEST-MD5 hashes user:realm:password, the realm coming after the '@'."""
        stored = "{DIGEST-MD5}b1726872c344b6dc8365b774f8fd6412"
        assert (True, False, False) == (
            verify(stored, b"secret", username="alice@example.com"),
            verify(stored, b"secret", username="alice"),
            verify(stored, b"secret"),
        )

    def test_scheme_name_is_case_insensitive(self):
        """{sha512-crypt} and {ssha.hex} mean the same as their upper-case names."""
        assert (True, True) == (
            verify(SHA512_CRYPT.replace("SHA512-CRYPT", "sha512-crypt"), b"secret"),
            verify("{ssha.hex}3d5df3a6a07029508f9ee2b79d959014dc505e2ed563b96e", b"secret"),
        )

    def test_unprefixed_hash_uses_crypt_by_default(self):
        """Without {SCHEME}, CRYPT lets the $id$ prefix choose the algorithm."""
        assert (True, True, False) == (
            verify(SHA512_CRYPT.removeprefix("{SHA512-CRYPT}"), b"secret"),
            verify("L5cgLz8pwXVFE", b"secret"),
            verify("L5cgLz8pwXVFE", b"secreT"),
        )

    def test_unprefixed_hash_uses_the_default_scheme(self):
        """Without {SCHEME}, the default scheme decides how to read the data."""
        assert (True, False) == (
            verify("secret", b"secret", default_scheme="PLAIN"),
            verify("secret", b"secret"),
        )

    def test_bare_md5_crypt_is_recognised_whatever_the_default(self):
        """A bare $1$ hash is MD5-CRYPT even when the default scheme is something else."""
        assert True is verify("$1$aOeaKNdi$.2ZCdMSldiHXD9Wdr11nT/", b"secret", default_scheme="SHA")

    def test_hex_digest_without_suffix(self):
        """A fixed-size digest exactly twice its length is read as hex, as Dovecot does."""
        assert True is verify("{SHA}e5e9fa1ba31ecd1ae84f75caaa474f3a663f05f4", b"secret")

    def test_crypt_scheme_must_match_its_prefix(self):
        """A {SHA512-CRYPT} entry holding an MD5-crypt hash is refused."""
        assert False is verify("{SHA512-CRYPT}$1$aOeaKNdi$.2ZCdMSldiHXD9Wdr11nT/", b"secret")

    def test_argon2_type_must_match(self):
        """An {ARGON2I} entry holding an argon2id hash is refused."""
        assert False is verify(ARGON2ID.replace("{ARGON2ID}", "{ARGON2I}"), b"secret")

    @pytest.mark.parametrize("stored", ["{PLAIN}secret", SHA512_CRYPT, BLF_CRYPT])
    @pytest.mark.parametrize("password", [b"secret\0", b"secret\0garbage", b"sec\0ret"])
    def test_password_with_nul_never_matches(self, stored, password):
        """A NUL is neither an end of string, as in C, nor ignored."""
        assert False is verify(stored, password)

    def test_bcrypt_reads_72_bytes(self):
        """BLF-CRYPT ignores bytes past the 72nd, like libxcrypt and Dovecot."""
        password = b"p" * 72
        stored = "{BLF-CRYPT}" + bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()
        assert True is verify(stored, password + b"anything")

    @pytest.mark.parametrize(
        "stored",
        [
            "",
            "{}secret",
            "{NOPE}secret",
            "{CRYPT}",
            "{CRYPT}*",
            "{CRYPT}!$6$EPUu0eMBnOfDs3Zf$UowAOl64XvvZdUHm",
            "{SHA512-CRYPT}$6$EPUu0eMBnOfDs3Zf$é",
            "{DES-CRYPT}L5cgLz8pwXVF",
            "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ",
            "{SHA}not base64!",
            "{SHA}c2VjcmV0",
            "{SSHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
            "{SSHA.HEX}zz5df3a6a07029508f9ee2b79d959014dc505e2ed563b96e",
            "{SSHA.ZZZ}3d5df3a6a07029508f9ee2b79d959014dc505e2ed563b96e",
            "{BLF-CRYPT.HEX}$2y$05$/mwp77iVnXkLa3HixlYPTuD0ukvRa1ravvv5zHTTczRX8D8Ro6oki",
            "{BLF-CRYPT}$2y$99$/mwp77iVnXkLa3HixlYPTuD0ukvRa1ravvv5zHTTczRX8D8Ro6oki",
            "{BLF-CRYPT}$2y$05$short",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$garbage",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$rw1oNoxEAdo68J8huXfoHA$RfaM74vwS5kjw0vjEO9COM",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$rw1oNoxEAdo68J8huXfoHA==$RfaM74vwS5kjw0vjEO9COMr"
            "YrkdCDpxYCGaDcs7yKPE",
            "{ARGON2ID}$argon2id$v=19$m=065536,t=3,p=1$rw1oNoxEAdo68J8huXfoHA$RfaM74vwS5kjw0vjEO9COMrY"
            "rkdCDpxYCGaDcs7yKPE",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=0$rw1oNoxEAdo68J8huXfoHA$RfaM74vwS5kjw0vjEO9COMrYr"
            "kdCDpxYCGaDcs7yKPE",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$rw1oNoxEAdo68J8huXfoHA$RfaM74vwS5kjw0vjEO9COMrYr"
            "kdCDpxYCGaDcs7yKPE\n",
            "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$qfz6oIH2bmoRsYMj/rs49g$QrgwyNybM25WpoCzyxUtQJaTXFp"
            "gFG5TlgWEwoOC9I",
            "{ARGON2I}$argon2i$v=19$m=1,t=4,p=1$qfz6oIH2bmoRsYMj/rs49g$QrgwyNybM25WpoCzyxUtQJaTXFpgFG5"
            "TlgWEwoOC9IE",
            "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$qfz6oIH2bmoRsYMj/rs49g$QrgwyNybM25WpoCzyxUtQJaTXFp"
            "gFG5TlgWEwoOC9IE$",
            "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$é$QrgwyNybM25WpoCzyxUtQJaTXFpgFG5TlgWEwoOC9IE",
            "{PBKDF2}$1$Z0V2Te63fWHVnx.f$0$290bc91443122772360fb5ab2969d179a6277406",
            "{PBKDF2}$1$Z0V2Te63fWHVnx.f$-5$290bc91443122772360fb5ab2969d179a6277406",
            "{PBKDF2}$2$Z0V2Te63fWHVnx.f$5000$290bc91443122772360fb5ab2969d179a6277406",
            "{PBKDF2}$1$Z0V2Te63fWHVnx.f$5000$290bc914",
            "{SCRAM-SHA-256}4096,HPyOXGGzOTJg6J6zq5oXxw==",
            "{SCRAM-SHA-1}x,24rGd1UW6O2LGKEdHrmHLg==,NBqNPvVzqNXdMvtyxIMsq50+9Xk=,nG14w6hlA7ZHi28E985vZbzN96U=",
            "{CRAM-MD5}cd3ba7deaad6e5ca",
            "{DIGEST-MD5}b1726872c344b6dc8365b774f8fd6412",
        ],
    )
    def test_malformed_stored_password_is_no_match(self, stored):
        """A malformed or unknown stored password returns False and raises nothing."""
        assert False is verify(stored, b"secret")


@pytest.fixture
def calls(monkeypatch):
    """Record which library each argon2 verification reaches; both still do the real work."""
    record = []
    for name in ("_sodium_verify", "_cffi_verify"):
        real = getattr(schemes, name)

        def spy(*args, _real=real, _name=name):
            record.append(_name)
            return _real(*args)

        monkeypatch.setattr(schemes, name, spy)
    return record


class TestArgon2Verify:
    """ARGON2ID/ARGON2I go through libsodium, as in Dovecot, and argon2-cffi only for the rest."""

    @staticmethod
    def made(version=19, hash_len=32, parallelism=1, kind=argon2.Type.ID):
        """Return a cheap {ARGON2ID} or {ARGON2I} hash of "secret" made by argon2-cffi."""
        encoded = argon2.low_level.hash_secret(
            b"secret",
            b"pobox salt 16 B.",
            time_cost=1,
            memory_cost=64,
            parallelism=parallelism,
            hash_len=hash_len,
            type=kind,
            version=version,
        ).decode("ascii")
        return ("{ARGON2ID}" if kind is argon2.Type.ID else "{ARGON2I}") + encoded

    @pytest.mark.parametrize("stored", [ARGON2ID, ARGON2I])
    def test_doveadm_hash_goes_to_libsodium(self, calls, stored):
        """A doveadm ARGON2ID/ARGON2I hash is checked by libsodium alone, right or wrong."""
        assert ((True, False), ["_sodium_verify", "_sodium_verify"]) == (
            (verify(stored, b"secret"), verify(stored, b"Secret")),
            calls,
        )

    @pytest.mark.parametrize("parallelism", [2, 4])
    def test_parallel_lanes_go_to_libsodium(self, calls, parallelism):
        """libsodium takes p>1 (it computes the lanes in turn), so argon2-cffi is not needed."""
        stored = self.made(parallelism=parallelism)
        assert ((True, False), ["_sodium_verify", "_sodium_verify"]) == (
            (verify(stored, b"secret"), verify(stored, b"Secret")),
            calls,
        )

    @pytest.mark.parametrize(
        "options",
        [
            {"version": 16},
            {"version": 16, "kind": argon2.Type.I},
            {"hash_len": 12},
            {"hash_len": 64},
        ],
        ids=["v16", "v16-argon2i", "short-hash", "over-127-chars"],
    )
    def test_hash_libsodium_refuses_goes_to_argon2_cffi(self, calls, options):
        """v=16, under 16 bytes of hash, or over 127 characters: argon2-cffi checks it alone."""
        stored = self.made(**options)
        assert ((True, False), ["_cffi_verify", "_cffi_verify"]) == (
            (verify(stored, b"secret"), verify(stored, b"Secret")),
            calls,
        )

    @pytest.mark.parametrize(
        "options", [{"version": 16}, {"hash_len": 12}], ids=["v16", "short-hash"]
    )
    def test_libsodium_does_refuse_the_fallback_hashes(self, options):
        """The fallback is needed: libsodium says no to these hashes even for the password."""
        encoded = self.made(**options).partition("}")[2].encode("ascii")
        with pytest.raises(nacl.exceptions.InvalidkeyError):
            nacl.pwhash.argon2id.verify(encoded, b"secret")

    def test_malformed_hash_in_libsodium_form_is_no_match(self, calls):
        """A hash of the right shape that libsodium cannot decode is no match, and no error."""
        stored = ARGON2ID[:-1] + "F"  # sets a padding bit of the last base64 digit
        assert (False, ["_sodium_verify"]) == (verify(stored, b"secret"), calls)

    def test_malformed_hash_outside_libsodium_form_is_no_match(self, calls):
        """A hash no library reads is no match, and no error, after argon2-cffi says so."""
        stored = ARGON2ID.replace("p=1", "p=1,keyid=AAAA")
        assert (False, ["_cffi_verify"]) == (verify(stored, b"secret"), calls)

    @settings(max_examples=40, deadline=None)
    @given(
        password=st.binary(min_size=1, max_size=40).filter(lambda p: b"\0" not in p),
        kind=st.sampled_from([argon2.Type.ID, argon2.Type.I]),
        version=st.sampled_from([16, 19]),
        time_cost=st.integers(1, 3),
        parallelism=st.integers(1, 4),
        salt=st.binary(min_size=8, max_size=48),
        hash_len=st.integers(4, 80),
    )
    def test_every_argon2_cffi_hash_verifies(
        self, password, kind, version, time_cost, parallelism, salt, hash_len
    ):
        """Whichever library checks it, an argon2-cffi hash takes its password and only it."""
        encoded = argon2.low_level.hash_secret(
            password,
            salt,
            time_cost=time_cost,
            memory_cost=8 * parallelism,
            parallelism=parallelism,
            hash_len=hash_len,
            type=kind,
            version=version,
        ).decode("ascii")
        stored = ("{ARGON2ID}" if kind is argon2.Type.ID else "{ARGON2I}") + encoded
        assert (True, False) == (verify(stored, password), verify(stored, password + b"x"))


class TestHashPassword:
    """hash_password() makes stored passwords that verify."""

    @pytest.mark.parametrize("scheme", sorted(SUPPORTED_SCHEMES))
    def test_round_trip(self, scheme):
        """Every supported scheme hashes under its own name and verifies only the password."""
        stored = hash_password(b"s\xc3\xa9cret", scheme, username="alice@example.com")
        assert (f"{{{scheme}}}", True, False) == (
            stored[: len(scheme) + 2],
            verify(stored, b"s\xc3\xa9cret", username="alice@example.com"),
            verify(stored, b"secret", username="alice@example.com"),
        )

    @pytest.mark.parametrize(
        ("scheme", "expected"),
        [
            (None, "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"),
            ("ARGON2I", "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$"),
            ("BLF-CRYPT", "{BLF-CRYPT}$2y$10$"),
            ("SCRAM-SHA-1", "{SCRAM-SHA-1}4096,"),
        ],
    )
    def test_default_costs(self, scheme, expected):
        """Defaults: ARGON2ID as doveadm makes it, bcrypt cost 10, 4096 SCRAM iterations."""
        stored = hash_password(b"secret") if scheme is None else hash_password(b"secret", scheme)
        assert expected == stored[: len(expected)]

    @pytest.mark.parametrize(
        ("scheme", "fields"), [("SHA512-CRYPT", 4), ("PBKDF2", 5), ("MD5-CRYPT", 4)]
    )
    def test_default_crypt_rounds(self, scheme, fields):
        """crypt(3) and PBKDF2 defaults match Dovecot's: implicit 5000 rounds, or PBKDF2 5000."""
        parts = hash_password(b"secret", scheme).split("$")
        assert (fields, scheme != "PBKDF2" or parts[3] == "5000") == (len(parts), True)

    @pytest.mark.parametrize("scheme", ["SSHA", "SHA512-CRYPT", "BLF-CRYPT", "PBKDF2"])
    def test_salt_is_fresh(self, scheme):
        """Hashing the same password twice gives two different salted hashes."""
        assert hash_password(b"secret", scheme) != hash_password(b"secret", scheme)

    def test_encoding_suffix(self):
        """A .HEX suffix writes hex and keeps the suffix in the prefix."""
        stored = hash_password(b"secret", "sha256.hex")
        assert "{SHA256.HEX}2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b" == (
            stored
        )

    def test_plain_and_md5(self):
        """PLAIN keeps the password as it is; MD5 is MD5-CRYPT, as in Dovecot."""
        assert ("{PLAIN}secret", "{MD5}$1$") == (
            hash_password(b"secret", "PLAIN"),
            hash_password(b"secret", "MD5")[:8],
        )

    @pytest.mark.parametrize(
        ("scheme", "rounds", "expected"),
        [
            ("SHA512-CRYPT", 6000, "{SHA512-CRYPT}$6$rounds=6000$"),
            ("SHA256-CRYPT", 7000, "{SHA256-CRYPT}$5$rounds=7000$"),
            ("BLF-CRYPT", 4, "{BLF-CRYPT}$2y$04$"),
            ("ARGON2ID", 2, "{ARGON2ID}$argon2id$v=19$m=65536,t=2,p=1$"),
            ("SCRAM-SHA-256", 5000, "{SCRAM-SHA-256}5000,"),
        ],
    )
    def test_rounds(self, scheme, rounds, expected):
        """rounds sets each scheme's cost, as doveadm pw -r does."""
        assert expected == hash_password(b"secret", scheme, rounds=rounds)[: len(expected)]

    def test_pbkdf2_rounds(self):
        """PBKDF2 writes $1$salt$rounds$hexhash with the rounds asked for."""
        parts = hash_password(b"secret", "PBKDF2", rounds=1000).split("$")
        assert ["{PBKDF2}", "1", 16, "1000", 40] == [
            parts[0],
            parts[1],
            len(parts[2]),
            parts[3],
            len(parts[4]),
        ]

    @pytest.mark.parametrize(
        ("scheme", "rounds"), [("SHA", 5), ("SHA512-CRYPT", 0), ("MD5", 9), ("BLF-CRYPT", 32)]
    )
    def test_rounds_that_do_not_apply(self, scheme, rounds):
        """Rounds a scheme cannot take are refused rather than ignored."""
        with pytest.raises(SchemeError, match="rounds"):
            hash_password(b"secret", scheme, rounds=rounds)

    @pytest.mark.parametrize("scheme", ["NOPE", "ARGON2ID.HEX", "SSHA.B32", ""])
    def test_unknown_scheme(self, scheme):
        """An unknown scheme, or a suffix a scheme cannot take, raises UnknownScheme."""
        with pytest.raises(UnknownScheme):
            hash_password(b"secret", scheme)

    def test_nul_is_refused(self):
        """A password with NUL cannot be stored: crypt(3) would cut it short."""
        with pytest.raises(SchemeError, match="NUL"):
            hash_password(b"sec\0ret", "SHA512-CRYPT")

    def test_bcrypt_refuses_long_password(self):
        """BLF-CRYPT would ignore bytes past the 72nd, so hashing refuses them."""
        with pytest.raises(SchemeError, match="72 bytes"):
            hash_password(b"x" * 73, "BLF-CRYPT")

    def test_digest_md5_needs_username(self):
        """DIGEST-MD5 cannot be made without the username."""
        with pytest.raises(SchemeError, match="username"):
            hash_password(b"secret", "DIGEST-MD5")


class TestIdentifyScheme:
    """identify_scheme() names the scheme of a stored password."""

    @pytest.mark.parametrize(
        ("expected", "stored", "default"),
        [
            ("SHA512-CRYPT", "{sha512-crypt}$6$x", "CRYPT"),
            ("SSHA.HEX", "{SSHA.hex}00", "CRYPT"),
            ("CRYPT", "$6$x$y", "CRYPT"),
            ("PLAIN", "secret", "plain"),
            ("MD5-CRYPT", "$1$x$y", "PLAIN"),
            ("CRYPT", "{unterminated", "CRYPT"),
        ],
    )
    def test_identify(self, expected, stored, default):
        """The prefix names the scheme; without one, the default (or $1$) does."""
        assert expected == identify_scheme(stored, default_scheme=default)


class TestIsCheap:
    """is_cheap() tells single-digest schemes from iterated ones."""

    @pytest.mark.parametrize(
        ("expected", "stored", "default"),
        [
            (True, "{PLAIN}secret", "CRYPT"),
            (True, "secret", "PLAIN"),
            (True, "{CLEARTEXT}secret", "CRYPT"),
            (True, "{SSHA256}AAAA", "CRYPT"),
            (True, "{CRAM-MD5}00", "CRYPT"),
            (True, "{MD5}5ebe2294ecd0e0f08eab7690d2a6ee69", "CRYPT"),
            (False, "{MD5}$1$salt$hash", "CRYPT"),
            (False, "$1$salt$hash", "PLAIN"),
            (False, "{SHA512-CRYPT}$6$x$y", "PLAIN"),
            (False, "$6$x$y", "CRYPT"),
            (False, "{BLF-CRYPT}$2y$05$x", "PLAIN"),
            (False, "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$x$y", "PLAIN"),
            (False, "{PBKDF2}$1$x$5000$y", "PLAIN"),
            (False, "{SCRAM-SHA-256}4096,x,y,z", "PLAIN"),
            (False, "{NO-SUCH-SCHEME}x", "PLAIN"),
        ],
    )
    def test_is_cheap(self, expected, stored, default):
        """Digests are cheap; crypt(3), bcrypt, Argon2, PBKDF2, SCRAM and unknowns are not."""
        assert expected == schemes.is_cheap(stored, default_scheme=default)


class TestScramCredentials:
    """scram_credentials() hands the stored SCRAM keys to a SASL server."""

    def test_parses_doveadm_entry(self):
        """The four comma-separated fields come back decoded."""
        assert ScramCredentials(
            "sha256",
            4096,
            base64.b64decode("HPyOXGGzOTJg6J6zq5oXxw=="),
            base64.b64decode("NeSSK9y583Iw4M6D+rE+gYgApP/p+4MzBv8Z1D7JcAk="),
            base64.b64decode("BnBcslrVRamDV2cYN+wQHO5ZJaXdQrryndM6Ijj6UM0="),
        ) == scram_credentials(SCRAM_SHA_256)

    def test_sha1(self):
        """SCRAM-SHA-1 entries carry 20-byte keys."""
        creds = scram_credentials(SCRAM_SHA_1)
        assert creds is not None
        assert ("sha1", 20, 20) == (creds.hash_name, len(creds.stored_key), len(creds.server_key))

    def test_keys_stay_out_of_repr(self):
        """The keys are secrets and do not appear in repr()."""
        creds = scram_credentials(SCRAM_SHA_256)
        assert creds is not None
        text = repr(creds)
        assert (True, False, False) == (
            "iterations=4096" in text,
            "stored_key" in text,
            "server_key" in text,
        )

    @pytest.mark.parametrize(
        "stored", ["{PLAIN}secret", "{SCRAM-SHA-256}4096,xx", "{SCRAM-SHA-256}0,,,", "x"]
    )
    def test_not_scram(self, stored):
        """Anything but a well-formed SCRAM entry gives None."""
        assert None is scram_credentials(stored)


class TestCramMd5Context:
    """cram_md5_context() hands the stored HMAC-MD5 context to a SASL server."""

    @pytest.mark.parametrize(
        ("expected", "stored"),
        [
            (
                "cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56",
                "{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56",
            ),
            (
                "cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56",
                "{CRAM-MD5.B64}zTun3qrW5cojRIukLjeXR6ng9/H7wAyKgbuqw5VzG1Y=",
            ),
        ],
    )
    def test_decodes(self, expected, stored):
        """The 32 bytes come back whatever the encoding."""
        assert bytes.fromhex(expected) == cram_md5_context(stored)

    @pytest.mark.parametrize(
        ("expected", "password"),
        [
            ("cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56", b"secret"),
            # Longer than the 64-byte HMAC block: the key is MD5(password) (RFC 2104 §2).
            ("8103bb3a2a4b96a9ca9cce4efecc8d22ebe7163dff7401afb5aa16d4edcf9f1f", b"x" * 70),
        ],
    )
    def test_hash_matches_doveadm(self, expected, password):
        """hash_password(CRAM-MD5) writes the same context as doveadm pw."""
        assert "{CRAM-MD5}" + expected == hash_password(password, "CRAM-MD5")

    @pytest.mark.parametrize("stored", ["{PLAIN}secret", "{CRAM-MD5}cd3b", SCRAM_SHA_256])
    def test_not_cram_md5(self, stored):
        """Anything but a well-formed CRAM-MD5 entry gives None."""
        assert None is cram_md5_context(stored)


class TestScramServerKeys:
    """scram_salt() and scram_server_keys(): what the SASL shell hands the SCRAM core."""

    def test_salt_stable_per_key_and_name(self):
        """16 bytes, the same for the same key, mechanism and name, different otherwise."""
        salt = scram_salt(b"k" * 32, "SCRAM-SHA-256", "alice")
        assert 16 == len(salt)
        assert salt == scram_salt(b"k" * 32, "SCRAM-SHA-256", "alice")
        others = {
            scram_salt(b"j" * 32, "SCRAM-SHA-256", "alice"),
            scram_salt(b"k" * 32, "SCRAM-SHA-1", "alice"),
            scram_salt(b"k" * 32, "SCRAM-SHA-256", "bob"),
        }
        assert salt not in others
        assert 3 == len(others)

    @pytest.mark.parametrize("stored", ["{PLAIN}secret", "{PLAIN.B64}c2VjcmV0"])
    def test_plain_password_derived(self, stored):
        """A {PLAIN} password gives the keys of RFC 5802 §3 with the given salt, 4096 rounds."""
        creds = scram_server_keys(stored, "SCRAM-SHA-256", b"s" * 16)
        salted = hashlib.pbkdf2_hmac("sha256", b"secret", b"s" * 16, 4096)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        assert (
            ScramCredentials(
                "sha256",
                4096,
                b"s" * 16,
                hashlib.sha256(client_key).digest(),
                hmac.digest(salted, b"Server Key", "sha256"),
            )
            == creds
        )

    def test_stored_keys_used(self):
        """Stored SCRAM keys of the mechanism's hash are used as they are."""
        assert scram_credentials(SCRAM_SHA_1) == scram_server_keys(
            SCRAM_SHA_1, "SCRAM-SHA-1", b"s" * 16
        )

    @pytest.mark.parametrize("stored", [None, SHA512_CRYPT, SCRAM_SHA_1, "{PLAIN.HEX}zz"])
    def test_decoys(self, stored):
        """Unknown users, one-way hashes, the other hash: decoys with the salt, empty keys."""
        assert ScramCredentials("sha256", 4096, b"s" * 16, b"", b"") == scram_server_keys(
            stored, "SCRAM-SHA-256", b"s" * 16
        )

    @pytest.mark.parametrize("stored", [None, "{PLAIN}secret", SCRAM_SHA_256, SHA512_CRYPT])
    def test_one_pbkdf2_whoever(self, stored, monkeypatch):
        """Every case costs exactly one PBKDF2 of 4096 rounds."""
        rounds = []
        real = hashlib.pbkdf2_hmac

        def counting(hash_name, password, salt, iterations):
            rounds.append(iterations)
            return real(hash_name, password, salt, iterations)

        monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
        scram_server_keys(stored, "SCRAM-SHA-256", b"s" * 16)
        assert [4096] == rounds


class TestDummyHash:
    """DUMMY_HASH, what unknown users are checked against when a file has no password."""

    def test_dummy_hash_has_default_parameters(self):
        """DUMMY_HASH is a well-formed argon2id hash that costs what a default hash costs."""
        expected = argon2.extract_parameters(hash_password(b"x").removeprefix("{ARGON2ID}"))
        assert expected == argon2.extract_parameters(DUMMY_HASH.removeprefix("{ARGON2ID}"))


# --- against the real Dovecot ---------------------------------------------------------------

#: Non-ASCII, with a space: the bytes must reach both sides unchanged.
PASSWORD = "sécret π"
USERNAME = "alice@example.com"
#: Every scheme both sides support, and a few encoding suffixes.
DOVEADM_SCHEMES = [*sorted(SUPPORTED_SCHEMES), "SSHA.HEX", "SHA512.HEX", "PLAIN.B64"]


@pytest.fixture(scope="module")
def doveadm():
    """Return the path of doveadm; fail (not skip) without it: CI installs dovecot-core."""
    path = shutil.which("doveadm")
    if path is None:
        pytest.fail("doveadm not found: install dovecot-core to run the external tests")
    return path


@pytest.mark.external
class TestAgainstDoveadm:
    """Hashes cross between pobox and doveadm pw in both directions."""

    @pytest.mark.parametrize("scheme", DOVEADM_SCHEMES)
    def test_doveadm_hash_verifies_here(self, doveadm, scheme):
        """What doveadm pw -s makes, verify() accepts for the password and only for it."""
        made = subprocess.run(
            [doveadm, "pw", "-s", scheme, "-u", USERNAME, "-p", PASSWORD],
            capture_output=True,
            text=True,
            check=True,
        )
        stored = made.stdout.strip()
        assert (True, False) == (
            verify(stored, PASSWORD.encode(), username=USERNAME),
            verify(stored, PASSWORD.upper().encode(), username=USERNAME),
        )

    @pytest.mark.parametrize("scheme", ["ARGON2ID", "ARGON2I"])
    def test_doveadm_argon2_hash_goes_to_libsodium(self, doveadm, calls, scheme):
        """A fresh doveadm ARGON2ID/ARGON2I hash is checked by libsodium, as Dovecot checks it."""
        made = subprocess.run(
            [doveadm, "pw", "-s", scheme, "-p", PASSWORD],
            capture_output=True,
            text=True,
            check=True,
        )
        stored = made.stdout.strip()
        assert ((True, False), ["_sodium_verify", "_sodium_verify"]) == (
            (verify(stored, PASSWORD.encode()), verify(stored, PASSWORD.upper().encode())),
            calls,
        )

    @pytest.mark.parametrize("scheme", DOVEADM_SCHEMES)
    def test_our_hash_verifies_in_doveadm(self, doveadm, scheme):
        """What hash_password() makes, doveadm pw -t accepts for the password and only for it."""
        stored = hash_password(PASSWORD.encode(), scheme, username=USERNAME)

        def check(password):
            return subprocess.run(
                [doveadm, "pw", "-t", stored, "-u", USERNAME, "-p", password],
                capture_output=True,
                text=True,
                check=False,
            ).returncode

        assert (0, True) == (check(PASSWORD), check(PASSWORD.upper()) != 0)
