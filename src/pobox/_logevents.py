"""Every log event of pobox with a fixed shape, written once: one function per event.

The call sites (the POP3 session and its driver, the listeners, the PROXY header readers, the
delivery agent) call these and nothing else for the lines admins and their tools read.  Each
function writes one record whose text is the Dovecot-shaped line (``log_format`` ``pobox``
and ``dovecot``) and whose fields (:data:`pobox.log.FIELDS`) are what ``log_format = "json"``
writes beside it; both come from the same arguments, so the formats cannot disagree.

The shapes are an interface: Debian's stock fail2ban ``dovecot`` filter, pobox's own
(``contrib/fail2ban/filter.d/pobox.conf``) and admins' greps read them.  Hence:

- ``Authentication failed: ...`` and ``Login refused, too many failures: ...`` (the lines
  pobox's filter matches, one per attempt) keep their shape exactly, ending in
  ``lip=..., session=<...>``: a filter installed from an older pobox must keep matching them.
  Whether the connection was encrypted is in their JSON fields (``tls``, ``tls_version``).
- ``Login:``, ``Login refused, ...`` (limits, a locked maildrop) and the pre-login
  ``Disconnected (...)`` lines say ``TLS (TLSv1.3)`` (``TLS (haproxy, TLSv1.3)`` when a
  trusted HAProxy did the TLS) between ``lip=`` and ``session=``, where Dovecot writes its
  ``TLS``; the stock filter's ``rip=<HOST>(?:[^>]*(?:, session=<\\S+>)?)`` skips over it.
- ``session=<...>`` comes last, after any client text: a stranger who writes
  ``session=<...>`` into a user name cannot make it the last one.

May import: the standard library and :mod:`pobox.log`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from pobox.log import EVENT, FIELDS, SessionLog

__all__ = [
    "auth_backend_failed",
    "auth_failed",
    "delivered",
    "delivery_failed",
    "delivery_timeout",
    "disconnected",
    "kicked",
    "lock_lost",
    "login",
    "login_over_limit",
    "login_throttled",
    "maildrop_locked",
    "maildrop_open_failed",
    "message_refused",
    "proxy_connected",
    "proxy_header_failed",
    "proxy_header_refused",
    "stls_discarded",
    "tls_element",
    "tls_handshake_failed",
    "too_many_connections",
    "trace",
]

INFO: Final = logging.INFO
WARNING: Final = logging.WARNING
ERROR: Final = logging.ERROR


def _emit(
    logger: logging.Logger,
    level: int,
    event: str,
    fields: Mapping[str, object],
    msg: str,
    *args: object,
) -> None:
    """Write one record of ``event`` that is not a session's (listeners, delivery)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, *args, extra={EVENT: event, FIELDS: dict(fields)})


def tls_element(log: SessionLog) -> str:
    """Return ``"TLS (TLSv1.3), "`` for an encrypted session's lines, ``""`` for plaintext."""
    if not log.tls:
        return ""
    inside = ", ".join(part for part in (log.tls_by, log.tls_version or "") if part)
    return f"TLS ({inside}), " if inside else "TLS, "


def _who(log: SessionLog, user: str | None, method: str) -> dict[str, object]:
    return {"user": user or "", "method": method}


# ----------------------------------------------------------------- login


def login(log: SessionLog, user: str, method: str) -> None:
    """``Login: user=<U>, method=M, rip=R, lip=L, [TLS (V), ]session=<S>``."""
    log.log(
        INFO,
        "Login: user=<%s>, method=%s, rip=%s, lip=%s, %ssession=<%s>",
        user,
        method,
        log.rip,
        log.lip,
        tls_element(log),
        log.session,
        event="login",
        fields=_who(log, user, method),
        names_session=True,
    )


def auth_failed(log: SessionLog, user: str | None, method: str) -> None:
    """``Authentication failed: user=<U>, method=M, rip=R, lip=L, session=<S>`` (fail2ban)."""
    log.log(
        INFO,
        "Authentication failed: user=<%s>, method=%s, rip=%s, lip=%s, session=<%s>",
        user or "",
        method,
        log.rip,
        log.lip,
        log.session,
        event="auth_failed",
        fields=_who(log, user, method),
        names_session=True,
    )


