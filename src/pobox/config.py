"""Configuration: frozen dataclasses read from TOML, with Dovecot-like names.

Every key is documented in :data:`KEYS` (that table also drives ``docs`` in README.md and
``pobox serve --help``); unknown keys and wrong types are errors that name the key path, found
at start-up, never at the first login.

May import: the standard library and :mod:`pobox.errors`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pobox.errors import ConfigError

__all__ = ["KEYS", "Config", "Listen", "load_config", "parse_listen", "shared_state_backend"]

#: ``disable_plaintext_auth`` values, as Dovecot names them, plus ``loopback`` (the default).
PLAINTEXT_POLICIES: Final = ("loopback", "yes", "no")

#: ``ssl_min_protocol`` values: TLS 1.2 is the floor (RFC 8996 deprecates 1.0 and 1.1).
TLS_PROTOCOLS: Final = ("TLSv1.2", "TLSv1.3")

#: RFC 1939 §3: "the autologout timer MUST be of at least 10 minutes' duration".
RFC_MIN_AUTOLOGOUT: Final = 600


@dataclass(frozen=True, slots=True)
class Listen:
    """One address to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        """Return ``host:port`` (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    """The server's settings; see :data:`KEYS` for each one's meaning."""

    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 1110),)
    mail_location: str = "maildir:~/Maildir"
    passwd_file: str = "/etc/pobox/passwd"
    default_pass_scheme: str = "CRYPT"
    login_greeting: str = "pobox ready."
    pop3_lock_session: bool = True
    mail_inline_read_max: int = 128 * 1024
    login_timeout: float = 60.0
    login_deadline: float = 180.0
    idle_timeout: float = 600.0
    auth_failure_delay: float = 2.0
    max_bad_commands: int = 10
    log_level: str = "info"
    log_path: str = ""
    trace: bool = False
    event_loop: str = "auto"
    auth_mechanisms: str = "PLAIN LOGIN"
    apop: bool = False
    oauth_jwt_key_file: str = ""
    scram_secret_file: str = ""
    auth_failure_delay_max: float = 15.0
    auth_failures_per_ip: int = 10
    auth_failures_per_user: int = 10
    auth_failure_window: float = 600.0
    max_auth_failures: int = 3
    log_format: str = "pobox"
    ssl_cert: str = ""
    ssl_key: str = ""
    ssl_listen: tuple[Listen, ...] = ()
    ssl_min_protocol: str = "TLSv1.2"
    ssl_client_ca: str = ""
    #: (server name, cert path, key path) for SNI, in the order of the config file.
    ssl_sni: tuple[tuple[str, str, str], ...] = ()
    disable_plaintext_auth: str = "loopback"
    login_trusted_networks: tuple[str, ...] = ()
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_open_files: int = 0
    user: str = ""
    group: str = ""
    mail_uid: str = ""
    mail_gid: str = ""
    first_valid_uid: int = 500
    last_valid_uid: int = 0
    first_valid_gid: int = 1
    last_valid_gid: int = 0
    lmtp_listen: tuple[str, ...] = ()
    smtp_listen: tuple[str, ...] = ()
    max_message_size: int = 50 * 1024 * 1024
    quota_bytes: int = 0
    quota_messages: int = 0
    hostname: str = ""
    local_domains: tuple[str, ...] = ()
    lmtp_max_connections: int = 100
    lmtp_max_connections_per_ip: int = 50
    smtp_max_connections: int = 100
    smtp_max_connections_per_ip: int = 20
    delivery_timeout: float = 300.0
    delivery_min_data_rate: int = 2048
    mail_temp_dir: str = ""
    haproxy_trusted_networks: tuple[str, ...] = ()
    haproxy_timeout: float = 3.0
    postgresql_dsn: str = ""
    postgresql_schema: str = "pobox"
    postgresql_pool_min: int = 2
    postgresql_pool_max: int = 20
    postgresql_lock_connections: int = 4
    postgresql_timeout: float = 10.0
    postgresql_lock_check_interval: float = 10.0
    userdb: str = "passwd-file"
    postgresql_user_cache_ttl: float = 30.0
    postgresql_password_query: str = ""
    postgresql_user_query: str = ""
    postgresql_iterate_query: str = ""
    shared_state: str = "auto"
    node_name: str = ""
    shared_state_timeout: float = 0.5
    shared_state_heartbeat: float = 5.0
    mail_max_userip_connections: int = 10
    mail_max_user_connections: int = 0
    health_listen: str = ""
    metrics_listen: str = ""
    drain_timeout: float = 30.0
    workers: int = 0
    warnings: tuple[str, ...] = field(default=(), compare=False)


#: key → (type, description).  The single source of the documentation of every key.
KEYS: Final[dict[str, tuple[type, str]]] = {
    "listen": (
        list,
        'Addresses to listen on, "HOST:PORT" ("[::1]:110" for IPv6). Default 127.0.0.1:1110.',
    ),
    "mail_location": (
        str,
        "Where maildrops are, like Dovecot's mail_location: maildir:PATH with ~ (home), "
        "%u (user), %n (local part), %d (domain), %h (home); or postgresql (the database of "
        "postgresql_dsn). Default maildir:~/Maildir.",
    ),
    "passwd_file": (str, "Dovecot-format passwd-file with the users. Re-read when it changes."),
    "default_pass_scheme": (
        str,
        "Scheme of passwd-file hashes without a {SCHEME} prefix (Dovecot default_pass_scheme).",
    ),
    "login_greeting": (str, "Text after +OK in the greeting (Dovecot login_greeting)."),
    "pop3_lock_session": (
        bool,
        "Lock the maildrop for the whole session (RFC 1939 §8); a second login gets "
        "-ERR [IN-USE]. Default true.",
    ),
    "mail_inline_read_max": (
        int,
        "Messages up to this many octets are read in the server's event loop instead of a "
        "worker thread (faster on local disks); 0 for slow network storage. Default 131072.",
    ),
    "login_timeout": (float, "Seconds of silence before login after which we hang up (60)."),
    "login_deadline": (
        float,
        "Seconds from connecting within which a client must have logged in, however busy it "
        "keeps the connection (CAPA, failed attempts): then it is closed. Dovecot's fixed "
        "login timeout is the same 180 (the default).",
    ),
    "idle_timeout": (
        float,
        "Autologout: seconds of silence after login before the session is closed without "
        "UPDATE. RFC 1939 requires at least 600 (the default); lower values are for tests.",
    ),
    "auth_failure_delay": (
        float,
        "Seconds to wait before answering a failed login (Dovecot auth_failure_delay, 2).",
    ),
    "max_bad_commands": (int, "Consecutive bad commands before the session is closed (10)."),
    "log_level": (str, "debug, info, warning or error (info)."),
    "log_path": (str, "File to log to; empty for standard error (the systemd journal)."),
    "trace": (bool, "Log the C:/S: dialogue of every session, passwords masked (false)."),
    "event_loop": (
        str,
        "auto (uvloop if installed, the default), uvloop, or asyncio (the standard loop).",
    ),
    "auth_mechanisms": (
        str,
        "SASL mechanisms AUTH offers, space-separated (Dovecot auth_mechanisms): PLAIN LOGIN "
        "CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256 EXTERNAL OAUTHBEARER XOAUTH2. CRAM-MD5 and "
        "SCRAM need {PLAIN}, {CRAM-MD5} or {SCRAM-*} passwords. Default PLAIN LOGIN.",
    ),
    "apop": (
        bool,
        "Offer APOP (RFC 1939 §7): the greeting ends with a <timestamp>; works for users "
        "with {PLAIN} passwords only (false).",
    ),
    "oauth_jwt_key_file": (
        str,
        "File with the HS256 key that signs OAuth bearer tokens (JWT) for OAUTHBEARER and "
        "XOAUTH2; the token's sub or email must be the user, exp is checked. Empty: none.",
    ),
    "scram_secret_file": (
        str,
        "File with the secret key SCRAM salts are derived from (names without stored SCRAM "
        "keys, unknown names too, each get a stable salt); made, mode 0600, when missing and "
        "SCRAM is offered. Same file on every node. Default: pobox-scram.secret next to "
        "passwd_file.",
    ),
    "auth_failure_delay_max": (
        float,
        "Cap of the failed-login delay, which doubles with each failure from an address (15).",
    ),
    "auth_failures_per_ip": (
        int,
        "Failed logins from one address within auth_failure_window after which logins from "
        "that address are refused with -ERR [LOGIN-DELAY] until the window passes (10).",
    ),
    "auth_failures_per_user": (
        int,
        "Failed logins for one user name, from anywhere, within auth_failure_window after "
        "which its failures wait auth_failure_delay_max; never refuses a right password (10).",
    ),
    "auth_failure_window": (float, "Seconds the failed-login counters remember (600)."),
    "max_auth_failures": (
        int,
        "Failed logins in one connection after which it is closed (3, like Dovecot).",
    ),
    "log_format": (
        str,
        'pobox (default) or dovecot: prefix each log line with a syslog-style "Mon DD '
        'HH:MM:SS host dovecot: pop3-login:" so the stock fail2ban dovecot filter reads it.',
    ),
    "ssl_cert": (
        str,
        "PEM certificate chain for TLS (STLS and ssl_listen). Empty: no TLS. Re-read on "
        "SIGHUP without dropping sessions.",
    ),
    "ssl_key": (str, "PEM private key of ssl_cert; must match it."),
    "ssl_listen": (
        list,
        "Addresses for implicit TLS (RFC 8314, port 995 in production), like listen "
        "(default none).",
    ),
    "ssl_min_protocol": (str, "Oldest TLS version accepted: TLSv1.2 (default) or TLSv1.3."),
    "ssl_client_ca": (
        str,
        "PEM CA file: TLS clients may present a certificate it signed; its emailAddress or CN "
        "is the identity for SASL EXTERNAL (add EXTERNAL to auth_mechanisms). Empty: off.",
    ),
    "ssl_sni": (
        dict,
        'Per-server-name certificates (SNI): [ssl_sni."mail.example.org"] with cert and key. '
        "Other names get ssl_cert.",
    ),
    "disable_plaintext_auth": (
        str,
        "Refuse USER/PASS and AUTH PLAIN/LOGIN without TLS: loopback (default: refuse "
        "except from loopback and login_trusted_networks), yes (always refuse), no (allow).",
    ),
    "login_trusted_networks": (
        list,
        'CIDR networks trusted like loopback by disable_plaintext_auth, e.g. ["10.0.0.0/8"].',
    ),
    "max_connections": (
        int,
        "Open connections in all; more get -ERR [SYS/TEMP] and are closed (1000).",
    ),
    "max_connections_per_ip": (
        int,
        "Open connections from one address; more get -ERR [SYS/TEMP] and are closed (50).",
    ),
    "max_open_files": (
        int,
        "Open-file limit (RLIMIT_NOFILE) to raise to at start-up, hard limit too while root. "
        "0 (default): computed, 2 per connection (socket, a message file being read) + 64.",
    ),
    "user": (
        str,
        "Unprivileged user the serving process switches to after binding the ports and "
        "loading the keys when started as root (like Dovecot's default_internal_user). "
        "Empty: mail_uid's user when mail_uid is set, else nobody (see Security model).",
    ),
    "group": (str, "Group to switch to with user (default: the user's primary group)."),
    "mail_uid": (
        str,
        "User (name or number) that owns the mail of users whose userdb sets no uid "
        "(Dovecot mail_uid; one vmail uid for virtual users). Started as root with mail_uid "
        "set and user empty or the same, the whole server runs as it. Empty: none.",
    ),
    "mail_gid": (
        str,
        "Group (name or number) of the mail of users whose userdb sets no gid (Dovecot "
        "mail_gid). Empty: the primary group of mail_uid (or of the userdb uid).",
    ),
    "first_valid_uid": (
        int,
        "Lowest uid mail is accessed with (Dovecot first_valid_uid, 500): users owned by "
        "lower uids (root, system accounts) are refused. 0 allows root.",
    ),
    "last_valid_uid": (int, "Highest uid mail is accessed with; 0: no limit (default)."),
    "first_valid_gid": (
        int,
        "Lowest gid mail is accessed with (Dovecot first_valid_gid, 1): gid 0 is refused.",
    ),
    "last_valid_gid": (int, "Highest gid mail is accessed with; 0: no limit (default)."),
    "lmtp_listen": (
        list,
        'LMTP (RFC 2033) delivery listeners: "HOST:PORT" and/or "unix:/path" (default none).',
    ),
    "smtp_listen": (
        list,
        'Inbound SMTP listeners for local users only (never a relay), "HOST:PORT" (none).',
    ),
    "max_message_size": (
        int,
        "Largest message delivered, in octets (LMTP, SMTP, pobox deliver); 0: no limit. 50 MiB.",
    ),
    "quota_bytes": (
        int,
        "Default maildrop quota in octets, enforced at delivery; 0: none. Per user: passwd-file "
        "extra field quota_bytes=100M or userdb_quota_rule=*:storage=100M:messages=1000.",
    ),
    "quota_messages": (int, "Default maximum number of messages per maildrop; 0: none."),
    "hostname": (str, "Name in the LMTP/SMTP greeting (default: the system host name)."),
    "local_domains": (
        list,
        "Domains whose addresses are local users for SMTP (user@domain is user); the "
        "hostname and localhost always are.",
    ),
    "lmtp_max_connections": (
        int,
        "Open LMTP connections in all, Unix socket ones included; more get 421 4.3.2 and "
        "are closed (100).",
    ),
    "lmtp_max_connections_per_ip": (
        int,
        "Open LMTP connections from one address; more get 421 4.7.0 and are closed (50).",
    ),
    "smtp_max_connections": (
        int,
        "Open SMTP connections in all; more get 421 4.3.2 and are closed (100).",
    ),
    "smtp_max_connections_per_ip": (
        int,
        "Open SMTP connections from one address; more get 421 4.7.0 and are closed (20).",
    ),
    "delivery_timeout": (
        float,
        "LMTP/SMTP: seconds to wait for a command or for the next line of DATA (RFC 5321 "
        "§4.5.3.2.7: 300). A client that sends no message for twice as long is closed.",
    ),
    "delivery_min_data_rate": (
        int,
        "LMTP/SMTP: octets per second a client must keep up in DATA, over delivery_timeout "
        "of grace (like Postfix's smtpd_min_data_rate); slower clients get 421 4.4.2 (2048).",
    ),
    "mail_temp_dir": (
        str,
        "Directory where LMTP, SMTP and pobox deliver spool messages over 256 KiB while they "
        "arrive, in nameless files (Dovecot mail_temp_dir). Empty: the system's (TMPDIR, /tmp).",
    ),
    "haproxy_trusted_networks": (
        list,
        'CIDR networks of HAProxy (Dovecot\'s key), e.g. ["10.0.0.5/32"]: connections from '
        "them must start with a PROXY protocol v1/v2 header (POP3, POP3S, LMTP) naming the "
        "real client; from elsewhere a header is refused. Empty (default): never accepted.",
    ),
    "haproxy_timeout": (
        float,
        "Seconds a connection from haproxy_trusted_networks has to send its PROXY header "
        "before it is closed (3, Dovecot's default).",
    ),
    "postgresql_dsn": (
        str,
        'libpq connection string or URI of the database for mail_location = "postgresql", '
        'e.g. "host=db1 dbname=pobox user=pobox" or "postgresql://pobox@db1/pobox"; what it '
        "leaves out comes from the PG* environment variables, ~/.pgpass and pg_service.conf.",
    ),
    "postgresql_schema": (str, "Schema of pobox's tables in that database (pobox)."),
    "postgresql_pool_min": (int, "Pooled connections kept open for reads and deliveries (2)."),
    "postgresql_pool_max": (
        int,
        "Most pooled connections; more concurrent queries wait for one, up to "
        "postgresql_timeout (20).",
    ),
    "postgresql_lock_connections": (
        int,
        "Connections that hold the maildrop locks (advisory locks, many per connection) and run "
        "the UPDATEs of the sessions they lock (4).",
    ),
    "postgresql_timeout": (
        float,
        "Seconds any statement, connection attempt or wait for a pooled connection may take; "
        "past it the client gets -ERR [SYS/TEMP] or 451 4.3.0 (10).",
    ),
    "postgresql_lock_check_interval": (
        float,
        "Seconds between checks of a lock connection holding locks; a connection found dead "
        "ends its sessions without UPDATE. 0: only when the server closes it (10).",
    ),
    "userdb": (
        str,
        "Where users and passwords are: passwd-file (passwd_file, the default) or postgresql "
        "(the users table of postgresql_dsn, or the postgresql_*_query queries).",
    ),
    "postgresql_user_cache_ttl": (
        float,
        "Seconds a node keeps a user it read from PostgreSQL (found or not); changes to the "
        "users table reach every node at once (NOTIFY), custom tables only after this. 0: no "
        "cache (30).",
    ),
    "postgresql_password_query": (
        str,
        "Your own query for a login, like Dovecot's password_query: returns a password column "
        "({SCHEME}data) and optionally user columns (uid, gid, home, mail, quota_rule, "
        "quota_bytes, quota_messages, nologin). Parameters %(user)s, %(username)s (part "
        "before @), %(domain)s are always bound, never pasted in. Empty: pobox's users table.",
    ),
    "postgresql_user_query": (
        str,
        "Your own query for a user record (delivery), like Dovecot's user_query: the user "
        "columns above, same parameters. Empty: the password query's user columns.",
    ),
    "postgresql_iterate_query": (
        str,
        "Your own query listing every user (pobox user list), like Dovecot's iterate_query: "
        "a username (or user) column. Empty with custom queries: no listing.",
    ),
    "shared_state": (
        str,
        "Where the state every node must share is kept (failed-login counters, the session "
        "registry and its connection limits): memory (this node only) or postgresql "
        "(postgresql_dsn, for several nodes). auto: postgresql when mail_location or userdb "
        "is postgresql, else memory.",
    ),
    "node_name": (
        str,
        "This node's name in the session registry and the logs; unique in the cluster "
        "(default: the host name).",
    ),
    "shared_state_timeout": (
        float,
        "Seconds a call to the shared state may take; past it (or if the database is down) "
        "that login uses this node's memory instead, logged once per episode (0.5).",
    ),
    "shared_state_heartbeat": (
        float,
        "Seconds between a node's heartbeats (renewing its lease, seeing kicks). A node not "
        "heard from for 3 heartbeats is dead: its sessions no longer count (5).",
    ),
    "mail_max_userip_connections": (
        int,
        "Logged-in sessions one user may have from one client address, on all nodes "
        "together; beyond it -ERR [IN-USE] (Dovecot's key). 0: no limit (10).",
    ),
    "mail_max_user_connections": (
        int,
        "Logged-in sessions one user may have from any address, on all nodes together; "
        "beyond it -ERR [IN-USE] (Dovecot's key). 0: no limit (0).",
    ),
    "health_listen": (
        str,
        'HTTP health check for a load balancer, "HOST:PORT" (default "": off). GET /health '
        "answers 200 while the node reaches its stores and is not draining, else 503 with the "
        "reason. Bind it to loopback or a private network: anyone who reaches it may ask.",
    ),
    "metrics_listen": (
        str,
        'Prometheus metrics endpoint, "HOST:PORT" (default "": off). GET /metrics answers '
        "the node's counters (all workers summed). Bind it to loopback or a private network: "
        "anyone who reaches it may read them.",
    ),
    "drain_timeout": (
        float,
        "Seconds SIGTERM lets open sessions finish (QUIT and UPDATE as usual) after the node "
        "stops accepting connections; then the rest are closed without UPDATE and the node "
        "exits. A second SIGTERM or SIGINT stops at once. 0: close at once (30).",
    ),
    "workers": (
        int,
        "Serving processes sharing the listening sockets (POP3, POP3S, LMTP, SMTP), started "
        "and restarted by a master process that binds them; the throttle and the connection "
        "limits count across them. 1: one process, no master. 0: one per CPU (0).",
    ),
}

_LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error"})


def parse_listen(text: str, *, key: str = "listen") -> Listen:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (loopback).

    Raises:
        ConfigError: naming ``key`` if the text is not an address.
    """
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        v6, sep, rest = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{key}: {text!r} is not [IPv6]:PORT")
        host, port_text = v6, rest
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: {text!r} has no valid port (0-65535)")
    return Listen(host or "0.0.0.0", int(port_text))  # noqa: S104 - an empty host means all


