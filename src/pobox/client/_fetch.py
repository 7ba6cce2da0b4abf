"""Fetch one account: log in with :mod:`poplib`, stream new messages into a sink, delete.

The order of operations is what makes a run safe to interrupt (RFC 1939 §6: deletions take
effect only at QUIT):

1. RETR the message, streamed line by line from poplib's socket file into the sink (no
   ``retr()``, which would build the whole message as a list in memory);
2. fsync it in the Maildir's ``tmp/`` and journal ``pending identity name`` (fsync);
3. put it in place (link into ``new/``, fsync the directory; or append to the mbox, or the
   MDA's exit status 0);
4. journal its identity as stored (fsync);
5. only then DELE it; QUIT at the end commits the deletions.

A run that dies anywhere (Ctrl-C, SIGKILL, a dropped connection) before QUIT leaves every
message on the server; the next run finds the stored ones in the state, skips them and
deletes them.  A Maildir message killed between steps 3 and 4 is found by its pending name
and not fetched again; with mbox or an MDA, the message in flight at that moment may be.  A
partial copy never leaves ``tmp/``.

With ``keep``, nothing is deleted and only identities not in the state are fetched; with
``keep_days``, messages stored at least that many days ago are deleted.  A message's identity
is its UIDL; a server without UIDL gets a TOP-based one (see :func:`_top_identity`).

May import: the standard library, pobox.errors and pobox.client.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import poplib
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import scramp  # type: ignore[import-untyped]  # no py.typed in scramp 1.5

from pobox.client._account import Account, read_password
from pobox.client._sinks import (
    Delivery,
    DeliveryError,
    DeliveryTemporaryError,
    MaildirSink,
    MboxSink,
    MdaSink,
    Sink,
)
from pobox.client._state import SeenState, StateLocked
from pobox.errors import ConfigError, PoboxError

__all__ = ["FetchError", "FetchResult", "Progress", "Status", "fetch_account", "sink_for"]

#: Longest piece of a message line read at once: long lines are written in pieces, so memory
#: stays bounded whatever the server sends (poplib's own limit, 2048, refuses long lines).
_READ_CHUNK = 1 << 16
#: Report progress after this many bytes, not per line (a 50 MB message has ~10^6 lines).
_PROGRESS_STEP = 1 << 20
_DAY = 86400.0
_RESP_CODE = re.compile(rb"^-ERR \[([A-Za-z0-9/-]+)\]")
_TEMPORARY_CODES = {"IN-USE", "LOGIN-DELAY", "SYS/TEMP"}


class Status(enum.IntEnum):
    """How an account's run ended, as the exit status a cron job can act on (sysexits.h)."""

    OK = 0
    FAILED = 1
    TEMPORARY = 75  # EX_TEMPFAIL: try again later
    AUTH = 77  # EX_NOPERM: wrong user or password
    CONFIG = 78  # EX_CONFIG


class FetchError(PoboxError):
    """An account's run failed; ``status`` says how."""

    def __init__(self, message: str, status: Status) -> None:
        """Record ``message`` and ``status``."""
        super().__init__(message)
        self.status = status


@dataclass
class FetchResult:
    """What one account's run did."""

    account: str
    fetched: int = 0
    octets: int = 0
    deleted: int = 0
    status: Status = Status.OK
    error: str | None = None

    def summary(self) -> str:
        """Return the one-line summary, e.g. ``alice@host: fetched 3 (12,345 bytes), ...``."""
        line = f"{self.account}: fetched {self.fetched} ({self.octets:,} bytes), "
        line += f"deleted {self.deleted}"
        if self.error:
            line += f"; FAILED: {self.error}"
        return line


class Progress(Protocol):
    """Where a run reports its progress (a progress bar on a terminal)."""

    def start(self, account: str, messages: int, octets: int) -> None:
        """Announce ``messages`` new messages of ``octets`` bytes in all."""

    def advance(self, octets: int) -> None:
        """Count ``octets`` more bytes received."""

    def finish(self) -> None:
        """End the account's progress display."""


def sink_for(account: Account) -> Sink:
    """Return the account's destination."""
    if account.maildir:
        return MaildirSink(Path(account.maildir).expanduser())
    if account.mbox:
        return MboxSink(Path(account.mbox).expanduser())
    return MdaSink(account.mda or "")


def _error_text(exc: poplib.error_proto) -> bytes:
    arg = exc.args[0] if exc.args else b""
    return arg if isinstance(arg, bytes) else str(arg).encode("utf-8", "replace")


