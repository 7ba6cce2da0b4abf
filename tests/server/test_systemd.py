"""systemd integration: the test plays systemd with real sockets and a real ``pobox serve``.

The notify socket is a real ``AF_UNIX`` datagram socket the test binds and reads, as
systemd's is; socket activation passes a real listening socket as descriptor 3 with
``LISTEN_FDS``/``LISTEN_PID`` set for the exec'd process, as systemd does.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.server import _inherit
from pobox.server._systemd import Notifier, adopt_listen_fds, listen_fds
from tests.helpers.accounts import ROOT_MAIL_VALUES
from tests.helpers.process import ServeProcess, _toml, stop_process

#: Seconds the test waits for a notification (a deadline for the test, not an assertion).
DEADLINE = 30.0


def write_config(folder: Path, **settings: object) -> Path:
    """Write a pobox.toml for alice on ``folder``; ``settings`` are config keys."""
    folder.mkdir(parents=True, exist_ok=True)
    add_user(folder / "passwd", "alice", b"secret", scheme="PLAIN")
    (folder / "mail" / "alice").mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = {
        "listen": ["127.0.0.1:0"],
        "workers": 1,
        "mail_location": f"maildir:{folder}/mail/%u",
        "passwd_file": str(folder / "passwd"),
        "auth_failure_delay": 0,
        "log_path": str(folder / "pobox.log"),
        "drain_timeout": 5,
        **ROOT_MAIL_VALUES,
        **settings,
    }
    config = folder / "pobox.toml"
    config.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in values.items()))
    return config


class Systemd:
    """The notify end: a datagram socket pobox sends to, and what it received."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.address = address
        self.received: list[dict[str, str]] = []

    async def next(self) -> dict[str, str]:
        """Return the next notification as a dict of its assignments."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), DEADLINE)
        message = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.received.append(message)
        return message

    async def until(self, key: str) -> dict[str, str]:
        """Return the next notification that sets ``key``, skipping others."""
        while True:
            message = await self.next()
            if key in message:
                return message


@asynccontextmanager
async def notified_serve(
    tmp_path: Path, address: str, watchdog_usec: int = 200_000, **settings: object
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Systemd]]:
    """Run ``pobox serve`` with ``NOTIFY_SOCKET=address`` and a watchdog."""
    systemd = Systemd(address)
    config = write_config(tmp_path, **settings)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(watchdog_usec)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pobox", "serve", "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        yield proc, systemd
    finally:
        await stop_process(proc)
        systemd.sock.close()


async def greeting(port: int) -> bytes:
    """Connect to the POP3 port and return its greeting line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.readline(), DEADLINE)
    finally:
        writer.close()
        await writer.wait_closed()


def port_of(status: str) -> int:
    """The POP3 port named in a ``STATUS=serving on 127.0.0.1:PORT...`` line."""
    match = re.search(r"127\.0\.0\.1:(\d+)", status)
    assert match is not None, status
    return int(match.group(1))


class TestNotify:
    """Type=notify: READY, WATCHDOG, RELOADING and STOPPING from a real ``pobox serve``."""

    @pytest.mark.parametrize("workers", [1, 2])
    async def test_ready_watchdog_reload_stopping(self, tmp_path: Path, workers: int) -> None:
        """READY once the port answers; pings keep coming; SIGHUP reloads; SIGTERM stops."""
        address = str(tmp_path / "notify")
        async with notified_serve(tmp_path, address, workers=workers) as (proc, systemd):
            ready = await systemd.until("READY")
            # The port answers as soon as READY is read: nothing is left to bind.
            assert (await greeting(port_of(ready["STATUS"]))).startswith(b"+OK")
            assert str(proc.pid) == ready["MAINPID"]
            pings = [await systemd.until("WATCHDOG") for _ in range(3)]
            assert ["1", "1", "1"] == [ping["WATCHDOG"] for ping in pings]
            proc.send_signal(signal.SIGHUP)
            reloading = await systemd.until("RELOADING")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            assert "1" == (await systemd.until("READY"))["READY"]
            proc.send_signal(signal.SIGTERM)
            stopping = await systemd.until("STOPPING")
            assert "draining" in stopping["STATUS"]
            assert 0 == await asyncio.wait_for(proc.wait(), DEADLINE)
        # Only the process systemd started speaks to it: every message names it.
        assert {str(proc.pid)} == {m["MAINPID"] for m in systemd.received if "MAINPID" in m}

    async def test_abstract_socket(self, tmp_path: Path) -> None:
        """An abstract NOTIFY_SOCKET (@name) works as a path does."""
        address = f"@pobox-test-{os.getpid()}-{tmp_path.name}"
        async with notified_serve(tmp_path, address, watchdog_usec=0) as (_, systemd):
            ready = await systemd.until("READY")
            assert (await greeting(port_of(ready["STATUS"]))).startswith(b"+OK")


