"""CPU per login of pobox trees, in process: the real server objects, no sockets, interleaved.

    .venv/bin/python bench/login_cpu.py [--logins 4000] [--rounds 5]
        [--mechanism user|plain|apop] [NAME=SRC ...]

Each ``SRC`` is a pobox source folder (default: this tree's ``src``); each round runs every
tree once, in that order, each in a fresh process: ``pobox serve``'s own start
(:func:`pobox.cli.run_server`, the benchmark's ``login`` world and configuration: Maildir, the
session lock on, a passwd-file with ``{PLAIN}`` passwords, as root ``mail_uid``), then
``--logins`` logins one after the other through :class:`~pobox.server.Pop3Server`'s own
connection driver on a fake transport: connect, ``USER``, ``PASS``, ``STAT``, ``QUIT``, as
bench/loadgen.py's ``login`` workload does (200 users in turn); ``--mechanism plain`` logs in
with ``AUTH PLAIN`` and an initial response instead, ``apop`` with ``APOP`` (``apop = true``).
No socket, no client, no event-loop wakeup per read: what is left is pobox's work per login
(the driver, the core, the session, the password check, the lock file, the snapshot cache,
the registry, the two log lines to the log file) with its own system calls.

Printed per tree and round: the wall-clock time of a login, the least and the 10th percentile
over batches of 20 (a batch another process did not interrupt), and the process's user and
system CPU per login (``getrusage``, which other programs on the core skew less than the
clock but which the kernel splits between user and system only by sampling).  Compare trees
by the best batches of interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

#: Logins per timed batch.
BATCH = 20
#: Untimed logins first (every user's snapshot cached, the code warm).
WARM = 400


class _Transport:
    """What the driver uses of a transport, writing nowhere; ``waiter`` gets the next write."""

    def __init__(self, port: int) -> None:
        self.closing = False
        self.waiter: asyncio.Future[bytes] | None = None
        self.peer = ("127.0.0.1", port)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 110)}.get(name, default)

    def write(self, data: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.write(b"")

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _login(server: object, user: bytes, password: bytes, port: int, mechanism: str) -> None:
    """One login workload session through the server's driver, logging in by ``mechanism``."""
    loop = asyncio.get_running_loop()
    transport = _Transport(port)
    driver = server._plain_protocol()  # type: ignore[attr-defined]
    transport.waiter = loop.create_future()
    driver.connection_made(transport)
    greeting = transport.waiter.result()
    if mechanism == "user":
        driver.data_received(b"USER " + user + b"\r\n")
        command = b"PASS " + password
    elif mechanism == "plain":
        command = b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password)
    else:  # RFC 1939 §7: MD5 of the greeting's timestamp and the password
        stamp = greeting[greeting.index(b"<") : greeting.index(b">") + 1]
        digest = hashlib.md5(stamp + password, usedforsecurity=False).hexdigest()
        command = b"APOP " + user + b" " + digest.encode()
    transport.waiter = loop.create_future()
    driver.data_received(command + b"\r\n")
    reply = await transport.waiter
    if not reply.startswith(b"+OK"):
        raise SystemExit(f"login failed: {reply!r}")
    driver.data_received(b"STAT\r\n")
    transport.waiter = loop.create_future()
    driver.data_received(b"QUIT\r\n")
    await transport.waiter
    driver.connection_lost(None)
    await driver.done


