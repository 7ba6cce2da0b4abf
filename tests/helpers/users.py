"""Unprivileged system users for tests that need another uid, and running code as them.

The tests run as root in CI. :func:`system_user` creates a user once (``useradd``; idempotent,
also when two test processes race) and returns its uid and gid; :func:`run_as` runs a Python
snippet as that user (real uid, gid, no supplementary groups), for the parts of a test that a
mail user would do (plant links, hold locks). Tests that need them fail, never skip, when not
run as root.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["MALLORY", "VICTIM", "interpreter", "need_root", "popen_as", "run_as", "system_user"]

#: The local user who attacks with their own maildir.
MALLORY = "pobox-mallory"
#: Another local user, whose mail the attacker is after.
VICTIM = "pobox-victim"

_ROOT = Path(__file__).resolve().parents[2]
#: What the snippets import: pobox's sources and the tests' helpers.
_PYTHONPATH = f"{_ROOT / 'src'}:{_ROOT}"


def need_root() -> None:
    """Fail the test unless it runs as root (it needs other users)."""
    if os.geteuid() != 0:
        pytest.fail("this test needs other users and root: run the suite as root")


def system_user(name: str) -> tuple[int, int]:
    """Return ``(uid, gid)`` of the unprivileged user ``name``, creating it if missing."""
    need_root()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        done = subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            capture_output=True,
            check=False,
        )
        if done.returncode not in {0, 9}:  # 9: exists (another test process made it)
            pytest.fail(f"useradd {name} failed: {done.stderr.decode(errors='replace')}")
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _world_usable(path: Path) -> bool:
    """Tell whether any user may execute ``path`` (it and every directory above it)."""
    if not path.is_file() or not path.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in path.parents)


def interpreter() -> str:
    """Return a Python other users can run: this one, unless it lives where they cannot reach.

    (A pyenv under ``/root`` is out of their reach; then the system's ``/usr/bin/python3``.)
    """
    for candidate in (Path(sys.executable).resolve(), Path("/usr/bin/python3")):
        if _world_usable(candidate):
            return str(candidate)
    pytest.fail(f"no Python other users can run: {sys.executable} and /usr/bin/python3")


def run_as(
    user: tuple[int, int], code: str, *, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the Python ``code`` as ``user`` (uid, gid; no other groups); return its result."""
    return subprocess.run(
        [interpreter(), "-c", code],
        user=user[0],
        group=user[1],
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": _PYTHONPATH},
    )


def popen_as(user: tuple[int, int], code: str) -> subprocess.Popen[str]:
    """Start the Python ``code`` as ``user`` (uid, gid; no other groups), pipes on stdin/stdout."""
    return subprocess.Popen(
        [interpreter(), "-c", code],
        user=user[0],
        group=user[1],
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": _PYTHONPATH},
    )
