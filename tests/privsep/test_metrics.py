"""``metrics_listen`` with ``workers = 2`` started as root: the workers run as nobody.

The workers count into files of the master's private directory after dropping their
privileges, so the directory must be theirs (mode 0700) and the master, root, reads it.
"""

from __future__ import annotations

import pwd
import re
import stat
from pathlib import Path

from tests.integration.test_metrics import key, scrape
from tests.privsep.conftest import World
from tests.privsep.serving import children, serve
from tests.privsep.test_serve import _passwd, _retrieve_all

LOGIN_OK = key("pobox_logins_total", mechanism="PLAIN", result="ok")
RETR = key("pobox_pop3_command_duration_seconds_count", command="RETR")


def multiproc_dir(pid: int) -> Path:
    """The PROMETHEUS_MULTIPROC_DIR in the environment of process ``pid``."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in environ:
        if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(item.split(b"=", 1)[1].decode())
    raise AssertionError(f"no PROMETHEUS_MULTIPROC_DIR in the environment of {pid}")


class TestWorkersAsNobody:
    """The counts of workers that dropped their privileges reach the master's scrape."""

    async def test_directory_is_the_workers_and_counts_add_up(self, world: World) -> None:
        """The directory is nobody's, 0700; two logins (one per attempt) are counted."""
        nobody = pwd.getpwnam("nobody")
        settings = (
            f'passwd_file = "{_passwd(world)}"\nworkers = 2\nmetrics_listen = "127.0.0.1:0"\n'
        )
        async with serve(world.root, settings) as served:
            line = await served.wait_log(r"Metrics on http://127\.0\.0\.1:\d+/metrics")
            found = re.search(r":(\d+)/metrics", line)
            assert found is not None
            port = int(found.group(1))
            await served.wait_log(r"master: pobox \S+ started")
            workers = children(served.proc.pid)
            folder = multiproc_dir(workers[0])
            info = folder.stat()
            before = await scrape(port)
            for _ in range(2):
                await _retrieve_all(served.port)
            after = await scrape(port)
            kinds = {path.name.split("_")[0] for path in folder.iterdir()}
        assert (nobody.pw_uid, nobody.pw_gid, 0o700) == (
            info.st_uid,
            info.st_gid,
            stat.S_IMODE(info.st_mode),
        )
        assert 2 == after[LOGIN_OK] - before.get(LOGIN_OK, 0)
        assert 2 == after[RETR] - before.get(RETR, 0)
        # The workers' files: made before they dropped privileges, written after.
        assert {"counter", "gauge", "histogram"} == kinds
        assert not folder.exists()  # the master removed it as it stopped
