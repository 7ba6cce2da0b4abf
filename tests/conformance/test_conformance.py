"""The conformance suite (``pobox conformance``) against pobox, Dovecot and a broken server.

pobox must pass every check that applies; Dovecot's report is pinned as it is (a change in
either shows here); a fake server with one bug at a time must fail exactly the checks that
look for that bug, which shows that the checks can fail.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.cli import main
from pobox.conformance import SEED_MESSAGES, Report, Status, Target, run_suite
from pobox.testing import running_server
from tests.conformance.fake import fake_server
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir
from tests.helpers.maildir import deliver
from tests.tls.helpers import Pki, ssl_port

#: Checks that need what neither the seed maildrop nor a plain listener offers.
NOT_ADVERTISED = ["expire", "login-delay", "sys-codes"]
NO_STLS = ["stls-not-after-login", "stls"]


def suite(port: int, *, allow_delete: bool = True, mode: str = "plain") -> Report:
    """Run the suite as alice/secret against ``127.0.0.1:port``."""
    return run_suite(Target("127.0.0.1", port, "alice", "secret", mode), allow_delete=allow_delete)


def failures(report: Report) -> dict[str, str]:
    """Return the failed checks' ids and details (to show in an assertion)."""
    return {c.id: c.detail for c in report.checks if c.status is Status.FAIL}


