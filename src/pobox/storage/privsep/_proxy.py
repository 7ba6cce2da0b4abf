"""The serving process's side of the storage helper: a :class:`MaildropStore` that asks it.

:class:`StorageHelper` starts the helper process (:mod:`._helper`) while ``pobox serve`` is
still root, sends it the settings and keeps two sockets to it:

* the main one, driven by the event loop (:class:`HelperChannel`): requests are sent as
  they come, answers matched by id, so any number of sessions wait on the helper at once;
* the file one, blocking (:class:`HelperFiles`): a thread (re-reading the passwd-file) or a
  signal handler (reloading TLS certificates) gets a descriptor of a root-only configuration
  file through it.

:class:`HelperStore` and :class:`HelperMaildrop` satisfy the storage interface on top of the
channel. Reads stay here: ``fetch`` hands back a read-only descriptor of the message file,
opened by the helper with the owner's rights, and the message is read from it in this
process (in the event loop up to ``inline_read_max`` octets, else in a worker thread), never
beyond the size the helper saw. A request whose caller gave up (a session cancelled while
waiting) still gets its answer: descriptors that come back for nobody are closed and a
maildrop opened for nobody is closed again, so no session lock is left behind.

If the helper goes away (its socket ends or breaks the protocol), every waiting request
fails with :class:`~pobox.storage.base.StorageTemporaryError` and ``on_lost`` is called: the
server logs it and exits, and never goes on serving without it.

May import: the standard library, :mod:`pobox.config`, :mod:`pobox.records`,
:mod:`pobox.storage` and the modules of this package.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pobox
from pobox.config import parse_duration
from pobox.records import Quota
from pobox.storage.base import (
    INBOX,
    DeleteResult,
    IncomingMessage,
    MailUser,
    MessageGone,
    MessageInfo,
    StorageError,
    StorageTemporaryError,
    Usage,
    check_folder,
)
from pobox.storage.maildir import LOCK_TIMEOUT, MaildirAccess, MaildirGates
from pobox.storage.privsep._protocol import (
    delete_result_from_wire,
    error_from_wire,
    messages_from_wire,
    quota_to_wire,
    usage_from_wire,
    user_to_wire,
)
from pobox.storage.privsep._wire import (
    MAX_RESPONSE,
    FrameAssembler,
    WireError,
    close_fds,
    decode,
    encode,
    receive_datagram,
    receive_frame,
    send_frame,
    socket_pair,
    split,
)

if TYPE_CHECKING:
    from pobox.config import Config
    from pobox.storage.privsep._owner import OwnerPolicy

__all__ = ["HelperChannel", "HelperFiles", "HelperMaildrop", "HelperStore", "StorageHelper"]

logger = logging.getLogger(__name__)

#: Chunks a large message is read in (as the Maildir store reads them).
CHUNK_SIZE: Final = 256 * 1024
#: Seconds the helper has to start and answer ``hello``, or a ``file`` request.
START_TIMEOUT: Final = 30.0
FILE_TIMEOUT: Final = 10.0

_Answer = tuple[dict[str, Any], list[int]]


class HelperChannel:
    """Requests and answers on the main socket, driven by the running event loop."""

    def __init__(self, sock: socket.socket, on_lost: Callable[[str], None]) -> None:
        """Drive ``sock`` (connected to the helper) from the running loop."""
        sock.setblocking(False)
        self._sock = sock
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[_Answer], str]] = {}
        self._assembler = FrameAssembler(MAX_RESPONSE)
        self._outbox: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._writing = False
        self.lost: str | None = None
        self._loop.add_reader(sock.fileno(), self._readable)

    async def call(self, op: str, fields: dict[str, Any], fds: Sequence[int] = ()) -> _Answer:
        """Send a request and wait for its answer: the ``ok`` fields and any descriptors.

        The caller owns the descriptors returned and closes them.

        Raises:
            StorageError: the helper answered with an error, or is gone.
        """
        if self.lost is not None:
            raise StorageTemporaryError(f"storage helper gone: {self.lost}")
        request_id = next(self._ids)
        future: asyncio.Future[_Answer] = self._loop.create_future()
        self._pending[request_id] = (future, op)
        self._send({"id": request_id, "op": op, **fields}, fds)
        return await future

    # ---------------------------------------------------------------- sending

    def _send(self, message: dict[str, Any], fds: Sequence[int]) -> None:
        datagrams = split(encode(message))
        # Descriptors are duplicated into the queue: the caller may close its own at once.
        held = [os.dup(fd) for fd in fds]
        for index, datagram in enumerate(datagrams):
            self._outbox.append((datagram, held if index == 0 else []))
        self._flush()

    def _flush(self) -> None:
        while self._outbox:
            datagram, fds = self._outbox[0]
            rights = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                if fds
                else []
            )
            try:
                self._sock.sendmsg([datagram], rights)
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._sock.fileno(), self._flush)
                return
            except OSError as exc:
                self._lose(f"cannot write to it: {exc}")
                return
            self._outbox.popleft()
            close_fds(fds)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())

    # ---------------------------------------------------------------- receiving

    def _readable(self) -> None:
        while self.lost is None:
            try:
                datagram = receive_datagram(self._sock)
            except BlockingIOError:
                return
            except (WireError, OSError) as exc:
                self._lose(f"broken connection: {exc}")
                return
            if datagram is None:
                self._lose("it closed the connection")
                return
            try:
                frame = self._assembler.feed(*datagram)
                if frame is not None:
                    payload, fds = frame
                    self._answer(payload, fds)
            except WireError as exc:
                self._lose(f"broken answer: {exc}")
                return

    def _answer(self, payload: bytes, fds: list[int]) -> None:
        try:
            message = decode(payload)
        except WireError:
            close_fds(fds)
            raise
        request_id = message.get("id")
        entry = self._pending.pop(request_id, None) if type(request_id) is int else None
        if entry is None:
            close_fds(fds)
            raise WireError(f"an answer to no request: {message.get('id')!r}")
        future, op = entry
        ok = message.get("ok")
        if future.done():  # the caller gave up meanwhile (a session was cancelled)
            close_fds(fds)
            if op == "open" and isinstance(ok, dict) and isinstance(ok.get("handle"), int):
                self._orphan_close(ok["handle"])
            return
        if isinstance(ok, dict):
            future.set_result((ok, fds))
        else:
            close_fds(fds)
            future.set_exception(error_from_wire(message.get("error")))

    def _orphan_close(self, handle: int) -> None:
        """Close a maildrop the helper opened for a session that stopped waiting."""
        request_id = next(self._ids)
        future: asyncio.Future[_Answer] = self._loop.create_future()
        future.cancel()  # nobody waits: _answer drops the answer
        self._pending[request_id] = (future, "close")
        self._send({"id": request_id, "op": "close", "handle": handle}, ())

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        self._loop.remove_reader(self._sock.fileno())
        if self._writing:
            self._loop.remove_writer(self._sock.fileno())
        for _, fds in self._outbox:
            close_fds(fds)
        self._outbox.clear()
        self._assembler.reset()
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(StorageTemporaryError(f"storage helper gone: {reason}"))
        self._on_lost(reason)

    def close(self) -> None:
        """Close the socket: the helper releases every lock it holds for us and exits."""
        if self.lost is None:
            self.lost = "closed"
            self._loop.remove_reader(self._sock.fileno())
            if self._writing:
                self._loop.remove_writer(self._sock.fileno())
            for future, _ in self._pending.values():
                if not future.done():
                    future.set_exception(StorageTemporaryError("storage helper closed"))
            self._pending.clear()
        self._sock.close()


class HelperFiles:
    """Root-only configuration files, opened by the helper: the blocking file socket."""

    def __init__(self, sock: socket.socket) -> None:
        """Use ``sock`` (connected to the helper's file thread)."""
        sock.settimeout(FILE_TIMEOUT)
        self._sock = sock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def open(self, key: str) -> int:
        """Return a read-only descriptor of the configuration file ``key`` names.

        Raises:
            StorageError: the helper refused or could not open it, or is gone.
        """
        with self._lock:
            request_id = next(self._ids)
            try:
                send_frame(self._sock, {"id": request_id, "op": "file", "key": key})
                answer = _receive_frame(self._sock)
            except (OSError, WireError) as exc:
                msg = f"storage helper: cannot get {key}: {exc}"
                raise StorageTemporaryError(msg) from exc
        message, fds = answer
        if message.get("id") != request_id or not isinstance(message.get("ok"), dict):
            close_fds(fds)
            raise error_from_wire(message.get("error"))
        if len(fds) != 1:
            close_fds(fds)
            msg = f"storage helper: no descriptor for {key}"
            raise StorageTemporaryError(msg)
        return fds[0]

    def read(self, key: str) -> bytes:
        """Return the content of the configuration file ``key`` names."""
        fd = self.open(key)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def _receive_frame(sock: socket.socket) -> _Answer:
    """Receive one whole frame on a blocking socket.

    Raises:
        WireError: broken framing, or the end of file.
    """
    received = receive_frame(sock, FrameAssembler(MAX_RESPONSE))
    if received is None:
        msg = "the helper closed the connection"
        raise WireError(msg)
    return received


class HelperStore:
    """A :class:`~pobox.storage.base.MaildropStore` whose every file access is the helper's.

    As the Maildir store does, it lets one operation at a time work on a maildir (waiting at
    most ``lock_timeout`` for its turn): a user who holds their own index lock ties up one of
    the helper's worker threads at most, never all of them.
    """

    def __init__(
        self,
        channel: HelperChannel,
        *,
        location: str = "maildir:~/Maildir",
        inline_read_max: int = 128 * 1024,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        """Reach mail through ``channel``.

        Args:
            location: the mail location (only to tell maildirs apart: the helper works the
                paths out itself).
            inline_read_max: messages of at most this many octets are read in the event
                loop's thread from the descriptor the helper hands back.
            lock_timeout: the longest wait for a maildir's turn.
        """
        self.channel = channel
        self._paths = MaildirAccess(location)
        self._gates = MaildirGates()
        self._inline_read_max = inline_read_max
        self._lock_timeout = lock_timeout

    def _turn(self, user: MailUser) -> contextlib.AbstractAsyncContextManager[None]:
        """Wait for the turn on ``user``'s maildir."""
        return self._gates.turn(self._paths.maildir_root(user), self._lock_timeout)

    async def open(self, user: MailUser, *, lock: bool = True) -> HelperMaildrop:
        """Open ``user``'s maildrop in the helper, which holds the session lock.

        Raises:
            MaildropLocked: another session holds the lock.
            StorageError: the helper refused the user (its owner) or failed.
        """
        return await self._open(user, "open", {"lock": lock})

    async def _open(self, user: MailUser, op: str, fields: dict[str, Any]) -> HelperMaildrop:
        """Send an ``open`` or ``open_folders`` request; return the maildrop it opened."""
        async with self._turn(user):
            ok, fds = await self.channel.call(op, {"user": user_to_wire(user), **fields})
        close_fds(fds)
        handle = ok.get("handle")
        if type(handle) is not int:
            msg = "storage helper: malformed open answer"
            raise StorageTemporaryError(msg)
        return HelperMaildrop(
            self.channel,
            handle,
            messages_from_wire(ok.get("messages")),
            self._inline_read_max,
            functools.partial(self._gates.turn, self._paths.maildir_root(user), self._lock_timeout),
        )

    async def open_folders(
        self, user: MailUser, folders: Sequence[str], *, lock: bool = True
    ) -> HelperMaildrop:
        """Open ``user``'s maildrop with ``folders`` merged in, in the helper.

        Raises:
            FolderNameError: a folder name is not acceptable.
            MaildropLocked: another session holds the lock.
            StorageError: the helper refused the user (its owner) or failed.
        """
        names = list(dict.fromkeys(check_folder(name) for name in folders))
        return await self._open(user, "open_folders", {"lock": lock, "folders": names})

    async def deliver_to_folder(
        self,
        user: MailUser,
        message: IncomingMessage,
        folder: str,
        *,
        quota: Quota | None = None,
    ) -> str:
        """Have the helper store ``message`` in ``folder`` of ``user``'s maildir (made if missing).

        Raises:
            FolderNameError: the folder name is not acceptable.
            QuotaExceeded: the message does not fit (in that folder).
            StorageError: the helper refused the user or failed.
        """
        folder = check_folder(folder)
        if folder == INBOX:
            return await self.deliver(user, message, quota=quota)
        return await self._deliver(user, message, quota, {"folder": folder})

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Have the helper store ``message`` for ``user``, as the owner of the mail.

        The body goes over as a descriptor (the spool's file, or a memory file holding it).

        Raises:
            QuotaExceeded: the message does not fit.
            StorageError: the helper refused the user or failed.
        """
        return await self._deliver(user, message, quota, {})

    async def _deliver(
        self,
        user: MailUser,
        message: IncomingMessage,
        quota: Quota | None,
        extra: dict[str, Any],
    ) -> str:
        """Send a ``deliver`` (or, with a ``folder``, ``deliver_folder``) request."""
        body = message.body
        fields = {
            "user": user_to_wire(user),
            "header": message.header.decode("latin-1"),
            "quota": quota_to_wire(quota),
            "wire_size": body.wire_size,
            "digest": body.digest,
            **extra,
        }
        op = "deliver_folder" if extra else "deliver"
        async with self._turn(user):
            # A spool on disk is only duplicated; one in memory is copied to a memory file.
            fd = body.export_fd() if body.in_memory else await asyncio.to_thread(body.export_fd)
            try:
                ok, fds = await self.channel.call(op, fields, [fd])
            finally:
                os.close(fd)
        close_fds(fds)
        return str(ok.get("key"))

    async def usage(self, user: MailUser) -> Usage:
        """Ask the helper what ``user``'s maildrop holds."""
        async with self._turn(user):
            ok, fds = await self.channel.call("usage", {"user": user_to_wire(user)})
        close_fds(fds)
        return usage_from_wire(ok)

    async def aclose(self) -> None:
        """Do nothing: :class:`StorageHelper` closes the channel."""


class HelperMaildrop:
    """One maildrop the helper holds open for a session."""

    def __init__(
        self,
        channel: HelperChannel,
        handle: int,
        messages: tuple[MessageInfo, ...],
        inline_read_max: int,
        turn: Callable[[], contextlib.AbstractAsyncContextManager[None]],
    ) -> None:
        """Wrap the helper's maildrop ``handle``, whose snapshot is ``messages``.

        Args:
            turn: waits for the maildir's turn (for deletions).
        """
        self._channel = channel
        self._turn = turn
        self._handle = handle
        self._messages = messages
        self._inline_read_max = inline_read_max
        self._closed = False

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open."""
        return self._messages

    def read_now(self, key: str) -> bytes | None:
        """Return ``None``: every read needs a descriptor from the helper first."""
        return None

    async def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield the stored bytes of message ``key``, read from the descriptor the helper opened.

        Raises:
            MessageGone: the message is no longer in the maildrop.
            StorageError: the helper or a read failed.
        """
        self._check_open()
        ok, fds = await self._channel.call("fetch", {"handle": self._handle, "key": key})
        size = ok.get("size")
        if len(fds) != 1 or type(size) is not int or size < 0:
            close_fds(fds)
            msg = "storage helper: malformed fetch answer"
            raise StorageTemporaryError(msg)
        # Buffered: its lock makes close() wait for a read still running in a worker thread
        # (a cancelled session), so the descriptor is never closed under that read.
        handle = os.fdopen(fds[0], "rb")
        try:
            if size <= self._inline_read_max:
                yield _read_bounded(handle, size)
                return
            remaining = size
            while remaining > 0:
                chunk = await asyncio.to_thread(_read_bounded, handle, min(CHUNK_SIZE, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk
        finally:
            handle.close()

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Have the helper remove messages (UPDATE state, RFC 1939 §6).

        Raises:
            RuntimeError: the maildrop is closed (its lock may be another session's now).
        """
        self._check_open()
        async with self._turn():
            ok, fds = await self._channel.call(
                "delete", {"handle": self._handle, "keys": list(keys)}
            )
        close_fds(fds)
        return delete_result_from_wire(ok)

    async def mark_seen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Have the helper add the ``S`` flag to messages, with the owner's rights.

        Returns:
            The keys that could not be marked.

        Raises:
            RuntimeError: the maildrop is closed.
            StorageError: the helper could not mark any.
        """
        self._check_open()
        async with self._turn():
            ok, fds = await self._channel.call("seen", {"handle": self._handle, "keys": list(keys)})
        close_fds(fds)
        failed = ok.get("failed")
        if not isinstance(failed, list) or not all(type(key) is str for key in failed):
            msg = "storage helper: malformed seen answer"
            raise StorageTemporaryError(msg)
        return tuple(failed)

    async def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Have the helper record first retrievals in ``pobox-retrieved``.

        Raises:
            RuntimeError: the maildrop is closed.
            StorageError: the helper could not record them.
        """
        self._check_open()
        if not times:
            return
        request = {
            "handle": self._handle,
            "keys": list(times),
            "times": [int(when) for when in times.values()],
        }
        async with self._turn():
            _, fds = await self._channel.call("note_retrieved", request)
        close_fds(fds)

    async def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Have the helper list the snapshot's messages first retrieved by ``when``.

        Raises:
            RuntimeError: the maildrop is closed.
            StorageError: the helper could not read the times.
        """
        self._check_open()
        async with self._turn():
            ok, fds = await self._channel.call(
                "retrieved_before", {"handle": self._handle, "when": max(int(when), 0)}
            )
        close_fds(fds)
        keys = ok.get("keys")
        if not isinstance(keys, list) or not all(type(key) is str for key in keys):
            msg = "storage helper: malformed retrieved_before answer"
            raise StorageTemporaryError(msg)
        return tuple(keys)

    def _check_open(self) -> None:
        """Refuse to work on a closed maildrop, as the Maildir store does."""
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Do nothing: the helper holds the lock file until this session closes it, and if
        the helper dies the whole server stops (a lock file is never lost under a session)."""

    async def close(self) -> None:
        """Release the maildrop (and its session lock) in the helper; safe to call again."""
        if self._closed:
            return
        self._closed = True
        if self._channel.lost is None:
            # If the helper is gone, its exit released the lock.
            with contextlib.suppress(StorageError):
                await self._channel.call("close", {"handle": self._handle})


def _read_bounded(handle: Any, size: int) -> bytes:  # noqa: ANN401 - a raw file object
    """Read up to ``size`` octets (fewer only at the end of the file)."""
    parts: list[bytes] = []
    while size > 0:
        try:
            chunk = handle.read(size)
        except OSError as exc:
            msg = f"cannot read message: {exc.strerror}"
            raise StorageTemporaryError(msg) from exc
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


class StorageHelper:
    """The running helper process, its two sockets and the store on top of them."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        channel: HelperChannel,
        files: HelperFiles,
        store: HelperStore,
    ) -> None:
        """Hold a started helper; use :meth:`start`."""
        self.process = process
        self.channel = channel
        self.files = files
        self.store = store

    @property
    def pid(self) -> int:
        """The helper's process id."""
        return self.process.pid

    @classmethod
    async def start(
        cls, config: Config, policy: OwnerPolicy, *, on_lost: Callable[[str], None]
    ) -> StorageHelper:
        """Start the helper (the caller is still root) and send it the settings.

        Raises:
            StorageError: the helper did not start or refused the settings.
        """
        settings = {
            "location": config.mail_location,
            "mail_uid": policy.mail_uid,
            "mail_gid": policy.mail_gid,
            "first_valid_uid": policy.first_valid_uid,
            "last_valid_uid": policy.last_valid_uid,
            "first_valid_gid": policy.first_valid_gid,
            "last_valid_gid": policy.last_valid_gid,
            "files": config_files(config),
            "appends": {"log_path": config.log_path} if config.log_path else {},
            "workers": min(32, (os.cpu_count() or 1) + 4),
            "reuse_xuidl": config.pop3_reuse_xuidl,
            "retention": parse_duration(config.pop3_delete_retention),
            "header_ends": "oe-ns-eoh" in config.pop3_client_workarounds,
        }
        main_ours, main_theirs = socket_pair()
        files_ours, files_theirs = socket_pair()
        package_root = str(Path(pobox.__file__).resolve().parent.parent)
        try:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [
                    sys.executable,
                    "-m",
                    "pobox.storage.privsep",
                    str(main_theirs.fileno()),
                    str(files_theirs.fileno()),
                ],
                pass_fds=(main_theirs.fileno(), files_theirs.fileno()),
                stdin=subprocess.DEVNULL,
                cwd="/",
                env={"PATH": os.defpath, "PYTHONPATH": package_root, "LC_ALL": "C.UTF-8"},
            )
        finally:
            main_theirs.close()
            files_theirs.close()
        try:
            main_ours.settimeout(START_TIMEOUT)
            await asyncio.to_thread(
                send_frame, main_ours, {"id": 1, "op": "hello", "settings": settings}
            )
            message, fds = await asyncio.to_thread(_receive_frame, main_ours)
            close_fds(fds)
            if not isinstance(message.get("ok"), dict):
                raise error_from_wire(message.get("error"))
        except (OSError, WireError, StorageError) as exc:
            process.kill()
            process.wait()
            main_ours.close()
            files_ours.close()
            msg = f"the storage helper did not start: {exc}"
            raise StorageTemporaryError(msg) from exc
        channel = HelperChannel(main_ours, on_lost)
        files = HelperFiles(files_ours)
        store = HelperStore(
            channel, location=config.mail_location, inline_read_max=config.mail_inline_read_max
        )
        return cls(process, channel, files, store)

    async def aclose(self) -> None:
        """Close the sockets and wait for the helper to release its locks and exit."""
        self.channel.close()
        self.files.close()
        try:
            await asyncio.wait_for(asyncio.to_thread(self.process.wait), START_TIMEOUT)
        except TimeoutError:
            logger.error("master: the storage helper did not exit; killing it")
            self.process.kill()
            await asyncio.to_thread(self.process.wait)


def config_files(config: Config) -> dict[str, str]:
    """Return the configuration files the serving process may have to read again, by key."""
    files = {"passwd_file": config.passwd_file}
    for key in ("ssl_cert", "ssl_key", "ssl_client_ca"):
        if getattr(config, key):
            files[key] = getattr(config, key)
    for name, cert, key in config.ssl_sni:
        files[f"ssl_sni.{name}.cert"] = cert
        files[f"ssl_sni.{name}.key"] = key
    return files


_ = MessageGone