def login_throttled(log: SessionLog, user: str | None, method: str) -> None:
    """``Login refused, too many failures: user=<U>, ..., session=<S>`` (fail2ban)."""
    log.log(
        INFO,
        "Login refused, too many failures: user=<%s>, method=%s, rip=%s, lip=%s, session=<%s>",
        user or "",
        method,
        log.rip,
        log.lip,
        log.session,
        event="login_throttled",
        fields=_who(log, user, method),
        names_session=True,
    )


def login_over_limit(
    log: SessionLog, reason: str, user: str, method: str, *, sessions: int, from_address: int
) -> None:
    """``Login refused, REASON: user=<U>, ..., [TLS, ]session=<S>, sessions=N, ...`` (IN-USE)."""
    log.log(
        INFO,
        "Login refused, %s: user=<%s>, method=%s, rip=%s, lip=%s, %ssession=<%s>, "
        "sessions=%d, from this address=%d",
        reason,
        user,
        method,
        log.rip,
        log.lip,
        tls_element(log),
        log.session,
        sessions,
        from_address,
        event="login_over_limit",
        fields={
            **_who(log, user, method),
            "reason": reason,
            "user_sessions": sessions,
            "userip_sessions": from_address,
        },
        names_session=True,
    )


def maildrop_locked(log: SessionLog, user: str, method: str) -> None:
    """``Login refused, maildrop locked: user=<U>, method=M, ..., [TLS, ]session=<S>``."""
    log.log(
        INFO,
        "Login refused, maildrop locked: user=<%s>, method=%s, rip=%s, lip=%s, %ssession=<%s>",
        user,
        method,
        log.rip,
        log.lip,
        tls_element(log),
        log.session,
        event="maildrop_locked",
        fields=_who(log, user, method),
        names_session=True,
    )


def pop3_disabled(log: SessionLog, user: str, method: str) -> None:
    """``Login refused, POP3 disabled for the user: user=<U>, method=M, ..., session=<S>``."""
    log.log(
        INFO,
        "Login refused, POP3 disabled for the user: user=<%s>, method=%s, rip=%s, lip=%s, "
        "%ssession=<%s>",
        user,
        method,
        log.rip,
        log.lip,
        tls_element(log),
        log.session,
        event="pop3_disabled",
        fields=_who(log, user, method),
        names_session=True,
    )


def auth_backend_failed(log: SessionLog, user: str | None, error: object) -> None:
    """``Authentication backend failure for user=<U>: ERROR`` (answered ``[SYS/TEMP]``)."""
    log.log(
        ERROR,
        "Authentication backend failure for user=<%s>: %s",
        user or "",
        error,
        event="auth_backend_failed",
        fields={"user": user or "", "error": str(error)},
    )


def maildrop_open_failed(log: SessionLog, user: str, error: object) -> None:
    """``Cannot open maildrop of user=<U>: ERROR``."""
    log.log(
        ERROR,
        "Cannot open maildrop of user=<%s>: %s",
        user,
        error,
        event="maildrop_open_failed",
        fields={"user": user, "error": str(error)},
    )


# ----------------------------------------------------------------- the session


def trace(log: SessionLog, direction: str, line: str) -> None:
    """``C: LINE`` / ``S: LINE`` of ``--trace`` (passwords masked by the core)."""
    log.log(
        INFO,
        "%s: %s",
        direction,
        line,
        event="trace",
        fields={"direction": direction, "line": line},
    )


def stls_discarded(log: SessionLog, count: int) -> None:
    """``Discarded N bytes pipelined after STLS`` (RFC 2595 §4, CVE-2011-0411)."""
    log.log(
        WARNING,
        "Discarded %d bytes pipelined after STLS",
        count,
        event="stls_discarded",
        fields={"bytes": count},
    )


