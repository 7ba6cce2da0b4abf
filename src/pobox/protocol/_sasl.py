"""SASL mechanisms, server side, as pure state machines (RFC 4422, used by POP3 AUTH: RFC 5034).

Theory of operation
-------------------
A mechanism object lives for one ``AUTH`` exchange.  :meth:`Mechanism.start` takes the
initial response (``None`` when the client sent none) and every later client response goes
to :meth:`Mechanism.step`, already base64-decoded.  Each call returns one :data:`Step`:

- :class:`Challenge`: send these bytes (base64-encoded, after ``+ ``) and wait for a response;
- :class:`CheckPassword`: the client sent a plaintext password; the shell verifies it;
- :class:`NeedSecret`: the mechanism needs what is stored for the user; the shell answers
  with :meth:`Mechanism.secret` (a :class:`Secret`, or ``None`` for an unknown user; for
  SCRAM, always keys: decoys for an unknown user, see :meth:`Scram.secret`);
- :class:`CheckToken`: an OAuth 2.0 bearer token for the shell's token verifier;
- :class:`Verified`: the mechanism itself proved the client's identity;
- :class:`Failed`: authentication failed (the reason is for the log, never for the client).

Nothing here does I/O or reads a clock; randomness (the server nonces) comes from the caller,
so RFC test vectors can be replayed byte for byte.  Nothing costly runs here either: SCRAM's
PBKDF2 is the shell's, in a worker thread; the core only checks proofs (a few HMACs).

User names (PLAIN's and LOGIN's authcid and authzid, SCRAM's ``n=`` and ``a=``) are
SASLprep'd query strings (RFC 4013) as RFC 4616 §2 and RFC 5802 §5.1 ask; a name SASLprep
refuses fails the exchange (``-ERR [AUTH]``).  Passwords are passed on as sent: the password
check (:func:`pobox.auth.schemes.verify`) accepts the password as sent *and* its SASLprep'd
form, so a hash made from either matches (see there).

May import: the standard library and :mod:`pobox.protocol._i18n` (SASLprep).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final

from pobox.protocol._i18n import saslprep

__all__ = [
    "ALL_MECHANISMS",
    "PLAINTEXT_MECHANISMS",
    "Apop",
    "Challenge",
    "CheckPassword",
    "CheckToken",
    "Failed",
    "Mechanism",
    "NeedSecret",
    "ScramKeys",
    "Secret",
    "Step",
    "Verified",
    "b64decode_strict",
    "hmac_md5_from_context",
    "new_mechanism",
]


# ----------------------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client as a continuation and wait for its response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CheckPassword:
    """Verify this plaintext password (PLAIN, LOGIN)."""

    authcid: str
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class NeedSecret:
    """Fetch what is stored for ``authcid`` and pass it to :meth:`Mechanism.secret`."""

    authcid: str


@dataclass(frozen=True, slots=True)
class CheckToken:
    """Verify an OAuth 2.0 bearer token for ``authcid`` (OAUTHBEARER, XOAUTH2)."""

    authcid: str
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Verified:
    """The mechanism proved that the client is ``authcid``."""

    authcid: str


@dataclass(frozen=True, slots=True)
class Failed:
    """Authentication failed; ``reason`` is for the log only."""

    authcid: str | None
    reason: str


Step = Challenge | CheckPassword | NeedSecret | CheckToken | Verified | Failed


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """The SCRAM keys stored for a user (RFC 5802 §3), e.g. from Dovecot's ``{SCRAM-SHA-256}``."""

    hash_name: str
    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Secret:
    """What is stored for a user, in whichever forms the user database has.

    Attributes:
        password: the plaintext password (a ``{PLAIN}`` entry); every mechanism can use it.
        scram: stored SCRAM keys.
        cram_md5_context: Dovecot's ``{CRAM-MD5}`` value, the 32-byte HMAC-MD5 context.
    """

    password: bytes | None = field(default=None, repr=False)
    scram: ScramKeys | None = None
    cram_md5_context: bytes | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------- helpers


def b64decode_strict(data: bytes) -> bytes | None:
    """Decode base64 as RFC 4648 §4 says (padding required, no stray bytes); ``None`` if bad."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _prepared(name: str) -> str | None:
    """Return ``name`` SASLprep'd as a query string (RFC 4013), or ``None`` if refused."""
    try:
        return saslprep(name)
    except ValueError:
        return None


