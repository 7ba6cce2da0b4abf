"""Process limits (:mod:`pobox.server._limits`): connection caps, and the open-file limit
``pobox serve`` raises at start-up."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import resource
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.config import Config, load_config
from pobox.errors import ConfigError
from pobox.server._limits import ConnectionLimits, descriptors_needed, plan_limit
from tests.helpers.accounts import ROOT_MAIL_SETTINGS

INFINITY = resource.RLIM_INFINITY
#: prctl(2) option and capability(7) number: drop CAP_SYS_RESOURCE from the bounding set.
PR_CAPBSET_DROP = 24
CAP_SYS_RESOURCE = 24


class TestDescriptorsNeeded:
    """The limit a configuration needs."""

    def test_default(self) -> None:
        """1000 connections need 2 each (socket, a message file being read) plus 64."""
        assert 2064 == descriptors_needed(Config())

    def test_session_lock_holds_no_descriptor(self) -> None:
        """The session lock is a lock file not kept open: it costs no descriptor."""
        assert 2064 == descriptors_needed(Config(pop3_lock_session=False))

    def test_scales_with_max_connections(self) -> None:
        """The need follows max_connections."""
        assert 40064 == descriptors_needed(Config(max_connections=20_000))

    def test_explicit(self) -> None:
        """max_open_files, when set, is the need."""
        assert 500 == descriptors_needed(Config(max_open_files=500))

    def test_delivery_listeners_add_their_caps(self) -> None:
        """Each delivery protocol that listens adds 3 per connection of its cap."""
        lmtp = Config(lmtp_listen=("unix:/run/pobox/lmtp",), lmtp_max_connections=10)
        both = Config(lmtp_listen=("127.0.0.1:24",), smtp_listen=("127.0.0.1:25",))
        assert (2094, 2664) == (descriptors_needed(lmtp), descriptors_needed(both))

    def test_caps_without_a_listener_cost_nothing(self) -> None:
        """A cap of a protocol that does not listen needs no descriptors."""
        assert 2064 == descriptors_needed(Config(smtp_max_connections=5000))


class TestConnectionLimits:
    """Connection caps in all and per address."""

    def test_per_address_cap(self) -> None:
        """An address at its cap is refused; others are not."""
        limits = ConnectionLimits(total=10, per_address=2)
        answers = [limits.admit("192.0.2.1") for _ in range(3)] + [limits.admit("192.0.2.2")]
        assert [None, None, "from 192.0.2.1", None] == answers
        assert 3 == limits.open

    def test_total_cap(self) -> None:
        """Beyond the total every address is refused, Unix socket clients (None) included."""
        limits = ConnectionLimits(total=2, per_address=5)
        answers = [limits.admit(None), limits.admit("192.0.2.1"), limits.admit("192.0.2.2")]
        assert [None, None, "in all", "in all"] == [*answers, limits.admit(None)]

    def test_release_frees_the_slot(self) -> None:
        """A released connection's slot serves the next one, in all and for its address."""
        limits = ConnectionLimits(total=1, per_address=1)
        limits.admit("192.0.2.1")
        limits.release("192.0.2.1")
        assert (None, 1) == (limits.admit("192.0.2.1"), limits.open)

    def test_refused_connections_are_not_counted(self) -> None:
        """A refusal takes no slot: releasing the admitted ones brings the count to zero."""
        limits = ConnectionLimits(total=5, per_address=1)
        limits.admit("192.0.2.1")
        limits.admit("192.0.2.1")
        limits.release("192.0.2.1")
        assert (0, None) == (limits.open, limits.admit("192.0.2.1"))


