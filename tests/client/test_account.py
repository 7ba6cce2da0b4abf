"""Accounts from TOML files and password sources."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from pobox.client import Account, accounts_from_file, read_password
from pobox.errors import ConfigError

ACCOUNTS = """
[defaults]
host = "pop.example.test"
password_env = "POBOX_TEST_PASSWORD"
maildir = "~/Mail"

[[account]]
user = "alice"

[[account]]
user = "bob"
host = "other.example.test"
tls = "starttls"
keep = true
"""


class TestAccountsFromFile:
    """accounts_from_file reads [defaults] and [[account]] tables."""

    def test_defaults_and_accounts(self, tmp_path: Path) -> None:
        """Each account inherits the defaults and overrides some; ports follow the TLS mode."""
        path = tmp_path / "accounts.toml"
        path.write_text(ACCOUNTS)
        alice, bob = accounts_from_file(path)
        assert ("alice@pop.example.test", 995, False) == (alice.name, alice.port, alice.keeps)
        assert ("bob@other.example.test", 110, True) == (bob.name, bob.port, bob.keeps)

    def test_overrides_apply_to_every_account(self, tmp_path: Path) -> None:
        """Command-line overrides such as --keep-days apply to all accounts."""
        path = tmp_path / "accounts.toml"
        path.write_text(ACCOUNTS)
        accounts = accounts_from_file(path, {"keep_days": 7})
        assert [7, 7] == [a.keep_days for a in accounts]

    def test_unknown_key_names_its_path(self, tmp_path: Path) -> None:
        """A misspelt key is an error naming the account and the key."""
        path = tmp_path / "accounts.toml"
        path.write_text(ACCOUNTS + 'pasword = "x"\n')
        with pytest.raises(ConfigError, match=r"account\[2\]\.pasword: unknown key"):
            accounts_from_file(path)

    def test_plaintext_needs_insecure(self, tmp_path: Path) -> None:
        """tls = "none" without insecure = true is refused."""
        path = tmp_path / "accounts.toml"
        path.write_text(ACCOUNTS.replace('"starttls"', '"none"'))
        with pytest.raises(ConfigError, match=r"account\[2\]\.tls: 'none' sends the password"):
            accounts_from_file(path)


class TestReadPassword:
    """read_password takes the password from a file, a variable or a command."""

    def account(self, **source: str) -> Account:
        """An account with the given password source."""
        return Account(host="h", user="u", maildir="m", **source).validate()

    def test_file_without_newline(self, tmp_path: Path) -> None:
        """The file's trailing line end is not part of the password."""
        (tmp_path / "pw").write_text("s3cret\n")
        assert "s3cret" == read_password(self.account(password_file=str(tmp_path / "pw")))

    def test_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The variable's value is the password."""
        monkeypatch.setenv("POBOX_TEST_PASSWORD", "from-env")
        assert "from-env" == read_password(self.account(password_env="POBOX_TEST_PASSWORD"))

    def test_command(self) -> None:
        """The command's first output line is the password."""
        command = shlex.join([sys.executable, "-c", "print('from-cmd'); print('ignored')"])
        assert "from-cmd" == read_password(self.account(password_command=command))

    def test_failing_command(self) -> None:
        """A failing password command is a configuration error."""
        command = shlex.join([sys.executable, "-c", "raise SystemExit(3)"])
        with pytest.raises(ConfigError, match="password_command exited with status 3"):
            read_password(self.account(password_command=command))
