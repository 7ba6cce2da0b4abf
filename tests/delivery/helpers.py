"""Helpers for the delivery tests: a running pobox with its delivery listeners, a POP3 reader."""

from __future__ import annotations

import poplib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pobox.auth.passwdfile import PasswdFileAuthenticator
from pobox.cli import build_store
from pobox.delivery import DeliveryServer, build_agent
from pobox.testing import RunningServer, running_server

PASSWORD = "secret"


@dataclass
class Running:
    """A pobox serving POP3 and delivering over LMTP/SMTP."""

    pop3: RunningServer
    delivery: DeliveryServer

    @property
    def lmtp(self) -> tuple[str, int]:
        """The LMTP TCP address."""
        return self.delivery.address("lmtp")

    @property
    def smtp(self) -> tuple[str, int]:
        """The SMTP TCP address."""
        return self.delivery.address("smtp")


@asynccontextmanager
async def running_pobox(
    root: Path,
    users: tuple[str, ...] = ("alice",),
    *,
    extra_fields: Mapping[str, str] | None = None,
    **settings: Any,
) -> AsyncIterator[Running]:
    """Run pobox with POP3 and delivery listeners (LMTP and SMTP on loopback by default).

    Args:
        extra_fields: passwd-file extra fields by user (``"quota_bytes=10"``).
    """
    settings.setdefault("lmtp_listen", ["127.0.0.1:0"])
    settings.setdefault("smtp_listen", ["127.0.0.1:0"])
    settings.setdefault("hostname", "mx.pobox.test")
    async with running_server(root, dict.fromkeys(users, PASSWORD), **settings) as pop3:
        if extra_fields:
            passwd = Path(pop3.config.passwd_file)
            lines = []
            for entry in passwd.read_text().splitlines():
                name = entry.partition(":")[0]
                if name in extra_fields:
                    # user:password:uid:gid:gecos:home:shell:extra fields
                    padded = entry.ljust(len(entry) + 7 - entry.count(":"), ":")
                    entry = padded + extra_fields[name]  # noqa: PLW2901 - the entry, extended
                lines.append(entry + "\n")
            passwd.write_text("".join(lines))
        config = pop3.config
        agent = build_agent(
            config, PasswdFileAuthenticator(config.passwd_file), build_store(config)
        )
        delivery = DeliveryServer(config, agent)
        await delivery.start()
        try:
            yield Running(pop3, delivery)
        finally:
            await delivery.aclose()


def retrieve_all(host: str, port: int, user: str, *, delete: bool = False) -> list[bytes]:
    """Log in by POP3 and return every message as RETR sends it (CRLF lines, unstuffed)."""
    client = poplib.POP3(host, port, timeout=30)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        messages = []
        for number in range(1, count + 1):
            _, lines, _ = client.retr(number)
            messages.append(b"".join(line + b"\r\n" for line in lines))
            if delete:
                client.dele(number)
    finally:
        client.quit()
    return messages
