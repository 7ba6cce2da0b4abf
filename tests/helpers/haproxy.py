"""Run a real HAProxy (Debian's ``haproxy`` package) on loopback, for tests behind a proxy.

``running_haproxy(tmpdir, sections)`` writes a configuration into ``tmpdir``: a ``global``
section of its own (a stats socket in ``tmpdir``, nothing in /etc), TCP-mode ``defaults``,
then ``sections`` (frontends, backends).  It checks the file with ``haproxy -c``, starts
``haproxy -db`` (in the foreground) as a child process, waits until every ``bind`` port
accepts connections, yields a :class:`HAProxy`, and stops it again by the PID it started
(SIGTERM, then SIGKILL)::

    sections = f'''
    listen pop3
        bind 127.0.0.1:{free_port()}
        server pobox 127.0.0.1:{pobox_port} send-proxy-v2
    '''
    with running_haproxy(tmp, sections) as haproxy:
        ...

A missing HAProxy raises :class:`HAProxyError`: tests that need it fail rather than skip
(``scripts/install-deps --test`` installs it).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.ports import free_port

__all__ = ["HAProxy", "HAProxyError", "free_port", "running_haproxy"]

_GLOBAL = """\
global
    maxconn 256
    stats socket {socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


class HAProxyError(RuntimeError):
    """HAProxy is missing, or its configuration is wrong, or it did not start."""


@dataclass(frozen=True, slots=True)
class HAProxy:
    """A running HAProxy."""

    pid: int
    config: Path
    stats_socket: Path
    output: Path

    def command(self, line: str) -> str:
        """Send one command to the stats socket (``show stat``...); return the answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_state(self, backend: str, server: str) -> tuple[str, str]:
        """Return a server's ``(status, check_status)`` from ``show stat``: ("UP", "L7OK")."""
        lines = self.command("show stat").splitlines()
        columns = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(columns, line.split(","), strict=False))
            if (row.get("pxname"), row.get("svname")) == (backend, server):
                return row["status"], row["check_status"]
        msg = f"no server {backend}/{server} in show stat"
        raise HAProxyError(msg)


def find_haproxy() -> Path:
    """Return the haproxy program.

    Raises:
        HAProxyError: it is not installed.
    """
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        msg = "haproxy is not installed: run scripts/install-deps --test"
        raise HAProxyError(msg)
    return Path(found)


@contextlib.contextmanager
def running_haproxy(tmpdir: Path, sections: str, start_timeout: float = 15.0) -> Iterator[HAProxy]:
    """Run HAProxy with ``sections`` after its global and defaults while the block runs.

    Raises:
        HAProxyError: HAProxy is missing, refuses the configuration, or does not listen.
    """
    binary = find_haproxy()
    tmpdir.mkdir(parents=True, exist_ok=True)
    config = tmpdir / "haproxy.cfg"
    stats = tmpdir / "haproxy.sock"
    config.write_text(_GLOBAL.format(socket=stats) + sections)
    check = subprocess.run(
        [str(binary), "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        msg = f"haproxy -c refused {config}:\n{check.stdout}{check.stderr}"
        raise HAProxyError(msg)
    output = tmpdir / "haproxy.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [str(binary), "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ports = [int(p) for p in re.findall(r"^\s*bind\s+127\.0\.0\.1:(\d+)", sections, re.M)]
        _wait_listening(process, ports, start_timeout, output)
        yield HAProxy(process.pid, config, stats, output)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_listening(
    process: subprocess.Popen[bytes], ports: list[int], timeout: float, output: Path
) -> None:
    """Wait until every port in ``ports`` accepts a connection."""
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            msg = f"haproxy did not listen on {waiting}:\n{output.read_text(errors='replace')}"
            raise HAProxyError(msg)
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", waiting[0])) == 0:
                waiting.pop(0)
                continue
        time.sleep(0.02)
