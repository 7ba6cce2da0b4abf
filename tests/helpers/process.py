"""``python -m pobox serve`` as a real process, logging to a file the tests read.

``async with pobox_serve(folder, users={"alice": "secret"}, trace=True) as proc:`` writes a
passwd-file and a config under ``folder``, starts the server on an ephemeral loopback port and
waits for its "started" line in ``proc.log``.  On leaving, the process gets SIGTERM (twice if
it is still draining sessions the test left open, :func:`stop_process`).
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from pobox.auth.passwdfile import add_user
from tests.helpers.accounts import ROOT_MAIL_VALUES


@dataclass
class ServeProcess:
    """A running ``pobox serve`` and the file it logs to."""

    proc: asyncio.subprocess.Process
    log: Path
    port: int = 0

    def text(self) -> str:
        """What the log file holds now."""
        return self.log.read_text(encoding="utf-8", errors="surrogateescape")

    async def wait_log(self, pattern: str, path: Path | None = None, timeout: float = 20) -> str:
        """Wait until a line of ``path`` (the log) matches ``pattern``; return that line."""
        path = path or self.log
        async with asyncio.timeout(timeout):
            while True:
                assert self.proc.returncode is None, "the server exited"
                if path.exists():
                    for line in path.read_text(errors="surrogateescape").splitlines():
                        if re.search(pattern, line):
                            return line
                await asyncio.sleep(0.05)

    async def wait_count(self, text: str, count: int, timeout: float = 20) -> None:
        """Wait until the log holds ``text`` at least ``count`` times."""
        async with asyncio.timeout(timeout):
            while not self.log.exists() or self.text().count(text) < count:
                assert self.proc.returncode is None, "the server exited"
                await asyncio.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server."""
        self.proc.send_signal(sig)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@asynccontextmanager
async def serve_config(config: Path, **popen: object) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``python -m pobox serve -c config`` (``popen``: ``stderr=PIPE``...); SIGTERM at exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pobox", "serve", "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL,
        **popen,  # type: ignore[arg-type]
    )  # fmt: skip
    try:
        yield proc
    finally:
        await stop_process(proc)


#: Seconds a test lets a server drain its sessions before the second SIGTERM.
DRAIN_WAIT = 2.0


async def stop_process(proc: asyncio.subprocess.Process, drain_wait: float = DRAIN_WAIT) -> None:
    """SIGTERM ``proc``; if it still drains sessions a test left open, SIGTERM it again.

    ``pobox serve`` drains on the first SIGTERM (``drain_timeout``, 30 s by default) and
    stops at once on the second. A test that checks the exit status gives a long
    ``drain_wait``: a second SIGTERM that comes as the process is exiting (its event loop,
    and so its handlers, gone) ends it by the signal.
    """
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(drain_wait):
            await proc.wait()
    except TimeoutError:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        await proc.wait()


@asynccontextmanager
async def pobox_serve(
    folder: Path,
    users: Mapping[str, str] | None = None,
    **settings: object,
) -> AsyncIterator[ServeProcess]:
    """Run ``python -m pobox serve`` on ``folder``; ``settings`` are config keys."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, password in (users if users is not None else {"alice": "secret"}).items():
        add_user(folder / "passwd", name, password.encode(), scheme="PLAIN")
        (folder / "mail" / name).mkdir(parents=True, exist_ok=True)
    log = Path(str(settings.get("log_path", folder / "pobox.log")))
    values: dict[str, object] = {
        "listen": ["127.0.0.1:0"],
        "workers": 1,  # one process unless a test asks for more
        "mail_location": f"maildir:{folder}/mail/%u",
        "passwd_file": str(folder / "passwd"),
        "auth_failure_delay": 0,
        "log_path": str(log),
        "control_socket": "off",  # not /run/pobox/control: a test that wants one names it
        **({} if "mail_uid" in settings else ROOT_MAIL_VALUES),  # as root, on root's files
        **settings,
    }
    config = folder / "pobox.toml"
    config.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in values.items()))
    async with serve_config(config) as proc:
        started = ServeProcess(proc, log)
        line = await started.wait_log(r"started, listening on")
        started.port = int(re.findall(r"127\.0\.0\.1:(\d+)", line)[0])
        yield started
