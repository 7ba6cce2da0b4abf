"""Configuration: one declaration per key, read from TOML into a frozen :class:`Config`.

Every setting is declared once, as a field of :class:`Config` made with :func:`key`: its
name is the field's name, its Python type the annotation, and the call gives its default,
its help text and its limits (``choices``, ``minimum``, ``positive``, a ``check`` for a rule of
its own) and how TOML values are read into it (``parse``) and written back (``dump``). From
that one declaration come :data:`KEYS`, the type checks and the per-key validation of
:func:`build_config`, the ``pobox serve --help`` text and its flags (:func:`keys_help`,
``flag=True``), the key table of README.md (:func:`markdown_table`; a test checks README
against it, ``scripts/update-config-table`` rewrites it) and ``pobox config dump``
(:func:`dump_config`).  Rules that tie several keys together (TLS needs both a certificate
and a key, custom queries need the password query...) stay explicit functions, the
``_validate_*`` below.

Why a typed table of our own rather than msgspec or pydantic: the whole code base reads a
frozen dataclass with these attribute names, our error messages name the key in the words
an admin needs ("unknown key 'listne' (did you mean 'listen'?)"), TOML values need small
conversions (``"HOST:PORT"`` into :class:`Listen`, CIDRs normalised), and the help text must
reach README.md and ``--help``: a schema library would add a dependency and a second model
and still leave all of that to write.

**Adding a key.** Add one field to :class:`Config`, at the end of the group it belongs to::

    #: (optional comment for readers of the code)
    metrics_listen: str = key(
        "",
        'HTTP endpoint for Prometheus, `"HOST:PORT"`; empty: off.',
        check=_check_optional_listen,
        section="Several nodes and processes",
    )

The help text is Markdown (backticks become plain text in ``--help``); the default is shown
from the value unless ``default_doc`` says it better; ``section`` (required) is one of
:data:`SECTIONS`, the heading it is listed under.  Then run
``scripts/update-config-table`` (README's table) and add a CHANGELOG line. ``toml`` is
needed only where the TOML type is not that of the default (a table, or a user given as a
name or a number); ``parse``/``dump`` only where the TOML value is not the Python one.
A key written the old way (a plain field, a ``KEYS`` entry, a README row) becomes one
``key(...)`` field: the old ``KEYS`` text is its help, its ``_validate`` lines become
``choices``/``minimum``/``positive``/``check``, and its README row goes (the script writes
it). A new listener binds inside ``pobox.errors.binding("its_key", address)``, so that a
port in use names the key.

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.names`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import textwrap
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from pobox.errors import ConfigError
from pobox.names import INBOX, folder_name, parse_format

__all__ = [
    "KEYS",
    "SECTIONS",
    "Config",
    "Key",
    "Listen",
    "build_config",
    "dump_config",
    "key",
    "keys_help",
    "load_config",
    "markdown_table",
    "parse_duration",
    "parse_expire_days",
    "parse_listen",
    "readme_with_table",
    "shared_state_backend",
]

#: ``disable_plaintext_auth`` values, as Dovecot names them, plus ``loopback`` (the default).
PLAINTEXT_POLICIES: Final = ("loopback", "yes", "no")

#: ``ssl_min_protocol`` values: TLS 1.2 is the floor (RFC 8996 deprecates 1.0 and 1.1).
TLS_PROTOCOLS: Final = ("TLSv1.2", "TLSv1.3")

#: RFC 1939 §3: "the autologout timer MUST be of at least 10 minutes' duration".
RFC_MIN_AUTOLOGOUT: Final = 600

#: The names of pobox.protocol.ALL_MECHANISMS (config may not import the protocol core).
SASL_MECHANISMS: Final = frozenset(
    {"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"}
    | {"EXTERNAL", "OAUTHBEARER", "XOAUTH2"}
)

#: RFC 2449 §4: a status line is at most 512 octets; "+OK " and CRLF take 6 of them.
_GREETING_MAX: Final = 506

#: PostgreSQL's longest identifier (NAMEDATALEN - 1).
_PG_IDENTIFIER_MAX = 63

#: The named parameters a custom user query may use (Dovecot's %u, %n, %d).
QUERY_PARAMETERS: Final = ("user", "username", "domain")
#: ``%(name)s`` placeholders and ``%%``; any other ``%`` in a custom query is an error.
_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]*)\)s|%)")


@dataclass(frozen=True, slots=True)
class Listen:
    """One address to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        """Return ``host:port`` (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, *, key: str = "listen") -> Listen:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (loopback).

    Raises:
        ConfigError: naming ``key`` if the text is not an address.
    """
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        v6, sep, rest = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{key}: {text!r} is not [IPv6]:PORT")
        host, port_text = v6, rest
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: {text!r} has no valid port (0-65535)")
    return Listen(host or "0.0.0.0", int(port_text))  # noqa: S104 - an empty host means all


# --------------------------------------------------------------------------- the declaration

#: The headings keys are listed under, in README and ``pobox serve --help``, in this order.
SECTIONS: Final = (
    "POP3 service",
    "Users and logins",
    "TLS",
    "Mail and its owners",
    "Delivery: LMTP, SMTP, pobox deliver",
    "Logging",
    "PostgreSQL",
    "Several nodes and processes",
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Key:
    """The declaration of one configuration key (see the module docstring).

    Attributes:
        name: the TOML key and the :class:`Config` attribute.
        default: the value when the file does not set it.
        doc: what it does, in Markdown (README's table; ``--help`` without backticks).
        toml: the TOML type(s) accepted (the first one named in errors).
        choices: the only values allowed, if any.
        minimum: the smallest value allowed, if any.
        positive: the value must be above ``minimum`` (0), not equal to it.
        note: said after a range error, e.g. ``(0: no limit)``.
        check: a rule of this key alone beyond choices and range; raises ConfigError.
        parse: turns a TOML value (of a right type) into the Python one; raises ConfigError.
        dump: turns the Python value back into a TOML value (the inverse of ``parse``).
        default_doc: how README shows the default, when the value does not say it well.
        flag: also a ``pobox serve --NAME`` option.
        secret: may hold a password: ``config dump`` hides it unless asked.
        section: the heading it is listed under in README and ``--help`` (:data:`SECTIONS`).
    """

    name: str
    default: Any
    doc: str
    toml: tuple[type, ...]
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    positive: bool = False
    note: str = ""
    check: Callable[[str, Any], None] | None = None
    parse: Callable[[str, Any], Any] | None = None
    dump: Callable[[Any], Any] | None = None
    default_doc: str = ""
    flag: bool = False
    secret: bool = False
    section: str = ""

    def validate(self, value: Any) -> None:  # noqa: ANN401 - a value of any key
        """Check ``value`` against the choices, the range and the check of this key.

        Raises:
            ConfigError: naming the key and what is wrong.
        """
        if self.choices and value not in self.choices:
            raise ConfigError(f"{self.name}: {value!r} is not {_alternatives(self.choices)}")
        if self.minimum is not None:
            low = value <= self.minimum if self.positive else value < self.minimum
            if low:
                raise ConfigError(f"{self.name}: {self._range_text()}")
        if self.check is not None:
            self.check(self.name, value)

    def _range_text(self) -> str:
        if self.positive:
            unit = " number of seconds" if float in self.toml else ""
            text = f"must be a positive{unit}"
        elif self.minimum == 0:
            text = "must not be negative"
        else:
            text = f"must be at least {self.minimum:g}"
        return f"{text} {self.note}" if self.note else text

    def to_toml(self, value: Any) -> Any:  # noqa: ANN401 - a value of any key
        """Return ``value`` as TOML writes it (``parse`` reads it back to the same value)."""
        if self.dump is not None:
            return self.dump(value)
        return list(value) if isinstance(value, tuple) else value


#: Seconds per unit of a duration string (:func:`parse_duration`).
_DURATION_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, *, key: str = "duration") -> int:
    """Return the seconds of a duration such as ``"7d"``, ``"36h"``, ``"90m"`` or ``"0"``.

    Raises:
        ConfigError: ``text`` is not a whole number followed by at most one of s, m, h, d, w.
    """
    match = re.fullmatch(r"([0-9]{1,9})([smhdw]?)", text.strip())
    if match is None:
        msg = f'{key}: {text!r} is not a duration such as "7d", "36h", "90m" or "0"'
        raise ConfigError(msg)
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _alternatives(choices: tuple[str, ...]) -> str:
    """``a or b``, ``one of a, b or c``."""
    words = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    return words if len(choices) < 3 else f"one of {words}"


