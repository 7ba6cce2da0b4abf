"""Password schemes as Dovecot names them: verify and make ``{SCHEME}data`` strings.

This module owns the stored-password formats of Dovecot's ``password-scheme.c``.  A stored
password is ``{SCHEME}data``.  Without the braces, Dovecot's ``default_pass_scheme`` applies;
its usual value ``CRYPT`` means "whatever crypt(3) makes of the ``$id$`` prefix".  Scheme
names are case-insensitive, and the schemes whose data is raw bytes (``PLAIN``, ``SHA*``,
``SSHA*``, the MD5 family, ``CRAM-MD5``) take Dovecot's ``.HEX`` / ``.B64`` encoding suffix.

Everything here is CPU-bound and blocking: callers on an event loop run it in a thread.  It
is all thread-safe: crypt(3) is libxcrypt's reentrant ``crypt_rn`` with a buffer per call
(the stdlib ``crypt`` module is gone in Python 3.13), and ``ctypes`` releases the GIL while
it runs.

May import: the standard library, ``argon2`` (argon2-cffi), ``nacl`` (PyNaCl, for libsodium),
``bcrypt``, :mod:`pobox.errors`, :mod:`pobox.auth.base`, and the stdlib-only protocol core
(``md5_compress`` from :mod:`pobox.protocol._sasl`, ``saslprep`` from
:mod:`pobox.protocol._i18n`; the core never imports auth).

**Passwords in other forms** (RFC 6856, RFC 4616, RFC 5802: SASLprep, RFC 4013).  The same
password can reach pobox as different octets: ``é`` composed or as ``e`` plus a combining
accent, fullwidth letters, a no-break space.  :func:`prepare_password` folds them into one
form, and both sides use it: :func:`hash_password` hashes the prepared form (SCRAM's keys
must be made from it, RFC 5802 §3), and :func:`verify` accepts the password as sent *or*
prepared, and compares a ``{PLAIN}`` entry in its prepared form too.  So a hash pobox made
matches whatever form the client types, and a hash made elsewhere (``doveadm pw`` hashes
the octets it is given) still matches the octets it was made from.  A password SASLprep
refuses (a control character, a private-use one) or that is not UTF-8 is used as sent.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import functools
import hashlib
import hmac
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import argon2
import argon2.low_level
import bcrypt
import nacl.exceptions
import nacl.pwhash

from pobox.auth.base import AuthError
from pobox.errors import PoboxError
from pobox.protocol._i18n import saslprep
from pobox.protocol._sasl import md5_compress

__all__ = [
    "DUMMY_HASH",
    "SCRAM_ITERATIONS",
    "SUPPORTED_SCHEMES",
    "SchemeError",
    "ScramCredentials",
    "UnknownScheme",
    "cram_md5_context",
    "hash_password",
    "identify_scheme",
    "prepare_password",
    "scram_credentials",
    "scram_salt",
    "scram_server_keys",
    "verify",
]


class SchemeError(PoboxError, ValueError):
    """A password cannot be hashed as asked (a bad scheme, cost or password)."""


class UnknownScheme(SchemeError):
    """The password scheme is not one this module knows."""


# --- crypt(3) through libxcrypt ---------------------------------------------------------

#: ``sizeof(struct crypt_data)`` in libxcrypt's ``<crypt.h>``; ``crypt_rn`` checks it.
_CRYPT_DATA_SIZE = 32768
#: ``CRYPT_GENSALT_OUTPUT_SIZE`` in libxcrypt's ``<crypt.h>``.
_CRYPT_GENSALT_OUTPUT_SIZE = 192
#: libxcrypt's sonames: with the glibc-compatible API (Debian's), and without it.
_LIBCRYPT_NAMES = ("libcrypt.so.1", "libcrypt.so.2")


@functools.cache
def _libcrypt() -> ctypes.CDLL:
    """Load libxcrypt and declare the two functions used, once per process."""
    for name in _LIBCRYPT_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if not hasattr(lib, "crypt_rn"):  # glibc's old libcrypt: no crypt_rn
            continue
        # char *crypt_rn(const char *phrase, const char *setting, void *data, int size)
        lib.crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        lib.crypt_rn.restype = ctypes.c_char_p
        # char *crypt_gensalt_rn(const char *prefix, unsigned long count,
        #                        const char *rbytes, int nrbytes, char *output, int size)
        lib.crypt_gensalt_rn.argtypes = [
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        lib.crypt_gensalt_rn.restype = ctypes.c_char_p
        return lib
    msg = "libxcrypt (libcrypt.so.1) is not available: crypt(3) password schemes cannot work"
    raise AuthError(msg)


def _crypt(password: bytes, setting: str) -> bytes | None:
    """Return crypt(3) of ``password`` under ``setting``, or ``None`` if libxcrypt refuses it."""
    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    result: bytes | None = _libcrypt().crypt_rn(
        password, setting.encode("ascii"), data, _CRYPT_DATA_SIZE
    )
    return result


def _crypt_gensalt(scheme: str, prefix: str | None, count: int) -> str:
    """Return a fresh crypt(3) setting (salt from the OS) for ``prefix`` and ``count``."""
    output = ctypes.create_string_buffer(_CRYPT_GENSALT_OUTPUT_SIZE)
    raw_prefix = None if prefix is None else prefix.encode("ascii")
    setting: bytes | None = _libcrypt().crypt_gensalt_rn(
        raw_prefix, count, None, 0, output, _CRYPT_GENSALT_OUTPUT_SIZE
    )
    if setting is None:
        msg = f"crypt(3) cannot make a {scheme} hash with {count} rounds"
        raise SchemeError(msg)
    return setting.decode("ascii")


#: crypt(3) schemes: the ``$id$`` their data must start with (``None``: any) and the prefix
#: handed to ``crypt_gensalt`` (``None``: libxcrypt's preferred method, ``""``: DES).
_CRYPT_SCHEMES: dict[str, tuple[str | None, str | None]] = {
    "CRYPT": (None, None),
    "DES-CRYPT": (None, ""),
    "MD5-CRYPT": ("$1$", "$1$"),
    "SHA256-CRYPT": ("$5$", "$5$"),
    "SHA512-CRYPT": ("$6$", "$6$"),
}


def _crypt_verify(scheme: str, data: str, password: bytes) -> bool:
    required, _ = _CRYPT_SCHEMES[scheme]
    if required is not None and not data.startswith(required):
        return False
    if scheme == "DES-CRYPT" and (len(data) != 13 or data.startswith(("$", "_"))):
        return False
    if not data:  # some crypt(3)s return "" for an empty setting: that must not "match"
        return False
    result = _crypt(password, data)
    return result is not None and hmac.compare_digest(result, data.encode("ascii"))


# --- BLF-CRYPT and ARGON2 -----------------------------------------------------------------

#: bcrypt reads at most 72 bytes of password; libxcrypt and Dovecot silently ignore the rest.
_BCRYPT_MAX_PASSWORD = 72
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_COSTS = range(4, 32)
#: Dovecot's doveadm uses cost 5; 10 costs about as much as our ARGON2ID default.
_BCRYPT_DEFAULT_COST = 10

#: Type, prefix, and Dovecot's (libsodium's interactive) time and memory cost in KiB.
_ARGON2: dict[str, tuple[argon2.Type, str, int, int]] = {
    "ARGON2I": (argon2.Type.I, "$argon2i$", 4, 32768),
    "ARGON2ID": (argon2.Type.ID, "$argon2id$", 3, 65536),
}


#: The argon2 encodings libsodium verifies, as Dovecot does: version 19 only (not 16, nor the
#: version-less form), at least 16 bytes of hash (``ARGON2_MIN_OUTLEN``; 22 base64 digits), and
#: at most 127 characters (PyNaCl's ``crypto_pwhash_STRBYTES`` less the NUL).  Any parallelism
#: is fine: libsodium computes the lanes one after the other.  Within this form libsodium and
#: argon2-cffi decode alike (both from the reference ``argon2-encoding.c``), so the choice
#: between them depends on the stored hash alone, never on the password.
_SODIUM_ARGON2 = re.compile(
    rb"\$argon2(?:id|i)\$v=19\$m=[1-9][0-9]*,t=[1-9][0-9]*,p=[1-9][0-9]*"
    rb"\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]{22,}"
)
_SODIUM_MAX_ENCODED = 127


def _sodium_takes(encoded: bytes) -> bool:
    """Return whether libsodium can verify ``encoded``, whatever the password."""
    return len(encoded) <= _SODIUM_MAX_ENCODED and _SODIUM_ARGON2.fullmatch(encoded) is not None


def _sodium_verify(encoded: bytes, password: bytes) -> bool:
    """Verify with libsodium's ``crypto_pwhash_str_verify``, Dovecot's own check.

    It is about 1.7 times as fast as argon2-cffi's reference code on an m=65536,t=3 hash, and
    releases the GIL.  ``argon2i.verify`` is the same function: libsodium reads the type from
    the prefix.  It says only "no" for a wrong password and for a hash it cannot read alike,
    which is why :func:`_sodium_takes` decides beforehand and its answer is final.
    """
    try:
        return nacl.pwhash.argon2id.verify(encoded, password)
    except nacl.exceptions.InvalidkeyError:
        return False


def _cffi_verify(encoded: bytes, password: bytes, kind: argon2.Type) -> bool:
    """Verify with argon2-cffi: the encodings libsodium refuses (``v=16``, short or long)."""
    try:
        return argon2.low_level.verify_secret(encoded, password, kind)
    except argon2.exceptions.VerificationError:
        return False


def _argon2_verify(scheme: str, data: str, password: bytes) -> bool:
    kind, prefix, _, _ = _ARGON2[scheme]
    if not data.startswith(prefix):  # crypto_pwhash_str_verify would take either type
        return False
    encoded = data.encode("ascii")
    if _sodium_takes(encoded):
        return _sodium_verify(encoded, password)
    return _cffi_verify(encoded, password, kind)


# --- PBKDF2 and SCRAM ---------------------------------------------------------------------

#: Dovecot's ``PBKDF2_ROUNDS_DEFAULT`` and salt length (``password-scheme-pbkdf2.c``).
_PBKDF2_DEFAULT_ROUNDS = 5000
_PBKDF2_SALT_CHARS = 16
_SHA1_SIZE = 20
#: The alphabet of crypt(3) salts, which Dovecot also uses for PBKDF2 salts.
_SALT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _uint(text: str) -> int:
    """Parse a decimal count as Dovecot's ``str_to_uint`` does: ASCII digits only, > 0."""
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        msg = f"not a positive count: {text!r}"
        raise ValueError(msg)
    return int(text)