def proxy_connected(log: SessionLog, description: str, *, health_check: bool) -> None:
    """``haproxy: Client connected: PROXY v2: rip=..., ..., session=<S>``."""
    log.log(
        logging.DEBUG if health_check else INFO,
        "haproxy: Client connected: %s, session=<%s>",
        description,
        log.session,
        event="proxy_connected",
        fields={"proxy": description},
        names_session=True,
    )


def kicked(log: SessionLog) -> None:
    """``Kicked by the administrator, ending the session without UPDATE``."""
    log.log(INFO, "Kicked by the administrator, ending the session without UPDATE", event="kicked")


def lock_lost(log: SessionLog) -> None:
    """``Maildrop lock lost, ending the session without UPDATE``."""
    log.log(ERROR, "Maildrop lock lost, ending the session without UPDATE", event="lock_lost")


def disconnected(
    log: SessionLog,
    reason: str,
    *,
    top: tuple[int, int],
    retr: tuple[int, int],
    deleted: int,
    messages: int,
    size: int,
) -> None:
    """``Disconnected: REASON top=N/B, retr=N/B, del=N/M, size=S`` (after login)."""
    log.log(
        INFO,
        "Disconnected: %s top=%d/%d, retr=%d/%d, del=%d/%d, size=%d",
        reason,
        *top,
        *retr,
        deleted,
        messages,
        size,
        event="disconnected",
        fields={
            "reason": reason,
            "top_count": top[0],
            "top_bytes": top[1],
            "retr_count": retr[0],
            "retr_bytes": retr[1],
            "del_count": deleted,
            "messages": messages,
            "size": size,
        },
    )


def disconnected_before_login(
    log: SessionLog,
    *,
    secs: int,
    reason: str,
    failures: int,
    refusals: int,
    user: str | None,
    method: str,
) -> None:
    """The last line of a session that did not log in; its shape says why.

    - ``Disconnected (auth failed, N attempts in S secs): user=<U>, method=M, rip=R, lip=L,
      [TLS, ]session=<I>``: wrong credentials (what fail2ban's stock filter counts);
    - ``Disconnected (login refused, N attempts in S secs): ...``: right credentials, but the
      login was refused (maildrop locked, connection limits, throttled, backend failure):
      no filter counts it, it is no failure and no idle connection;
    - ``Disconnected (no auth attempts in S secs): REASON, rip=R, lip=L, [TLS, ]session=<I>``.
    """
    base = {"reason": reason, "secs": secs, "auth_failures": failures, "login_refusals": refusals}
    if failures or refusals:
        what, count = ("auth failed", failures) if failures else ("login refused", refusals)
        log.log(
            INFO,
            "Disconnected (%s, %d attempts in %d secs): user=<%s>, method=%s, rip=%s, lip=%s, "
            "%ssession=<%s>",
            what,
            count,
            secs,
            user or "",
            method,
            log.rip,
            log.lip,
            tls_element(log),
            log.session,
            event="disconnected",
            fields={**base, **_who(log, user, method)},
            names_session=True,
        )
        return
    log.log(
        INFO,
        "Disconnected (no auth attempts in %d secs): %s, rip=%s, lip=%s, %ssession=<%s>",
        secs,
        reason,
        log.rip,
        log.lip,
        tls_element(log),
        log.session,
        event="disconnected",
        fields=base,
        names_session=True,
    )


def tls_handshake_failed(log: SessionLog, error: BaseException) -> None:
    """A POP3S handshake failed: the connection's one line, with the reason and the address.

    ``Disconnected (no auth attempts in 0 secs): TLS handshaking failed: REASON, rip=R,
    lip=L, session=<I>``, the same line as after a failed STLS.
    """
    disconnected_before_login(
        log,
        secs=0,
        reason=tls_failure_reason(error),
        failures=0,
        refusals=0,
        user=None,
        method="",
    )


def tls_failure_reason(error: BaseException) -> str:
    """Return ``TLS handshaking failed: REASON`` for a failed handshake's exception."""
    return f"TLS handshaking failed: {str(error) or type(error).__name__}"


# ----------------------------------------------------------------- listeners