def key(
    default: _T,
    doc: str,
    *,
    toml: tuple[type, ...] = (),
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    positive: bool = False,
    note: str = "",
    check: Callable[[str, Any], None] | None = None,
    parse: Callable[[str, Any], Any] | None = None,
    dump: Callable[[Any], Any] | None = None,
    default_doc: str = "",
    flag: bool = False,
    secret: bool = False,
    section: str,
) -> _T:
    """Declare a configuration key: a :class:`Config` field carrying its :class:`Key`.

    The TOML type is that of ``default`` (a tuple is a TOML array) unless ``toml`` says
    otherwise. ``positive`` implies ``minimum`` 0.
    """
    if not toml:
        toml = (list,) if isinstance(default, tuple) else (type(default),)
    if positive and minimum is None:
        minimum = 0
    spec = Key(
        "", default, doc, toml, choices, minimum, positive, note, check, parse, dump,
        default_doc, flag, secret, section,
    )  # fmt: skip
    if section not in SECTIONS:
        msg = f"section {section!r} is not one of config.SECTIONS"
        raise ValueError(msg)
    return field(default=default, metadata={"key": spec})


# --------------------------------------------------------------------------- per-key rules


def _parse_listens(name: str, value: list[Any]) -> tuple[Listen, ...]:
    if not all(isinstance(v, str) for v in value) or (name == "listen" and not value):
        raise ConfigError(f'{name}: expected a list of "HOST:PORT" strings')
    return tuple(parse_listen(v, key=f"{name}[{i}]") for i, v in enumerate(value))


def _dump_listens(value: tuple[Listen, ...]) -> list[str]:
    return [str(listen) for listen in value]


def _parse_delivery_listens(name: str, value: list[Any]) -> tuple[str, ...]:
    return tuple(_delivery_listen(v, f"{name}[{i}]") for i, v in enumerate(value))


