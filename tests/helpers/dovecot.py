"""Run a real Dovecot POP3 server, for side-by-side tests and benchmarks.

``running_dovecot(tmpdir, users={"alice": "secret"})`` writes a self-contained configuration
into ``tmpdir`` (``base_dir``, ``state_dir`` and the log all live there, nothing touches
``/etc/dovecot`` or the system's running Dovecot), starts ``dovecot -F`` as a child process on
a free loopback port, waits until it greets, yields a :class:`Dovecot`, and stops it again by
the PID it started::

    with searchable_tmpdir() as tmp, running_dovecot(tmp, users={"alice": "secret"}) as dovecot:
        client = poplib.POP3("127.0.0.1", dovecot.port, timeout=10)

Users live in a passwd-file (passdb and userdb) with ``{PLAIN}`` passwords; each has a home,
by default ``<tmpdir>/home/<name>``, and the mail location defaults to ``maildir:~/Maildir``.

Running as root: Dovecot refuses mail access as root ("Mail access not allowed for root"), so
the mail processes run as ``nobody`` and the homes are handed over to it (``chown -R``) before
Dovecot starts; every directory above them must be searchable by ``nobody``, which pytest's
``tmp_path`` is not (``/tmp/pytest-of-root`` is mode 0700). Use :func:`searchable_tmpdir`.
The login processes run as ``dovenull`` (or ``nobody``). As another user, every Dovecot
process runs as that user.

A missing Dovecot raises :class:`DovecotError`: tests that need it fail rather than skip.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.ports import free_port

__all__ = [
    "Dovecot",
    "DovecotError",
    "dovecot_config",
    "find_dovecot",
    "running_dovecot",
    "searchable_tmpdir",
]

_CANDIDATES = ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot")
_HOST = "127.0.0.1"
_LOG_TAIL_LINES = 40


class DovecotError(RuntimeError):
    """Dovecot is missing, or failed to start or stop."""


@dataclass(frozen=True, slots=True)
class Dovecot:
    """A running Dovecot.

    Attributes:
        host: the address it listens on (loopback).
        port: the POP3 port.
        pid: the PID of the master process (the child this helper started).
        config: the configuration file.
        log: the log file (``log_path`` and ``info_log_path``).
        homes: each user's home directory.
    """

    host: str
    port: int
    pid: int
    config: Path
    log: Path
    homes: Mapping[str, Path]

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the log."""
        return _tail(self.log, lines)

    def wait_for_log(self, text: str, *, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``text`` appears ``count`` times in the log (e.g. ``"Logged out"``).

        Raises:
            DovecotError: it did not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _read(self.log).count(text) >= count:
                return
            time.sleep(0.02)
        msg = f"{text!r} did not appear {count} time(s) in the Dovecot log:\n{self.log_tail()}"
        raise DovecotError(msg)


def find_dovecot() -> Path:
    """Return the path of the ``dovecot`` binary.

    Raises:
        DovecotError: Dovecot is not installed.
    """
    found = shutil.which("dovecot")
    candidates = [found] if found else []
    candidates.extend(_CANDIDATES)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    msg = (
        "Dovecot is not installed (looked in PATH and /usr/sbin); Debian: apt install dovecot-pop3d"
    )
    raise DovecotError(msg)


@contextlib.contextmanager
def searchable_tmpdir() -> Iterator[Path]:
    """Yield a fresh temporary directory that Dovecot's mail processes can reach, then remove it.

    It is created directly under the system temporary directory with mode 0755.
    """
    path = Path(tempfile.mkdtemp(prefix="pobox-dovecot-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_dovecot(
    tmpdir: Path,
    users: Mapping[str, str],
    mail_location: str = "maildir:~/Maildir",
    *,
    homes: Mapping[str, Path] | None = None,
    extra_config: str = "",
    start_timeout: float = 15.0,
    stop_timeout: float = 10.0,
) -> Iterator[Dovecot]:
    """Run Dovecot's POP3 service for ``users`` (name to password) while the block runs.

    Args:
        tmpdir: where the configuration, runtime files, log and default homes go.
        users: login names and their passwords.
        mail_location: Dovecot's ``mail_location``.
        homes: home directories by user (default ``<tmpdir>/home/<name>``); created if missing.
        extra_config: more ``dovecot.conf`` lines, appended last.
        start_timeout: seconds to wait for the greeting.
        stop_timeout: seconds to wait for Dovecot to exit after SIGTERM (then SIGKILL).

    Raises:
        DovecotError: Dovecot is missing or did not start; the message has the log's tail.
    """
    binary = find_dovecot()
    tmpdir = Path(tmpdir).resolve()
    confdir = tmpdir / "dovecot"
    rundir = confdir / "run"
    for directory in (confdir, rundir, confdir / "state"):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    account = _mail_account()
    user_homes = {
        name: Path(homes[name]) if homes and name in homes else tmpdir / "home" / name
        for name in users
    }
    for home in user_homes.values():
        home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _chown_tree(home, account.uid, account.gid)
        _check_searchable(home, account)
    users_file = confdir / "users"
    users_file.write_text(_passwd_file(users, user_homes, account))
    port = free_port()
    log = confdir / "dovecot.log"
    config = confdir / "dovecot.conf"
    config.write_text(_config(confdir, users_file, log, port, mail_location, account, extra_config))
    output = confdir / "dovecot.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [str(binary), "-F", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_greeting(process, port, start_timeout, log, output)
        yield Dovecot(
            host=_HOST, port=port, pid=process.pid, config=config, log=log, homes=user_homes
        )
    finally:
        _stop(process, stop_timeout)


@dataclass(frozen=True, slots=True)
class _Account:
    """Who runs Dovecot's processes: internal services, login processes, mail processes."""

    internal_user: str
    internal_group: str
    login_user: str
    uid: int
    gid: int


def _mail_account() -> _Account:
    """Choose the accounts Dovecot's processes run as (see the module documentation)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(os.getegid()).gr_name
        return _Account(me.pw_name, group, me.pw_name, me.pw_uid, os.getegid())
    nobody = pwd.getpwnam("nobody")
    try:
        login = pwd.getpwnam("dovenull").pw_name
    except KeyError:
        login = nobody.pw_name
    return _Account("root", "root", login, nobody.pw_uid, nobody.pw_gid)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give ``path`` and everything below it to ``uid``/``gid``."""
    os.chown(path, uid, gid)
    for parent, directories, files in os.walk(path):
        for name in (*directories, *files):
            os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)


def _check_searchable(home: Path, account: _Account) -> None:
    """Refuse a home that the mail processes could not reach."""
    for directory in (home, *home.parents):
        info = directory.stat()
        if info.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            msg = (
                f"Dovecot's mail processes (uid {account.uid}) cannot search {directory}, "
                f"above the home {home}; use searchable_tmpdir()"
            )
            raise DovecotError(msg)


def _passwd_file(users: Mapping[str, str], homes: Mapping[str, Path], account: _Account) -> str:
    """Return a Dovecot passwd-file: ``user:{PLAIN}password:uid:gid::home::``."""
    lines = []
    for name, password in users.items():
        for value in (name, password):
            if any(char in value for char in ":\n\r"):
                msg = f"user names and passwords cannot contain ':' or line breaks: {value!r}"
                raise ValueError(msg)
        lines.append(f"{name}:{{PLAIN}}{password}:{account.uid}:{account.gid}::{homes[name]}::\n")
    return "".join(lines)


def dovecot_config(
    confdir: Path, users_file: Path, log: Path, port: int, mail_location: str, extra: str = ""
) -> str:
    """Return the text of the ``dovecot.conf`` that :func:`running_dovecot` writes.

    For a caller that starts Dovecot itself (the benchmark): ``base_dir`` is
    ``confdir/run``, ``state_dir`` is ``confdir/state`` (create both), ``users_file`` is the
    passwd-file for passdb and userdb, ``extra`` is appended last.
    """
    return _config(confdir, users_file, log, port, mail_location, _mail_account(), extra)


def _config(
    confdir: Path,
    users_file: Path,
    log: Path,
    port: int,
    mail_location: str,
    account: _Account,
    extra: str,
) -> str:
    """Return the text of ``dovecot.conf``."""
    unprivileged = ""
    if os.geteuid() != 0:
        # chroot needs root; without it the login and anvil processes run in place.
        unprivileged = "service pop3-login {\n  chroot =\n}\nservice anvil {\n  chroot =\n}\n"
    return f"""\
# Written by tests/helpers/dovecot.py: a private POP3-only Dovecot for tests.
base_dir = {confdir / "run"}
state_dir = {confdir / "state"}
instance_name = pobox-test-{port}
log_path = {log}
info_log_path = {log}
protocols = pop3
listen = {_HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = {account.internal_user}
default_internal_group = {account.internal_group}
default_login_user = {account.login_user}
first_valid_uid = {account.uid}
first_valid_gid = {account.gid}
mail_location = {mail_location}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users_file}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {_HOST}
    port = {port}
  }}
}}
{unprivileged}{extra}
"""


def _wait_for_greeting(
    process: subprocess.Popen[bytes], port: int, timeout: float, log: Path, output: Path
) -> None:
    """Wait until Dovecot answers ``+OK`` on ``port``; stop it and raise if it does not."""
    deadline = time.monotonic() + timeout
    problem = "no greeting"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            problem = f"dovecot exited with status {process.returncode}"
            break
        try:
            with socket.create_connection((_HOST, port), timeout=1.0) as connection:
                greeting = connection.makefile("rb").readline()
        except OSError as exc:
            problem = f"cannot connect: {exc}"
            time.sleep(0.05)
            continue
        if greeting.startswith(b"+OK"):
            return
        problem = f"unexpected greeting {greeting!r}"
        time.sleep(0.05)
    _stop(process, 5.0)
    msg = (
        f"Dovecot did not start on {_HOST}:{port} ({problem}).\n"
        f"--- {log} ---\n{_tail(log, _LOG_TAIL_LINES)}\n"
        f"--- {output} ---\n{_tail(output, _LOG_TAIL_LINES)}"
    )
    raise DovecotError(msg)


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop the master process this helper started: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _read(path: Path) -> str:
    """Return a file's text, or an empty string if it does not exist."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, lines: int) -> str:
    """Return the last ``lines`` lines of a file."""
    return "\n".join(_read(path).splitlines()[-lines:])