# MD5 (RFC 1321 §3.4) continued from a saved state: Dovecot's {CRAM-MD5} stores the HMAC-MD5
# inner and outer states, not the password, and hashlib cannot resume from a given state.
_MD5_SHIFTS: Final = (
    (7, 12, 17, 22) * 4
    + (5, 9, 14, 20) * 4
    + (4, 11, 16, 23) * 4
    + (
        6,
        10,
        15,
        21,
    )
    * 4
)
_MD5_SINES: Final = tuple(int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64))
_MASK32: Final = 0xFFFFFFFF


def md5_compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    """Return the MD5 state after one 64-byte block (RFC 1321 §3.4).

    hashlib hides MD5's intermediate state, which Dovecot's stored ``{CRAM-MD5}`` form is
    made of; :mod:`pobox.auth.schemes` uses this too, to build that form.
    """
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _MD5_SINES[i] + words[g]) & _MASK32
        shift = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << shift) | (f >> (32 - shift)))) & _MASK32
    return (
        (state[0] + a) & _MASK32,
        (state[1] + b) & _MASK32,
        (state[2] + c) & _MASK32,
        (state[3] + d) & _MASK32,
    )


def _md5_resume(state: tuple[int, int, int, int], data: bytes) -> bytes:
    """Return MD5 of (one 64-byte block already hashed into ``state``) + ``data``."""
    length = 64 + len(data)
    padded = data + b"\x80" + b"\0" * ((55 - length) % 64) + struct.pack("<Q", length * 8)
    for i in range(0, len(padded), 64):
        state = md5_compress(state, padded[i : i + 64])
    return struct.pack("<4I", *state)


def hmac_md5_from_context(context: bytes, message: bytes) -> bytes:
    """Return HMAC-MD5(key, message) from the 32-byte context Dovecot stores as ``{CRAM-MD5}``.

    The first 16 bytes are the outer MD5 state, the last 16 the inner one, four
    little-endian words each (RFC 2195 §2 suggests storing them so).
    """
    words = struct.unpack("<8I", context)
    inner = _md5_resume(words[4:], message)
    return _md5_resume(words[:4], inner)


# ----------------------------------------------------------------------------- mechanisms


class Mechanism:
    """One SASL exchange, server side; subclasses are the mechanisms."""

    #: The IANA name of the mechanism.
    name: str = ""
    #: Whether the client sends its password in the clear (refused where plaintext is).
    plaintext: ClassVar[bool] = False
    #: The user the client has named so far in this exchange, if any.
    _user: str | None = None
    #: How the shell turns a name into its user database's (``auth_username_format``): an
    #: authorization identity is the user's when both come out the same.
    name_format: Callable[[str], str] = str

    def _same_user(self, authzid: str, authcid: str) -> bool:
        """Whether ``authzid`` names the user ``authcid`` (after the shell's name format)."""
        return self.name_format(authzid) == self.name_format(authcid)

    @property
    def authcid(self) -> str | None:
        """The user the client has named so far (an exchange aborted after it is a failure)."""
        return self._user

    def start(self, initial: bytes | None) -> Step:
        """Begin with the client's initial response (``None`` if it sent none)."""
        return Challenge(b"") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        """Take the next client response."""
        return Failed(None, "unexpected response")

    def secret(self, secret: Secret | None) -> Step:
        """Take the shell's answer to :class:`NeedSecret` (``None``: no such user)."""
        return Failed(None, "no secret expected")

    def rejected(self) -> Challenge | None:
        """Return a last challenge to send when the shell rejects a token, if the RFC has one."""
        return None


