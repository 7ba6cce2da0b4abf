"""Configuration: frozen dataclasses read from TOML, with Dovecot-like names.

Every key is documented in :data:`KEYS` (that table also drives ``docs`` in README.md and
``pobox serve --help``); unknown keys and wrong types are errors that name the key path, found
at start-up, never at the first login.

May import: the standard library and :mod:`pobox.errors`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pobox.errors import ConfigError

__all__ = ["KEYS", "Config", "Listen", "load_config", "parse_listen"]

#: RFC 1939 §3: "the autologout timer MUST be of at least 10 minutes' duration".
RFC_MIN_AUTOLOGOUT: Final = 600


@dataclass(frozen=True, slots=True)
class Listen:
    """One address to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        """Return ``host:port`` (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    """The server's settings; see :data:`KEYS` for each one's meaning."""

    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 1110),)
    mail_location: str = "maildir:~/Maildir"
    passwd_file: str = "/etc/pobox/passwd"
    default_pass_scheme: str = "CRYPT"
    login_greeting: str = "pobox ready."
    pop3_lock_session: bool = True
    login_timeout: float = 60.0
    idle_timeout: float = 600.0
    auth_failure_delay: float = 2.0
    max_bad_commands: int = 10
    log_level: str = "info"
    log_path: str = ""
    trace: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)


#: key → (type, description).  The single source of the documentation of every key.
KEYS: Final[dict[str, tuple[type, str]]] = {
    "listen": (
        list,
        'Addresses to listen on, "HOST:PORT" ("[::1]:110" for IPv6). Default 127.0.0.1:1110.',
    ),
    "mail_location": (
        str,
        "Where maildrops are, like Dovecot's mail_location: maildir:PATH with ~ (home), "
        "%u (user), %n (local part), %d (domain), %h (home). Default maildir:~/Maildir.",
    ),
    "passwd_file": (str, "Dovecot-format passwd-file with the users. Re-read when it changes."),
    "default_pass_scheme": (
        str,
        "Scheme of passwd-file hashes without a {SCHEME} prefix (Dovecot default_pass_scheme).",
    ),
    "login_greeting": (str, "Text after +OK in the greeting (Dovecot login_greeting)."),
    "pop3_lock_session": (
        bool,
        "Lock the maildrop for the whole session (RFC 1939 §8); a second login gets "
        "-ERR [IN-USE]. Default true.",
    ),
    "login_timeout": (float, "Seconds of silence before login after which we hang up (60)."),
    "idle_timeout": (
        float,
        "Autologout: seconds of silence after login before the session is closed without "
        "UPDATE. RFC 1939 requires at least 600 (the default); lower values are for tests.",
    ),
    "auth_failure_delay": (
        float,
        "Seconds to wait before answering a failed login (Dovecot auth_failure_delay, 2).",
    ),
    "max_bad_commands": (int, "Consecutive bad commands before the session is closed (10)."),
    "log_level": (str, "debug, info, warning or error (info)."),
    "log_path": (str, "File to log to; empty for standard error (the systemd journal)."),
    "trace": (bool, "Log the C:/S: dialogue of every session, passwords masked (false)."),
}

_LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error"})


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


def _check_type(key: str, value: Any, want: type) -> Any:  # noqa: ANN401 - TOML values
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, want):
        raise ConfigError(f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_config(values: dict[str, Any], *, base: Config | None = None) -> Config:
    """Validate ``values`` (TOML-shaped) over ``base`` and return the config.

    Raises:
        ConfigError: an unknown key, a wrong type or a bad value, naming the key.
    """
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in KEYS:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(KEYS))})")
        want, _ = KEYS[key]
        value = _check_type(key, raw, want)
        if key == "listen":
            if not value or not all(isinstance(v, str) for v in value):
                raise ConfigError('listen: expected a list of "HOST:PORT" strings')
            changes[key] = tuple(parse_listen(v, key=f"listen[{i}]") for i, v in enumerate(value))
        else:
            changes[key] = value
    config = dataclasses.replace(base or Config(), **changes)
    return _validate(config)


def _validate(config: Config) -> Config:
    warnings: list[str] = []
    if not config.mail_location.startswith("maildir:"):
        raise ConfigError(f"mail_location: {config.mail_location!r} must start with 'maildir:'")
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: {config.log_level!r} is not one of {sorted(_LOG_LEVELS)}")
    for key in ("login_timeout", "idle_timeout", "auth_failure_delay"):
        if getattr(config, key) < 0 or (key != "auth_failure_delay" and not getattr(config, key)):
            raise ConfigError(f"{key}: must be a positive number of seconds")
    if config.max_bad_commands < 1:
        raise ConfigError("max_bad_commands: must be at least 1")
    if "\r" in config.login_greeting or "\n" in config.login_greeting:
        raise ConfigError("login_greeting: must be a single line")
    if len(config.login_greeting.encode()) > 506:
        raise ConfigError("login_greeting: at most 506 octets (RFC 2449 §4: 512 per line)")
    if config.idle_timeout < RFC_MIN_AUTOLOGOUT:
        warnings.append(
            f"idle_timeout: {config.idle_timeout:g} s is below the 600 s RFC 1939 requires"
        )
    return dataclasses.replace(config, warnings=tuple(warnings))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file at ``path`` (if any), apply ``overrides``, validate.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as f:
                values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    values.update(overrides or {})
    return build_config(values)