def _delivery_listen(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected "HOST:PORT" or "unix:/path", got {value!r}')
    if value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise ConfigError(f"{key}: {value!r}: the socket path must be absolute")
        return value
    parse_listen(value, key=key)
    return value


def _parse_networks(name: str, value: list[Any]) -> tuple[str, ...]:
    return tuple(_network(v, f"{name}[{i}]") for i, v in enumerate(value))


def _network(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a CIDR string, got {value!r}")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r} is not a network: {exc}") from None


def _parse_domains(name: str, value: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name}: expected a list of domain names")
    return tuple(v.lower().rstrip(".") for v in value)


def _parse_sni(name: str, value: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    return tuple(_sni_entry(server, entry) for server, entry in value.items())


#: Dovecot's ``pop3_client_workarounds`` that pobox implements (see pobox.protocol).
CLIENT_WORKAROUNDS: Final = ("outlook-no-nuls", "oe-ns-eoh")


def _parse_workarounds(name: str, value: str | list[Any]) -> tuple[str, ...]:
    """Read a space-separated string (as Dovecot writes it) or a TOML list of names."""
    words = value.split() if isinstance(value, str) else value
    names: list[str] = []
    for word in words:
        if not isinstance(word, str) or word.lower() not in CLIENT_WORKAROUNDS:
            raise ConfigError(
                f"{name}: unknown workaround {word!r} (known: {', '.join(CLIENT_WORKAROUNDS)})"
            )
        if word.lower() not in names:
            names.append(word.lower())
    return tuple(names)


def parse_expire_days(value: str) -> str | None:
    """Read an RFC 2449 EXPIRE value: ``"never"`` → ``"NEVER"``, days → their digits.

    Returns:
        the CAPA argument, or ``None`` if ``value`` is neither (nor empty: ``""`` is unset).
    """
    text = value.strip()
    if text.lower() == "never":
        return "NEVER"
    if text.isascii() and text.isdigit() and len(text) <= 9:
        return str(int(text))
    if not text:
        return ""
    return None


def _parse_expire_days(name: str, value: str | int) -> str:
    """Check ``pop3_expire_days``: empty, ``never`` or a number of days (0 or more)."""
    if isinstance(value, bool):
        raise ConfigError(f'{name}: expected a number of days, "never" or ""')
    parsed = parse_expire_days(str(value))
    if parsed is None:
        raise ConfigError(f'{name}: {value!r} is not a number of days (0 or more), "never" or ""')
    return parsed


#: The values of ``pop3_folder_mark``.
FOLDER_MARKS: Final = ("none", "header", "subject")


def parse_folders(name: str, value: str | list[Any]) -> tuple[str, ...]:
    """Read ``pop3_folders``: a TOML list, or names separated by commas (the userdb field).

    Raises:
        ConfigError: a name is not a folder name, or the list is empty.
    """
    words = value.split(",") if isinstance(value, str) else value
    names: list[str] = []
    for word in words:
        canonical = folder_name(word.strip()) if isinstance(word, str) else None
        if canonical is None:
            raise ConfigError(
                f"{name}: {word!r} is not a folder name (letters, digits, _+-.&, and spaces, "
                "as the Maildir++ folder .NAME)"
            )
        if canonical not in names:
            names.append(canonical)
    if not names:
        raise ConfigError(f'{name}: name at least one folder (the default is ["{INBOX}"])')
    return tuple(names)


def _dump_sni(value: tuple[tuple[str, str, str], ...]) -> dict[str, dict[str, str]]:
    return {server: {"cert": cert, "key": key} for server, cert, key in value}


def _sni_entry(name: str, entry: object) -> tuple[str, str, str]:
    key = f"ssl_sni.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{key}: expected a table with exactly cert and key")
    for sub in entry:
        if sub not in ("cert", "key"):
            close = difflib.get_close_matches(sub, ("cert", "key"), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "only cert and key"
            raise ConfigError(f"{key}: unknown key {sub!r} ({hint})")
    if set(entry) != {"cert", "key"}:
        raise ConfigError(f"{key}: expected a table with exactly cert and key")
    if not all(isinstance(v, str) and v for v in entry.values()):
        raise ConfigError(f"{key}: cert and key must be file paths")
    return name.lower().rstrip("."), entry["cert"], entry["key"]


def _parse_account(name: str, value: str | int) -> str:
    """Check a user or group given by name or number (looked up when the server starts)."""
    text = str(value).strip()
    if text.startswith("-") or any(c.isspace() or c in ":/" for c in text):
        raise ConfigError(f"{name}: {text!r} is not a user/group name or a number")
    return text


def _check_mail_location(name: str, value: str) -> None:
    if value.startswith("mbox:"):
        # Dovecot's syntax: mbox:/var/mail/%u, or mbox:~/mail:INBOX=/var/mail/%u.
        path, _, rest = value[len("mbox:") :].partition(":")
        inbox = [o[len("INBOX=") :] for o in rest.split(":") if o.startswith("INBOX=")]
        if not path or (inbox and not inbox[-1]):
            raise ConfigError(f"{name}: {value!r}: expected mbox:PATH or mbox:ROOT:INBOX=PATH")
        return
    if not value.startswith("maildir:") and value != "postgresql":
        raise ConfigError(
            f"{name}: {value!r} must start with 'maildir:' or 'mbox:', or be 'postgresql'"
        )


def _check_greeting(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ConfigError(f"{name}: must be a single line")
    if len(value.encode()) > _GREETING_MAX:
        raise ConfigError(f"{name}: at most {_GREETING_MAX} octets (RFC 2449 §4: 512 per line)")


def _check_mechanisms(name: str, value: str) -> None:
    unknown = set(value.upper().split()) - SASL_MECHANISMS
    if unknown:
        raise ConfigError(f"{name}: unknown {sorted(unknown)}; known {sorted(SASL_MECHANISMS)}")


def _check_temp_dir(name: str, value: str) -> None:
    if value and not (Path(value).is_absolute() and Path(value).is_dir()):
        raise ConfigError(f"{name}: {value} is not an absolute directory")


def _check_duration(name: str, value: str) -> None:
    parse_duration(value, key=name)


def _check_optional_listen(name: str, value: str) -> None:
    if value:
        parse_listen(value, key=name)


#: sockaddr_un's sun_path holds 108 octets, the last a NUL (unix(7)).
_SUN_PATH_MAX: Final = 107


def _check_control_socket(name: str, value: str) -> None:
    if value not in ("auto", "off") and (
        not value.startswith("/") or len(value.encode()) > _SUN_PATH_MAX or "\x00" in value
    ):
        raise ConfigError(
            f"{name}: {value!r} must be auto, off or an absolute path of at most "
            f"{_SUN_PATH_MAX} octets"
        )


def _check_username_format(name: str, value: str) -> None:
    try:
        parse_format(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _check_schema(name: str, value: str) -> None:
    if not 0 < len(value.encode()) <= _PG_IDENTIFIER_MAX or "\x00" in value:
        raise ConfigError(f"{name}: must be 1 to 63 octets, no NUL")


def _check_node_name(name: str, value: str) -> None:
    if len(value) > 255 or any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ConfigError(f"{name}: at most 255 characters, no spaces or control characters")


def _check_query(name: str, text: str) -> None:
    """Refuse a custom query with a placeholder other than ``%(user)s`` and its kin."""
    if not text:
        return
    rest = _PLACEHOLDER.sub("", text)
    for match in _PLACEHOLDER.finditer(text):
        param = match.group("name")
        if param is not None and param not in QUERY_PARAMETERS:
            raise ConfigError(
                f"{name}: unknown parameter %({param})s; use %(user)s, %(username)s or %(domain)s"
            )
    if "%" in rest:
        raise ConfigError(
            f"{name}: a % that is not %(user)s, %(username)s, %(domain)s or %%: values are bound "
            "as parameters, so write %(user)s without quotes where Dovecot has '%u'"
        )


# --------------------------------------------------------------------------- the keys


@dataclass(frozen=True, slots=True)
class Config:
    """The server's settings: each field is a key, declared with :func:`key`."""

    listen: tuple[Listen, ...] = key(
        (Listen("127.0.0.1", 1110),),
        'Addresses to listen on, `"HOST:PORT"` (`"[::1]:110"` for IPv6).',
        parse=_parse_listens,
        dump=_dump_listens,
        flag=True,
        section="POP3 service",
    )
    mail_location: str = key(
        "maildir:~/Maildir",
        "Where maildrops are, like Dovecot's: `maildir:PATH` with `~` (home), `%u` "
        "(user), `%n` (local part), `%d` (domain), `%h` (home); `mbox:/var/mail/%u` (an mbox "
        "spool) or `mbox:~/mail:INBOX=/var/mail/%u` (the spool after `INBOX=`; the root "
        "before it is ignored); `postgresql`. A user's `userdb_mail=` field overrides it.",
        check=_check_mail_location,
        flag=True,
        section="Mail and its owners",
    )
    passwd_file: str = key(
        "/etc/pobox/passwd",
        "Dovecot-format passwd-file with the users. It is re-read when it changes.",
        flag=True,
        section="Users and logins",
    )
    auth_username_format: str = key(
        "%Lu",
        "How a name given at login (every mechanism) or delivery (LMTP/SMTP `RCPT`, "
        "`pobox deliver -u`) becomes the name the user database is asked for, as Dovecot's "
        "key: `%u` the name, `%n` the part before `@`, `%d` the part after; modifiers `L` "
        "lowercase, `U` uppercase, `T` trim (`%Ln` drops the domain). `%Lu`: `Alice` logs "
        "in as `alice`; `%u` keeps the case typed.",
        check=_check_username_format,
        section="Users and logins",
    )
    default_pass_scheme: str = key(
        "CRYPT",
        "Scheme of hashes without a `{SCHEME}` prefix (Dovecot `default_pass_scheme`).",
        section="Users and logins",
    )
    login_greeting: str = key(
        "pobox ready.",
        "Text after `+OK` in the greeting.",
        check=_check_greeting,
        section="POP3 service",
    )
    pop3_lock_session: bool = key(
        True,
        "Lock the maildrop for the whole session (RFC 1939 §8); a second login gets `-ERR "
        "[IN-USE]`.",
        section="POP3 service",
    )
    pop3_no_flag_updates: bool = key(
        False,
        "Do not mark messages seen: by default, as Dovecot, a message sent whole by `RETR` "
        "(not `TOP`) gets the Maildir `S` flag (IMAP `\\Seen`; the file moves from `new/` to "
        "`cur/`) at the end of the session, UIDL and size unchanged. No effect on "
        "PostgreSQL, which has no IMAP side.",
        section="POP3 service",
    )
    pop3_client_workarounds: tuple[str, ...] = key(
        (),
        "Dovecot's workarounds for old clients, space-separated or a list: `outlook-no-nuls` "
        "(send each NUL of a message as the octet 0x80) and `oe-ns-eoh` (send the empty "
        "line that ends the header when a message has none; its size in LIST, STAT and "
        "RETR counts those 2 octets, so the server must know each message's header end: "
        "Maildir reads it once per message and keeps it in `pobox-uidlist`, PostgreSQL "
        "reads every message's header at each login).",
        toml=(list, str),
        parse=_parse_workarounds,
        section="POP3 service",
    )
    pop3_utf8: bool = key(
        True,
        "Offer RFC 6856 `UTF8` (CAPA `UTF8 USER`): after the command, user names and "
        "passwords are UTF-8 and prepared with SASLprep (RFC 4013). `false`: neither "
        "advertised nor accepted. AUTH PLAIN, LOGIN and SCRAM SASLprep their names and "
        "passwords either way (RFC 4616, RFC 5802).",
        section="POP3 service",
    )
    pop3_lang: bool = key(
        True,
        "Offer RFC 6856 `LANG` (CAPA `LANG`), with which a client picks the language of "
        "reply texts. `false`: neither advertised nor accepted.",
        section="POP3 service",
    )
    #: The tags of pobox.protocol's LANGUAGES (config may not import the core; a test
    #: checks that both say the same).
    pop3_language: str = key(
        "en",
        "The language of reply texts from the greeting on, what `LANG *` picks, and what "
        "`STLS` goes back to: `en` (English) or `de` (German). Status indicators, response "
        "codes and numbers are the same in every language.",
        choices=("en", "de"),
        section="POP3 service",
    )
    pop3_daily_download_bytes: int = key(
        0,
        "Octets of mail (RETR and TOP, message sizes as LIST gives them) a user may download "
        "per UTC day (the count resets at 00:00 UTC); `0`: no cap. A RETR or TOP that would "
        "pass it gets `-ERR [SYS/TEMP] daily download limit reached`. Per user: userdb field "
        "of the same name (`pop3_daily_download_bytes=500M`, `0`: none). Counted where the "
        "shared state is: this process, the master of `workers`, or PostgreSQL.",
        minimum=0,
        section="POP3 service",
    )
    pop3_expire_days: str = key(
        "",
        "RFC 2449 EXPIRE, enforced: messages are deleted this many days after their first "
        "`RETR` (recorded per message in the store), at the `QUIT` of a later session; `0`: "
        "messages sent by `RETR` are deleted at that session's `QUIT` even without `DELE` (not "
        "those only read with `TOP`); `never`: advertise `EXPIRE NEVER` (pobox deletes "
        'nothing by itself); `""`: no EXPIRE in CAPA. Per user: userdb field of the same '
        "name; CAPA then says `EXPIRE n USER` before login and the user's value after. Not with "
        "an mbox `mail_location` (it keeps no first-RETR times).",
        toml=(str, int),
        parse=_parse_expire_days,
        section="POP3 service",
    )
    pop3_login_delay: int = key(
        0,
        "RFC 2449 LOGIN-DELAY, enforced: seconds a user must wait after a login before the "
        "next one succeeds (`-ERR [LOGIN-DELAY]` sooner; checked after the password, so only "
        "the password's holder learns it); `0`: none, and no LOGIN-DELAY in CAPA. Per user: "
        "userdb field of the same name. Logins are timed where the shared state is: this "
        "process, the master of `workers`, or PostgreSQL.",
        minimum=0,
        section="POP3 service",
    )
    pop3_folders: tuple[str, ...] = key(
        (INBOX,),
        'Folders whose mail POP3 lists, merged in arrival order: `["INBOX", "Junk"]` shows '
        "the spam an IMAP client or a Sieve filter filed into the Maildir++ folder `.Junk/` "
        "(PostgreSQL: the `folder` column), with UIDLs that stay distinct and stay the same "
        "when a message moves between folders; DELE removes a message from its folder. A "
        "folder that does not exist is empty. Per user: userdb field of the same name, "
        "comma-separated (`pop3_folders=INBOX,Junk`).",
        toml=(list, str),
        parse=parse_folders,
        dump=list,
        section="POP3 service",
    )
    pop3_folder_mark: str = key(
        "none",
        "How a message of a `pop3_folders` folder other than INBOX is marked, so that a "
        "client's filter can sort it: `header` adds `X-Folder: NAME` on top of the header, "
        "`subject` puts `[NAME] ` before the subject; `none`: no mark. Sizes in LIST, STAT "
        "and RETR count the mark.",
        choices=FOLDER_MARKS,
        section="POP3 service",
    )
    pop3_reuse_xuidl: bool = key(
        False,
        "At a maildir's first open, keep the UIDL of a message's `X-UIDL:` header (left by "
        "qpopper and other mbox servers), as Dovecot's key of that name. UIDLs of "
        "`dovecot-uidlist`, `courierpop3dsizelist` and `pobox-uidl-map` are kept always.",
        section="POP3 service",
    )
    pop3_delete_retention: str = key(
        "0",
        "Keep messages deleted over POP3 this long (in the hidden Maildir folder "
        "`.pobox-deleted/`; with PostgreSQL, in the table `deleted_message`), from where "
        "`pobox restore USER` brings them back with their UIDLs and sizes: a duration, "
        '`"7d"`, `"36h"`, `"90m"`, `"3600s"` (a bare number is seconds); `"0"`: off, deleted '
        "mail is removed for good. Kept mail is invisible to POP3, not counted against the "
        "quota, and purged at the maildrop's next `QUIT` after the retention (or by "
        "`pobox restore USER --purge`). With `pop3_folders`, mail deleted from any listed "
        "folder is kept too, and restored into that folder (the INBOX if no longer listed).",
        check=_check_duration,
        section="POP3 service",
    )
    mail_inline_read_max: int = key(
        128 * 1024,
        "Messages up to this many octets are read in the event loop instead of a worker "
        "thread (faster on local disks); larger ones too, chunk by chunk, while the page "
        "cache holds them (`RWF_NOWAIT`). `0`: every read in a worker thread, for slow "
        "network storage.",
        minimum=0,
        section="POP3 service",
    )
    login_timeout: float = key(
        60.0,
        "Seconds of silence before login after which the connection is closed.",
        positive=True,
        section="POP3 service",
    )
    login_deadline: float = key(
        180.0,
        "Seconds from connecting within which a client must have logged in, however busy "
        "it keeps the connection (a `CAPA` every few seconds); then it is closed. "
        "Dovecot's fixed pre-login limit is the same 3 minutes.",
        positive=True,
        section="POP3 service",
    )
    idle_timeout: float = key(
        600.0,
        "Autologout after login: silence closes the session without UPDATE and frees "
        "the lock. RFC 1939 requires at least 600; lower values log a warning.",
        positive=True,
        section="POP3 service",
    )
    auth_failure_delay: float = key(
        2.0,
        "Seconds before answering a failed login (Dovecot `auth_failure_delay`).",
        minimum=0,
        section="Users and logins",
    )
    max_bad_commands: int = key(
        10,
        "Bad commands in a row before the session is closed.",
        minimum=1,
        section="POP3 service",
    )
    log_level: str = key(
        "info",
        "`debug`, `info`, `warning` or `error`.",
        choices=("debug", "info", "warning", "error"),
        flag=True,
        section="Logging",
    )
    log_path: str = key(
        "",
        "Log file; empty means standard error (the systemd journal). Reopened on `SIGHUP` "
        "and `SIGUSR1` (logrotate: `contrib/logrotate/pobox`).",
        default_doc="(stderr)",
        flag=True,
        section="Logging",
    )
    trace: bool = key(
        False,
        "Log the `C:`/`S:` dialogue of every session, passwords masked.",
        flag=True,
        section="Logging",
    )
    event_loop: str = key(
        "auto",
        "`auto` (uvloop if installed, the default), `uvloop`, or `asyncio` (the standard loop).",
        choices=("auto", "uvloop", "asyncio"),
        section="POP3 service",
    )
    auth_mechanisms: str = key(
        "PLAIN LOGIN",
        "SASL mechanisms `AUTH` offers, space-separated (Dovecot `auth_mechanisms`): "
        "`PLAIN` `LOGIN` `CRAM-MD5` `SCRAM-SHA-1` `SCRAM-SHA-256` `EXTERNAL` "
        "`OAUTHBEARER` `XOAUTH2`. CRAM-MD5 and SCRAM need `{PLAIN}`, `{CRAM-MD5}` or "
        "`{SCRAM-*}` passwords.",
        check=_check_mechanisms,
        section="Users and logins",
    )
    apop: bool = key(
        False,
        "Offer APOP (RFC 1939 §7): the greeting carries a `<timestamp>`; works for users "
        "with `{PLAIN}` passwords only.",
        section="Users and logins",
    )
    oauth_jwt_key_file: str = key(
        "",
        "File with the HS256 key that signs OAuth bearer tokens (JWT) for `OAUTHBEARER` "
        "and `XOAUTH2`; the token's `sub` or `email` must be the user, `exp` is "
        "checked. Empty: no OAuth.",
        section="Users and logins",
    )
    scram_secret_file: str = key(
        "",
        "File with the secret key SCRAM salts are derived from (names without stored "
        "SCRAM keys, unknown names too, each get a stable salt); made, mode 0600, when "
        "missing and SCRAM is offered. The same file on every node.",
        default_doc="(`pobox-scram.secret` next to `passwd_file`)",
        section="Users and logins",
    )
    auth_failure_delay_max: float = key(
        15.0,
        "Cap of the failed-login delay, which doubles with each failure from an address.",
        minimum=0,
        section="Users and logins",
    )
    auth_failures_per_ip: int = key(
        10,
        "Failed logins from one address within `auth_failure_window` after which logins "
        "from that address are refused with `-ERR [LOGIN-DELAY]` until the window "
        "passes.",
        minimum=1,
        section="Users and logins",
    )
    auth_failures_per_user: int = key(
        10,
        "Failed logins for one user name, from anywhere, within `auth_failure_window` "
        "after which its failures wait `auth_failure_delay_max`; never refuses a right "
        "password.",
        minimum=1,
        section="Users and logins",
    )
    auth_failure_window: float = key(
        600.0,
        "Seconds the failed-login counters remember.",
        positive=True,
        section="Users and logins",
    )
    max_auth_failures: int = key(
        3,
        "Failed logins in one connection after which it is closed (like Dovecot).",
        minimum=1,
        section="Users and logins",
    )
    log_format: str = key(
        "pobox",
        "`pobox`, `dovecot` (each line starts with a syslog-style `Mon DD HH:MM:SS "
        "host dovecot: pop3-login:` so the stock fail2ban `dovecot` filter reads it) or "
        "`json` (one JSON object per line, see [Logs](#logs)).",
        choices=("pobox", "dovecot", "json"),
        section="Logging",
    )
    ssl_cert: str = key(
        "",
        "PEM certificate chain for TLS (STLS and `ssl_listen`); empty: no TLS. Re-read "
        "on `SIGHUP` without dropping sessions.",
        section="TLS",
    )
    ssl_key: str = key(
        "",
        "PEM private key of `ssl_cert`; must match it.",
        section="TLS",
    )
    ssl_listen: tuple[Listen, ...] = key(
        (),
        "Addresses for implicit TLS (RFC 8314, port 995 in production), like `listen`.",
        parse=_parse_listens,
        dump=_dump_listens,
        section="TLS",
    )
    ssl_min_protocol: str = key(
        "TLSv1.2",
        "Oldest TLS version accepted: `TLSv1.2` or `TLSv1.3`.",
        choices=TLS_PROTOCOLS,
        section="TLS",
    )
    ssl_client_ca: str = key(
        "",
        "PEM CA file: TLS clients may present a certificate it signed; its emailAddress "
        "or CN is the identity for SASL `EXTERNAL` (add it to `auth_mechanisms`).",
        section="TLS",
    )
    ssl_sni: tuple[tuple[str, str, str], ...] = key(
        (),
        'Per-server-name certificates: `[ssl_sni."mail.example.org"]` with `cert` and '
        "`key`; other names get `ssl_cert`.",
        default_doc="(none)",
        toml=(dict,),
        parse=_parse_sni,
        dump=_dump_sni,
        section="TLS",
    )
    disable_plaintext_auth: str = key(
        "loopback",
        "Refuse USER/PASS and AUTH PLAIN/LOGIN without TLS: `loopback` (refuse except "
        "from loopback and `login_trusted_networks`), `yes` (always refuse), `no` "
        "(allow).",
        choices=PLAINTEXT_POLICIES,
        section="Users and logins",
    )
    login_trusted_networks: tuple[str, ...] = key(
        (),
        'CIDR networks trusted like loopback by `disable_plaintext_auth`, e.g. `["10.0.0.0/8"]`.',
        parse=_parse_networks,
        section="Users and logins",
    )
    max_connections: int = key(
        1000,
        "Open connections in all; more get `-ERR [SYS/TEMP]` and are closed.",
        minimum=1,
        section="POP3 service",
    )
    max_connections_per_ip: int = key(
        50,
        "Open connections from one address; more get `-ERR [SYS/TEMP]` and are closed.",
        minimum=1,
        section="POP3 service",
    )
    max_open_files: int = key(
        0,
        "Open-file limit (`RLIMIT_NOFILE`) to raise to at start-up, the hard limit too "
        "while root. `0`: computed, 2 per connection (socket, a message file being "
        "read) + 64.",
        minimum=0,
        section="POP3 service",
    )
    user: str = key(
        "",
        "Unprivileged account the server becomes after binding the ports when started as "
        "root; `group` sets its group. See [Security model](#security-model).",
        default_doc="(`mail_uid`'s account, else `nobody`)",
        section="Mail and its owners",
    )
    group: str = key(
        "",
        "Group to switch to with `user`.",
        default_doc="(the `user`'s primary group)",
        section="Mail and its owners",
    )
    mail_uid: str = key(
        "",
        "Owner (name or number) of the mail of users whose userdb line sets no uid: the "
        "one vmail account of virtual users. Started as root with `user` unset, the whole "
        "server runs as it (Dovecot `mail_uid`).",
        toml=(str, int),
        parse=_parse_account,
        section="Mail and its owners",
    )
    mail_gid: str = key(
        "",
        "Group (name or number) of the mail of users whose userdb line sets no gid "
        "(Dovecot `mail_gid`).",
        default_doc="(`mail_uid`'s group)",
        toml=(str, int),
        parse=_parse_account,
        section="Mail and its owners",
    )
    first_valid_uid: int = key(
        500,
        "Lowest uid mail is accessed with: root and system accounts are refused (Dovecot "
        "`first_valid_uid`); `0` allows root, for tests only.",
        minimum=0,
        section="Mail and its owners",
    )
    last_valid_uid: int = key(
        0,
        "Highest uid mail is accessed with; `0`: no limit.",
        minimum=0,
        section="Mail and its owners",
    )
    first_valid_gid: int = key(
        1,
        "Lowest gid mail is accessed with: gid 0 is refused.",
        minimum=0,
        section="Mail and its owners",
    )
    last_valid_gid: int = key(
        0,
        "Highest gid mail is accessed with; `0`: no limit.",
        minimum=0,
        section="Mail and its owners",
    )
    lmtp_listen: tuple[str, ...] = key(
        (),
        'LMTP (RFC 2033) delivery listeners: `"HOST:PORT"` and/or `"unix:/path"`.',
        parse=_parse_delivery_listens,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    smtp_listen: tuple[str, ...] = key(
        (),
        'Inbound SMTP listeners for local users only (never a relay), `"HOST:PORT"`.',
        parse=_parse_delivery_listens,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    max_message_size: int = key(
        50 * 1024 * 1024,
        "Largest message delivered, in octets (LMTP, SMTP, `pobox deliver`); `0`: no "
        "limit. The default is 50 MiB.",
        minimum=0,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    quota_bytes: int = key(
        0,
        "Default maildrop quota in octets, enforced at delivery; `0`: none. Per user: "
        "passwd-file extra field `quota_bytes=100M` or "
        "`userdb_quota_rule=*:storage=100M:messages=1000`.",
        minimum=0,
        section="Mail and its owners",
    )
    quota_messages: int = key(
        0,
        "Default maximum number of messages per maildrop; `0`: none.",
        minimum=0,
        section="Mail and its owners",
    )
    hostname: str = key(
        "",
        "Name in the LMTP/SMTP greeting; with `localhost` and `local_domains`, the "
        "domains whose addresses are local users for SMTP.",
        default_doc="(system host name)",
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    local_domains: tuple[str, ...] = key(
        (),
        "Domains whose addresses are local users for SMTP (`user@domain` is `user`); "
        "the `hostname` and `localhost` always are.",
        parse=_parse_domains,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    lmtp_max_connections: int = key(
        100,
        "Open LMTP connections in all, the MTA's Unix socket ones included; more get `421 4.3.2`.",
        minimum=1,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    lmtp_max_connections_per_ip: int = key(
        50,
        "Open LMTP connections from one address; more get `421 4.7.0`.",
        minimum=1,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    smtp_max_connections: int = key(
        100,
        "Open SMTP connections in all; more get `421 4.3.2`.",
        minimum=1,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    smtp_max_connections_per_ip: int = key(
        20,
        "Open SMTP connections from one address (Postfix opens up to 20 to one "
        "destination); more get `421 4.7.0`.",
        minimum=1,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    delivery_timeout: float = key(
        300.0,
        "LMTP/SMTP: seconds to wait for a command or the next DATA line (RFC 5321 "
        "§4.5.3.2.7); twice this without a message closes the connection.",
        positive=True,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    delivery_min_data_rate: int = key(
        2048,
        "LMTP/SMTP: octets per second a client must keep up in DATA after "
        "`delivery_timeout` of grace, like Postfix's `smtpd_min_data_rate`.",
        minimum=1,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    mail_temp_dir: str = key(
        "",
        "Where LMTP, SMTP and `pobox deliver` spool a message over 256 KiB while it "
        "arrives (Dovecot `mail_temp_dir`); empty means `TMPDIR` or `/tmp`. Use a local "
        "disk.",
        default_doc="(system)",
        check=_check_temp_dir,
        section="Delivery: LMTP, SMTP, pobox deliver",
    )
    haproxy_trusted_networks: tuple[str, ...] = key(
        (),
        "CIDR networks of HAProxy: their connections must start with a PROXY header "
        "([Behind HAProxy](#behind-haproxy)); empty: never accepted.",
        parse=_parse_networks,
        section="POP3 service",
    )
    haproxy_timeout: float = key(
        3.0,
        "Seconds such a connection has to send its header before it is closed.",
        positive=True,
        section="POP3 service",
    )
    postgresql_dsn: str = key(
        "",
        'For `mail_location = "postgresql"`: a libpq conninfo string or URI (`"host=db1 '
        'dbname=pobox user=pobox"`, `"postgresql://pobox@db1/pobox"`). What it leaves out '
        "comes from `PGHOST`, `PGUSER`, ... , `~/.pgpass` and `pg_service.conf`.",
        default_doc="(libpq defaults)",
        secret=True,
        section="PostgreSQL",
    )
    postgresql_schema: str = key(
        "pobox",
        "Schema of pobox's tables.",
        check=_check_schema,
        section="PostgreSQL",
    )
    postgresql_pool_min: int = key(
        2,
        "Pooled connections kept open for reads and deliveries.",
        minimum=1,
        section="PostgreSQL",
    )
    postgresql_pool_max: int = key(
        20,
        "Most pooled connections; more concurrent queries wait for one, up to "
        "`postgresql_timeout`.",
        minimum=1,
        section="PostgreSQL",
    )
    postgresql_lock_connections: int = key(
        4,
        "Connections that carry the maildrop locks (many per connection) and the UPDATEs "
        "of their sessions.",
        minimum=1,
        section="PostgreSQL",
    )
    postgresql_timeout: float = key(
        10.0,
        "Seconds any statement, connection attempt or wait for a pooled connection may "
        "take; then `-ERR [SYS/TEMP]` / `451 4.3.0`.",
        positive=True,
        section="PostgreSQL",
    )
    postgresql_lock_check_interval: float = key(
        10.0,
        "Seconds between probes of a lock connection that holds locks (0: only when the "
        "server closes it).",
        minimum=0,
        section="PostgreSQL",
    )
    userdb: str = key(
        "passwd-file",
        "Where users and passwords are: `passwd-file` (`passwd_file`) or `postgresql` "
        "(pobox's `users` table in `postgresql_dsn`, or your own tables through the three "
        "queries below).",
        choices=("passwd-file", "postgresql"),
        section="Users and logins",
    )
    postgresql_user_cache_ttl: float = key(
        30.0,
        "Seconds a node keeps a user it read (found or not; at most 10,000 names). "
        "Changes to pobox's table reach every node at once (NOTIFY); changes to your own "
        "tables within this time. `0`: no cache.",
        minimum=0,
        section="PostgreSQL",
    )
    postgresql_password_query: str = key(
        "",
        "Your own query for a login, like Dovecot's `password_query`: a `password` column "
        "(`{SCHEME}data`) and optionally the user columns. Parameters `%(user)s`, "
        "`%(username)s` (before `@`), `%(domain)s`, always bound.",
        default_doc="(pobox's table)",
        check=_check_query,
        section="PostgreSQL",
    )
    postgresql_user_query: str = key(
        "",
        "Your own query for a user record (delivery), like Dovecot's `user_query`: `uid`, "
        "`gid`, `home`, `mail`, `quota_rule`/`quota_bytes`/`quota_messages`, `nologin`.",
        default_doc="(the password query)",
        check=_check_query,
        section="PostgreSQL",
    )
    postgresql_iterate_query: str = key(
        "",
        "Your own query listing users for `pobox user list`, like Dovecot's "
        "`iterate_query`: a `username` (or `user`) column.",
        check=_check_query,
        section="PostgreSQL",
    )
    shared_state: str = key(
        "auto",
        "Where the state all nodes share is kept (failed-login counters, the session "
        "registry and its connection limits): `memory` (this node) or `postgresql` "
        "(`postgresql_dsn`). `auto`: `postgresql` when `mail_location` or `userdb` is "
        "`postgresql`. See [Shared state across nodes](#shared-state-across-nodes).",
        choices=("auto", "memory", "postgresql"),
        section="Several nodes and processes",
    )
    node_name: str = key(
        "",
        "This node's name in the session registry and the logs; unique in the cluster "
        "(two live nodes with one name are logged as an error).",
        default_doc="(host name)",
        check=_check_node_name,
        section="Several nodes and processes",
    )
    shared_state_timeout: float = key(
        0.5,
        "Seconds a call to the shared state may take; past it, or with the database down, "
        "the login uses this node's memory instead (logged once per episode).",
        positive=True,
        section="Several nodes and processes",
    )
    shared_state_heartbeat: float = key(
        5.0,
        "Seconds between a node's heartbeats (its lease, and kicks); a node silent for 3 "
        "heartbeats is dead and its sessions stop counting.",
        positive=True,
        section="Several nodes and processes",
    )
    mail_max_userip_connections: int = key(
        10,
        "Logged-in sessions of one user from one client address, all nodes together "
        "(Dovecot's key); more get `-ERR [IN-USE]`. `0`: no limit.",
        minimum=0,
        note="(0: no limit)",
        section="Several nodes and processes",
    )
    mail_max_user_connections: int = key(
        0,
        "Logged-in sessions of one user from anywhere, all nodes together (Dovecot's "
        "key); more get `-ERR [IN-USE]`. `0`: no limit.",
        minimum=0,
        note="(0: no limit)",
        section="Several nodes and processes",
    )
    health_listen: str = key(
        "",
        '`"HOST:PORT"` of an HTTP health check for a load balancer: `GET /health` answers '
        "`200 ok` while the node reaches its stores and is not draining, else `503` and "
        "the reason ([Health checks and draining](#health-checks-and-draining)). Bind it "
        "to loopback or a private network.",
        check=_check_optional_listen,
        section="Several nodes and processes",
    )
    metrics_listen: str = key(
        "",
        '`"HOST:PORT"` of a Prometheus endpoint: `GET /metrics` answers the node\'s counters, '
        "gauges and histograms, all workers summed ([Metrics](#metrics)). Off by default. "
        "Bind it to loopback or a private network: anyone who reaches it can read the counts.",
        check=_check_optional_listen,
        section="Several nodes and processes",
    )
    control_socket: str = key(
        "auto",
        "Unix socket of `pobox who` and `pobox kick` ([Live sessions](#live-sessions-pobox-"
        "who-and-pobox-kick)). `auto`: `$RUNTIME_DIRECTORY/control` under systemd's "
        "`RuntimeDirectory=`, else `/run/pobox/control` when started as root, else "
        "`$XDG_RUNTIME_DIR/pobox/control` (none if that is unset); `off`: none; or an "
        "absolute path. Mode `0600` (`0660` with `group`), owned by `user`; only root and "
        "the server's own user are answered.",
        check=_check_control_socket,
        section="Several nodes and processes",
    )
    drain_timeout: float = key(
        30.0,
        "Seconds `SIGTERM` lets open sessions finish (QUIT and UPDATE as usual) after the "
        "node stops accepting connections; then the rest are closed without UPDATE and "
        "the node exits 0. A second `SIGTERM`/`SIGINT` stops at once. `0`: close at once.",
        minimum=0,
        section="Several nodes and processes",
    )
    workers: int = key(
        0,
        "Serving processes sharing the listeners (POP3, POP3S, LMTP, SMTP), under a "
        "master process that binds them and starts them again if they die; the throttle "
        "and the connection limits count across them ([Several processes: "
        "`workers`](#several-processes-workers)). `1`: one process, no master. `0`: one "
        "per CPU.",
        minimum=0,
        note="(0: one per CPU)",
        section="Several nodes and processes",
    )
    #: Not a key: what :func:`build_config` found worth a warning (not an error).
    warnings: tuple[str, ...] = field(default=(), compare=False)


#: Every key's declaration, in the order of :class:`Config` (README's and ``--help``'s).
KEYS: Final[dict[str, Key]] = {
    f.name: dataclasses.replace(f.metadata["key"], name=f.name)
    for f in dataclasses.fields(Config)
    if "key" in f.metadata
}


def _check_type(spec: Key, value: Any) -> Any:  # noqa: ANN401 - TOML values
    if float in spec.toml and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, spec.toml) or (isinstance(value, bool) and bool not in spec.toml):
        raise ConfigError(
            f"{spec.name}: expected {spec.toml[0].__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def unknown_key_message(name: str) -> str:
    """Say that ``name`` is no key, with the nearest one if it looks like a typo."""
    close = difflib.get_close_matches(name, KEYS, n=1, cutoff=0.75)
    hint = (
        f"did you mean {close[0]!r}?"
        if close
        else "see the keys in README.md or pobox serve --help"
    )
    return f"unknown key {name!r} ({hint})"


def build_config(values: Mapping[str, Any], *, base: Config | None = None) -> Config:
    """Validate ``values`` (TOML-shaped) over ``base`` and return the config.

    Raises:
        ConfigError: an unknown key, a wrong type or a bad value, naming the key.
    """
    changes: dict[str, Any] = {}
    for name, raw in values.items():
        spec = KEYS.get(name)
        if spec is None:
            raise ConfigError(unknown_key_message(name))
        value = _check_type(spec, raw)
        changes[name] = spec.parse(name, value) if spec.parse is not None else value
    config = dataclasses.replace(base or Config(), **changes)
    return _validate(config)


def _check_readable(key: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {path} is not readable")


def _validate_security(config: Config) -> None:
    if bool(config.ssl_cert) != bool(config.ssl_key):
        raise ConfigError("ssl_cert, ssl_key: set both or neither")
    if config.ssl_client_ca:
        if not config.ssl_cert:
            raise ConfigError("ssl_client_ca: needs ssl_cert and ssl_key")
        _check_readable("ssl_client_ca", config.ssl_client_ca)
    if config.ssl_cert:
        _check_readable("ssl_cert", config.ssl_cert)
        _check_readable("ssl_key", config.ssl_key)
    elif config.ssl_listen or config.ssl_sni:
        which = "ssl_listen" if config.ssl_listen else "ssl_sni"
        raise ConfigError(f"{which}: needs ssl_cert and ssl_key")
    for name, cert, key in config.ssl_sni:
        _check_readable(f"ssl_sni.{name}.cert", cert)
        _check_readable(f"ssl_sni.{name}.key", key)
    if config.group and not config.user:
        raise ConfigError("group: needs user")
    for kind in ("uid", "gid"):
        first, last = getattr(config, f"first_valid_{kind}"), getattr(config, f"last_valid_{kind}")
        if last and last < first:
            raise ConfigError(
                f"last_valid_{kind}: {last} is below first_valid_{kind} {first} (0: no limit)"
            )


def _validate_postgresql(config: Config) -> None:
    queries = ("postgresql_password_query", "postgresql_user_query", "postgresql_iterate_query")
    if any(getattr(config, key) for key in queries) and not config.postgresql_password_query:
        raise ConfigError(
            "postgresql_password_query: needed when postgresql_user_query or "
            "postgresql_iterate_query is set"
        )
    if config.mail_location.startswith("mbox:") and parse_duration(config.pop3_delete_retention):
        raise ConfigError(
            "pop3_delete_retention: not supported with an mbox mail_location (Maildir and "
            'PostgreSQL only); set it to "0"'
        )
    if config.mail_location.startswith("mbox:") and config.pop3_expire_days not in ("", "NEVER"):
        raise ConfigError(
            "pop3_expire_days: not supported with an mbox mail_location (Maildir and "
            "PostgreSQL only: mbox keeps no first-RETR times); leave it unset or set it to "
            '"never"'
        )
    if config.postgresql_pool_max < config.postgresql_pool_min:
        raise ConfigError("postgresql_pool_max: must be at least postgresql_pool_min")


def shared_state_backend(config: Config) -> str:
    """Return where shared state is kept: ``memory`` or ``postgresql`` (``auto`` resolved)."""
    if config.shared_state != "auto":
        return config.shared_state
    if config.mail_location == "postgresql" or config.userdb == "postgresql":
        return "postgresql"
    return "memory"


def _validate(config: Config) -> Config:
    """Check every key on its own (its declaration), then the rules that tie keys together."""
    for name, spec in KEYS.items():
        spec.validate(getattr(config, name))
    _validate_postgresql(config)
    _validate_security(config)
    warnings: list[str] = []
    if config.idle_timeout < RFC_MIN_AUTOLOGOUT:
        warnings.append(
            f"idle_timeout: {config.idle_timeout:g} s is below the 600 s RFC 1939 requires"
        )
    return dataclasses.replace(config, warnings=tuple(warnings))


#: tomllib's position suffix (Python 3.11-3.13 have no lineno/colno attributes).
_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def _toml_error(path: str | Path, exc: tomllib.TOMLDecodeError, data: bytes) -> ConfigError:
    """``FILE:LINE:COLUMN: not valid TOML: WHAT`` (the form editors jump to)."""
    text = str(exc)
    match = _TOML_POSITION.match(text)
    if match is not None:
        where = f"{path}:{match['line']}:{match['col']}"
        return ConfigError(f"{where}: not valid TOML: {match['msg']}")
    what = text.removesuffix(" (at end of document)")
    if what != text:  # an unclosed array or string: it ends on the last line
        return ConfigError(
            f"{path}:{len(data.splitlines()) or 1}: not valid TOML: {what} at the end"
        )
    return ConfigError(f"{path}: not valid TOML: {text}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read the TOML file at ``path``.

    Raises:
        ConfigError: it cannot be read, or is not TOML (with the line and column).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid TOML: not UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, exc, data) from exc


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file at ``path`` (if any), apply ``overrides``, validate.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    values: dict[str, Any] = read_toml(path) if path is not None else {}
    try:
        return build_config({**values, **(overrides or {})})
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{_where(path, str(exc))}: {exc}") from None


#: The key an error message is about: ``key: ...``, ``key[2]: ...``, ``unknown key 'key'``.
_MESSAGE_KEY = re.compile(r"^(?:unknown key '(?P<unknown>[^']+)'|(?P<key>[a-z0-9_]+)[:\[.])")


def _where(path: str | Path, message: str) -> str:
    """``FILE:LINE`` of the key ``message`` is about, or ``FILE`` if it is not found there."""
    match = _MESSAGE_KEY.match(message)
    if match is None:
        return str(path)
    name = match["unknown"] or match["key"]
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return str(path)
    pattern = re.compile(rf"^\s*(?:{re.escape(name)}|\[\s*{re.escape(name)}\b)\s*[=.\]]")
    for number, line in enumerate(lines, 1):
        if pattern.match(line):
            return f"{path}:{number}"
    return str(path)


# --------------------------------------------------------------------------- the outputs


def _toml_value(value: Any) -> str:  # noqa: ANN401 - any TOML value
    """Write one TOML value (a string, a number, a boolean or an array of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if not math.isfinite(value):
            return "inf" if value > 0 else "-inf"
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    msg = f"no TOML form for {value!r}"  # a dump function returned something else
    raise TypeError(msg)


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n"}
    escapes |= {"\f": "\\f", "\r": "\\r"}
    out = []
    for c in text:
        if c in escapes:
            out.append(escapes[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _bare_or_quoted(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_string(name)


#: A password in a libpq connection string: ``password=`` (conninfo or URI parameter) or
#: ``scheme://user:password@``.
_DSN_PASSWORD = re.compile(r"password\s*=|://[^@/?#]*:[^@/?#]*@", re.IGNORECASE)


def dump_config(config: Config, *, every: bool = False, secrets: bool = False) -> str:
    """Return ``config`` as TOML: the keys that differ from the defaults, or ``every`` key.

    Like ``doveconf -n``: reading the text back gives the same :class:`Config`, except that
    a secret key holding a password (a ``postgresql_dsn`` with one) is written as a comment
    unless ``secrets`` (``doveconf -P``).
    """
    lines: list[str] = []
    tables: list[str] = []
    for name, spec in KEYS.items():
        value = getattr(config, name)
        if not every and value == spec.default:
            continue
        if spec.secret and not secrets and _DSN_PASSWORD.search(str(value)):
            lines.append(f"# {name} = (hidden: it holds a password; --secrets prints it)")
            continue
        toml = spec.to_toml(value)
        if isinstance(toml, dict):  # a table of tables (ssl_sni): after the plain keys
            if not toml:
                lines.append(f"{name} = {{}}")
            for sub, entries in toml.items():
                tables.append(f"\n[{name}.{_bare_or_quoted(sub)}]")
                tables.extend(f"{k} = {_toml_value(v)}" for k, v in entries.items())
        else:
            lines.append(f"{name} = {_toml_value(toml)}")
    return "".join(line + "\n" for line in lines + tables)


def default_text(spec: Key) -> str:
    """How README and ``--help`` show a key's default."""
    if spec.default_doc:
        return spec.default_doc
    value = spec.to_toml(spec.default)
    if isinstance(value, str):
        return f"`{value}`" if value else "(none)"
    if isinstance(value, float) and value.is_integer():
        return f"`{value:g}`"
    return f"`{_toml_value(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def by_section() -> list[tuple[str, list[Key]]]:
    """Return the keys under their headings, in :data:`SECTIONS` and declaration order."""
    return [(title, [s for s in KEYS.values() if s.section == title]) for title in SECTIONS]


def markdown_table() -> str:
    """Return README.md's tables of every key, one per section: name, default, meaning."""
    parts = []
    for title, specs in by_section():
        rows = [f"**{title}**", "", "| Key | Default | Meaning |", "|---|---|---|"]
        rows += [f"| `{s.name}` | {default_text(s)} | {_cell(s.doc)} |" for s in specs]
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


#: The lines that enclose the generated key table in README.md.
README_BEGIN: Final = "<!-- config keys: generated by scripts/update-config-table -->"
README_END: Final = "<!-- end of config keys -->"


def readme_with_table(readme: str) -> str:
    """Return README.md's text with the key table between the markers made anew.

    Raises:
        ValueError: the markers are missing.
    """
    head, begin, rest = readme.partition(README_BEGIN + "\n")
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        msg = f"README.md has no {README_BEGIN!r} ... {README_END!r}"
        raise ValueError(msg)
    return head + begin + markdown_table() + end + tail


def keys_help(width: int = 88) -> str:
    """Return the key list of ``pobox serve --help``: each key, its default, its meaning."""
    out = []
    for title, specs in by_section():
        out.append(f"\n {title}:")
        for spec in specs:
            out.append(f"  {spec.name} = {default_text(spec).replace('`', '')}")
            out.extend(
                textwrap.wrap(
                    spec.doc.replace("`", ""),
                    width,
                    initial_indent="      ",
                    subsequent_indent="      ",
                    break_on_hyphens=False,
                )
            )
    return "\n".join(out)
