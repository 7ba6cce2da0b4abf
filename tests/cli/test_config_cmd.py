"""``pobox config check`` / ``config dump``, and the start-up errors a newcomer meets.

Every test runs the real command in a subprocess, as an admin would, and reads its exit
status and its output.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pobox.binding import listen_error
from pobox.cli import _overrides, build_parser
from pobox.config import load_config
from tests.helpers.accounts import ROOT_MAIL_SETTINGS, ROOT_MAIL_VALUES
from tests.tls.helpers import Pki

#: sysexits.h: what init systems and scripts see.
EX_OSERR, EX_CONFIG = 71, 78


def pobox(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pobox ARGS`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "pobox", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    """A folder with an empty passwd-file and a mail directory."""
    (tmp_path / "passwd").write_text("")
    (tmp_path / "mail").mkdir()
    return tmp_path


def write_config(folder: Path, text: str, *, port: int = 0) -> Path:
    """Write pobox.toml in ``folder``: a working base, then ``text``.

    Run as root (CI), the base lets the server access mail as root, which the demo does too
    and which no production server should (see README, "Security model").
    """
    path = folder / "pobox.toml"
    base = [
        f'listen = ["127.0.0.1:{port}"]\n',
        f'mail_location = "maildir:{folder}/mail/%u"\n',
        f'passwd_file = "{folder}/passwd"\n',
    ]
    path.write_text("".join(line for line in base if line.split()[0] not in text))
    with path.open("a") as f:
        f.write(text + ROOT_MAIL_SETTINGS)
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a socket of this test listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


class TestConfigCheck:
    """pobox config check: the start-up checks of serve, without starting."""

    def test_good_file(self, setup: Path) -> None:
        """A working file: exit 0 and "ok", nothing on standard error."""
        path = write_config(setup, "")
        result = pobox("config", "check", "-c", str(path))
        assert (0, f"{path}: ok\n", "") == (result.returncode, result.stdout, result.stderr)

    def test_warnings_are_printed(self, setup: Path) -> None:
        """Warnings do not fail the check, and are said."""
        path = write_config(setup, "idle_timeout = 5\n")
        result = pobox("config", "check", "-c", str(path))
        assert 0 == result.returncode
        assert (
            "pobox: warning: config: idle_timeout: 5 s is below the 600 s RFC 1939 requires\n"
            in result.stderr
        )

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("listne = []\n", "{path}:4: unknown key 'listne' (did you mean 'listen'?)"),
            ("log_level = debug\n", "{path}:4:13: not valid TOML: Invalid value"),
            ('ssl_min_protocol = "TLSv1"\n', "{path}:4: ssl_min_protocol: 'TLSv1' is not "
             "TLSv1.2 or TLSv1.3"),
            ('passwd_file = "/nonexistent/passwd"\n', "passwd_file: /nonexistent/passwd "
             "does not exist"),
            ('ssl_cert = "{folder}/passwd"\nssl_key = "{folder}/passwd"\n',
             "ssl_cert: {folder}/passwd holds no PEM certificate"),
            ('log_path = "{folder}/nowhere/pobox.log"\n', "log_path: cannot open "
             "{folder}/nowhere/pobox.log: No such file or directory"),
            ('log_path = "{folder}"\n', "log_path: cannot open {folder}: Is a directory"),
        ],
    )  # fmt: skip
    def test_same_error_as_serve(self, setup: Path, text: str, message: str) -> None:
        """A broken file: exit 78 and the very message serve stops with."""
        path = write_config(setup, text.format(folder=setup))
        check = pobox("config", "check", "-c", str(path))
        serve = pobox("serve", "-c", str(path))
        expected = f"pobox: configuration error: {message.format(path=path, folder=setup)}\n"
        assert (EX_CONFIG, expected) == (check.returncode, check.stderr)
        assert EX_CONFIG == serve.returncode
        assert expected in serve.stderr.splitlines(keepends=True)


class TestConfigDump:
    """pobox config dump: the settings that differ from the defaults, like doveconf -n."""

    def test_non_defaults_only(self, setup: Path) -> None:
        """Only the keys the file changes are printed, after a comment line."""
        path = write_config(setup, "idle_timeout = 900\npop3_lock_session = true\n")
        result = pobox("config", "dump", "-c", str(path))
        assert 0 == result.returncode
        comment, *lines = result.stdout.splitlines()
        assert comment.startswith("# pobox ")
        assert comment.endswith(f"of {path}")
        assert [
            'listen = ["127.0.0.1:0"]',
            f'mail_location = "maildir:{setup}/mail/%u"',
            f'passwd_file = "{setup}/passwd"',
            "idle_timeout = 900",
        ] == [line for line in lines if line.split()[0] not in ROOT_MAIL_VALUES]

    @pytest.mark.parametrize("every", [False, True])
    def test_loads_back(self, setup: Path, every: bool) -> None:
        """What dump prints (with --all too) is a config file of the same settings."""
        path = write_config(
            setup,
            'login_trusted_networks = ["10.0.0.1/8"]\nquota_bytes = 1000\n'
            'lmtp_listen = ["unix:/run/pobox/lmtp"]\nlogin_greeting = "a \\"b\\" \\\\ c"\n',
        )
        result = pobox("config", "dump", "-c", str(path), *(["--all"] if every else []))
        assert 0 == result.returncode
        again = setup / "again.toml"
        again.write_text(result.stdout)
        assert load_config(path) == load_config(again)
        assert every == ("drain_timeout = 30" in result.stdout)
        assert "10.0.0.0/8" == tomllib.loads(result.stdout)["login_trusted_networks"][0]

    def test_secrets_on_request(self, setup: Path) -> None:
        """A DSN's password is hidden, and printed with --secrets (-P, as doveconf)."""
        path = write_config(setup, 'postgresql_dsn = "host=db password=s3cret"\n')
        hidden = pobox("config", "dump", "-c", str(path))
        shown = pobox("config", "dump", "-c", str(path), "-P")
        assert "s3cret" not in hidden.stdout
        assert 'postgresql_dsn = "host=db password=s3cret"\n' in shown.stdout

    def test_broken_file(self, setup: Path) -> None:
        """A file that does not load is refused as check refuses it."""
        path = write_config(setup, "listne = []\n")
        result = pobox("config", "dump", "-c", str(path))
        assert EX_CONFIG == result.returncode
        assert "unknown key 'listne' (did you mean 'listen'?)" in result.stderr