class Plain(Mechanism):
    """PLAIN (RFC 4616): ``authzid NUL authcid NUL passwd`` in one message."""

    name = "PLAIN"
    plaintext = True

    def step(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3:
            return Failed(None, "malformed PLAIN message")
        authzid, authcid, password = (parts[0], parts[1], parts[2])
        user, zid = _utf8(authcid), _utf8(authzid)
        if not user or zid is None or not password:
            return Failed(None, "malformed PLAIN message")
        # RFC 4616 §2: the identities are prepared with SASLprep. A refused name is logged
        # as sent (the log sanitises it), as Dovecot logs what was tried.
        sent, user = user, _prepared(user)
        if user is None or (zid and (zid := _prepared(zid)) is None):
            return Failed(sent, "PLAIN identity not allowed by SASLprep")
        if zid and not self._same_user(zid, user):
            return Failed(user, f"authorization identity {zid!r} is not the user's")
        return CheckPassword(user, password)


class Login(Mechanism):
    """LOGIN (draft-murchison-sasl-login): the user name, then the password, on request."""

    name = "LOGIN"
    plaintext = True

    def __init__(self) -> None:
        self._user: str | None = None

    def start(self, initial: bytes | None) -> Step:
        # An initial response, when a client sends one, is the user name.
        return Challenge(b"Username:") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        if self._user is None:
            user = _utf8(response)
            if not user:
                return Failed(None, "malformed LOGIN user name")
            sent, user = user, _prepared(user)
            if user is None:
                return Failed(sent, "LOGIN user name not allowed by SASLprep")
            self._user = user
            return Challenge(b"Password:")
        if not response:
            return Failed(self._user, "empty password")
        return CheckPassword(self._user, response)


class CramMD5(Mechanism):
    """CRAM-MD5 (RFC 2195): the client answers ``user SP hex(HMAC-MD5(password, challenge))``."""

    name = "CRAM-MD5"

    def __init__(self, challenge: bytes) -> None:
        self.challenge = challenge
        self._user: str | None = None
        self._digest = b""

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:
            return Failed(None, "CRAM-MD5 takes no initial response")
        return Challenge(self.challenge)

    def step(self, response: bytes) -> Step:
        user_bytes, _, digest = response.rpartition(b" ")
        user = _utf8(user_bytes)
        if not user or len(digest) != 32 or not all(c in b"0123456789abcdef" for c in digest):
            return Failed(None, "malformed CRAM-MD5 response")
        self._user, self._digest = user, digest
        return NeedSecret(user)

    def secret(self, secret: Secret | None) -> Step:
        assert self._user is not None
        if secret is not None and secret.password is not None:
            expected = hmac.digest(secret.password, self.challenge, "md5")
        elif secret is not None and secret.cram_md5_context is not None:
            expected = hmac_md5_from_context(secret.cram_md5_context, self.challenge)
        else:
            return Failed(self._user, "no CRAM-MD5 credentials for the user")
        if hmac.compare_digest(expected.hex().encode(), self._digest):
            return Verified(self._user)
        return Failed(self._user, "wrong CRAM-MD5 digest")


def _scram_name(text: str) -> str | None:
    """Decode a SCRAM ``saslname`` (RFC 5802 §5.1: ``=2C`` is ``,`` and ``=3D`` is ``=``)."""
    out, i = [], 0
    while i < len(text):  # the caller split on ",": there is none left in text
        if text[i] == "=":
            code = text[i + 1 : i + 3]
            if code not in ("2C", "3D"):
                return None
            out.append("," if code == "2C" else "=")
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class Scram(Mechanism):
    """SCRAM-SHA-1 / SCRAM-SHA-256 (RFC 5802, RFC 7677), without channel binding.

    The server nonce is the caller's (printable ASCII without ``,``).  The server's final
    message goes out as a last challenge, to which the client answers with an empty
    response: POP3 has no "additional data with success" (RFC 5034 §4).
    """

    plaintext = False

    def __init__(self, hash_name: str, nonce: str) -> None:
        self.hash_name = hash_name
        self.name = "SCRAM-SHA-256" if hash_name == "sha256" else "SCRAM-SHA-1"
        self._snonce = nonce
        self._user: str | None = None
        self._gs2 = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = b""
        self._keys: ScramKeys | None = None
        self._known = False
        self._server_final: bytes | None = None
        self._done = False

    def step(self, response: bytes) -> Step:
        if self._user is None:
            return self._client_first(response)
        if self._server_final is None:
            return self._client_final(response)
        if self._done or response:
            return Failed(self._user, "unexpected data after the SCRAM server-final message")
        self._done = True
        return Verified(self._user)

    def _client_first(self, message: bytes) -> Step:
        text = _utf8(message)
        if text is None:
            return Failed(None, "SCRAM client-first is not UTF-8")
        parts = text.split(",", 2)
        if len(parts) != 3:
            return Failed(None, "malformed SCRAM client-first")
        cbind, authzid, bare = parts
        if cbind.startswith("p="):
            return Failed(None, "channel binding requested, not supported")
        if cbind not in ("n", "y"):
            return Failed(None, "malformed SCRAM gs2 header")
        attrs = bare.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            return Failed(None, "malformed SCRAM client-first")
        user = _scram_name(attrs[0][2:])
        cnonce = attrs[1][2:]
        if not user or not cnonce or not cnonce.isprintable() or "," in cnonce:
            return Failed(None, "malformed SCRAM client-first")
        # RFC 5802 §5.1: the client SHOULD have prepared the name; prepare it here too, so a
        # name typed in another form is the same user (as for PLAIN).
        sent, user = user, _prepared(user)
        if user is None:
            return Failed(sent, "SCRAM user name not allowed by SASLprep")
        if authzid:
            zid = _scram_name(authzid[2:]) if authzid.startswith("a=") else None
            zid = zid and _prepared(zid)
            if zid is None or not self._same_user(zid, user):
                return Failed(user, "SCRAM authorization identity is not the user's")
        self._user = user
        self._gs2 = f"{cbind},{authzid},".encode()
        self._client_first_bare = bare.encode()
        self._nonce = (cnonce + self._snonce).encode()
        return NeedSecret(user)

    def secret(self, secret: Secret | None) -> Step:
        """Take the keys to run the exchange with: the user's, or decoys.

        The shell answers for *every* name, known or not, with keys of this mechanism's
        hash: the user's stored or derived keys, or decoys with an empty StoredKey (an
        unknown user, a password SCRAM cannot use) that no proof matches.  Their salt and
        iteration count are what the client is shown, so the shell makes them look the same
        for all names (RFC 5802 §5.1 suggests it); this core reads no secrets and no clock.
        """
        assert self._user is not None
        keys = secret.scram if secret is not None else None
        if keys is None or keys.hash_name != self.hash_name:
            return Failed(self._user, "no SCRAM keys for the user")
        self._known = bool(keys.stored_key)
        self._keys = keys
        salt64 = base64.b64encode(keys.salt)
        self._server_first = b"r=%s,s=%s,i=%d" % (self._nonce, salt64, keys.iterations)
        return Challenge(self._server_first)

    def _client_final(self, message: bytes) -> Step:
        assert self._keys is not None
        without_proof, sep, proof64 = message.rpartition(b",p=")
        attrs = without_proof.split(b",")
        if (
            not sep
            or len(attrs) < 2
            or not attrs[0].startswith(b"c=")
            or not attrs[1].startswith(b"r=")
        ):
            return Failed(self._user, "malformed SCRAM client-final")
        if b64decode_strict(attrs[0][2:]) != self._gs2:
            return Failed(self._user, "SCRAM channel binding data does not match")
        if attrs[1][2:] != self._nonce:
            return Failed(self._user, "SCRAM nonce does not match")
        proof = b64decode_strict(proof64)
        keys = self._keys
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        signature = hmac.digest(keys.stored_key or b"\0", auth_message, self.hash_name)
        if proof is None or len(proof) != len(signature) or not self._known:
            return Failed(self._user, "wrong SCRAM proof")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(
            hashlib.new(self.hash_name, client_key).digest(), keys.stored_key
        ):
            return Failed(self._user, "wrong SCRAM proof")
        server_signature = hmac.digest(keys.server_key, auth_message, self.hash_name)
        self._server_final = b"v=" + base64.b64encode(server_signature)
        return Challenge(self._server_final)


class External(Mechanism):
    """EXTERNAL (RFC 4422 App. A): the identity the TLS layer verified (a client certificate)."""

    name = "EXTERNAL"

    def __init__(self, identity: str | None) -> None:
        self.identity = identity

    def start(self, initial: bytes | None) -> Step:
        if self.identity is None:
            return Failed(None, "no verified client certificate")
        return Challenge(b"") if initial is None else self.step(initial)

    def step(self, response: bytes) -> Step:
        assert self.identity is not None
        authzid = _utf8(response)
        if authzid is None or (authzid and not self._same_user(authzid, self.identity)):
            return Failed(self.identity, "authorization identity is not the certificate's")
        return Verified(self.identity)


#: RFC 7628 §3.2.2: the error the server sends before failing an OAUTHBEARER exchange.
_OAUTH_ERROR: Final = json.dumps(
    {"status": "invalid_token", "schemes": "bearer", "scope": "pop"}, separators=(",", ":")
).encode()


class OAuthBearer(Mechanism):
    """OAUTHBEARER (RFC 7628): a GS2 header, then ``^A``-separated ``key=value`` pairs."""

    name = "OAUTHBEARER"

    def __init__(self) -> None:
        self._error_sent = False
        self._user: str | None = None

    def step(self, response: bytes) -> Step:
        # After rejected() the connection answers the client's ^A itself (RFC 7628 §3.2.3).
        text = _utf8(response)
        if text is None:
            return Failed(None, "OAUTHBEARER message is not UTF-8")
        gs2, sep, rest = text.partition("\x01")
        header = gs2.split(",")
        if not sep or len(header) != 3 or header[0] not in ("n", "y") or header[2]:
            return Failed(None, "malformed OAUTHBEARER message")
        pairs = {}
        for kv in rest.split("\x01"):
            if kv:
                key, eq, value = kv.partition("=")
                if not eq:
                    return Failed(None, "malformed OAUTHBEARER message")
                pairs[key] = value
        user = _scram_name(header[1][2:]) if header[1].startswith("a=") else None
        auth = pairs.get("auth", "")
        scheme, _, token = auth.partition(" ")
        if not user or scheme.lower() != "bearer" or not token:
            return Failed(user, "OAUTHBEARER without a user and a bearer token")
        self._user = user
        return CheckToken(user, token)

    def rejected(self) -> Challenge | None:
        if self._error_sent:
            return None
        self._error_sent = True
        return Challenge(_OAUTH_ERROR)


class XOAuth2(Mechanism):
    """XOAUTH2 (Google's): ``user=U ^A auth=Bearer T ^A ^A``."""

    name = "XOAUTH2"

    def step(self, response: bytes) -> Step:
        text = _utf8(response)
        if text is None:
            return Failed(None, "XOAUTH2 message is not UTF-8")
        pairs = {}
        for kv in text.split("\x01"):
            key, eq, value = kv.partition("=")
            if eq:
                pairs[key] = value
        user = pairs.get("user", "")
        scheme, _, token = pairs.get("auth", "").partition(" ")
        if not user or scheme.lower() != "bearer" or not token:
            return Failed(user or None, "malformed XOAUTH2 message")
        return CheckToken(user, token)


class Apop(Mechanism):
    """APOP (RFC 1939 §7), run as a mechanism: ``digest`` is MD5(timestamp + password)."""

    name = "APOP"

    def __init__(self, timestamp: bytes, user: str, digest: bytes) -> None:
        self.timestamp = timestamp
        self._user = self._apop_user = user
        self._digest = digest.lower()

    def start(self, initial: bytes | None) -> Step:
        return NeedSecret(self._apop_user)

    def secret(self, secret: Secret | None) -> Step:
        user = self._apop_user
        if secret is None or secret.password is None:
            return Failed(user, "no plaintext password for APOP")
        expected = hashlib.md5(self.timestamp + secret.password).hexdigest().encode()  # noqa: S324
        if hmac.compare_digest(expected, self._digest):
            return Verified(user)
        return Failed(user, "wrong APOP digest")


#: Every mechanism this module implements, in the order CAPA lists them.
ALL_MECHANISMS: Final = (
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
    "EXTERNAL",
    "OAUTHBEARER",
    "XOAUTH2",
)

#: Mechanisms that send the password itself: refused where USER/PASS is.
PLAINTEXT_MECHANISMS: Final = frozenset({"PLAIN", "LOGIN"})


def new_mechanism(
    name: str,
    *,
    nonce: str,
    challenge: bytes,
    external_identity: str | None,
    name_format: Callable[[str], str] = str,
) -> Mechanism:
    """Return a fresh mechanism called ``name`` (upper case).

    Args:
        nonce: the SCRAM server nonce (printable ASCII without ``,``).
        challenge: the CRAM-MD5 challenge, ``<unique@host>``.
        external_identity: the verified TLS client identity, for EXTERNAL.
        name_format: the shell's ``auth_username_format``, for comparing an authorization
            identity with the user (``Alice`` is ``alice`` with Dovecot's ``%Lu``).

    Raises:
        ValueError: ``name`` is not in :data:`ALL_MECHANISMS`.
    """
    mechanism = _new_mechanism(
        name, nonce=nonce, challenge=challenge, external_identity=external_identity
    )
    mechanism.name_format = name_format
    return mechanism


def _new_mechanism(
    name: str, *, nonce: str, challenge: bytes, external_identity: str | None
) -> Mechanism:
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "CRAM-MD5":
        return CramMD5(challenge)
    if name == "SCRAM-SHA-1":
        return Scram("sha1", nonce)
    if name == "SCRAM-SHA-256":
        return Scram("sha256", nonce)
    if name == "EXTERNAL":
        return External(external_identity)
    if name == "OAUTHBEARER":
        return OAuthBearer()
    if name == "XOAUTH2":
        return XOAuth2()
    raise ValueError(f"unknown SASL mechanism {name!r}")