async def _child(
    config_path: str, logins: int, users: list[str], password: bytes, mechanism: str
) -> None:
    import pobox  # noqa: PLC0415 - the tree under test, from PYTHONPATH
    from pobox import cli  # noqa: PLC0415
    from pobox.server import Pop3Server  # noqa: PLC0415

    servers: list[Pop3Server] = []
    start = Pop3Server.start

    async def started(self: Pop3Server) -> None:
        servers.append(self)
        await start(self)

    Pop3Server.start = started  # type: ignore[method-assign]
    config = cli.load_config(config_path, {})
    cli.start_logging(config)
    task = asyncio.create_task(cli.run_server(config))
    while not servers:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    names = [user.encode() for user in users]
    for index in range(WARM):
        await _login(servers[0], names[index % len(names)], password, 30_000 + index, mechanism)
    before = resource.getrusage(resource.RUSAGE_SELF)
    batches = []
    index = 0
    for _ in range(logins // BATCH):
        began = time.perf_counter()
        for _ in range(BATCH):
            port = 30_000 + index % 20_000
            await _login(servers[0], names[index % len(names)], password, port, mechanism)
            index += 1
        batches.append((time.perf_counter() - began) * 1e6 / BATCH)
    after = resource.getrusage(resource.RUSAGE_SELF)
    batches.sort()
    result = {
        "best": batches[0],
        "p10": batches[len(batches) // 10],
        "user": (after.ru_utime - before.ru_utime) * 1e6 / index,
        "sys": (after.ru_stime - before.ru_stime) * 1e6 / index,
        "pobox": str(Path(pobox.__file__).parent),
    }
    print(json.dumps(result), flush=True)
    task.cancel()
    os._exit(0)  # the server's own shutdown is not measured


def _config(run: ModuleType, root: Path, *, apop: bool) -> Path:
    """The benchmark's pobox configuration for the login world under ``root``."""
    base = root / "pobox"
    text = (
        f'listen = ["{run.HOST}:{run._free_port()}"]\nmail_location = "maildir:~/Maildir"\n'
        f'passwd_file = "{base / "passwd"}"\npop3_lock_session = true\nlog_level = "info"\n'
        f'log_path = "{base / "pobox.log"}"\n'
        + "".join(f"{key} = {value}\n" for key, value in run._POBOX_LIMITS.items())
        + run._pobox_access("pobox")
        + ("apop = true\n" if apop else "")
    )
    path = base / "login_cpu.toml"
    path.write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="*", metavar="NAME=SRC")
    parser.add_argument("--logins", type=int, default=4000, help="timed logins per run (4000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each tree (5)")
    parser.add_argument(
        "--mechanism",
        choices=["user", "plain", "apop"],
        default="user",
        help="USER/PASS (default), AUTH PLAIN with an initial response, or APOP (apop = true)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # CONFIG USERS PASSWORD
    args = parser.parse_args()
    if args.child:  # pobox from PYTHONPATH: bench/run.py (which puts this tree first) not loaded
        import uvloop  # noqa: PLC0415

        config, users, password = args.child
        users_list = json.loads(users)
        uvloop.run(_child(config, args.logins, users_list, password.encode(), args.mechanism))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run  # noqa: PLC0415

    trees = [tree.split("=", 1) for tree in args.trees] or [["this", str(run.ROOT / "src")]]
    settings = run.Settings.make(
        argparse.Namespace(quick=False, rounds=1, duration=1.0, generators=1)
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    with run.searchable_tmpdir() as root:
        users = run.build_world(root, settings, ["login"])["plain"]
        config = _config(run, root, apop=args.mechanism == "apop")
        for number in range(args.rounds):
            for name, src in trees:
                command = [sys.executable, __file__, "--logins", str(args.logins)]
                command += ["--mechanism", args.mechanism, "--child"]
                out = subprocess.run(
                    [*command, str(config), json.dumps(users), run.PASSWORD],
                    env={**os.environ, "PYTHONPATH": src},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                row = json.loads(out.strip().splitlines()[-1])
                results[name].append(row)
                if number == 0:
                    print(f"{name}: pobox from {row['pobox']}")
                print(
                    f"round {number + 1} {name}: best batch {row['best']:.1f} us/login, "
                    f"p10 {row['p10']:.1f}; CPU user {row['user']:.1f} + sys {row['sys']:.1f}",
                    flush=True,
                )
    for name, rows in results.items():
        bests = sorted(row["best"] for row in rows)
        cpu = sorted(row["user"] + row["sys"] for row in rows)
        print(
            f"{name}: best batch min {bests[0]:.1f} median {bests[len(bests) // 2]:.1f} us/login;"
            f" CPU median {cpu[len(cpu) // 2]:.1f} us/login"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