def too_many_connections(logger: logging.Logger, service: str, which: str, rip: str) -> None:
    """``SERVICE: Too many connections WHICH, refusing rip=R``."""
    _emit(
        logger,
        WARNING,
        "too_many_connections",
        {"service": service, "limit": which, "rip": rip},
        "%s: Too many connections %s, refusing rip=%s",
        service,
        which,
        rip,
    )


def proxy_header_failed(
    logger: logging.Logger,
    service: str,
    rip: str,
    *,
    reason: str | None,
    version: int | None = None,
    timed_out: bool = False,
) -> None:
    """A trusted peer sent no valid PROXY header, in Dovecot's words.

    ``haproxy: Client timed out (rip=R)``, ``haproxy: Client disconnected (rip=R)`` (no
    ``reason``: it closed), ``haproxy(vN): Client disconnected: REASON (rip=R)``.
    """
    fields = {"service": service, "rip": rip, "reason": reason, "proxy_version": version}
    if timed_out:
        _emit(
            logger,
            WARNING,
            "proxy_header_failed",
            {**fields, "reason": "timed out"},
            "%s: haproxy: Client timed out (rip=%s)",
            service,
            rip,
        )
    elif reason is None:
        _emit(
            logger,
            INFO,
            "proxy_header_failed",
            fields,
            "%s: haproxy: Client disconnected (rip=%s)",
            service,
            rip,
        )
    elif version is None:
        _emit(
            logger,
            WARNING,
            "proxy_header_failed",
            fields,
            "%s: haproxy: Client disconnected: %s (rip=%s)",
            service,
            reason,
            rip,
        )
    else:
        _emit(
            logger,
            WARNING,
            "proxy_header_failed",
            fields,
            "%s: haproxy(v%d): Client disconnected: %s (rip=%s)",
            service,
            version,
            reason,
            rip,
        )


def proxy_header_refused(
    logger: logging.Logger, service: str, rip: str, lip: str, session: str | None = None
) -> None:
    """``SERVICE: haproxy: Client not trusted, PROXY header refused (rip=R, lip=L)``."""
    suffix = f", session=<{session}>" if session is not None else ""
    _emit(
        logger,
        WARNING,
        "proxy_header_refused",
        {"service": service, "rip": rip, "lip": lip, "session": session},
        "%s: haproxy: Client not trusted, PROXY header refused (rip=%s, lip=%s)%s",
        service,
        rip,
        lip,
        suffix,
    )


# ----------------------------------------------------------------- delivery


def delivered(logger: logging.Logger, user: str, key: str, size: int, sender: str) -> None:
    """``delivery: USER: saved KEY (N octets) from <SENDER>``."""
    _emit(
        logger,
        INFO,
        "delivered",
        {"service": "delivery", "user": user, "key": key, "size": size, "sender": sender},
        "delivery: %s: saved %s (%d octets) from <%s>",
        user,
        key,
        size,
        sender,
    )


def delivery_failed(
    logger: logging.Logger, level: int, user: str, error: object, *, exc_info: bool = False
) -> None:
    """``delivery: USER: ERROR`` (over quota, storage failures; the MTA hears the code)."""
    if logger.isEnabledFor(level):
        logger.log(
            level,
            "delivery: %s: %s",
            user,
            error,
            exc_info=exc_info,
            extra={
                EVENT: "delivery_failed",
                FIELDS: {"service": "delivery", "user": user, "error": str(error)},
            },
        )


def delivery_timeout(logger: logging.Logger, service: str, rip: str) -> None:
    """``SERVICE: timeout, closing the connection rip=R`` (LMTP/SMTP, answered ``421``)."""
    _emit(
        logger,
        INFO,
        "delivery_timeout",
        {"service": service, "rip": rip},
        "%s: timeout, closing the connection rip=%s",
        service,
        rip,
    )


def message_refused(logger: logging.Logger, service: str, reply: str, rip: str) -> None:
    """``SERVICE: message refused, REPLY rip=R`` (too long, bad line endings, ...)."""
    _emit(
        logger,
        INFO,
        "message_refused",
        {"service": service, "reply": reply, "rip": rip},
        "%s: message refused, %s rip=%s",
        service,
        reply,
        rip,
    )