def _pbkdf2_verify(data: str, password: bytes) -> bool:
    # $1$salt$rounds$hexhash: the salt string is used as it is, the key is HMAC-SHA1.
    parts = data.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "1":
        return False
    salt, rounds, hexhash = parts[2], _uint(parts[3]), parts[4]
    expected = binascii.unhexlify(hexhash)
    if len(expected) != _SHA1_SIZE:
        return False
    key = hashlib.pbkdf2_hmac("sha1", password, salt.encode("utf-8", "surrogateescape"), rounds)
    return hmac.compare_digest(key, expected)


_SCRAM_HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
#: RFC 5802 §5.1 asks for at least 4096 iterations; Dovecot uses exactly that.
_SCRAM_DEFAULT_ITERATIONS = 4096
_SCRAM_SALT_BYTES = 16


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """What a SCRAM server stores for a user (RFC 5802 §3), as Dovecot's ``{SCRAM-*}``.

    Attributes:
        hash_name: :mod:`hashlib` name of the hash, ``"sha1"`` or ``"sha256"``.
        iterations: PBKDF2 iteration count.
        salt: the salt.
        stored_key: ``H(ClientKey)``.
        server_key: ``HMAC(SaltedPassword, "Server Key")``.
    """

    hash_name: str
    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


def _scram_keys(
    hash_name: str, password: bytes, salt: bytes, iterations: int
) -> tuple[bytes, bytes]:
    """Return ``(StoredKey, ServerKey)`` for ``password`` (RFC 5802 §3)."""
    salted = hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    return hashlib.new(hash_name, client_key).digest(), server_key


