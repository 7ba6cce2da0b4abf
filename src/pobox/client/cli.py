"""The ``pobox fetch`` subcommand: accounts from a TOML file or flags, one summary per account.

``add_fetch_parser(sub)`` registers the subcommand on the ``pobox`` parser; the command's
exit status is for cron (sysexits.h): 0 all accounts fine, 75 try again later ([IN-USE],
[LOGIN-DELAY], connection refused or lost), 77 login refused, 78 configuration error, 1
anything else or accounts that failed differently.  A progress bar is drawn on a terminal
only; summaries go to standard output unless ``--quiet``.

May import: the standard library, rich, pobox.errors and pobox.client.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pobox.client._account import AUTH_METHODS, TLS_MODES, Account, accounts_from_file
from pobox.client._fetch import FetchResult, Status, fetch_account
from pobox.errors import ConfigError

__all__ = ["add_fetch_parser", "cmd_fetch", "exit_status"]

_EX_INTERRUPTED = 130

INSECURE_WARNING = (
    "pobox fetch: WARNING: {name}: TLS is OFF (--insecure): the password and every message "
    "go over the network IN CLEAR, readable by anyone on the path"
)


class _Bar:
    """A rich progress bar on standard error, one task per account."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task: Any = None

    def start(self, account: str, messages: int, octets: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(f"{account}: {messages} new", total=octets)

    def advance(self, octets: int) -> None:
        self._progress.advance(self._task, octets)

    def finish(self) -> None:
        self._progress.stop()


def add_fetch_parser(sub: Any) -> argparse.ArgumentParser:  # noqa: ANN401 - argparse's private type
    """Add the ``fetch`` subcommand to the ``pobox`` subparsers ``sub``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "fetch",
        help="download mail from POP3 servers into a Maildir, an mbox or an MDA",
        description=(
            "Download mail from POP3 servers. TLS (implicit or STLS) with certificate checks "
            "by default; messages are deleted on the server only once stored locally "
            "(fsync). Exit status: 0 ok, 1 failed, 75 try later, 77 login refused, "
            "78 configuration error."
        ),
    )
    p.add_argument("--account-file", "-a", type=Path, help="TOML file of [[account]] tables")
    p.add_argument("--host", help="POP3 server")
    p.add_argument("--port", type=int, help="port (995 for implicit TLS, else 110)")
    p.add_argument("--user", "-u", help="login name")
    p.add_argument("--tls", choices=TLS_MODES, help="implicit (default), starttls or none")
    p.add_argument("--cafile", help="CA certificates to verify the server with (PEM)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext (no TLS): the password goes over the network in clear",
    )
    p.add_argument("--password-file", help="read the password from this file")
    p.add_argument("--password-env", metavar="VAR", help="read it from this variable")
    p.add_argument("--password-command", metavar="CMD", help="run CMD, first output line")
    p.add_argument("--auth", choices=AUTH_METHODS, help="login method (auto: the best offered)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--maildir", help="deliver into this Maildir")
    target.add_argument("--mbox", help="append to this mbox file")
    target.add_argument("--mda", help="pipe each message to this command (no shell)")
    p.add_argument("--keep", "-k", action="store_true", help="leave mail on the server")
    p.add_argument(
        "--keep-days", type=int, metavar="N", help="keep, and delete what was fetched N days ago"
    )
    p.add_argument("--state-dir", help="where seen-UIDL files go (~/.local/state/pobox/fetch)")
    p.add_argument("--timeout", type=float, help="network timeout in seconds (60)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary lines, no progress")
    p.set_defaults(func=cmd_fetch)
    return p


_FLAG_KEYS = (
    "host",
    "port",
    "user",
    "tls",
    "cafile",
    "password_file",
    "password_env",
    "password_command",
    "auth",
    "maildir",
    "mbox",
    "mda",
    "keep_days",
    "state_dir",
    "timeout",
)


def _accounts(args: argparse.Namespace) -> list[Account]:
    """Build the accounts from the account file and/or the flags."""
    given = {k: getattr(args, k) for k in _FLAG_KEYS if getattr(args, k) is not None}
    if args.keep:
        given["keep"] = True
    if args.insecure:
        given["insecure"] = True
        given.setdefault("tls", "none")
    if args.account_file:
        return accounts_from_file(args.account_file, given)
    if not args.host or not args.user:
        raise ConfigError("give --account-file, or --host and --user")
    try:
        return [Account(**given).validate("command line")]
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def exit_status(results: list[FetchResult]) -> int:
    """Return the command's exit status for the accounts' results."""
    failed = {r.status for r in results if r.status is not Status.OK}
    if not failed:
        return 0
    if len(failed) == 1:
        return int(failed.pop())
    return int(Status.FAILED)


def cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch every account; print one summary line per account."""
    try:
        accounts = _accounts(args)
    except ConfigError as exc:
        print(f"pobox fetch: configuration error: {exc}", file=sys.stderr)
        return int(Status.CONFIG)
    results = []
    for account in accounts:
        if account.tls == "none":
            print(INSECURE_WARNING.format(name=account.name), file=sys.stderr, flush=True)
        bar = _Bar() if sys.stderr.isatty() and not args.quiet else None
        try:
            result = fetch_account(account, progress=bar)
        except KeyboardInterrupt:
            print(f"pobox fetch: {account.name}: interrupted", file=sys.stderr)
            return _EX_INTERRUPTED
        results.append(result)
        if result.error:
            print(f"pobox fetch: {result.summary()}", file=sys.stderr, flush=True)
        elif not args.quiet:
            print(result.summary(), flush=True)
    return exit_status(results)
