"""CAPA's EXPIRE and LOGIN-DELAY (RFC 2449 §6.5, §6.7): the server's, then the user's."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import pytest

from pobox.protocol import LocalProtocolError, LoginAccepted, ServerConnection, State

from .helpers import run

HEAD = (
    b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
)


def capa(conn: ServerConnection) -> bytes:
    """Return the CAPA reply of ``conn`` (greeting and earlier output drained)."""
    return run(conn, b"CAPA\r\n")[1]


def login(conn: ServerConnection, accepted: LoginAccepted) -> None:
    """Log ``conn`` in with USER/PASS and answer ``accepted``."""
    run(conn, b"USER alice\r\nPASS secret\r\n")
    conn.send(accepted)
    assert b"+OK Logged in.\r\n" == run(conn)[1]


class TestBeforeLogin:
    """CAPA in AUTHORIZATION shows the server's values."""

    def test_none_by_default(self):
        """Neither capability is shown unless the shell gives a value."""
        conn = ServerConnection(implementation=None)
        run(conn)
        assert HEAD + b"USER\r\n.\r\n" == capa(conn)

    def test_both(self):
        """EXPIRE and LOGIN-DELAY with the values given, after the others."""
        conn = ServerConnection(implementation=None, expire="30", login_delay=900)
        run(conn)
        assert HEAD + b"USER\r\nEXPIRE 30\r\nLOGIN-DELAY 900\r\n.\r\n" == capa(conn)

    def test_never_and_zero(self):
        """EXPIRE NEVER and LOGIN-DELAY 0 are shown as they are."""
        conn = ServerConnection(implementation=None, expire="NEVER", login_delay=0)
        run(conn)
        assert HEAD + b"USER\r\nEXPIRE NEVER\r\nLOGIN-DELAY 0\r\n.\r\n" == capa(conn)

    def test_per_user(self):
        """With per-user values possible, both carry USER before login."""
        conn = ServerConnection(
            implementation=None, expire="0", login_delay=60, policy_per_user=True
        )
        run(conn)
        assert HEAD + b"USER\r\nEXPIRE 0 USER\r\nLOGIN-DELAY 60 USER\r\n.\r\n" == capa(conn)

    @pytest.mark.parametrize("expire", ["", "-1", "30 USER", "3\r\n0", "\u0663", "never"])
    def test_bad_expire(self, expire):
        """An EXPIRE argument that is neither digits nor NEVER is refused."""
        with pytest.raises(ValueError, match="EXPIRE"):
            ServerConnection(expire=expire)

    def test_bad_login_delay(self):
        """A negative LOGIN-DELAY is refused."""
        with pytest.raises(ValueError, match="LOGIN-DELAY"):
            ServerConnection(login_delay=-1)


class TestAfterLogin:
    """CAPA in TRANSACTION shows the user's values, without USER."""

    def test_user_values(self):
        """The values of LoginAccepted replace the server's, and USER goes."""
        conn = ServerConnection(
            implementation=None, expire="30", login_delay=900, policy_per_user=True
        )
        run(conn)
        login(conn, LoginAccepted([], expire="7", login_delay=3600))
        assert HEAD + b"EXPIRE 7\r\nLOGIN-DELAY 3600\r\n.\r\n" == capa(conn)

    def test_user_without_policy(self):
        """A user with neither value gets neither in CAPA after login."""
        conn = ServerConnection(implementation=None, expire="30", login_delay=900)
        run(conn)
        login(conn, LoginAccepted([]))
        assert HEAD + b".\r\n" == capa(conn)

    def test_user_policy_only(self):
        """A user's own values show after login even when the server shows none before."""
        conn = ServerConnection(implementation=None)
        run(conn)
        login(conn, LoginAccepted([], expire="NEVER", login_delay=0))
        assert HEAD + b"EXPIRE NEVER\r\nLOGIN-DELAY 0\r\n.\r\n" == capa(conn)

    @pytest.mark.parametrize(("expire", "delay"), [("1 USER", None), ("x", 5), (None, -5)])
    def test_bad_user_values(self, expire, delay):
        """A LoginAccepted with a bad EXPIRE or LOGIN-DELAY is the shell's error."""
        conn = ServerConnection()
        run(conn, b"USER alice\r\nPASS secret\r\n")
        with pytest.raises(LocalProtocolError):
            conn.send(LoginAccepted([], expire=expire, login_delay=delay))
        assert State.AUTHENTICATING == conn.state
