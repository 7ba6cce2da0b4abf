"""contrib/: the systemd units, the fail2ban jail and logrotate, checked by their own tools.

``systemd-analyze verify`` parses a unit as systemd would load it: unknown keys, bad values,
a missing command.  It needs no running systemd (this suite's machines have none), only the
``systemd`` package (installed by ``scripts/install-deps --test``): a missing tool fails the
test, never skips it.  The one change made to a unit before checking it is its command path:
``/usr/local/bin/pobox`` (where ``scripts/install-deps`` links pobox when run as root) becomes
this checkout's ``.venv/bin/pobox``, since ``verify`` checks that the command exists.
``systemd-analyze security --offline`` scores the sandboxing (0 is best, 10 worst).
Starting the units under a real systemd is the manual check in README.md.
The fail2ban jail goes through ``fail2ban-client --test`` in a copy of Debian's
``/etc/fail2ban`` (the filter's matches are checked against a real server's log in
``tests/sasl/test_defence.py``; logrotate runs against a real server in
``tests/log/test_reopen.py``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pobox.config import build_config, parse_listen
from tests.helpers import need

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "contrib" / "systemd"
#: Where the units expect pobox.
INSTALLED = "/usr/local/bin/pobox"
#: The sandboxing scores the units must keep (systemd-analyze security: lower is safer).
MAX_EXPOSURE = {"pobox.service": 3.5, "pobox-vmail.service": 2.5}


def _installed_copy(tmp_path: Path, name: str) -> Path:
    """Copy the unit ``name`` into ``tmp_path`` with this checkout's pobox as its command."""
    text = (SYSTEMD / name).read_text()
    pobox = Path(sys.executable).with_name("pobox")
    assert pobox.is_file(), f"{pobox}: run scripts/install-deps --test"
    copy = tmp_path / name
    copy.write_text(text.replace(INSTALLED, str(pobox)))
    return copy


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("systemd-analyze"), *args], capture_output=True, text=True, check=False, timeout=120
    )


class TestUnits:
    """The service and socket units."""

    @pytest.mark.parametrize("name", ["pobox.service", "pobox-vmail.service", "pobox.socket"])
    def test_verify(self, tmp_path: Path, name: str) -> None:
        """systemd-analyze verify finds nothing to say: no unknown key, no bad value."""
        for unit in SYSTEMD.iterdir():  # the socket names its service: both in one place
            _installed_copy(tmp_path, unit.name)
        result = _analyze("verify", str(tmp_path / name))
        assert (0, "", "") == (result.returncode, result.stdout, result.stderr)

    def test_verify_catches_a_typo(self, tmp_path: Path) -> None:
        """The check can fail: a misspelt key is reported."""
        unit = _installed_copy(tmp_path, "pobox.service")
        unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs="))
        result = _analyze("verify", str(unit))
        assert "Unknown key 'WatchdogSecs'" in result.stderr

    @pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
    def test_sandboxing_score(self, tmp_path: Path, name: str) -> None:
        """systemd-analyze security rates the unit's sandboxing at most its recorded score."""
        result = _analyze("security", "--offline=true", str(_installed_copy(tmp_path, name)))
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
        assert match is not None, result.stdout + result.stderr
        assert float(match.group(1)) <= MAX_EXPOSURE[name]

    @pytest.mark.parametrize("name", ["pobox.service", "pobox-vmail.service"])
    def test_service_shape(self, name: str) -> None:
        """Type=notify with a watchdog, SIGHUP reload, a descriptor limit, the ambient sandbox."""
        lines = set((SYSTEMD / name).read_text().splitlines())
        wanted = {
            "Type=notify",
            "NotifyAccess=main",
            "WatchdogSec=30s",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "LimitNOFILE=65536",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "SystemCallFilter=@system-service",
            f"ExecStart={INSTALLED} serve --config /etc/pobox/pobox.toml",
        }
        assert set() == wanted - lines

    def test_vmail_never_root(self) -> None:
        """pobox-vmail.service runs as vmail with only the capability to bind low ports."""
        lines = set((SYSTEMD / "pobox-vmail.service").read_text().splitlines())
        assert {
            "User=vmail",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        } <= lines

    def test_socket_addresses_are_pobox_listen_values(self) -> None:
        """Each ListenStream= is written as pobox.toml writes an address, and parses as one."""
        text = (SYSTEMD / "pobox.socket").read_text()
        streams = re.findall(r"^ListenStream=(.+)$", text, re.MULTILINE)
        assert ["0.0.0.0:110", "[::]:110", "0.0.0.0:995", "[::]:995"] == streams
        config = build_config({"listen": streams})
        assert [parse_listen(s) for s in streams] == list(config.listen)


def test_systemd_analyze_is_the_real_one() -> None:
    """The tool is systemd's (a stand-in would make these checks meaningless)."""
    result = _analyze("--version")
    assert result.stdout.startswith("systemd "), result.stdout
    assert shutil.which("systemd-analyze") is not None


#: Debian's fail2ban configuration, the base the jail is installed into.
FAIL2BAN_ETC = Path("/etc/fail2ban")


def _fail2ban_test(tmp_path: Path, jail: str) -> subprocess.CompletedProcess[str]:
    """Install contrib's filter and ``jail`` into a copy of /etc/fail2ban; run its test."""
    need("fail2ban-client")
    etc = tmp_path / "fail2ban"
    shutil.copytree(FAIL2BAN_ETC, etc)
    (etc / "jail.d" / "defaults-debian.conf").unlink(missing_ok=True)  # sshd: not ours
    shutil.copy(ROOT / "contrib" / "fail2ban" / "filter.d" / "pobox.conf", etc / "filter.d")
    log = tmp_path / "pobox.log"
    log.touch()
    (etc / "jail.d" / "pobox.conf").write_text(jail.replace(LOG_PATH, str(log)))
    return subprocess.run(
        [need("fail2ban-client"), "-c", str(etc), "--test"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


#: Where the units' LogsDirectory= puts the log, and so where logrotate and fail2ban look.
LOG_PATH = "/var/log/pobox/pobox.log"


class TestLogFiles:
    """contrib/fail2ban's jail and contrib/logrotate agree with the units on the log."""

    def test_one_log_path(self) -> None:
        """The jail reads the file logrotate rotates, in the units' LogsDirectory."""
        jail = (ROOT / "contrib" / "fail2ban" / "jail.d" / "pobox.conf").read_text()
        rotate = (ROOT / "contrib" / "logrotate" / "pobox").read_text()
        assert f"logpath  = {LOG_PATH}" in jail.splitlines()
        assert f"{LOG_PATH} {{" in rotate.splitlines()
        for unit in ("pobox.service", "pobox-vmail.service"):
            assert "LogsDirectory=pobox" in (SYSTEMD / unit).read_text().splitlines()

    def test_jail_passes_fail2ban_configuration_test(self, tmp_path: Path) -> None:
        """fail2ban-client --test accepts the jail with its filter."""
        jail = (ROOT / "contrib" / "fail2ban" / "jail.d" / "pobox.conf").read_text()
        result = _fail2ban_test(tmp_path, jail)
        assert 0 == result.returncode, result.stdout + result.stderr
        assert "OK: configuration test is successful" in result.stdout + result.stderr

    def test_fail2ban_test_can_fail(self, tmp_path: Path) -> None:
        """A jail naming a filter that does not exist fails the same check."""
        jail = (ROOT / "contrib" / "fail2ban" / "jail.d" / "pobox.conf").read_text()
        result = _fail2ban_test(tmp_path, jail.replace("filter   = pobox", "filter   = pobx"))
        assert 0 != result.returncode