def _classify(exc: poplib.error_proto, *, during_auth: bool) -> FetchError:
    """Turn a server's ``-ERR`` into a :class:`FetchError` with the right status."""
    text = _error_text(exc)
    shown = text.decode("utf-8", "replace")
    match = _RESP_CODE.match(text)
    code = match.group(1).decode().upper() if match else None
    if code == "IN-USE":
        msg = f"the maildrop is in use by another session, try again later ({shown})"
        return FetchError(msg, Status.TEMPORARY)
    if code == "LOGIN-DELAY":
        msg = f"the server asks to wait longer between logins, try again later ({shown})"
        return FetchError(msg, Status.TEMPORARY)
    if code in _TEMPORARY_CODES:
        return FetchError(f"temporary server failure ({shown})", Status.TEMPORARY)
    if during_auth and code in (None, "AUTH"):
        return FetchError(f"login refused ({shown})", Status.AUTH)
    return FetchError(f"server error ({shown})", Status.FAILED)


def _connect(account: Account) -> poplib.POP3:
    """Open the connection, with TLS unless the account is explicitly insecure."""
    context = ssl.create_default_context(cafile=account.cafile)
    try:
        if account.tls == "implicit":
            pop: poplib.POP3 = poplib.POP3_SSL(
                account.host, account.port, timeout=account.timeout, context=context
            )
        else:
            pop = poplib.POP3(account.host, account.port, timeout=account.timeout)
            if account.tls == "starttls":
                try:
                    pop.stls(context)
                except BaseException:
                    with contextlib.suppress(OSError):  # a failed handshake closed it already
                        pop.close()
                    raise
    except ssl.SSLCertVerificationError as exc:
        msg = f"TLS certificate verification failed: {exc.verify_message or exc}"
        raise FetchError(msg, Status.FAILED) from exc
    except ssl.SSLError as exc:
        raise FetchError(f"TLS failed: {exc}", Status.FAILED) from exc
    except poplib.error_proto as exc:
        text = _error_text(exc)
        if b"STLS not supported" in text:
            msg = "the server does not offer STLS; refusing to send the password in clear"
            raise FetchError(msg, Status.FAILED) from exc
        raise _classify(exc, during_auth=False) from exc
    except OSError as exc:
        msg = f"cannot connect to {account.host}:{account.port}: {exc}"
        raise FetchError(msg, Status.TEMPORARY) from exc
    return pop


#: SASL mechanisms in order of preference (RFC 5034 AUTH): SCRAM never sends the password and
#: checks the server too (RFC 5802); PLAIN sends it, inside TLS.
_SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1")


def _challenge(response: bytes) -> bytes:
    """Decode a ``+ base64`` continuation (RFC 5034 §4); anything else ends the exchange."""
    if response != b"+" and not response.startswith(b"+ "):
        msg = b"-ERR unexpected reply during AUTH: " + response[:80]
        raise poplib.error_proto(msg)
    return base64.b64decode(response[2:])


def _auth_scram(pop: poplib.POP3, mechanism: str, user: str, password: str) -> None:
    """Log in with SCRAM through scramp, carried by poplib's command helpers."""
    helpers = _helpers(pop)
    client = scramp.ScramClient([mechanism], user, password)
    first = base64.b64encode(client.get_client_first().encode()).decode("ascii")
    server_first = _challenge(helpers._shortcmd(f"AUTH {mechanism} {first}"))
    try:
        client.set_server_first(server_first.decode("utf-8"))
        final = client.get_client_final()
    except scramp.ScramException as exc:
        helpers._shortcmd("*")  # cancel the exchange (RFC 5034 §4)
        msg = f"SCRAM exchange failed: {exc}"
        raise FetchError(msg, Status.FAILED) from exc
    server_final = _challenge(helpers._shortcmd(base64.b64encode(final.encode()).decode()))
    try:
        client.set_server_final(server_final.decode("utf-8"))
    except scramp.ScramException as exc:  # the server does not know the password: not ours
        msg = f"the server failed SCRAM verification, refusing to go on: {exc}"
        raise FetchError(msg, Status.FAILED) from exc
    helpers._shortcmd("")  # the empty response after server-final; +OK follows