class TestBindErrors:
    """A listener that cannot be bound: the key, the address and the fix, no traceback."""

    def test_port_in_use(self, setup: Path, busy_port: int) -> None:
        """Another server on the port: exit 71, and what to do."""
        path = write_config(setup, "", port=busy_port)
        result = pobox("serve", "-c", str(path))
        assert EX_OSERR == result.returncode
        assert (
            f"pobox: listen: another server listens on 127.0.0.1:{busy_port}: stop it or "
            "change listen\n"
        ) == result.stderr.splitlines(keepends=True)[-1]
        assert "Traceback" not in result.stderr

    def test_port_in_use_with_workers(self, setup: Path, busy_port: int) -> None:
        """The master of several workers binds too: the same message."""
        path = write_config(setup, "workers = 2\n", port=busy_port)
        result = pobox("serve", "-c", str(path))
        assert EX_OSERR == result.returncode
        assert result.stderr.endswith(
            f"pobox: listen: another server listens on 127.0.0.1:{busy_port}: stop it or "
            "change listen\n"
        )

    @pytest.mark.parametrize("name", ["lmtp_listen", "smtp_listen", "health_listen"])
    def test_other_listeners_name_their_key(self, setup: Path, busy_port: int, name: str) -> None:
        """LMTP, SMTP and the health check name their own key."""
        value = f'"127.0.0.1:{busy_port}"'
        path = write_config(setup, f"{name} = {value if name == 'health_listen' else [value]}\n")
        path.write_text(path.read_text().replace("'", ""))
        result = pobox("serve", "-c", str(path))
        assert EX_OSERR == result.returncode
        assert result.stderr.endswith(
            f"pobox: {name}: another server listens on 127.0.0.1:{busy_port}: stop it or "
            f"change {name}\n"
        )
        assert "Traceback" not in result.stderr

    def test_implicit_tls_port_in_use(self, setup: Path, busy_port: int) -> None:
        """ssl_listen names itself too (with a real certificate, so only the bind fails)."""
        pki = Pki.create(setup / "pki")
        path = write_config(
            setup,
            f'ssl_cert = "{pki.cert_pem}"\nssl_key = "{pki.key_pem}"\n'
            f'ssl_listen = ["127.0.0.1:{busy_port}"]\nworkers = 1\n',
        )
        result = pobox("serve", "-c", str(path))
        assert EX_OSERR == result.returncode
        assert result.stderr.endswith(
            f"pobox: ssl_listen: another server listens on 127.0.0.1:{busy_port}: stop it or "
            "change ssl_listen\n"
        )

    def test_address_not_here(self, setup: Path) -> None:
        """An address this host does not have (TEST-NET-1): exit 78, change the key."""
        path = setup / "pobox.toml"
        write_config(setup, "")
        path.write_text(path.read_text().replace("127.0.0.1:0", "192.0.2.1:1110"))
        result = pobox("serve", "-c", str(path))
        assert EX_CONFIG == result.returncode
        assert result.stderr.endswith(
            "pobox: listen: 192.0.2.1:1110 is not an address of this host: change listen\n"
        )