def _check_type(key: str, value: Any, want: type) -> Any:  # noqa: ANN401 - TOML values
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, want):
        raise ConfigError(f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_config(values: dict[str, Any], *, base: Config | None = None) -> Config:
    """Validate ``values`` (TOML-shaped) over ``base`` and return the config.

    Raises:
        ConfigError: an unknown key, a wrong type or a bad value, naming the key.
    """
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in KEYS:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(KEYS))})")
        want, _ = KEYS[key]
        number = key in ("mail_uid", "mail_gid") and type(raw) is int
        value = _check_type(key, str(raw) if number else raw, want)  # a number is a uid/gid
        if key == "listen":
            if not value or not all(isinstance(v, str) for v in value):
                raise ConfigError('listen: expected a list of "HOST:PORT" strings')
            changes[key] = tuple(parse_listen(v, key=f"listen[{i}]") for i, v in enumerate(value))
        elif key == "ssl_listen":
            if not all(isinstance(v, str) for v in value):
                raise ConfigError('ssl_listen: expected a list of "HOST:PORT" strings')
            changes[key] = tuple(parse_listen(v, key=f"{key}[{i}]") for i, v in enumerate(value))
        elif key in ("lmtp_listen", "smtp_listen"):
            changes[key] = tuple(_delivery_listen(v, f"{key}[{i}]") for i, v in enumerate(value))
        elif key == "local_domains":
            if not all(isinstance(v, str) and v for v in value):
                raise ConfigError("local_domains: expected a list of domain names")
            changes[key] = tuple(v.lower().rstrip(".") for v in value)
        elif key in ("login_trusted_networks", "haproxy_trusted_networks"):
            changes[key] = tuple(_network(v, f"{key}[{i}]") for i, v in enumerate(value))
        elif key == "ssl_sni":
            changes[key] = tuple(_sni_entry(name, entry) for name, entry in value.items())
        elif key in ("mail_uid", "mail_gid"):
            changes[key] = _account(key, value)
        else:
            changes[key] = value
    config = dataclasses.replace(base or Config(), **changes)
    return _validate(config)