def _login(pop: poplib.POP3, account: Account, password: str) -> dict[str, list[str]]:
    """Log in: SCRAM, then SASL PLAIN (RFC 5034) when offered, else USER/PASS.

    Returns:
        the capabilities after login.
    """
    try:
        caps = pop.capa()
    except poplib.error_proto:
        caps = {}
    mechanisms = {m.upper() for m in caps.get("SASL", [])}
    scram = next((m for m in _SCRAM_MECHANISMS if m in mechanisms), None)
    if account.auth == "scram" and scram is None:
        msg = "the server offers no SCRAM mechanism (auth = scram)"
        raise FetchError(msg, Status.FAILED)
    use_plain = account.auth == "plain" or (account.auth == "auto" and "PLAIN" in mechanisms)
    try:
        if scram is not None and account.auth in ("auto", "scram"):
            _auth_scram(pop, scram, account.user, password)
        elif use_plain:
            token = b"\0" + account.user.encode() + b"\0" + password.encode()
            # poplib has no AUTH; its command helper sends the RFC 5034 initial response.
            _helpers(pop)._shortcmd("AUTH PLAIN " + base64.b64encode(token).decode("ascii"))
        else:
            pop.user(account.user)
            pop.pass_(password)
    except poplib.error_proto as exc:
        raise _classify(exc, during_auth=True) from exc
    try:
        return pop.capa()  # RFC 2449 §5: capabilities may change after login
    except poplib.error_proto:
        return caps


def _top_identity(pop: poplib.POP3, number: int, size: int) -> str:
    """Identify a message without UIDL: its Message-ID, else a hash of its header, + size.

    The size tells apart two messages that share a Message-ID (a resent message).
    """
    _, lines, _ = pop.top(number, 0)
    message_id = b""
    for line in lines:
        if line.lower().startswith(b"message-id:"):
            message_id = line.split(b":", 1)[1].strip()
            break
    basis = message_id or b"\n".join(lines)
    digest = hashlib.sha256(basis + b"\0" + str(size).encode()).hexdigest()[:40]
    return f"top:{digest}"


def _listing(pop: poplib.POP3, caps: dict[str, list[str]]) -> Iterator[tuple[int, str, int]]:
    """Yield ``(number, identity, size)`` for each message of the maildrop."""
    sizes: dict[int, int] = {}
    for line in pop.list()[1]:
        num, size = line.split()[:2]
        sizes[int(num)] = int(size)
    uidls: dict[int, str] | None
    try:
        lines = pop.uidl()[1]
    except poplib.error_proto:
        uidls = None
    else:
        uidls = {}
        for line in lines:
            num, uidl = line.split()[:2]
            uidls[int(num)] = "uidl:" + uidl.decode("ascii", "replace")
    if uidls is None and "TOP" not in caps and caps:
        msg = "the server has neither UIDL nor TOP: cannot tell messages apart safely"
        raise FetchError(msg, Status.FAILED)
    seen: dict[str, int] = {}
    for number in sorted(sizes):
        if uidls is not None:
            identity = uidls.get(number) or f"nouidl:{number}"
        else:
            identity = _top_identity(pop, number, sizes[number])
        seen[identity] = seen.get(identity, 0) + 1
        if seen[identity] > 1:  # the same identity twice: keep both messages apart
            identity = f"{identity}#{seen[identity]}"
        yield number, identity, sizes[number]


def retrieve(pop: poplib.POP3, number: int, out: Delivery, on_bytes: Callable[[int], None]) -> int:
    """RETR message ``number`` into ``out``, streamed, dot-unstuffed, with LF line ends.

    Only poplib's command helpers and its socket file are used: each line is read in pieces
    of at most :data:`_READ_CHUNK` bytes and written out at once.

    Returns:
        the number of bytes written.

    Raises:
        poplib.error_proto: the server refused, or the connection ended mid-message.
    """
    _helpers(pop)._putcmd(f"RETR {number}")
    _helpers(pop)._getresp()
    reader = pop.file
    at_line_start, pending_cr = True, False
    written = unreported = 0
    while True:
        chunk = reader.readline(_READ_CHUNK)
        unreported += len(chunk)  # progress counts octets on the wire, as LIST does
        if not chunk:
            msg = b"-ERR the connection ended in the middle of a message"
            raise poplib.error_proto(msg)
        if at_line_start:
            if chunk in (b".\r\n", b".\n"):
                break
            if chunk.startswith(b"."):
                chunk = chunk[1:]  # RFC 1939 §3: byte-stuffed termination octet
        if pending_cr:
            pending_cr = False
            if not chunk.startswith(b"\n"):
                out.write(b"\r")
                written += 1
        if chunk.endswith(b"\n"):
            at_line_start = True
            if chunk.endswith(b"\r\n"):
                chunk = chunk[:-2] + b"\n"
        else:
            at_line_start = False
            if chunk.endswith(b"\r"):  # maybe half of a CRLF split by the chunk limit
                chunk, pending_cr = chunk[:-1], True
        out.write(chunk)
        written += len(chunk)
        if unreported >= _PROGRESS_STEP:
            on_bytes(unreported)
            unreported = 0
    if unreported:
        on_bytes(unreported)
    return written


