"""How server replies and account results turn into exit statuses for cron."""

from __future__ import annotations

import poplib

import pytest

from pobox.client import FetchResult, Status
from pobox.client._fetch import _classify
from pobox.client.cli import exit_status


class TestClassify:
    """_classify maps -ERR replies, with their RFC 2449/3206 codes, to statuses."""

    @pytest.mark.parametrize(
        ("reply", "during_auth", "expected"),
        [
            (b"-ERR [IN-USE] Mailbox is locked", True, Status.TEMPORARY),
            (b"-ERR [LOGIN-DELAY] wait 15 minutes", True, Status.TEMPORARY),
            (b"-ERR [SYS/TEMP] disk trouble", False, Status.TEMPORARY),
            (b"-ERR [AUTH] Authentication failed.", True, Status.AUTH),
            (b"-ERR invalid password", True, Status.AUTH),
            (b"-ERR [SYS/PERM] account disabled", True, Status.FAILED),
            (b"-ERR no such message", False, Status.FAILED),
        ],
    )
    def test_status(self, reply: bytes, during_auth: bool, expected: Status) -> None:
        """Each reply gets the status a cron job should act on."""
        assert expected == _classify(poplib.error_proto(reply), during_auth=during_auth).status

    def test_login_delay_message(self) -> None:
        """[LOGIN-DELAY] says to try again later."""
        error = _classify(poplib.error_proto(b"-ERR [LOGIN-DELAY] wait"), during_auth=True)
        assert "wait longer between logins, try again later" in str(error)


class TestExitStatus:
    """exit_status combines the accounts' results."""

    def result(self, status: Status) -> FetchResult:
        """A result with ``status``."""
        return FetchResult("a@h", status=status)

    def test_all_ok(self) -> None:
        """Every account fine: 0."""
        assert 0 == exit_status([self.result(Status.OK), self.result(Status.OK)])

    def test_one_kind_of_failure(self) -> None:
        """Failures of one kind give that kind's status."""
        assert 75 == exit_status([self.result(Status.OK), self.result(Status.TEMPORARY)])

    def test_mixed_failures(self) -> None:
        """Failures of different kinds give 1."""
        assert 1 == exit_status([self.result(Status.AUTH), self.result(Status.TEMPORARY)])