class TestAddressGroups:
    """An IPv6 client is capped per /64, as one subscriber's network; IPv4 per address."""

    def test_one_slash_64_shares_one_cap(self) -> None:
        """Addresses of one /64 share the per-address cap; another /64 has its own."""
        limits = ConnectionLimits(total=100, per_address=2)
        answers = [limits.admit(f"2001:db8:1:2::{n:x}") for n in range(1, 4)]
        answers.append(limits.admit("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        answers.append(limits.admit("2001:db8:1:3::1"))
        assert [None, None, "from 2001:db8:1:2::/64", "from 2001:db8:1:2::/64", None] == answers

    def test_release_by_any_address_of_the_group(self) -> None:
        """Each address releases its own slot in its /64's count."""
        limits = ConnectionLimits(total=100, per_address=2)
        limits.admit("2001:db8::1")
        limits.admit("2001:db8::2")
        limits.release("2001:db8::1")
        assert (None, 2) == (limits.admit("2001:db8::3"), limits.open)

    def test_ipv4_mapped_counts_as_ipv4(self) -> None:
        """An IPv4-mapped address (dual-stack socket) is its IPv4 address, not one /64 of all."""
        limits = ConnectionLimits(total=100, per_address=1)
        answers = [
            limits.admit("::ffff:192.0.2.1"),
            limits.admit("192.0.2.1"),
            limits.admit("::ffff:192.0.2.2"),
        ]
        assert [None, "from 192.0.2.1", None] == answers


class TestConfigKey:
    """``max_open_files`` in the configuration."""

    def test_negative_refused(self) -> None:
        """A negative value is an error naming the key."""
        with pytest.raises(ConfigError, match="max_open_files: must not be negative"):
            load_config(None, {"max_open_files": -1})

    def test_read(self) -> None:
        """An integer is taken as it is."""
        assert 70000 == load_config(None, {"max_open_files": 70000}).max_open_files


class TestPlanLimit:
    """The ``(soft, hard)`` limits chosen for a need."""

    def test_enough_already(self) -> None:
        """A soft limit that covers the need is left alone, never lowered."""
        assert (4096, 8192) == plan_limit(3064, 4096, 8192, nr_open=1 << 20, privileged=True)

    def test_soft_raised_to_need(self) -> None:
        """The soft limit rises to the need when the hard limit allows it."""
        assert (3064, 524288) == plan_limit(3064, 1024, 524288, nr_open=1 << 20, privileged=False)

    def test_soft_raised_to_hard(self) -> None:
        """Without privilege the soft limit stops at the hard limit."""
        assert (2048, 2048) == plan_limit(3064, 1024, 2048, nr_open=1 << 20, privileged=False)

    def test_root_raises_hard(self) -> None:
        """A privileged process raises the hard limit to the need too."""
        assert (3064, 3064) == plan_limit(3064, 1024, 2048, nr_open=1 << 20, privileged=True)

    def test_root_capped_by_nr_open(self) -> None:
        """The hard limit never goes past the kernel's fs.nr_open."""
        got = plan_limit(2_000_000, 1024, 20000, nr_open=1048576, privileged=True)
        assert (1048576, 1048576) == got

    def test_unlimited_hard(self) -> None:
        """Under an unlimited hard limit the soft limit rises to the need."""
        got = plan_limit(3064, 1024, INFINITY, nr_open=1 << 20, privileged=False)
        assert (3064, INFINITY) == got

    def test_unlimited_soft(self) -> None:
        """An unlimited soft limit is enough."""
        got = plan_limit(3064, INFINITY, INFINITY, nr_open=1 << 20, privileged=True)
        assert (INFINITY, INFINITY) == got


def _limits_1024(*, drop_cap: bool) -> Callable[[], None]:
    """Return a pre-exec hook: soft 256, hard 1024, and as root no CAP_SYS_RESOURCE."""

    def hook() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))
        if drop_cap and os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return hook


def _proc_limits(pid: int) -> tuple[int, int]:
    """Return the ``(soft, hard)`` open-file limits of ``pid`` from /proc."""
    text = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    assert found is not None, text
    return int(found[1]), int(found[2])


@asynccontextmanager
async def serving(
    tmp_path: Path, extra: str, preexec: Callable[[], None]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """Run ``python -m pobox serve`` until it listens; yield it and its log lines so far."""
    add_user(tmp_path / "passwd", "alice", b"secret", scheme="PLAIN")
    config = tmp_path / "pobox.toml"
    config.write_text(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n'
        f'mail_location = "maildir:{tmp_path}/mail/%u"\n'
        f'passwd_file = "{tmp_path}/passwd"\n' + ROOT_MAIL_SETTINGS + extra
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pobox", "serve", "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not lines or "started, listening on" not in lines[-1]:
                line = (await proc.stderr.readline()).decode()
                assert line, "the server exited:\n" + "".join(lines)
                lines.append(line)
        yield proc, lines
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await proc.wait()


class TestServe:
    """``pobox serve`` started with a low open-file limit."""

    async def test_raises_soft_limit(self, tmp_path: Path) -> None:
        """The soft limit rises from 256 to max_open_files, and the log says so."""
        hook = _limits_1024(drop_cap=False)
        async with serving(tmp_path, "max_open_files = 700\n", hook) as (proc, lines):
            assert (700, 1024) == _proc_limits(proc.pid)
        log = "".join(lines)
        assert "open-file limit raised from 256 (hard 1024) to 700 (hard 1024)" in log
        assert "WARNING" not in log

    async def test_warns_when_hard_limit_cannot_rise(self, tmp_path: Path) -> None:
        """Without CAP_SYS_RESOURCE the limit stops at the hard one, with one warning."""
        hook = _limits_1024(drop_cap=True)
        async with serving(tmp_path, "", hook) as (proc, lines):
            assert (1024, 1024) == _proc_limits(proc.pid)
        warnings = [line for line in lines if " WARNING " in line]
        assert 1 == len(warnings), lines
        assert "(ulimit -n) 1024 (hard 1024) is below the 2064 that max_connections" in warnings[0]
        assert "LimitNOFILE=2064" in warnings[0]
        assert "sessions beyond about 480 may fail" in warnings[0]
