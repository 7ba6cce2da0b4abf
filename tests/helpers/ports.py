"""Loopback ports for the servers the tests start (Dovecot, PostgreSQL, HAProxy, ``pobox``).

A port picked by binding to port 0 comes from the kernel's ephemeral range, where another test
process (pytest-xdist runs several) or any outgoing connection may take it between the test
picking it and the server binding it. These come from below that range instead, from a block
of their own for each test process, so only the process itself could reuse one, and it checks
that the port is free when it hands it out.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from pathlib import Path

__all__ = ["free_port"]

#: Ports per test process, and the most test processes with blocks of their own.
_BLOCK = 1200
_PROCESSES = 8


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % _PROCESSES if worker.isdigit() else 0
    top = max(_ephemeral_low(), 1024 + _BLOCK * _PROCESSES)
    start = top - _BLOCK * (_PROCESSES - index)
    return range(start, start + _BLOCK)


_PORTS = _block()
_NEXT = itertools.count(random.randrange(_BLOCK))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port of this test process's block that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(_BLOCK):
        port = _PORTS[next(_NEXT) % _BLOCK]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS} on {host}")