def _scram_parse(scheme: str, data: str) -> ScramCredentials:
    # iterations,salt,StoredKey,ServerKey with the three binary fields in base64.
    hash_name = _SCRAM_HASHES[scheme]
    iterations, salt, stored_key, server_key = data.split(",")
    creds = ScramCredentials(
        hash_name,
        _uint(iterations),
        _b64decode(salt),
        _b64decode(stored_key),
        _b64decode(server_key),
    )
    size = hashlib.new(hash_name).digest_size
    if len(creds.stored_key) != size or len(creds.server_key) != size:
        msg = "SCRAM key of the wrong length"
        raise ValueError(msg)
    return creds


def _scram_verify(scheme: str, data: str, password: bytes) -> bool:
    creds = _scram_parse(scheme, data)
    stored_key, server_key = _scram_keys(creds.hash_name, password, creds.salt, creds.iterations)
    return hmac.compare_digest(stored_key + server_key, creds.stored_key + creds.server_key)


# --- CRAM-MD5: the HMAC-MD5 context ---------------------------------------------------------
#
# Dovecot stores HMAC-MD5's two intermediate MD5 states: the states after compressing the
# key XOR opad and the key XOR ipad blocks (hmac-cram-md5.c), each as four little-endian
# words, outer first.  hashlib does not expose MD5's state, so the compression function of
# RFC 1321 §3.4 comes from the SASL core, which needs it too; it runs twice per verification.

