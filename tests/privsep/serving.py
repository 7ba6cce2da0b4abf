"""A real ``pobox serve`` process for the owner's-rights tests, and what /proc says about it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.process import DRAIN_WAIT

__all__ = ["Served", "children", "serve"]

#: A deadline for start-up and for the events awaited (never a timed assertion).
DEADLINE = 30.0


@dataclass
class Served:
    """A running ``pobox serve``: its process, ports and log."""

    proc: asyncio.subprocess.Process
    ports: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def port(self) -> int:
        """The first POP3 port."""
        return self.ports[0]

    async def wait_log(self, pattern: str) -> str:
        """Wait for a log line matching ``pattern``; return it."""
        async with asyncio.timeout(DEADLINE):
            while True:
                for line in self.log:
                    if re.search(pattern, line):
                        return line
                if self.reader is not None and self.reader.done():
                    msg = f"pobox exited ({self.proc.returncode}) before {pattern!r}:\n" + "".join(
                        self.log
                    )
                    raise AssertionError(msg)
                self.changed.clear()
                await self.changed.wait()

    async def lmtp_address(self) -> tuple[str, int]:
        """The LMTP listener's address, as its start-up line names it."""
        line = await self.wait_log(r"lmtp listening on")
        found = re.search(r"(\d+)\D*$", line.strip())
        assert found is not None, line
        return "127.0.0.1", int(found[1])

    @property
    def helper_pid(self) -> int:
        """The storage helper's pid, as the start-up line names it."""
        for line in self.log:
            found = re.search(r"storage helper \(pid (\d+)\)", line)
            if found:
                return int(found[1])
        msg = "no storage helper in the log:\n" + "".join(self.log)
        raise AssertionError(msg)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))
            self.changed.set()
        self.changed.set()

    async def _tail(self, path: Path) -> None:
        """Follow the log file ``path`` (across a rotation: by name) while the process runs."""
        seen = 0
        while self.proc.returncode is None:
            text = path.read_text(errors="replace") if path.exists() else ""
            if len(text) < seen:  # a new file after a rotation
                seen = 0
            if len(text) > seen:
                self.log.extend(text[seen:].splitlines(keepends=True))
                seen = len(text)
                self.changed.set()
            await asyncio.sleep(0.05)
        self.changed.set()

    async def wait_exit(self) -> int:
        """Wait for the process to end; return its status."""
        async with asyncio.timeout(DEADLINE):
            status = await self.proc.wait()
            if self.reader is not None:
                await self.reader
        return status


@contextlib.asynccontextmanager
async def serve(
    folder: Path, settings: str, *, prelude: str = "", log: Path | None = None
) -> AsyncIterator[Served]:
    """Run ``python -m pobox serve`` as root with ``settings`` (TOML lines) until the block ends.

    Args:
        prelude: Python run in the child before pobox starts (to drop root for mode 1).
        log: the ``log_path`` the settings name, followed instead of standard error.
    """
    config = folder / "pobox.toml"
    one = "" if "workers = " in settings else "workers = 1\n"  # one process unless asked
    config.write_text('listen = ["127.0.0.1:0"]\nauth_failure_delay = 0\n' + one + settings)
    if prelude:
        argv = ["-c", prelude + f"\nimport sys\nsys.exit(main(['serve', '-c', {str(config)!r}]))"]
    else:
        argv = ["-m", "pobox", "serve", "-c", str(config)]
    stderr = asyncio.subprocess.PIPE if log is None else asyncio.subprocess.DEVNULL
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdin=asyncio.subprocess.DEVNULL, stderr=stderr
    )
    served = Served(proc)
    served.reader = asyncio.create_task(served._read() if log is None else served._tail(log))
    try:
        line = await served.wait_log(r"started, listening on")
        served.ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
        yield served
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):  # a session left open: drained
                async with asyncio.timeout(DRAIN_WAIT):
                    await proc.wait()
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)  # the second one: stop at once
        with contextlib.suppress(TimeoutError):
            await served.wait_exit()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def children(pid: int) -> list[int]:
    """The child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found