class TestNotifier:
    """Notifier: the environment it reads and what it does without systemd."""

    def test_watchdog_of_another_process_is_ignored(self) -> None:
        """WATCHDOG_PID of another process: no pings from this one; the variables are gone."""
        env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        notifier = Notifier.from_environ(env)
        try:
            assert (0.0, {}) == (notifier.watchdog_interval, env)
        finally:
            notifier.close()

    def test_watchdog_interval(self) -> None:
        """WATCHDOG_USEC for this process: the interval in seconds."""
        env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
        notifier = Notifier.from_environ(env)
        try:
            assert 3.0 == notifier.watchdog_interval
        finally:
            notifier.close()

    def test_without_systemd_nothing_is_sent(self) -> None:
        """No NOTIFY_SOCKET: disabled, send() reports nothing sent."""
        notifier = Notifier.from_environ({})
        assert (False, False) == (notifier.enabled, notifier.send("READY=1"))

    def test_status_cannot_add_assignments(self, tmp_path: Path) -> None:
        """A newline in a status text cannot start an assignment of its own."""
        systemd = Systemd(str(tmp_path / "n"))
        notifier = Notifier(systemd.address)
        try:
            notifier.status("evil\nREADY=1")
            data = systemd.sock.recv(4096)
        finally:
            notifier.close()
            systemd.sock.close()
        assert b"STATUS=evil READY=1" == data


def _activated_command(fd: int, config: Path, pid_offset: int = 0) -> list[str]:
    """A command that does what systemd does after fork: fd 3, LISTEN_*, then exec pobox."""
    code = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        f"os.environ['LISTEN_PID'] = str(os.getpid() + {pid_offset})\n"
        "os.environ['LISTEN_FDNAMES'] = 'pop3'\n"
        f"argv = [sys.executable, '-m', 'pobox', 'serve', '-c', {str(config)!r}]\n"
        "os.execv(sys.executable, argv)\n"
    )
    return [sys.executable, "-c", code]


def _listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


class TestSocketActivation:
    """pobox.socket: the ports systemd bound, passed as descriptors."""

    @pytest.mark.parametrize("workers", [1, 2])
    async def test_serves_the_passed_socket(self, tmp_path: Path, workers: int) -> None:
        """pobox serves on the passed socket (it cannot bind that port itself: it is taken)."""
        sock = _listening()
        port = sock.getsockname()[1]
        config = write_config(tmp_path, listen=[f"127.0.0.1:{port}"], workers=workers)
        proc = await asyncio.create_subprocess_exec(
            *_activated_command(sock.fileno(), config),
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(sock.fileno(),),
        )
        sock.close()  # the server's copy is the only one now: systemd keeps its own, we not
        try:
            # The connection waits in the passed socket's backlog until pobox accepts it.
            assert (await greeting(port)).startswith(b"+OK")
            served = ServeProcess(proc, tmp_path / "pobox.log")
            await served.wait_log(r"started, listening on")  # its signal handlers are set
            assert f"socket activation: systemd passed pop3 127.0.0.1:{port}" in served.text()
        finally:
            await stop_process(proc, drain_wait=30)  # no session open: one SIGTERM ends it
        assert 0 == proc.returncode

    async def test_a_socket_no_listener_names_is_an_error(self, tmp_path: Path) -> None:
        """A passed socket on an address the configuration lacks: exit 78, the address named."""
        sock = _listening()
        port = sock.getsockname()[1]
        config = write_config(tmp_path, listen=["127.0.0.1:0"])
        proc = await asyncio.create_subprocess_exec(
            *_activated_command(sock.fileno(), config),
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(sock.fileno(),),
        )
        sock.close()
        _, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
        assert 78 == proc.returncode
        assert f"('127.0.0.1', {port})" in err.decode() + (tmp_path / "pobox.log").read_text()

    def test_listen_pid_of_another_process(self) -> None:
        """LISTEN_PID of another process (a child that inherited it): nothing is taken."""
        env = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
        assert ([], {}) == (listen_fds(env), env)

    def test_descriptor_that_is_no_socket(self, tmp_path: Path) -> None:
        """LISTEN_FDS counting a descriptor that is not a socket: ConfigError, no traceback."""
        code = (
            "import os, sys\n"
            "from pobox.errors import ConfigError\n"
            "from pobox.server._systemd import listen_fds\n"
            "fd = os.open('/dev/null', os.O_RDONLY)\n"
            "os.dup2(fd, 3)\n"
            "env = {'LISTEN_FDS': '1', 'LISTEN_PID': str(os.getpid())}\n"
            "try:\n"
            "    listen_fds(env)\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
        )
        assert "descriptor 3 is no socket" in result.stdout, result.stderr

    def test_datagram_socket_matches_no_listener(self) -> None:
        """A UDP socket on a listener's address is not that (TCP) listener."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match="no listen"):
            adopt_listen_fds(build_config({"listen": [f"127.0.0.1:{port}"]}), [sock])

    def test_unix_socket_matched_by_path(self, tmp_path: Path) -> None:
        """An LMTP Unix socket is matched to its lmtp_listen entry by path."""
        path = tmp_path / "lmtp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        config = build_config({"lmtp_listen": [f"unix:{path}"]})
        try:
            assert [f"lmtp unix:{path}"] == adopt_listen_fds(config, [sock])
            assert [sock] == _inherit.take(f"lmtp unix:{path}")
        finally:
            sock.close()

    def test_mismatch_closes_and_raises(self) -> None:
        """A socket no listener names raises ConfigError naming it."""
        sock = _listening()
        with pytest.raises(ConfigError, match="socket activation: systemd passed a socket on"):
            adopt_listen_fds(build_config({}), [sock])
        assert -1 == sock.fileno()