class _CommandHelpers(Protocol):
    """poplib's command helpers, which typeshed does not describe."""

    def _putcmd(self, line: str) -> None: ...
    def _getresp(self) -> bytes: ...
    def _shortcmd(self, line: str) -> bytes: ...


def _helpers(pop: poplib.POP3) -> _CommandHelpers:
    return cast("_CommandHelpers", pop)


class _NoProgress:
    def start(self, account: str, messages: int, octets: int) -> None:
        pass

    def advance(self, octets: int) -> None:
        pass

    def finish(self) -> None:
        pass


def fetch_account(
    account: Account, *, progress: Progress | None = None, now: float | None = None
) -> FetchResult:
    """Run one account: fetch its new mail, store it, delete what should go.

    Never raises for a failure of the account itself: the result's ``status`` and ``error``
    tell (:class:`Status`).  ``KeyboardInterrupt`` propagates, leaving the server's copies.

    Args:
        progress: where to report progress (nothing by default).
        now: the current time, for ``keep_days`` (tests).
    """
    result = FetchResult(account.name)
    try:
        _run(account, result, progress or _NoProgress(), time.time() if now is None else now)
    except ConfigError as exc:
        result.status, result.error = Status.CONFIG, str(exc)
    except StateLocked as exc:
        result.status, result.error = Status.TEMPORARY, str(exc)
    except FetchError as exc:
        result.status, result.error = exc.status, str(exc)
    except DeliveryTemporaryError as exc:
        result.status, result.error = Status.TEMPORARY, str(exc)
    except PoboxError as exc:
        result.status, result.error = Status.FAILED, str(exc)
    except poplib.error_proto as exc:
        error = _classify(exc, during_auth=False)
        if b"connection ended" in _error_text(exc) or b"EOF" in _error_text(exc):
            error = FetchError(f"connection lost: {_error_text(exc).decode()}", Status.TEMPORARY)
        result.status, result.error = error.status, str(error)
    except (TimeoutError, ConnectionError) as exc:
        result.status, result.error = Status.TEMPORARY, f"connection lost: {exc}"
    except OSError as exc:
        result.status, result.error = Status.FAILED, str(exc)
    return result


def _run(account: Account, result: FetchResult, progress: Progress, now: float) -> None:
    password = read_password(account)
    sink = sink_for(account)
    with SeenState(account.state_path()) as state:
        pop = _connect(account)
        try:
            caps = _login(pop, account, password)
            listing = list(_listing(pop, caps))
            for identity, name in list(state.pending.items()):
                if identity not in state.seen and sink.stored(name):
                    state.record(identity, now)  # put in place by a run that then died
            new = [(n, i, s) for n, i, s in listing if i not in state.seen]
            progress.start(account.name, len(new), sum(s for _, _, s in new))
            deleted: set[str] = set()
            failure: DeliveryError | None = None
            try:
                for number, identity, _size in listing:
                    if identity not in state.seen:
                        delivery = sink.begin()
                        try:
                            result.octets += retrieve(pop, number, delivery, progress.advance)
                        except BaseException:
                            delivery.abort()
                            raise
                        try:
                            final_name = delivery.prepare()
                            if final_name is not None:
                                state.record_pending(identity, final_name)
                            delivery.commit()
                        except DeliveryError as exc:
                            failure = exc
                            break
                        state.record(identity, now)
                        result.fetched += 1
                    if _should_delete(account, state.seen[identity], now):
                        pop.dele(number)
                        deleted.add(identity)
                        result.deleted += 1
            finally:
                progress.finish()
            try:
                pop.quit()  # commits the DELEs (RFC 1939 §6)
            except poplib.error_proto as exc:
                raise _classify(exc, during_auth=False) from exc
            state.compact(keep=[i for _, i, _ in listing if i not in deleted])
            if failure is not None:
                raise failure
        finally:
            with contextlib.suppress(OSError):
                pop.close()


def _should_delete(account: Account, stored_at: float, now: float) -> bool:
    if not account.keeps:
        return True
    if account.keep_days is None:
        return False
    return now - stored_at >= account.keep_days * _DAY
