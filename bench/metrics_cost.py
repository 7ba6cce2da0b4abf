"""What ``metrics_listen`` costs per POP3 command: server CPU time, metrics off and on.

Starts ``pobox serve`` (one process) on a throwaway Maildir, logs in, and sends ``--commands``
commands one at a time (each waits for its reply: every one goes through the whole path, the
command clock's begin and end, one write), then reads the server's own CPU time from
/proc/PID/stat.  Rounds alternate off and on, so a load that comes and goes on a shared machine
hits both alike; the medians of the CPU microseconds per command are printed, with the load
average.  CPU time, not wall time: other programs on the machine skew it much less.

    .venv/bin/python bench/metrics_cost.py --rounds 5 --commands 20000
    .venv/bin/python bench/metrics_cost.py --rounds 5 --commands 2000 --sessions
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pobox.auth.passwdfile import add_user

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SESSION = (b"USER alice\r\n", b"PASS secret\r\n", b"STAT\r\n", b"UIDL\r\n", b"LIST\r\n")


def _session(port: int) -> None:
    """One whole session: login, STAT, UIDL, LIST, RETR 1, QUIT (each answer read)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        for line in SESSION:
            sock.sendall(line)
            status = reader.readline()
            if line in (b"UIDL\r\n", b"LIST\r\n") and status.startswith(b"+OK"):
                while reader.readline() != b".\r\n":
                    pass
        sock.sendall(b"RETR 1\r\n")
        while reader.readline() != b".\r\n":
            pass
        sock.sendall(b"QUIT\r\n")
        reader.readline()


def one_round(
    folder: Path, *, metrics: bool, commands: int, verbs: list[bytes], sessions: bool
) -> float:
    """Return the server's CPU microseconds per command (or per session) for one run."""
    port = free_port()
    log = folder / "pobox.log"
    log.unlink(missing_ok=True)
    extra = f'metrics_listen = "127.0.0.1:{free_port()}"\n' if metrics else ""
    owner = "" if os.geteuid() else 'mail_uid = "0"\nmail_gid = "0"\nfirst_valid_uid = 0\n'
    owner += "first_valid_gid = 0\n" if owner else ""
    config = folder / "pobox.toml"
    config.write_text(
        f'listen = ["127.0.0.1:{port}"]\nworkers = 1\n'
        f'mail_location = "maildir:{folder}/mail/%u"\npasswd_file = "{folder}/passwd"\n'
        f'log_path = "{log}"\n' + extra + owner
    )
    proc = subprocess.Popen([sys.executable, "-m", "pobox", "serve", "-c", str(config)])
    try:
        deadline = time.monotonic() + 20
        while not (log.exists() and re.search("started, listening", log.read_text())):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("pobox did not start")
            time.sleep(0.05)
        if sessions:
            start = cpu_seconds(proc.pid)
            for _ in range(commands):
                _session(port)
            return (cpu_seconds(proc.pid) - start) / commands * 1e6
        with socket.create_connection(("127.0.0.1", port)) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            for line in (b"USER alice\r\n", b"PASS secret\r\n"):
                sock.sendall(line)
                reader.readline()
            start = cpu_seconds(proc.pid)
            for n in range(commands):
                sock.sendall(verbs[n % len(verbs)])
                reader.readline()
            spent = cpu_seconds(proc.pid) - start
            sock.sendall(b"QUIT\r\n")
            reader.readline()
        return spent / commands * 1e6
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--commands", type=int, default=20000, help="commands (or sessions)")
    parser.add_argument(
        "--sessions", action="store_true", help="whole sessions (7 commands) instead of commands"
    )
    args = parser.parse_args()
    verbs = [b"NOOP\r\n", b"STAT\r\n", b"LIST 1\r\n", b"UIDL 1\r\n"]
    with tempfile.TemporaryDirectory(prefix="pobox-metrics-cost-") as tmp:
        folder = Path(tmp)
        add_user(folder / "passwd", "alice", b"secret", scheme="PLAIN")
        new = folder / "mail" / "alice" / "new"
        new.mkdir(parents=True)
        for sub in ("cur", "tmp"):
            (new.parent / sub).mkdir()
        (new / "1.M1P1.host").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
        results: dict[bool, list[float]] = {False: [], True: []}
        unit = "session" if args.sessions else "command"
        load_start = os.getloadavg()[0]
        for _ in range(args.rounds):
            for metrics in (False, True):
                us = one_round(
                    folder,
                    metrics=metrics,
                    commands=args.commands,
                    verbs=verbs,
                    sessions=args.sessions,
                )
                results[metrics].append(us)
                print(f"metrics {'on ' if metrics else 'off'}: {us:.1f} us CPU per {unit}")
        off, on = statistics.median(results[False]), statistics.median(results[True])
        print(
            f"median: off {off:.1f} us, on {on:.1f} us per {unit}: +{on - off:.1f} us "
            f"({(on - off) / off:+.1%}); load average {load_start:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at end; {args.rounds} rounds of {args.commands} {unit}s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
