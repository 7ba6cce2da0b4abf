"""``pobox conformance``: black-box POP3 checks anyone can run against any POP3 server.

It talks POP3 over a socket and imports nothing of the server, so the same checks judge
pobox, Dovecot or anything else: RFC 1939 (POP3), RFC 2449 (CAPA, response codes,
PIPELINING, EXPIRE, LOGIN-DELAY), RFC 3206 (AUTH and SYS codes), RFC 2595 (STLS),
RFC 5034 (SASL AUTH PLAIN) and RFC 6856 (UTF8, LANG). Each check ends PASS, FAIL or SKIP
(a capability the server does not advertise, or a message the maildrop lacks: put
:data:`SEED_MESSAGES` in it). Exit statuses: 0 no check failed, 1 at least one did,
2 bad arguments.

It removes no mail unless ``--allow-delete``: DELE is always followed by RSET, and every
session sends RSET before QUIT. With it, the last message of the maildrop is deleted for
good (the UPDATE state, RFC 1939 §6).

May import: the standard library only.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path
from typing import Any

from pobox.conformance._checks import SEED_MESSAGES, Suite, run_suite
from pobox.conformance._client import Target
from pobox.conformance._report import Check, Report, Status

__all__ = [
    "SEED_MESSAGES",
    "Check",
    "Report",
    "Status",
    "Suite",
    "Target",
    "add_conformance_parser",
    "cmd_conformance",
    "run_suite",
]


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        msg = f"{text!r} is not HOST:PORT"
        raise argparse.ArgumentTypeError(msg)
    return host.strip("[]"), int(port)


def add_conformance_parser(sub: Any) -> None:  # noqa: ANN401 - argparse's private type
    """Add ``pobox conformance`` to the subcommands ``sub``."""
    parser = sub.add_parser(
        "conformance",
        help="check any POP3 server against the RFCs (black-box)",
        description="Run black-box RFC 1939/2449/3206/2595/5034/6856 checks against the "
        "POP3 server at HOST:PORT, logging in as USER, and print a report per RFC. The "
        "maildrop must hold messages (pobox.conformance.SEED_MESSAGES cover every check); "
        "nothing is deleted unless --allow-delete. Exit 0: no check failed; 1: some did.",
    )
    parser.add_argument("address", type=_address, metavar="HOST:PORT")
    parser.add_argument("--user", "-u", required=True, help="the user to log in as")
    secret = parser.add_mutually_exclusive_group(required=True)
    secret.add_argument("--password", "-p", help="the password (other users see it in ps)")
    secret.add_argument("--password-file", help="read the password from this file's first line")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--tls", action="store_true", help="TLS from the first byte (port 995)")
    tls.add_argument("--starttls", action="store_true", help="STLS on every connection")
    parser.add_argument(
        "--insecure", action="store_true", help="do not verify the server's certificate"
    )
    parser.add_argument("--cafile", help="trust this CA (PEM) instead of the system's")
    parser.add_argument(
        "--allow-delete",
        action="store_true",
        help="delete the last message for good, to check DELE then QUIT (UPDATE)",
    )
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds per read (15)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=cmd_conformance)


def cmd_conformance(args: argparse.Namespace) -> int:
    """Run the suite as the arguments say; print the report; return the exit status."""
    context = ssl.create_default_context(cafile=args.cafile)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    host, port = args.address
    mode = "tls" if args.tls else "starttls" if args.starttls else "plain"
    password = args.password
    if password is None:
        lines = Path(args.password_file).read_text().splitlines()
        password = lines[0] if lines else ""
    target = Target(host, port, args.user, password, mode, context, args.timeout)
    report = run_suite(target, allow_delete=args.allow_delete)
    sys.stdout.write(report.json() + "\n" if args.json else report.text())
    return 1 if report.failed else 0