def _delivery_listen(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected "HOST:PORT" or "unix:/path", got {value!r}')
    if value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise ConfigError(f"{key}: {value!r}: the socket path must be absolute")
        return value
    parse_listen(value, key=key)
    return value


def _account(key: str, value: str) -> str:
    """Check a user or group given by name or number (looked up when the server starts)."""
    value = value.strip()
    if value.startswith("-") or any(c.isspace() or c in ":/" for c in value):
        raise ConfigError(f"{key}: {value!r} is not a user/group name or a number")
    return value


def _network(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a CIDR string, got {value!r}")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r} is not a network: {exc}") from None


def _sni_entry(name: str, entry: object) -> tuple[str, str, str]:
    key = f"ssl_sni.{name}"
    if not isinstance(entry, dict) or set(entry) != {"cert", "key"}:
        raise ConfigError(f"{key}: expected a table with exactly cert and key")
    if not all(isinstance(v, str) and v for v in entry.values()):
        raise ConfigError(f"{key}: cert and key must be file paths")
    return name.lower().rstrip("."), entry["cert"], entry["key"]


def _check_readable(key: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {path} is not readable")


def _validate_security(config: Config) -> None:
    if bool(config.ssl_cert) != bool(config.ssl_key):
        raise ConfigError("ssl_cert, ssl_key: set both or neither")
    if config.ssl_client_ca:
        if not config.ssl_cert:
            raise ConfigError("ssl_client_ca: needs ssl_cert and ssl_key")
        _check_readable("ssl_client_ca", config.ssl_client_ca)
    if config.ssl_cert:
        _check_readable("ssl_cert", config.ssl_cert)
        _check_readable("ssl_key", config.ssl_key)
    elif config.ssl_listen or config.ssl_sni:
        which = "ssl_listen" if config.ssl_listen else "ssl_sni"
        raise ConfigError(f"{which}: needs ssl_cert and ssl_key")
    for name, cert, key in config.ssl_sni:
        _check_readable(f"ssl_sni.{name}.cert", cert)
        _check_readable(f"ssl_sni.{name}.key", key)
    if config.ssl_min_protocol not in TLS_PROTOCOLS:
        raise ConfigError(
            f"ssl_min_protocol: {config.ssl_min_protocol!r} is not one of {list(TLS_PROTOCOLS)}"
        )
    if config.disable_plaintext_auth not in PLAINTEXT_POLICIES:
        raise ConfigError(
            f"disable_plaintext_auth: {config.disable_plaintext_auth!r} is not one of "
            f"{list(PLAINTEXT_POLICIES)}"
        )
    for key in (
        "max_connections",
        "max_connections_per_ip",
        "lmtp_max_connections",
        "lmtp_max_connections_per_ip",
        "smtp_max_connections",
        "smtp_max_connections_per_ip",
    ):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}: must be at least 1")
    if config.group and not config.user:
        raise ConfigError("group: needs user")
    for kind in ("uid", "gid"):
        first, last = getattr(config, f"first_valid_{kind}"), getattr(config, f"last_valid_{kind}")
        if first < 0 or last < 0:
            raise ConfigError(f"first_valid_{kind}, last_valid_{kind}: must not be negative")
        if last and last < first:
            raise ConfigError(
                f"last_valid_{kind}: {last} is below first_valid_{kind} {first} (0: no limit)"
            )


#: PostgreSQL's longest identifier (NAMEDATALEN - 1).
_PG_IDENTIFIER_MAX = 63


#: The named parameters a custom user query may use (Dovecot's %u, %n, %d).
QUERY_PARAMETERS: Final = ("user", "username", "domain")
#: ``%(name)s`` placeholders and ``%%``; any other ``%`` in a custom query is an error.
_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]*)\)s|%)")