_MD5_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_BLOCK = 64


def _cram_md5(password: bytes, _salt: bytes = b"", _username: str | None = None) -> bytes:
    """Return the 32-byte HMAC-MD5 context Dovecot stores as ``{CRAM-MD5}``."""
    key = hashlib.md5(password).digest() if len(password) > _MD5_BLOCK else password  # noqa: S324
    key = key.ljust(_MD5_BLOCK, b"\0")
    outer = md5_compress(_MD5_IV, bytes(k ^ 0x5C for k in key))
    inner = md5_compress(_MD5_IV, bytes(k ^ 0x36 for k in key))
    return struct.pack("<8I", *outer, *inner)


# --- schemes whose data is encoded bytes ----------------------------------------------------


def _hasher(name: str) -> Callable[[bytes, bytes, str | None], bytes]:
    def digest(password: bytes, salt: bytes, _username: str | None = None) -> bytes:
        return hashlib.new(name, password + salt).digest()

    return digest


def _plain(password: bytes, _salt: bytes = b"", _username: str | None = None) -> bytes:
    return password


def _digest_md5(password: bytes, _salt: bytes = b"", username: str | None = None) -> bytes:
    # MD5(user:realm:password), the realm being what follows the first "@" of the username.
    if username is None:
        msg = "DIGEST-MD5 needs the username"
        raise SchemeError(msg)
    user, _, realm = username.partition("@")
    return hashlib.md5(f"{user}:{realm}:".encode() + password).digest()  # noqa: S324


@dataclass(frozen=True, slots=True)
class _Binary:
    """A scheme whose data is ``digest(password + salt) + salt`` in some encoding."""

    encoding: str  # "NONE", "HEX" or "B64" when no .HEX/.B64 suffix says otherwise
    size: int  # length of the digest; 0 for PLAIN
    digest: Callable[[bytes, bytes, str | None], bytes]
    salted: bool = False


#: Salt length for the SSHA family; Dovecot makes 4 bytes and accepts any length.
_SALT_BYTES = 16

_BINARY: dict[str, _Binary] = {
    "PLAIN": _Binary("NONE", 0, _plain),
    "SHA": _Binary("B64", 20, _hasher("sha1")),
    "SHA256": _Binary("B64", 32, _hasher("sha256")),
    "SHA512": _Binary("B64", 64, _hasher("sha512")),
    "SSHA": _Binary("B64", 20, _hasher("sha1"), salted=True),
    "SSHA256": _Binary("B64", 32, _hasher("sha256"), salted=True),
    "SSHA512": _Binary("B64", 64, _hasher("sha512"), salted=True),
    "PLAIN-MD5": _Binary("HEX", 16, _hasher("md5")),
    "LDAP-MD5": _Binary("B64", 16, _hasher("md5")),
    "SMD5": _Binary("B64", 16, _hasher("md5"), salted=True),
    "CRAM-MD5": _Binary("HEX", 32, _cram_md5),
    "DIGEST-MD5": _Binary("HEX", 16, _digest_md5),
}


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _decode(spec: _Binary, data: str, suffix: str | None) -> bytes:
    """Decode ``data`` as Dovecot's ``password_decode()`` does.

    A fixed-length value without a suffix is hex when it is exactly twice the digest long,
    else base64; a variable-length one uses the suffix or the scheme's default encoding.
    """
    fixed = spec.size and not spec.salted
    if suffix is None and fixed:
        encoding = "HEX" if len(data) == 2 * spec.size else "B64"
    else:
        encoding = suffix or spec.encoding
    if encoding == "NONE":
        raw = data.encode("utf-8", "surrogateescape")
    elif encoding == "HEX":
        raw = binascii.unhexlify(data)
    else:
        raw = _b64decode(data)
    if (fixed and len(raw) != spec.size) or (spec.salted and len(raw) <= spec.size):
        msg = "stored value of the wrong length"
        raise ValueError(msg)
    return raw


