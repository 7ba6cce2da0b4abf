"""The master's parts that need no process: the worker's argument, its count, its log name."""

from __future__ import annotations

import logging
import os

import pytest

from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.server._workers import WorkerLogNames, WorkerSpec, bind_listeners, worker_count


class TestWorkerSpec:
    """The ``--worker`` argument a master gives each worker."""

    def test_round_trip(self) -> None:
        """What encode() writes, decode() reads back."""
        spec = WorkerSpec(2, 7, {"pop3 127.0.0.1:0": [5, 6]})
        assert spec == WorkerSpec.decode(spec.encode())

    @pytest.mark.parametrize("text", ["", "[]", '{"index": 1}', '{"index": "x", "state_fd": 3}'])
    def test_malformed_is_a_config_error(self, text: str) -> None:
        """Anything else is refused with a ConfigError naming the option."""
        with pytest.raises(ConfigError, match=r"--worker: malformed"):
            WorkerSpec.decode(text)


class TestWorkerCount:
    """``workers``: 0 means one per CPU."""

    def test_zero_is_one_per_cpu(self) -> None:
        """The default counts the CPUs this process may run on."""
        assert len(os.sched_getaffinity(0)) == worker_count(build_config({}))

    def test_explicit(self) -> None:
        """A number is taken as it is."""
        assert 3 == worker_count(build_config({"workers": 3}))

    def test_negative_refused(self) -> None:
        """A negative count is a configuration error naming the key."""
        with pytest.raises(ConfigError, match=r"^workers: must not be negative"):
            build_config({"workers": -1})


class TestWorkerLogNames:
    """A worker's own lines say which worker."""

    def test_master_lines_renamed_session_lines_kept(self) -> None:
        """``master:`` becomes ``worker N:``; other lines are untouched."""
        names = WorkerLogNames(2)
        own = logging.LogRecord("pobox", logging.INFO, "", 0, "master: log file reopened", (), None)
        session = logging.LogRecord(
            "pobox", logging.INFO, "", 0, "pop3-login: Login: user=<%s>", ("a",), None
        )
        assert names.filter(own)
        assert names.filter(session)
        assert "worker 2: log file reopened" == own.getMessage()
        assert "pop3-login: Login: user=<a>" == session.getMessage()


class TestBindListeners:
    """The master binds every listener once."""

    def test_unix_path_that_is_no_socket_refused(self, tmp_path) -> None:
        """A delivery socket path holding a regular file is refused, and nothing stays bound."""
        path = tmp_path / "lmtp"
        path.write_text("not a socket")
        config = build_config({"listen": ["127.0.0.1:0"], "lmtp_listen": [f"unix:{path}"]})
        with pytest.raises(ConfigError, match=r"exists and is not a socket"):
            bind_listeners(config)
        assert "not a socket" == path.read_text()

    def test_every_kind_bound(self, tmp_path) -> None:
        """POP3, LMTP (TCP and a Unix socket) are bound; the socket file goes at the end."""
        path = tmp_path / "lmtp"
        config = build_config(
            {"listen": ["127.0.0.1:0"], "lmtp_listen": ["127.0.0.1:0", f"unix:{path}"]}
        )
        listeners = bind_listeners(config)
        try:
            assert ["pop3 127.0.0.1:0", "lmtp 127.0.0.1:0", f"lmtp unix:{path}"] == list(
                listeners.sockets
            )
            assert 1 == len(listeners.addresses())
            assert path.exists()
        finally:
            listeners.close()
            listeners.remove_paths()
        assert not path.exists()