def _validate_query(key: str, text: str) -> None:
    """Refuse a custom query with a placeholder other than ``%(user)s`` and its kin."""
    rest = _PLACEHOLDER.sub("", text)
    for match in _PLACEHOLDER.finditer(text):
        name = match.group("name")
        if name is not None and name not in QUERY_PARAMETERS:
            raise ConfigError(
                f"{key}: unknown parameter %({name})s; use %(user)s, %(username)s or %(domain)s"
            )
    if "%" in rest:
        raise ConfigError(
            f"{key}: a % that is not %(user)s, %(username)s, %(domain)s or %%: values are bound "
            "as parameters, so write %(user)s without quotes where Dovecot has '%u'"
        )


def _validate_userdb(config: Config) -> None:
    if config.userdb not in ("passwd-file", "postgresql"):
        raise ConfigError(f"userdb: {config.userdb!r} is not passwd-file or postgresql")
    if config.postgresql_user_cache_ttl < 0:
        raise ConfigError("postgresql_user_cache_ttl: must not be negative")
    queries = ("postgresql_password_query", "postgresql_user_query", "postgresql_iterate_query")
    for key in queries:
        if getattr(config, key):
            _validate_query(key, getattr(config, key))
    if any(getattr(config, key) for key in queries) and not config.postgresql_password_query:
        raise ConfigError(
            "postgresql_password_query: needed when postgresql_user_query or "
            "postgresql_iterate_query is set"
        )