def _binary_verify(
    spec: _Binary, data: str, suffix: str | None, password: bytes, username: str | None
) -> bool:
    raw = _decode(spec, data, suffix)
    salt = raw[spec.size :] if spec.salted else b""
    expected = spec.digest(password, salt, username) + salt
    return hmac.compare_digest(expected, raw)


def _encode(raw: bytes, encoding: str) -> str:
    if encoding == "NONE":
        return raw.decode("utf-8", "surrogateescape")
    if encoding == "HEX":
        return raw.hex()
    return base64.b64encode(raw).decode("ascii")


# --- scheme names ---------------------------------------------------------------------------

_ALIASES = {"CLEAR": "PLAIN", "CLEARTEXT": "PLAIN", "SHA1": "SHA"}
_SUFFIXES = {"HEX": "HEX", "B64": "B64", "BASE64": "B64"}

#: Every scheme name :func:`verify` and :func:`hash_password` understand (without suffix).
SUPPORTED_SCHEMES: frozenset[str] = frozenset(
    [*_CRYPT_SCHEMES, *_ARGON2, *_BINARY, *_SCRAM_HASHES, *_ALIASES, "BLF-CRYPT", "MD5", "PBKDF2"]
)


def _parse_name(name: str) -> tuple[str, str | None]:
    """Split ``SSHA.hex`` into the canonical scheme ``SSHA`` and the encoding ``HEX``."""
    upper = name.upper()
    base, dot, suffix = upper.rpartition(".")
    if dot and suffix in _SUFFIXES:
        upper, encoding = base, _SUFFIXES[suffix]
    else:
        encoding = None
    upper = _ALIASES.get(upper, upper)
    if upper not in SUPPORTED_SCHEMES or (encoding is not None and upper not in _BINARY):
        raise UnknownScheme(name)
    return upper, encoding