class TestPobox:
    """pobox passes every check that applies to it."""

    async def test_plain(self, tmp_path: Path) -> None:
        """Over plain TCP with --allow-delete: no FAIL; skips only what is not advertised."""
        async with running_server(tmp_path) as srv:
            for message in SEED_MESSAGES:
                srv.deliver("alice", message)
            report = await asyncio.to_thread(suite, srv.port)
            left = srv.count("alice")
        assert {} == failures(report)
        assert NOT_ADVERTISED + NO_STLS == sorted(
            report.ids(Status.SKIP), key=(NOT_ADVERTISED + NO_STLS).index
        )
        assert len(SEED_MESSAGES) - 1 == left  # the UPDATE check deleted the last one
        # RFC 6856: pobox advertises UTF8 and LANG, and the checks run and pass.
        assert (Status.PASS, Status.PASS, Status.PASS) == (
            report.status("utf8"),
            report.status("utf8-saslprep"),
            report.status("lang"),
        )

    async def test_expire_and_login_delay(self, tmp_path: Path) -> None:
        """With both keys set (the user's own delay 0), their grammar checks pass, not skip."""
        async with running_server(
            tmp_path, {}, pop3_expire_days="never", pop3_login_delay=900
        ) as srv:
            add_user(
                srv.config.passwd_file, "carol", b"secret", "PLAIN", extra=["pop3_login_delay=0"]
            )
            for message in SEED_MESSAGES:
                srv.deliver("carol", message)
            target = Target("127.0.0.1", srv.port, "carol", "secret", "plain")
            report = await asyncio.to_thread(run_suite, target, allow_delete=True)
        assert {} == failures(report)
        assert (Status.PASS, Status.PASS) == (
            report.status("expire"),
            report.status("login-delay"),
        )

    async def test_keeps_mail_without_allow_delete(self, tmp_path: Path) -> None:
        """Without --allow-delete every message is still there and the UPDATE check is skipped."""
        async with running_server(tmp_path) as srv:
            for message in SEED_MESSAGES:
                srv.deliver("alice", message)
            report = await asyncio.to_thread(suite, srv.port, allow_delete=False)
            left = srv.count("alice")
        assert (len(SEED_MESSAGES), Status.SKIP, {}) == (
            left,
            report.status("update"),
            failures(report),
        )

    async def test_starttls_cli(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`pobox conformance --starttls --json`: exit 0, STLS checks pass inside TLS."""
        pki = Pki.create(tmp_path / "pki")
        secret = tmp_path / "password"
        secret.write_text("secret\n")
        async with running_server(
            tmp_path / "srv", ssl_cert=str(pki.cert_pem), ssl_key=str(pki.key_pem)
        ) as srv:
            for message in SEED_MESSAGES:
                srv.deliver("alice", message)
            argv = [
                "conformance", f"127.0.0.1:{srv.port}", "--user", "alice",
                "--password-file", str(secret), "--starttls", "--cafile", str(pki.ca_pem), "--json",
            ]  # fmt: skip
            code = await asyncio.to_thread(main, argv)
        document = json.loads(capsys.readouterr().out)
        checks = {c["id"]: c for s in document["sections"] for c in s["checks"]}
        assert (0, "PASS", "PASS", "SKIP") == (
            code,
            checks["stls-capa"]["status"],
            checks["stls-not-after-login"]["status"],
            checks["update"]["status"],
        )
        assert 0 == document["totals"]["FAIL"]

    async def test_stls_and_pop3s(self, tmp_path: Path) -> None:
        """With a certificate: the STLS checks run and pass; POP3S (--tls) passes too."""
        pki = Pki.create(tmp_path / "pki")
        async with running_server(
            tmp_path / "srv",
            ssl_cert=str(pki.cert_pem),
            ssl_key=str(pki.key_pem),
            ssl_listen=["127.0.0.1:0"],
        ) as srv:
            for message in SEED_MESSAGES:
                srv.deliver("alice", message)
            context = pki.client_context()
            plain = Target("127.0.0.1", srv.port, "alice", "secret", "plain", context)
            report = await asyncio.to_thread(run_suite, plain)
            pop3s = Target("127.0.0.1", ssl_port(srv), "alice", "secret", "tls", context)
            implicit = await asyncio.to_thread(run_suite, pop3s)
        assert (Status.PASS, Status.PASS, {}) == (
            report.status("stls"),
            report.status("stls-not-after-login"),
            failures(report),
        )
        assert ({}, [*NOT_ADVERTISED, *NO_STLS, "update"]) == (
            failures(implicit),
            sorted(implicit.ids(Status.SKIP), key=[*NOT_ADVERTISED, *NO_STLS, "update"].index),
        )


@pytest.mark.external
class TestDovecot:
    """Dovecot's report, pinned: what it passes, fails and skips."""

    def test_report(self) -> None:
        """Dovecot 2.3 with a certificate: no FAIL, plain and STLS; the skips listed here."""
        with searchable_tmpdir() as tmp:
            pki = Pki.create(tmp / "pki")
            for message in SEED_MESSAGES:
                deliver(tmp / "home" / "alice" / "Maildir", message.replace(b"\r\n", b"\n"))
            extra = (
                "auth_failure_delay = 0\nssl = yes\n"
                f"ssl_cert = <{pki.cert_pem}\nssl_key = <{pki.key_pem}\n"
            )
            with running_dovecot(tmp, users={"alice": "secret"}, extra_config=extra) as dovecot:
                plain = run_suite(
                    Target("127.0.0.1", dovecot.port, "alice", "secret", "plain",
                           pki.client_context()),
                )  # fmt: skip
                starttls = run_suite(
                    Target("127.0.0.1", dovecot.port, "alice", "secret", "starttls",
                           pki.client_context()),
                    allow_delete=True,
                )  # fmt: skip
        unadvertised = [
            "implementation", "expire", "login-delay", "sys-codes", "utf8", "utf8-saslprep", "lang",
        ]  # fmt: skip
        assert ({}, sorted([*unadvertised, "update"])) == (
            failures(plain),
            sorted(plain.ids(Status.SKIP)),
        )
        assert ({}, sorted([*unadvertised, "stls"]), Status.PASS) == (
            failures(starttls),
            sorted(starttls.ids(Status.SKIP)),
            starttls.status("update"),
        )


class TestBrokenServer:
    """Each bug of the fake server fails the checks that look for it, and only those."""

    @pytest.mark.parametrize(
        ("flaw", "failed"),
        [
            ((), set()),
            (("no-stuffing",), {"retr", "retr-size", "retr-stuffing"}),
            (("top-miscount",), {"top-lines"}),
            (("no-quit-reply",), {"quit", "update"}),
            (("stat-after-dele",), {"dele", "deleted-err"}),
            (("pipelining-order",), {"pipelining", "advertised-works"}),
            (("bad-expire",), {"expire"}),
            (("bad-delay",), {"login-delay"}),
            (("user-after-login",), {"expire"}),
            (("bad-resp-code",), {"resp-codes", "auth-resp-code"}),
            (("auth-no-initial",), {"auth-plain", "auth-resp-code", "advertised-works"}),
            (("utf8-refused",), {"utf8", "utf8-saslprep", "advertised-works"}),
            (("utf8-no-prep",), {"utf8-saslprep"}),
            (("bad-lang",), {"lang", "advertised-works"}),
        ],
    )
    async def test_flaw(self, flaw: tuple[str, ...], failed: set[str]) -> None:
        """The report has exactly these FAILs (none for the server without flaws)."""
        async with fake_server(flaw) as fake:
            report = await asyncio.to_thread(suite, fake.port)
        assert failed == set(failures(report)), failures(report)

    async def test_rset_ignored_deletes_nothing(self) -> None:
        """A server whose RSET does nothing fails the check, and gets no QUIT to delete with."""
        async with fake_server({"rset-ignored"}) as fake:
            report = await asyncio.to_thread(suite, fake.port, allow_delete=False)
        assert ({"rset"}, len(SEED_MESSAGES)) == (set(failures(report)), len(fake.store))

    async def test_flawless_fake_runs_every_check(self) -> None:
        """The fake without flaws advertises every extension, so almost no check is skipped."""
        async with fake_server() as fake:
            report = await asyncio.to_thread(suite, fake.port)
        assert (["stls", "stls-not-after-login", "sys-codes"], {}) == (
            sorted(report.ids(Status.SKIP)),
            failures(report),
        )

    async def test_exit_status(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`pobox conformance` exits 1 when a check fails and names it in the text report."""
        async with fake_server({"no-quit-reply"}) as fake:
            argv = ["conformance", f"127.0.0.1:{fake.port}", "-u", "alice", "-p", "secret"]
            code = await asyncio.to_thread(main, argv)
        out = capsys.readouterr().out
        assert (1, True) == (code, "  FAIL  quit " in out)

    async def test_hostile_greeting_is_escaped(self) -> None:
        """Control bytes a server sends reach the report escaped, in text and JSON alike."""
        async with fake_server({"evil-greeting"}) as fake:
            report = await asyncio.to_thread(suite, fake.port)
        text, document = report.text(), report.json()
        assert (Status.FAIL, [], [], True) == (
            report.status("greeting"),
            [c for c in text + document if c in "\x1b\r"],
            [line for line in text.splitlines() if line.startswith("  PASS")],
            "\\x1b[2J" in text,
        )

    async def test_endless_line_is_refused(self) -> None:
        """A line that never ends fails the check once it passes the limit (memory bounded)."""
        async with fake_server({"endless-line"}) as fake:
            report = await asyncio.to_thread(suite, fake.port)
        assert [("greeting", Status.FAIL, "a line longer than 1048576 octets")] == [
            (c.id, c.status, c.detail) for c in report.checks
        ]

    def test_nobody_listening(self) -> None:
        """No server: the greeting check fails and the run stops there."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # bound, never listening: connections are refused
            report = suite(port)
        assert [("greeting", Status.FAIL)] == [(c.id, c.status) for c in report.checks]


class TestBlackBox:
    """The suite stands alone: it could be copied out and run against any server."""

    def test_imports_nothing_of_the_server(self) -> None:
        """Importing pobox.conformance loads no other pobox module."""
        code = (
            "import sys, pobox.conformance\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('pobox'))))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert [
            "pobox",
            "pobox.conformance",
            "pobox.conformance._checks",
            "pobox.conformance._client",
            "pobox.conformance._report",
        ] == result.stdout.split()