def _validate_postgresql(config: Config) -> None:
    _validate_userdb(config)
    if not 0 < len(config.postgresql_schema.encode()) <= _PG_IDENTIFIER_MAX or (
        "\x00" in config.postgresql_schema
    ):
        raise ConfigError("postgresql_schema: must be 1 to 63 octets, no NUL")
    for key in ("postgresql_pool_min", "postgresql_lock_connections"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}: must be at least 1")
    if config.postgresql_pool_max < config.postgresql_pool_min:
        raise ConfigError("postgresql_pool_max: must be at least postgresql_pool_min")
    if config.postgresql_timeout <= 0:
        raise ConfigError("postgresql_timeout: must be a positive number of seconds")
    if config.postgresql_lock_check_interval < 0:
        raise ConfigError("postgresql_lock_check_interval: must not be negative")


def _validate_shared_state(config: Config) -> None:
    if config.shared_state not in ("auto", "memory", "postgresql"):
        raise ConfigError(
            f"shared_state: {config.shared_state!r} is not auto, memory or postgresql"
        )
    for key in ("shared_state_timeout", "shared_state_heartbeat"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: must be a positive number of seconds")
    for key in ("mail_max_userip_connections", "mail_max_user_connections"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key}: must not be negative (0: no limit)")
    if len(config.node_name) > 255 or any(ord(c) < 33 or ord(c) == 127 for c in config.node_name):
        raise ConfigError("node_name: at most 255 characters, no spaces or control characters")


def shared_state_backend(config: Config) -> str:
    """Return where shared state is kept: ``memory`` or ``postgresql`` (``auto`` resolved)."""
    if config.shared_state != "auto":
        return config.shared_state
    if config.mail_location == "postgresql" or config.userdb == "postgresql":
        return "postgresql"
    return "memory"


def _validate_health(config: Config) -> None:
    if config.health_listen:
        parse_listen(config.health_listen, key="health_listen")
    if config.metrics_listen:
        parse_listen(config.metrics_listen, key="metrics_listen")
    if config.drain_timeout < 0:
        raise ConfigError("drain_timeout: must not be negative")
    if config.workers < 0:
        raise ConfigError("workers: must not be negative (0: one per CPU)")


def _validate(config: Config) -> Config:
    warnings: list[str] = []
    if not config.mail_location.startswith("maildir:") and config.mail_location != "postgresql":
        raise ConfigError(
            f"mail_location: {config.mail_location!r} must start with 'maildir:' or be 'postgresql'"
        )
    _validate_postgresql(config)
    _validate_shared_state(config)
    _validate_health(config)
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: {config.log_level!r} is not one of {sorted(_LOG_LEVELS)}")
    for key in (
        "login_timeout",
        "login_deadline",
        "idle_timeout",
        "auth_failure_delay",
        "delivery_timeout",
        "haproxy_timeout",
    ):
        if getattr(config, key) < 0 or (key != "auth_failure_delay" and not getattr(config, key)):
            raise ConfigError(f"{key}: must be a positive number of seconds")
    # The names of pobox.protocol.ALL_MECHANISMS (config may not import the protocol core).
    known = {"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"}
    known |= {"EXTERNAL", "OAUTHBEARER", "XOAUTH2"}
    unknown = set(config.auth_mechanisms.upper().split()) - known
    if unknown:
        raise ConfigError(f"auth_mechanisms: unknown {sorted(unknown)}; known {sorted(known)}")
    for key in ("auth_failures_per_ip", "auth_failures_per_user", "max_auth_failures"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}: must be at least 1")
    if config.auth_failure_window <= 0 or config.auth_failure_delay_max < 0:
        raise ConfigError("auth_failure_window, auth_failure_delay_max: must be positive")
    if config.log_format not in ("pobox", "dovecot"):
        raise ConfigError(f"log_format: {config.log_format!r} is not pobox or dovecot")
    for key in ("max_message_size", "quota_bytes", "quota_messages", "mail_inline_read_max"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key}: must not be negative")
    if config.event_loop not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"event_loop: {config.event_loop!r} is not auto, uvloop or asyncio")
    if config.max_open_files < 0:
        raise ConfigError("max_open_files: must not be negative")
    if config.max_bad_commands < 1:
        raise ConfigError("max_bad_commands: must be at least 1")
    if config.delivery_min_data_rate < 1:
        raise ConfigError("delivery_min_data_rate: must be at least 1 octet per second")
    if config.mail_temp_dir and not (
        Path(config.mail_temp_dir).is_absolute() and Path(config.mail_temp_dir).is_dir()
    ):
        raise ConfigError(f"mail_temp_dir: {config.mail_temp_dir} is not an absolute directory")
    _validate_security(config)
    if "\r" in config.login_greeting or "\n" in config.login_greeting:
        raise ConfigError("login_greeting: must be a single line")
    if len(config.login_greeting.encode()) > 506:
        raise ConfigError("login_greeting: at most 506 octets (RFC 2449 §4: 512 per line)")
    if config.idle_timeout < RFC_MIN_AUTOLOGOUT:
        warnings.append(
            f"idle_timeout: {config.idle_timeout:g} s is below the 600 s RFC 1939 requires"
        )
    return dataclasses.replace(config, warnings=tuple(warnings))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file at ``path`` (if any), apply ``overrides``, validate.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as f:
                values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    values.update(overrides or {})
    return build_config(values)