class TestListenError:
    """The message of each bind failure (errors as the kernel reports them)."""

    @pytest.mark.parametrize(
        ("code", "message", "in_use"),
        [
            (errno.EADDRINUSE, "ssl_listen: another server listens on [::1]:995: stop it or "
             "change ssl_listen", True),
            (errno.EACCES, "ssl_listen: permission denied to listen on [::1]:995 (ports below "
             "1024 need root or CAP_NET_BIND_SERVICE; a socket file, a directory you may write "
             "to): start pobox as root, which gives root up after binding, or change "
             "ssl_listen", False),
            (errno.EADDRNOTAVAIL, "ssl_listen: [::1]:995 is not an address of this host: "
             "change ssl_listen", False),
            (errno.EMFILE, "ssl_listen: cannot listen on [::1]:995: Too many open files: check "
             "ssl_listen", False),
        ],
    )  # fmt: skip
    def test_messages(self, code: int, message: str, in_use: bool) -> None:
        """Each errno gets its cause and its fix, naming the key."""
        error = listen_error("ssl_listen", "[::1]:995", OSError(code, os.strerror(code)))
        assert (message, in_use) == (str(error), error.in_use)

    def test_unresolvable_host(self) -> None:
        """A host name that does not resolve says so."""
        try:
            socket.getaddrinfo("pobox-no-such-host.invalid", 110)
        except socket.gaierror as exc:
            error = listen_error("listen", "pobox-no-such-host.invalid:110", exc)
        else:
            pytest.fail(".invalid resolved")
        assert str(error).startswith(
            "listen: cannot resolve the host of pobox-no-such-host.invalid:110 ("
        )


class TestServeFlags:
    """The serve options that set keys come from the declaration (flag=True)."""

    def test_flags_set_keys(self) -> None:
        """Repeated list options, a switch and a choice reach the keys they name."""
        args = build_parser().parse_args(
            ["serve", "--listen", "127.0.0.1:1", "--listen", "[::1]:2", "--trace",
             "--log-level", "debug", "--mail-location", "maildir:/m/%u"]
        )  # fmt: skip
        assert {
            "listen": ["127.0.0.1:1", "[::1]:2"],
            "trace": True,
            "log_level": "debug",
            "mail_location": "maildir:/m/%u",
        } == _overrides(args)

    def test_choices_from_the_declaration(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A value outside the key's choices is refused by the option parser."""
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--log-level", "loud"])
        assert "choose from debug, info, warning, error" in capsys.readouterr().err.replace("'", "")

    def test_help_lists_the_keys(self) -> None:
        """pobox serve --help prints every key with its default."""
        result = pobox("serve", "--help")
        assert 0 == result.returncode
        assert "  workers = 0\n      Serving processes sharing the listeners" in result.stdout
        assert "  --passwd-file PASSWD_FILE" in result.stdout
