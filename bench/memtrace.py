"""Run ``python -m pobox ...`` and log its memory every few seconds (``soak.py --memtrace``).

    python bench/memtrace.py -m pobox serve -c pobox.toml

Settings come from the environment (so that the command line stays pobox's own):

- ``MEMTRACE_OUT``: the folder for ``memory.log`` (made writable by anyone: the server may
  drop its privileges);
- ``MEMTRACE_EVERY``: seconds between two lines (default 20);
- ``MEMTRACE_FRAMES``: if set, tracemalloc runs with that many frames and a snapshot
  ``snap-NNN.tm`` is dumped with each line (compare two with
  ``tracemalloc.Snapshot.load(...).compare_to(...)``); it costs memory of its own, so read
  its *traced* figure, not RSS, then.

Each line: seconds since the start, RSS and threads (``/proc/self/status``), glibc's heap
(``mallinfo2``: the arenas' size, what is in use and what is free in them), Python's traced
memory when tracemalloc runs, and the garbage collector's generation counts. This is how the
soak's RSS growth was traced to connections freed only by full collections (see
``bench/results/soak.md``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _heap() -> str:
    """glibc's heap figures, or nothing where there is no ``mallinfo2``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return ""
    info = libc.mallinfo2()
    mib = 1024 * 1024
    return (
        f" heap {info.arena / mib:.1f} MiB in_use {info.uordblks / mib:.1f} MiB"
        f" free {info.fordblks / mib:.1f} MiB mmapped {info.hblkhd / mib:.1f} MiB"
    )


def _status() -> tuple[int, int]:
    rss = threads = 0
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def _log(out: Path, every: float) -> None:
    started = time.monotonic()
    number = 0
    while True:
        time.sleep(every)
        number += 1
        rss, threads = _status()
        traced = ""
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(str(out / f"snap-{number:03d}.tm"))
            traced = f" traced {tracemalloc.get_traced_memory()[0] / 1024 / 1024:.1f} MiB"
        line = (
            f"{time.monotonic() - started:.0f}s rss {rss / 1024:.1f} MiB threads {threads}"
            f"{_heap()}{traced} gc {gc.get_count()}\n"
        )
        with (out / "memory.log").open("a") as log:
            log.write(line)


def main() -> None:
    """Start the logger thread, then run the module named after ``-m`` as ``__main__``."""
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: memtrace.py -m MODULE [ARGS...]")
    out = Path(os.environ.get("MEMTRACE_OUT", "memtrace"))
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o1777)
    frames = os.environ.get("MEMTRACE_FRAMES")
    if frames:
        tracemalloc.start(int(frames))
    every = float(os.environ.get("MEMTRACE_EVERY", "20"))
    threading.Thread(target=_log, args=(out, every), daemon=True, name="memtrace").start()
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
