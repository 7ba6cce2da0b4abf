"""TLS for the server: the SSLContext factory, certificate reload and SNI, and the plaintext
login policy (Dovecot's ``disable_plaintext_auth``).

Contexts are server-side only, TLS 1.2 or newer (RFC 8996 retires 1.0 and 1.1), with the
Mozilla "intermediate" cipher list for TLS 1.2 (forward secrecy and AEAD only; TLS 1.3 suites
are OpenSSL's, all of them modern), no TLS compression (CRIME) and no renegotiation.

Listeners and sessions hold one *front* context for the life of the server.  Its SNI callback
hands each new handshake the context loaded most recently (chosen by server name when
``ssl_sni`` is set), so :meth:`ServerTls.reload` swaps certificates for new connections
while open sessions keep theirs.  A reload that fails leaves the old certificates in place.

May import: the standard library, :mod:`pobox.config`, :mod:`pobox.errors`.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from pobox.config import Config
from pobox.errors import ConfigError

__all__ = [
    "CIPHERS_TLS12",
    "FileReader",
    "ServerTls",
    "is_trusted_address",
    "make_server_context",
    "plaintext_auth_allowed",
]

#: Mozilla's "intermediate" TLS 1.2 suites (ssl-config.mozilla.org, v5.7): ECDHE/DHE key
#: exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305 only.
CIPHERS_TLS12: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)

_VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

#: Reads a configuration file by its key (``ssl_key``, ``ssl_sni.NAME.cert``, ...) for a
#: process that may not open it by path: the server after dropping root, through the storage
#: helper. Raises any exception on failure.
FileReader = Callable[[str], bytes]


@contextlib.contextmanager
def _loadable(read_file: FileReader | None, key: str, path: str) -> Iterator[str]:
    """Yield a path OpenSSL can load ``key``'s file from.

    Without ``read_file``, the path itself; with it, the file's content in an anonymous
    memory file of this process, named by ``/proc/self/fd``: OpenSSL loads certificates and
    keys from paths only.

    Raises:
        ConfigError: ``read_file`` failed, naming the key and the path.
    """
    if read_file is None:
        yield path
        return
    try:
        data = read_file(key)
    except Exception as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc}") from None
    fd = os.memfd_create("pobox-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def make_server_context(
    cert: str,
    key: str,
    *,
    min_protocol: str = "TLSv1.2",
    key_name: str = "ssl",
    client_ca: str = "",
    read_file: FileReader | None = None,
) -> ssl.SSLContext:
    """Build a server-side context for the certificate chain ``cert`` and its ``key``.

    Args:
        cert: path of the PEM certificate chain (leaf first).
        key: path of the PEM private key.
        min_protocol: ``"TLSv1.2"`` or ``"TLSv1.3"``.
        key_name: the config key prefix named in errors (``ssl`` or ``ssl_sni.NAME``).
        client_ca: PEM CA file; if set, clients *may* present a certificate signed by it
            (verified; a bad one fails the handshake), whose identity SASL EXTERNAL uses.
        read_file: reads the files by key instead of opening the paths (see
            :data:`FileReader`).

    Raises:
        ConfigError: a file cannot be read, is not PEM, or the key does not match.
    """
    cert_key, key_key = (
        ("ssl_cert", "ssl_key") if key_name == "ssl" else (f"{key_name}.cert", f"{key_name}.key")
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[min_protocol]
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_NO_RENEGOTIATION
    )
    ctx.set_ciphers(CIPHERS_TLS12)
    with contextlib.ExitStack() as stack:
        paths = (
            stack.enter_context(_loadable(read_file, cert_key, cert)),
            stack.enter_context(_loadable(read_file, key_key, key)),
            stack.enter_context(_loadable(read_file, "ssl_client_ca", client_ca))
            if client_ca
            else "",
        )
        _load_into(ctx, paths, shown=(cert, key, client_ca), keys=(cert_key, key_key))
    return ctx


def _load_into(
    ctx: ssl.SSLContext,
    paths: tuple[str, str, str],
    *,
    shown: tuple[str, str, str],
    keys: tuple[str, str],
) -> None:
    """Load the certificate chain, key and client CA from ``paths``.

    Errors name the keys and the configured paths (``shown``), never ``/proc/self/fd``.
    """
    cert, key, client_ca = shown
    cert_key, key_key = keys
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=paths[0])
    except ssl.SSLError:  # before OSError, of which it is a subclass
        raise ConfigError(f"{cert_key}: {cert} holds no PEM certificate") from None
    except OSError as exc:
        raise ConfigError(f"{cert_key}: cannot read {cert}: {exc.strerror}") from None
    try:
        ctx.load_cert_chain(paths[0], paths[1])
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"{key_key}: {key} does not match the certificate {cert}") from None
        raise ConfigError(f"{key_key}: cannot load {key} as a PEM private key") from None
    except OSError as exc:
        raise ConfigError(f"{key_key}: cannot read {key}: {exc.strerror}") from None
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=paths[2])
        except ssl.SSLError:
            raise ConfigError(f"ssl_client_ca: {client_ca} holds no PEM certificate") from None
        except OSError as exc:
            raise ConfigError(f"ssl_client_ca: cannot read {client_ca}: {exc.strerror}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL


class ServerTls:
    """The server's TLS contexts, reloadable (SIGHUP) without dropping sessions.

    Raises:
        ConfigError: from :func:`make_server_context`, naming the key.
    """

    def __init__(self, config: Config, read_file: FileReader | None = None) -> None:
        self._config = config
        self._read_file = read_file
        self._default, self._by_name = self._load()
        # The front context never changes; its callback picks the current certificates.
        # It carries the default certificate too, so it works for any client.
        self.context = make_server_context(
            config.ssl_cert,
            config.ssl_key,
            min_protocol=config.ssl_min_protocol,
            client_ca=config.ssl_client_ca,
            read_file=read_file,
        )
        self.context.sni_callback = self._select
        self.reloads = 0

    def _load(self) -> tuple[ssl.SSLContext, dict[str, ssl.SSLContext]]:
        cfg = self._config
        default = make_server_context(
            cfg.ssl_cert,
            cfg.ssl_key,
            min_protocol=cfg.ssl_min_protocol,
            client_ca=cfg.ssl_client_ca,
            read_file=self._read_file,
        )
        by_name = {
            name: make_server_context(
                cert,
                key,
                min_protocol=cfg.ssl_min_protocol,
                key_name=f"ssl_sni.{name}",
                client_ca=cfg.ssl_client_ca,
                read_file=self._read_file,
            )
            for name, cert, key in cfg.ssl_sni
        }
        return default, by_name

    def reload(self) -> None:
        """Re-read every certificate and key; new handshakes use them, open sessions not.

        Raises:
            ConfigError: a file is unreadable or wrong; the old certificates stay in use.
        """
        self._default, self._by_name = self._load()
        self.reloads += 1

    def _select(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        name = (server_name or "").lower().rstrip(".")
        sslobj.context = self._by_name.get(name, self._default)


def is_trusted_address(address: str, networks: Iterable[str] = ()) -> bool:
    """Whether ``address`` is loopback or inside one of the CIDR ``networks``.

    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) count as their IPv4 address; anything
    that is not an IP address (a Unix socket, ``"unknown"``) is not trusted.
    """
    return _is_trusted(address, tuple(networks))


@functools.lru_cache(maxsize=4096)
def _is_trusted(address: str, networks: tuple[str, ...]) -> bool:
    """:func:`is_trusted_address`, cached (bounded): asked at each login, parsing is its cost."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)


def plaintext_auth_allowed(
    policy: str, address: str, networks: Iterable[str] = (), *, secure: bool
) -> bool:
    """Whether USER/PASS and AUTH PLAIN/LOGIN may be used on a connection.

    Args:
        policy: ``disable_plaintext_auth``: ``"no"`` always allows, ``"yes"`` allows only
            over TLS, ``"loopback"`` also allows from loopback and ``networks``.
        address: the client's IP address.
        networks: ``login_trusted_networks``.
        secure: whether the connection is encrypted.
    """
    if secure or policy == "no":
        return True
    if policy == "yes":
        return False
    return is_trusted_address(address, networks)
