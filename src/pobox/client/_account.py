"""Fetch accounts: where to fetch from, how to log in, where to put the mail.

An account comes from a TOML account file (``[defaults]`` then one ``[[account]]`` table per
account) or from command-line flags.  Errors are :class:`~pobox.errors.ConfigError` naming
the key path, e.g. ``account[2].port``.  The password is never a literal in the account:
it comes from a file (``password_file``), an environment variable (``password_env``) or a
command (``password_command``, keyring-style, e.g. ``pass show mail/alice``).

May import: the standard library and pobox.errors.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pobox.errors import ConfigError

__all__ = [
    "AUTH_METHODS",
    "TLS_MODES",
    "Account",
    "accounts_from_file",
    "default_state_dir",
    "read_password",
]

#: ``implicit``: TLS from the first byte (port 995); ``starttls``: STLS (RFC 2595) on port
#: 110; ``none``: plaintext, allowed only with ``insecure = true`` / ``--insecure``.
TLS_MODES = ("implicit", "starttls", "none")
#: ``auto`` picks the best the server offers: SCRAM-SHA-256/1, then PLAIN, then USER/PASS.
AUTH_METHODS = ("auto", "scram", "plain", "user")
_PORTS = {"implicit": 995, "starttls": 110, "none": 110}
_PASSWORD_COMMAND_TIMEOUT = 60.0


def default_state_dir() -> Path:
    """Return ``$XDG_STATE_HOME/pobox/fetch`` (``~/.local/state/pobox/fetch``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pobox" / "fetch"


@dataclass(frozen=True)
class Account:
    """One remote maildrop and what to do with its mail."""

    host: str
    user: str
    port: int = 0  # 0: the TLS mode's usual port
    tls: str = "implicit"
    cafile: str | None = None
    insecure: bool = False
    password_file: str | None = None
    password_env: str | None = None
    password_command: str | None = None
    auth: str = "auto"  # auto (SCRAM, else PLAIN, else USER/PASS) | scram | plain | user
    keep: bool = False
    keep_days: int | None = None
    maildir: str | None = None
    mbox: str | None = None
    mda: str | None = None
    state_dir: str | None = None
    timeout: float = 60.0
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"{self.user}@{self.host}")
        if not self.port:
            object.__setattr__(self, "port", _PORTS.get(self.tls, 995))

    def __repr__(self) -> str:
        return f"Account({self.name!r}, port={self.port}, tls={self.tls!r})"

    @property
    def keeps(self) -> bool:
        """Whether mail stays on the server (``--keep`` or ``--keep-days``)."""
        return self.keep or self.keep_days is not None

    def state_path(self) -> Path:
        """Return this account's state file (seen UIDLs)."""
        directory = Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()
        safe = "".join(c if c.isalnum() or c in "@.-_" else "_" for c in self.user)
        return directory / f"{safe}@{self.host}:{self.port}.json"

    def validate(self, where: str = "account") -> Account:
        """Check the account's consistency; return it.

        Raises:
            ConfigError: naming the offending key.
        """
        if not self.host:
            raise ConfigError(f"{where}.host: missing")
        if not self.user:
            raise ConfigError(f"{where}.user: missing")
        if self.tls not in TLS_MODES:
            raise ConfigError(f"{where}.tls: {self.tls!r} is not one of {', '.join(TLS_MODES)}")
        if self.tls == "none" and not self.insecure:
            raise ConfigError(
                f"{where}.tls: 'none' sends the password in clear; it needs insecure = true "
                "(or --insecure)"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port: {self.port} is not a TCP port")
        if self.auth not in AUTH_METHODS:
            raise ConfigError(
                f"{where}.auth: {self.auth!r} is not one of {', '.join(AUTH_METHODS)}"
            )
        targets = [t for t in (self.maildir, self.mbox, self.mda) if t]
        if len(targets) != 1:
            raise ConfigError(f"{where}: give exactly one of maildir, mbox, mda")
        sources = [s for s in (self.password_file, self.password_env, self.password_command) if s]
        if len(sources) != 1:
            raise ConfigError(
                f"{where}: give exactly one of password_file, password_env, password_command"
            )
        if self.keep_days is not None and self.keep_days < 0:
            raise ConfigError(f"{where}.keep_days: must be 0 or more")
        if self.timeout <= 0:
            raise ConfigError(f"{where}.timeout: must be positive")
        return self


_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "host": str,
    "user": str,
    "port": int,
    "tls": str,
    "cafile": str,
    "insecure": bool,
    "password_file": str,
    "password_env": str,
    "password_command": str,
    "auth": str,
    "keep": bool,
    "keep_days": int,
    "maildir": str,
    "mbox": str,
    "mda": str,
    "state_dir": str,
    "timeout": (int, float),
}


def _checked(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        expected = _TYPES.get(key)
        if expected is None:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(_TYPES))})")
        if isinstance(value, bool) and expected is not bool:
            raise ConfigError(f"{where}.{key}: expected {expected}, got a boolean")
        if not isinstance(value, expected):
            raise ConfigError(f"{where}.{key}: expected {expected}, got {type(value).__name__}")
        out[key] = value
    return out


def accounts_from_file(path: Path, overrides: Mapping[str, Any] | None = None) -> list[Account]:
    """Read the accounts of a TOML account file, applying command-line ``overrides``.

    Raises:
        ConfigError: the file is unreadable or invalid; the message names the key path.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = set(data) - {"defaults", "account"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    defaults = _checked(data.get("defaults", {}), "defaults")
    tables = data.get("account", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[account]] table")
    accounts = []
    for number, table in enumerate(tables, 1):
        where = f"account[{number}]"
        settings = {**defaults, **_checked(table, where), **(overrides or {})}
        try:
            account = Account(**settings)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        accounts.append(account.validate(where))
    return accounts


def with_overrides(account: Account, overrides: Mapping[str, Any]) -> Account:
    """Return ``account`` with command-line ``overrides`` applied."""
    return replace(account, **overrides)


def read_password(account: Account) -> str:
    """Fetch the account's password from its file, variable or command.

    Raises:
        ConfigError: the source is missing, empty or failing.
    """
    where = account.name
    if account.password_file:
        try:
            text = Path(account.password_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: password_file: {exc}") from None
        password = text.rstrip("\r\n")
    elif account.password_env:
        value = os.environ.get(account.password_env)
        if value is None:
            raise ConfigError(f"{where}: password_env: ${account.password_env} is not set")
        password = value
    else:
        command = account.password_command or ""
        try:
            done = subprocess.run(  # noqa: S603 - the user's own keyring command
                shlex.split(command),
                capture_output=True,
                timeout=_PASSWORD_COMMAND_TIMEOUT,
                check=False,
            )
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"{where}: password_command: {exc}") from None
        if done.returncode != 0:
            raise ConfigError(f"{where}: password_command exited with status {done.returncode}")
        password = done.stdout.decode("utf-8", "replace").splitlines()[0] if done.stdout else ""
    if not password:
        raise ConfigError(f"{where}: the password is empty")
    return password
