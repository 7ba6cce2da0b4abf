"""The error classes of pobox.protocol.errors."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import pytest

from pobox.protocol import LocalProtocolError, ProtocolError, RemoteProtocolError


class TestProtocolError:
    """ProtocolError and its two concrete kinds."""

    def test_abstract(self):
        """ProtocolError itself cannot be raised."""
        with pytest.raises(TypeError, match="abstract"):
            ProtocolError("x")

    @pytest.mark.parametrize("cls", [LocalProtocolError, RemoteProtocolError])
    def test_resp_code(self, cls):
        """Both kinds carry their message and an RFC 2449 response code."""
        error = cls("bad", "SYS/PERM")

        assert isinstance(error, ProtocolError)
        assert ("bad", "SYS/PERM") == (str(error), error.resp_code)

    def test_resp_code_defaults_to_none(self):
        """The response code is optional."""
        assert LocalProtocolError("bad").resp_code is None
