"""How fast ``pobox import`` and ``pobox export`` move a Maildir in and out of PostgreSQL.

Starts a throwaway PostgreSQL cluster (tests/helpers/postgres.py), creates pobox's schema,
writes a Maildir of N messages (default 10,000 of about 2.6 KB: a header and 200 lines),
then runs the real commands as processes: ``pobox import`` into the database, ``pobox
import`` again (everything is there: the cost of a re-run), and ``pobox export`` to a new
Maildir. Prints messages per second for each; the export syncs every file it writes.

Usage: ``.venv/bin/python bench/transfer.py [--messages N]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.maildir import deliver  # noqa: E402 - after the path is set
from tests.helpers.postgres import migrate, running_postgres  # noqa: E402


def run(*argv: str) -> float:
    """Run ``pobox ARGV``; return the seconds it took (exit on failure)."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pobox", *argv], capture_output=True, text=True, check=False
    )
    took = time.monotonic() - began
    if done.returncode:
        sys.exit(f"pobox {argv[0]} failed ({done.returncode}): {done.stderr}")
    print(f"  {done.stdout.strip()}")
    return took


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    count = parser.parse_args().messages
    with tempfile.TemporaryDirectory(prefix="pobox-bench-") as tmp, running_postgres() as pg:
        folder = Path(tmp)
        pg.psql('CREATE DATABASE "bench"')
        migrate(pg.dsn("bench"))
        source = folder / "source"
        body = "".join(f"line {n} of a message body, some text\n" for n in range(200))
        for number in range(count):
            deliver(source, f"Subject: {number}\nFrom: a@b.test\n\n{body}".encode())
        (folder / "passwd").write_text("alice:{PLAIN}x\n")
        config = folder / "pobox.toml"
        config.write_text(
            f'mail_location = "postgresql"\npostgresql_dsn = "{pg.dsn("bench")}"\n'
            f'passwd_file = "{folder / "passwd"}"\n'
        )
        common = ["--user", "alice", "-c", str(config)]
        figures = {
            "import": run("import", "--from", f"maildir:{source}", *common),
            "import again": run("import", "--from", f"maildir:{source}", *common),
            "export": run("export", "--to", f"maildir:{folder / 'out'}", *common),
        }
    for name, seconds in figures.items():
        print(f"{name:>12}: {count} messages in {seconds:.1f} s, {count / seconds:,.0f} messages/s")


if __name__ == "__main__":
    main()