def _split(stored: str, default_scheme: str) -> tuple[str, str]:
    """Split a stored password into scheme name and data (Dovecot ``password_get_scheme``)."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 0:
            return stored[1:end], stored[end + 1 :]
    if stored.startswith("$1$"):  # Dovecot recognises a bare MD5-crypt whatever the default
        return "MD5-CRYPT", stored
    return default_scheme, stored


def identify_scheme(stored: str, *, default_scheme: str = "CRYPT") -> str:
    """Return the upper-case scheme name of a stored password, suffix included.

    Args:
        stored: ``{SCHEME}data``, or bare data in ``default_scheme``.
        default_scheme: the scheme of data without a ``{SCHEME}`` prefix.

    Returns:
        For example ``"SHA512-CRYPT"`` or ``"SSHA.HEX"``; the name is not checked.
    """
    return _split(stored, default_scheme)[0].upper()


# --- the public verbs -----------------------------------------------------------------------


def is_cheap(stored: str, *, default_scheme: str = "CRYPT") -> bool:
    """Return whether checking a password against ``stored`` costs only one digest.

    Those (``PLAIN``, the ``SHA``/``MD5`` digests, ``CRAM-MD5``, ...) take microseconds,
    less than handing the check to a worker thread; iterated schemes (crypt(3), bcrypt,
    Argon2, PBKDF2, SCRAM) take milliseconds and belong in a worker thread.  A malformed
    or unknown scheme is not cheap (the caller then takes the thread path, which fails it).
    """
    try:
        scheme, data = _split(stored, default_scheme)
        name, _ = _parse_name(scheme)
    except ValueError:
        return False
    # MD5 is verify()'s MD5-CRYPT when the data looks like one, else PLAIN-MD5.
    return name in _BINARY or (name == "MD5" and not data.startswith("$1$"))


def prepare_password(password: bytes) -> bytes:
    """Return ``password`` SASLprep'd (RFC 4013, a query string), or as it is if it cannot be.

    Not UTF-8, or refused by SASLprep (control or private-use characters, mixed-direction
    text, empty): the octets as they are, so such a password still works where it was
    hashed as it is, and never raises.
    """
    try:
        return saslprep(password.decode("utf-8")).encode("utf-8")
    except ValueError:  # UnicodeDecodeError included
        return password


def verify(
    stored: str, password: bytes, *, default_scheme: str = "CRYPT", username: str | None = None
) -> bool:
    """Return whether ``password``, as sent or SASLprep'd, matches the stored password.

    The prepared form is tried only when it differs from what was sent (so an ASCII
    password costs one hash, as before); a ``{PLAIN}`` entry also matches when both
    prepared forms are equal.  See the module docstring.

    A malformed stored password or an unknown scheme is never a match and never an error,
    and nothing is logged here: the caller knows the user and decides what to report.  A
    password containing NUL never matches (C would see only its first part), but is still
    hashed so that it costs the same time.

    Args:
        stored: ``{SCHEME}data``, or bare data in ``default_scheme``.
        password: the password the client sent, as bytes.
        default_scheme: the scheme of data without a ``{SCHEME}`` prefix (Dovecot's
            ``default_pass_scheme``).
        username: the login name; only ``DIGEST-MD5`` needs it.

    Raises:
        AuthError: libxcrypt is missing, so crypt(3) schemes cannot be checked at all.
    """
    if _verify_as_sent(stored, password, default_scheme, username):
        return True
    prepared = prepare_password(password)
    if prepared != password and _verify_as_sent(stored, prepared, default_scheme, username):
        return True
    plain = _plaintext(stored, default_scheme)
    return (
        plain is not None
        and b"\0" not in password
        and hmac.compare_digest(prepare_password(plain), prepared)
    )


def _verify_as_sent(
    stored: str, password: bytes, default_scheme: str, username: str | None
) -> bool:
    """Return whether these very octets match the stored password (see :func:`verify`)."""
    has_nul = b"\0" in password
    password = password.replace(b"\0", b"")  # same cost; the result is thrown away below
    try:
        scheme, data = _split(stored, default_scheme)
        name, suffix = _parse_name(scheme)
        if name in _BINARY:
            matched = _binary_verify(_BINARY[name], data, suffix, password, username)
        elif name == "MD5":  # Dovecot: MD5-CRYPT if it looks like one, else PLAIN-MD5
            matched = (
                _crypt_verify("MD5-CRYPT", data, password)
                if data.startswith("$1$")
                else _binary_verify(_BINARY["PLAIN-MD5"], data, None, password, username)
            )
        elif name in _CRYPT_SCHEMES:
            matched = _crypt_verify(name, data, password)
        elif name == "BLF-CRYPT":
            matched = data.startswith(_BCRYPT_PREFIXES) and bcrypt.checkpw(
                password[:_BCRYPT_MAX_PASSWORD], data.encode("ascii")
            )
        elif name in _ARGON2:
            matched = _argon2_verify(name, data, password)
        elif name == "PBKDF2":
            matched = _pbkdf2_verify(data, password)
        else:
            matched = _scram_verify(name, data, password)
    except (ValueError, OverflowError):  # includes UnknownScheme, binascii and Unicode errors
        return False
    return matched and not has_nul


def hash_password(
    password: bytes,
    scheme: str = "ARGON2ID",
    *,
    rounds: int | None = None,
    username: str | None = None,
) -> str:
    """Hash ``password`` with a fresh salt and return it as ``{SCHEME}data``.

    Args:
        password: the new password; it must not contain NUL.
        scheme: a name from :data:`SUPPORTED_SCHEMES`, case-insensitive, with an optional
            ``.HEX`` / ``.B64`` suffix for the byte-valued schemes.
        rounds: the cost, as ``doveadm pw -r`` takes it: rounds for ``SHA*-CRYPT`` and
            ``PBKDF2``, the cost exponent for ``BLF-CRYPT``, the time cost for ``ARGON2*``,
            the iterations for ``SCRAM-*``.  ``None`` picks the default.
        username: the login name; only ``DIGEST-MD5`` needs it.

    Returns:
        The stored form, prefixed with the scheme name as given (upper-cased).

    Raises:
        UnknownScheme: ``scheme`` is not supported.
        SchemeError: the password contains NUL (or is over 72 bytes for ``BLF-CRYPT``),
            ``rounds`` does not apply or is out of range, or the scheme needs a ``username``.
    """
    name, suffix = _parse_name(scheme)
    prefix = "{" + scheme.upper() + "}"
    if b"\0" in password:
        msg = "a password cannot contain NUL"
        raise SchemeError(msg)
    # One form for every way of typing it (see the module docstring); SCRAM's keys must be
    # made from the prepared password (RFC 5802 §3, Normalize).
    password = prepare_password(password)
    if rounds is not None and rounds < 1:
        msg = f"rounds must be positive, not {rounds}"
        raise SchemeError(msg)
    if name in _BINARY and rounds is not None:
        msg = f"{name} takes no rounds"
        raise SchemeError(msg)
    if name == "BLF-CRYPT" and (
        len(password) > _BCRYPT_MAX_PASSWORD
        or (rounds or _BCRYPT_DEFAULT_COST) not in _BCRYPT_COSTS
    ):
        msg = "BLF-CRYPT takes at most 72 bytes of password and rounds from 4 to 31"
        raise SchemeError(msg)
    if name in _BINARY:
        spec = _BINARY[name]
        salt = secrets.token_bytes(_SALT_BYTES) if spec.salted else b""
        raw = spec.digest(password, salt, username) + salt
        return prefix + _encode(raw, suffix or spec.encoding)
    if name in _CRYPT_SCHEMES or name == "MD5":
        _, gensalt_prefix = _CRYPT_SCHEMES["MD5-CRYPT" if name == "MD5" else name]
        result = _crypt(password, _crypt_gensalt(name, gensalt_prefix, rounds or 0))
        if result is None:
            msg = f"crypt(3) failed to hash with {scheme}"
            raise SchemeError(msg)
        return prefix + result.decode("ascii")
    if name == "BLF-CRYPT":
        salt = bcrypt.gensalt(rounds=rounds or _BCRYPT_DEFAULT_COST, prefix=b"2b")
        # $2y$ is what Dovecot writes; the algorithm is the same as $2b$.
        return prefix + "$2y$" + bcrypt.hashpw(password, salt).decode("ascii")[4:]
    if name in _ARGON2:
        kind, _, time_cost, memory_cost = _ARGON2[name]
        hasher = argon2.PasswordHasher(
            time_cost=rounds or time_cost,
            memory_cost=memory_cost,
            parallelism=1,
            hash_len=32,
            salt_len=16,
            type=kind,
        )
        return prefix + hasher.hash(password)
    if name == "PBKDF2":
        rounds = rounds or _PBKDF2_DEFAULT_ROUNDS
        salt_text = "".join(secrets.choice(_SALT_ALPHABET) for _ in range(_PBKDF2_SALT_CHARS))
        key = hashlib.pbkdf2_hmac("sha1", password, salt_text.encode("ascii"), rounds)
        return f"{prefix}$1${salt_text}${rounds}${key.hex()}"
    hash_name = _SCRAM_HASHES[name]
    iterations = rounds or _SCRAM_DEFAULT_ITERATIONS
    salt = secrets.token_bytes(_SCRAM_SALT_BYTES)
    stored_key, server_key = _scram_keys(hash_name, password, salt, iterations)
    fields = [base64.b64encode(value).decode("ascii") for value in (salt, stored_key, server_key)]
    return prefix + ",".join([str(iterations), *fields])


def scram_credentials(stored: str, *, default_scheme: str = "CRYPT") -> ScramCredentials | None:
    """Return the SCRAM keys of a ``{SCRAM-SHA-1}`` / ``{SCRAM-SHA-256}`` stored password.

    For the server side of SASL SCRAM (RFC 5802), which needs the keys, not a plaintext.

    Returns:
        The credentials, or ``None`` if ``stored`` is not a well-formed SCRAM entry.
    """
    scheme, data = _split(stored, default_scheme)
    try:
        name, _ = _parse_name(scheme)
        return _scram_parse(name, data) if name in _SCRAM_HASHES else None
    except ValueError:
        return None


#: Iterations of the SCRAM keys pobox derives itself (from a ``{PLAIN}`` password) and of the
#: decoys it shows for unknown users: RFC 7677 §4's minimum, and what Dovecot uses.
SCRAM_ITERATIONS = _SCRAM_DEFAULT_ITERATIONS
_SCRAM_SALT_LABEL = b"pobox SCRAM salt\0"
#: What the PBKDF2 of a decoy is computed over: the cost is the point, not the result.
_DECOY_PASSWORD = b"pobox: not a password"


def scram_salt(key: bytes, mechanism: str, username: str) -> bytes:
    """Return the salt a SCRAM exchange shows for ``username`` when none is stored.

    HMAC-SHA-256 of the name under the server's secret ``key``, cut to 16 bytes: the same
    at every request and every restart, for known and unknown names alike, and nobody
    without the key can tell it from a stored random salt (RFC 5802 §5.1 asks servers
    not to reveal which users exist).
    """
    message = (
        _SCRAM_SALT_LABEL + mechanism.encode() + b"\0" + username.encode("utf-8", "surrogateescape")
    )
    return hmac.digest(key, message, "sha256")[:_SCRAM_SALT_BYTES]


def _plaintext(stored: str, default_scheme: str) -> bytes | None:
    """Return the password of a ``{PLAIN}`` entry (any encoding suffix), else ``None``."""
    scheme, data = _split(stored, default_scheme)
    try:
        name, suffix = _parse_name(scheme)
        return _decode(_BINARY["PLAIN"], data, suffix) if name == "PLAIN" else None
    except ValueError:
        return None


def scram_server_keys(
    stored: str | None, mechanism: str, salt: bytes, *, default_scheme: str = "CRYPT"
) -> ScramCredentials:
    """Return the keys to run a SCRAM exchange with, for a user whose stored password is ``stored``.

    - a ``{PLAIN}`` password: keys derived from it with ``salt`` and :data:`SCRAM_ITERATIONS`;
    - stored ``{SCRAM-*}`` keys of ``mechanism``'s hash: those, with their own salt;
    - anything else (``None`` for an unknown user, a one-way hash, the other SCRAM hash):
      decoy keys with ``salt`` and :data:`SCRAM_ITERATIONS`, whose empty StoredKey no
      proof matches, so the exchange fails only at the proof, like a wrong password.

    Exactly one PBKDF2 of :data:`SCRAM_ITERATIONS` runs in every case (over a dummy when
    nothing needs deriving), so the work, and the time to the server-first message, is the
    same for every name.  CPU-bound: run it in a worker thread.

    Raises:
        KeyError: ``mechanism`` is not SCRAM-SHA-1 or SCRAM-SHA-256.
    """
    hash_name = _SCRAM_HASHES[mechanism]
    plain = None if stored is None else _plaintext(stored, default_scheme)
    creds = None
    if stored is not None and plain is None:
        creds = scram_credentials(stored, default_scheme=default_scheme)
        if creds is not None and creds.hash_name != hash_name:
            creds = None
    # RFC 5802 §3: the keys come from the SASLprep'd password, as the client's do.
    stored_key, server_key = _scram_keys(
        hash_name,
        _DECOY_PASSWORD if plain is None else prepare_password(plain),
        salt,
        SCRAM_ITERATIONS,
    )
    if creds is not None:
        return creds
    if plain is None:
        stored_key = server_key = b""
    return ScramCredentials(hash_name, SCRAM_ITERATIONS, salt, stored_key, server_key)


def cram_md5_context(stored: str, *, default_scheme: str = "CRYPT") -> bytes | None:
    """Return the 32-byte HMAC-MD5 context of a ``{CRAM-MD5}`` stored password.

    For the server side of SASL CRAM-MD5 (RFC 2195): the first 16 bytes are the outer MD5
    state, the last 16 the inner one, each as four little-endian words.

    Returns:
        The context, or ``None`` if ``stored`` is not a well-formed CRAM-MD5 entry.
    """
    scheme, data = _split(stored, default_scheme)
    try:
        name, suffix = _parse_name(scheme)
        return _decode(_BINARY[name], data, suffix) if name == "CRAM-MD5" else None
    except ValueError:
        return None


#: An ARGON2ID hash, with :func:`hash_password`'s default parameters, of a random password
#: nobody knows: what a user database with no password of its own checks unknown users
#: against, so that they cost what a real user costs.
DUMMY_HASH = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1"
    "$4LfCz1k5lswhtLbKi+3jzw$ZNiBEMVlXirfOXcd/BC0CLun6hNo5Hb4N5AB/qPiXAU"
)
