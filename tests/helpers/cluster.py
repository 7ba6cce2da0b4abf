"""Several ``pobox serve`` nodes on one throwaway PostgreSQL, behind a real HAProxy.

``with running_cluster(root, nodes=3, users={"alice": "secret"}) as cluster:`` starts, in
this order and each stopped again by the PID it started:

1. a throwaway PostgreSQL (:func:`tests.helpers.postgres.running_postgres`), a database for
   pobox, ``pobox db upgrade`` and ``pobox user add`` for each user (the commands an admin
   runs, not SQL);
2. ``nodes`` ``pobox serve`` processes, each with ports and a log file of its own, mail and
   users in PostgreSQL, ``haproxy_trusted_networks = ["127.0.0.1/32"]``, POP3, POP3S (a
   trustme certificate) and LMTP;
3. HAProxy configured by ``contrib/haproxy/pobox.cfg`` itself (:func:`haproxy_sections`):
   the documented configuration is the tested one, with only the addresses and ports, the
   check interval and the ``global`` section replaced; it waits until HAProxy sees every
   node UP.

HAProxy connects to the nodes from 127.0.0.1, the one trusted address, so clients must come
from elsewhere in 127.0.0.0/8 (:func:`connect`: bind before connect) for their own address
to show in the nodes' logs, and can then also reach a node directly without a header.

A node can be killed (SIGKILL) and started again on the same ports (:meth:`Node.kill`,
:meth:`Node.start`); each start appends to the same log file.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.haproxy import HAProxy, free_port, running_haproxy
from tests.helpers.postgres import Postgres, running_postgres
from tests.tls.helpers import Pki

__all__ = [
    "CONTRIB_CONFIG",
    "Cluster",
    "ClusterError",
    "Node",
    "connect",
    "haproxy_sections",
    "running_cluster",
]

#: The HAProxy configuration shipped for admins, and run by the tests.
CONTRIB_CONFIG = Path(__file__).resolve().parents[2] / "contrib" / "haproxy" / "pobox.cfg"
#: The ports the contrib file's ``bind`` lines use, by service.
_FRONT_PORTS = {110: "pop3", 995: "pop3s", 24: "lmtp"}
#: The HAProxy backend whose servers are checked (the others track it).
CHECKED_BACKEND = "pobox_pop3"
#: How often the tests' HAProxy checks the nodes: quick, so a dead node is down in ~1 s.
TEST_CHECK = "inter 500ms fall 2 rise 1"


class ClusterError(RuntimeError):
    """A node did not start, or the contrib file no longer has the shape the tests expect."""


@dataclass
class Node:
    """One ``pobox serve`` process: its config, log file and ports (fixed across restarts)."""

    name: str
    root: Path
    ports: dict[str, int]
    settings: dict[str, object]
    process: subprocess.Popen[bytes] | None = None
    #: How many "started" lines the log had before the last :meth:`start`.
    _started_before: int = 0

    @property
    def log(self) -> Path:
        """The node's log file."""
        return self.root / "pobox.log"

    @property
    def config(self) -> Path:
        """The node's pobox.toml."""
        return self.root / "pobox.toml"

    @property
    def pid(self) -> int:
        """The PID of the running process."""
        if self.process is None:
            msg = f"{self.name} is not running"
            raise ClusterError(msg)
        return self.process.pid

    def write_config(self) -> None:
        """Write pobox.toml from :attr:`settings`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "".join(f"{key} = {_toml(value)}\n" for key, value in self.settings.items())
        )

    def text(self) -> str:
        """What the log holds now."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def lines(self, text: str) -> list[str]:
        """The log lines containing ``text``."""
        return [line for line in self.text().splitlines() if text in line]

    def wait_for(self, text: str, timeout: float = 15) -> list[str]:
        """Wait until a log line contains ``text``; return the lines that do."""
        deadline = time.monotonic() + timeout
        while not (found := self.lines(text)):
            assert time.monotonic() < deadline, f"{self.name} did not log {text!r}"
            time.sleep(0.02)
        return found

    def start(self) -> None:
        """Start the process (it appends to the log); :meth:`wait_started` waits for it."""
        self._started_before = len(self.lines("started, listening on"))
        with (self.root / "pobox.err").open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pobox", "serve", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def wait_started(self, timeout: float = 60) -> None:
        """Wait until this start's "started, listening on" line is in the log.

        Raises:
            ClusterError: the process exited, or did not start within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while len(self.lines("started, listening on")) <= self._started_before:
            if self.process is None or self.process.poll() is not None:
                err = (self.root / "pobox.err").read_text(errors="replace")
                msg = f"{self.name} exited:\n{err[-3000:]}\n{self.text()[-3000:]}"
                raise ClusterError(msg)
            if time.monotonic() > deadline:
                msg = f"{self.name} did not start within {timeout} s:\n{self.text()[-3000:]}"
                raise ClusterError(msg)
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the process (as a crash or the OOM killer would) and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the running process (SIGTERM: it drains, then exits)."""
        if self.process is None:
            msg = f"{self.name} is not running"
            raise ClusterError(msg)
        self.process.send_signal(sig)

    def wait_exited(self, timeout: float = 60) -> int:
        """Wait until the process has exited; return its status."""
        process, self.process = self.process, None
        assert process is not None, f"{self.name} is not running"
        return process.wait(timeout)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process; SIGKILL it if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Cluster:
    """The running cluster: PostgreSQL, the nodes, HAProxy and its frontends' ports."""

    root: Path
    pg: Postgres
    dsn: str
    pki: Pki
    nodes: list[Node]
    front: dict[str, int] = field(default_factory=dict)
    haproxy: HAProxy | None = None

    def node(self, name: str) -> Node:
        """The node called ``name`` (``pobox1``...)."""
        for node in self.nodes:
            if node.name == name:
                return node
        msg = f"no node {name}"
        raise ClusterError(msg)

    def logged(self, text: str) -> list[Node]:
        """The nodes whose log has a line containing ``text``."""
        return [node for node in self.nodes if node.lines(text)]

    def wait_logged(self, text: str, timeout: float = 15) -> Node:
        """Wait until exactly one node has logged ``text``; return it.

        Raises:
            AssertionError: none did within ``timeout`` seconds, or more than one did.
        """
        deadline = time.monotonic() + timeout
        while not (found := self.logged(text)):
            assert time.monotonic() < deadline, f"no node logged {text!r}"
            time.sleep(0.02)
        assert 1 == len(found), f"{[n.name for n in found]} all logged {text!r}"
        return found[0]

    def server_states(self, backend: str = CHECKED_BACKEND) -> dict[str, str]:
        """HAProxy's status of each node in ``backend`` (``UP``, ``DOWN``, ``MAINT``...)."""
        assert self.haproxy is not None
        return {node.name: self.haproxy.server_state(backend, node.name)[0] for node in self.nodes}

    def wait_states(self, want: Mapping[str, str], timeout: float = 30) -> None:
        """Wait until HAProxy reports the states in ``want`` (node name to status prefix)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.server_states()
            except OSError as exc:  # the stats socket comes a moment after the frontends
                states = {name: repr(exc) for name in want}
            if all(states[name].startswith(status) for name, status in want.items()):
                return
            assert time.monotonic() < deadline, f"HAProxy says {states}, want {dict(want)}"
            time.sleep(0.1)

    def pobox(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``python -m pobox ARGS -c <first node's config>`` (``pobox db``, ``pobox user``)."""
        return subprocess.run(
            [sys.executable, "-m", "pobox", *args, "-c", str(self.nodes[0].config)],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def haproxy_sections(
    text: str, front: Mapping[str, int], nodes: list[Node], check: str = TEST_CHECK
) -> str:
    """Turn the contrib configuration into the tests' one; return it from ``defaults`` on.

    Replaced, and nothing else: the ``global`` section (:func:`running_haproxy` writes its
    own, with a stats socket in the test's directory); each ``bind`` address by a loopback
    frontend port (by the port it had: 110, 995, 24); each ``server pobox<N> ADDRESS:PORT``
    by node N's port for that service (the checked ones with ``port`` and node N's
    ``health_listen`` port: in production each node answers on port 8110 of its own
    address, here they share one), and the servers of nodes the cluster does not have
    dropped; the check interval by ``check``.

    Raises:
        ClusterError: the file no longer has the lines this expects.
    """
    start = re.search(r"^defaults\b", text, re.MULTILINE)
    if start is None:
        msg = f"{CONTRIB_CONFIG}: no defaults section"
        raise ClusterError(msg)
    text = text[start.start() :]
    by_name = {node.name: node for node in nodes}
    service_of = {str(port): service for port, service in _FRONT_PORTS.items()}
    seen_fronts: list[str] = []
    seen_servers: list[str] = []

    def bind(match: re.Match[str]) -> str:
        service = _FRONT_PORTS[int(match["port"])]
        seen_fronts.append(service)
        return f"{match['lead']}127.0.0.1:{front[service]}"

    def server(match: re.Match[str]) -> str:
        name = match["name"]
        seen_servers.append(name)
        if name not in by_name:
            return ""
        node = by_name[name]
        service = service_of[match["port"]]
        check = f" port {node.ports['health']}" if service == "pop3" else ""
        return f"{match['lead']}{name} 127.0.0.1:{node.ports[service]}{match['rest']}{check}\n"

    text = re.sub(
        r"^(?P<lead>\s*bind\s+)\S*:(?P<port>110|995|24)\b", bind, text, flags=re.MULTILINE
    )
    text = re.sub(
        r"^(?P<lead>\s*server\s+)(?P<name>pobox\d+) 10\.0\.0\.\d+:(?P<port>\d+)(?P<rest>.*)\n",
        server,
        text,
        flags=re.MULTILINE,
    )
    text, checks = re.subn(r"check port 8110 inter 1s fall 2 rise 2", f"check {check}", text)
    if sorted(seen_fronts) != sorted(_FRONT_PORTS.values()) or checks != 1:
        msg = f"{CONTRIB_CONFIG}: binds {seen_fronts}, check intervals {checks}"
        raise ClusterError(msg)
    missing = [node.name for node in nodes if seen_servers.count(node.name) != 3]
    if missing:
        msg = f"{CONTRIB_CONFIG}: no server line in each backend for {missing}"
        raise ClusterError(msg)
    return text


def connect(port: int, source: str, timeout: float = 15) -> socket.socket:
    """Connect to 127.0.0.1:``port`` from ``source`` (bound before connecting)."""
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )


def _node_settings(node: Node, dsn: str, pki: Pki, extra: Mapping[str, object]) -> None:
    node.settings = {
        "listen": [f"127.0.0.1:{node.ports['pop3']}"],
        "ssl_listen": [f"127.0.0.1:{node.ports['pop3s']}"],
        "lmtp_listen": [f"127.0.0.1:{node.ports['lmtp']}"],
        "health_listen": f"127.0.0.1:{node.ports['health']}",
        **pki.settings,
        "userdb": "postgresql",
        "mail_location": "postgresql",
        "postgresql_dsn": dsn,
        "postgresql_pool_min": 1,
        "postgresql_pool_max": 8,
        "postgresql_lock_connections": 2,
        "postgresql_timeout": 5,
        "haproxy_trusted_networks": ["127.0.0.1/32"],
        "auth_failure_delay": 0,
        "log_path": str(node.log),
        "log_level": "debug",
        # Each node's own name in the shared session registry (shared_state is postgresql).
        "node_name": node.name,
        "control_socket": "off",  # three nodes on one host: not /run/pobox/control
        # One process per node: a test's SIGKILL of the node's PID is the node's death (with
        # workers, the master's death makes its workers end their sessions themselves).
        "workers": 1,
        **extra,
    }


@contextlib.contextmanager
def running_cluster(
    root: Path,
    nodes: int = 3,
    users: Mapping[str, str] | None = None,
    settings: Mapping[str, object] | None = None,
    pg_settings: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Run PostgreSQL, ``nodes`` pobox nodes and HAProxy while the block runs (see module).

    ``users`` (name to password, stored ``{PLAIN}``) are added with ``pobox user add``;
    ``settings`` are pobox config keys for every node.

    Raises:
        ClusterError: a node did not start, or ``pobox db upgrade``/``pobox user add`` failed.
    """
    root.mkdir(parents=True, exist_ok=True)
    pki = Pki.create(root / "pki", "localhost")
    with running_postgres(pg_settings) as pg, contextlib.ExitStack() as stack:
        pg.psql('CREATE DATABASE "pobox"')
        dsn = pg.dsn("pobox")
        members = [
            Node(
                f"pobox{number}",
                root / f"pobox{number}",
                {service: free_port() for service in ("pop3", "pop3s", "lmtp", "health")},
                {},
            )
            for number in range(1, nodes + 1)
        ]
        for node in members:
            _node_settings(node, dsn, pki, settings or {})
            node.write_config()
        cluster = Cluster(root, pg, dsn, pki, members)
        for args, stdin in [
            (("db", "upgrade"), ""),
            *((("user", "add", name, "--scheme", "PLAIN"), pw + "\n") for name, pw in
              (users or {}).items()),
        ]:  # fmt: skip
            done = cluster.pobox(*args, stdin=stdin)
            if done.returncode:
                msg = f"pobox {' '.join(args)} failed: {done.stdout}{done.stderr}"
                raise ClusterError(msg)
        for node in members:
            stack.callback(node.stop)
            node.start()
        for node in members:
            node.wait_started()
        cluster.front = {service: free_port() for service in _FRONT_PORTS.values()}
        sections = haproxy_sections(CONTRIB_CONFIG.read_text(), cluster.front, members)
        cluster.haproxy = stack.enter_context(running_haproxy(root / "haproxy", sections))
        cluster.wait_states({node.name: "UP" for node in members})
        yield cluster
