"""The storage helper: the small root process that accesses mail with each owner's rights.

``pobox serve`` started as root, with mail belonging to several uids, starts this process
(``python -m pobox.storage.privsep MAIN_FD FILES_FD``) before it drops its own privileges,
and then reaches mail only through it. The helper:

* listens to nothing but the two sockets it was given (no network, no other descriptor);
* has no supplementary groups, ignores SIGINT, SIGTERM and SIGHUP (the serving process
  decides when it ends) and exits when its main socket reaches end of file, after releasing
  every session lock it holds for the serving process (a killed serving process therefore
  frees its users' maildrops);
* reads the settings from the first frame (``hello``, sent while the serving process is
  still root) and never again;
* reads each later request as if the serving process were hostile (:mod:`._protocol`), finds
  the owner of the user's mail itself (:class:`~._owner.OwnerPolicy`: never uid 0 or a uid
  below ``first_valid_uid``, whatever the request says) and runs the synchronous Maildir core
  (:class:`~pobox.storage.maildir.MaildirAccess`, symlink-proof, which also requires every
  file to be the owner's) in a worker thread whose filesystem uid/gid are the owner's
  (:func:`._fsid.become`: a worker keeps the last owner's ids between requests, never
  root's), so the kernel refuses whatever the owner could not do; message files go
  back as read-only descriptors, so the serving process reads mail without the helper copying
  it;
* on its second socket answers ``file`` requests only, handing over a read-only descriptor
  of a configuration file the settings name (the passwd-file, TLS certificates and keys) that
  the unprivileged serving process must read again later, or one open for appending of the
  log file (reopened after a rotation). Each is opened relative to its directory as the
  hello found it (a descriptor kept from then); the log without following a link and only if
  it is a regular file with no other name, a read-only file likewise unless only root can
  change its directory: a serving process that can write to one of those directories cannot
  make root read, append to or create any other file.

A thread whose credentials cannot be restored ends the process (exit status 70): the
serving process sees the end of file, logs it and exits, and never goes on without it.

May import: the standard library, :mod:`pobox.records`, :mod:`pobox.storage` and the modules
of this package.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from pobox.records import User
from pobox.storage.base import INBOX, IncomingMessage, StorageTemporaryError
from pobox.storage.maildir import MaildirAccess, MaildirHandle
from pobox.storage.maildir._folders import FolderHandle, open_folder_handle
from pobox.storage.maildir._fs import use_thread_rights
from pobox.storage.privsep._fsid import CredentialsError, become, owner_rights, thread_ids
from pobox.storage.privsep._owner import Owner, OwnerPolicy
from pobox.storage.privsep._protocol import (
    InvalidRequest,
    error_to_wire,
    messages_to_wire,
    parse_request,
)
from pobox.storage.privsep._wire import (
    MAX_REQUEST,
    FrameAssembler,
    WireError,
    close_fds,
    receive_frame,
    send_frame,
)
from pobox.storage.spool import Spool

__all__ = ["Helper", "Settings", "main"]

#: Exit status when a thread's credentials could not be restored (sysexits EX_SOFTWARE).
EX_SOFTWARE: Final = 70
#: Exit status when the serving process broke the framing or the hello (EX_PROTOCOL).
EX_PROTOCOL: Final = 76
#: Descriptors each operation takes with its request.
_FDS_IN: Final = {"deliver": 1, "deliver_folder": 1}


def _log(message: str) -> None:
    """Write one line to standard error (the serving process's, or the journal)."""
    clean = message.encode("ascii", "backslashreplace").decode().replace("\n", "\\n")
    sys.stderr.write(f"pobox storage-helper[{os.getpid()}]: {clean}\n")
    sys.stderr.flush()


class _LogToStderr(logging.Handler):
    """Send the core's log records (an imported UIDL refused...) to :func:`_log`, sanitised.

    The core's messages can quote what a maildir's user wrote: every character outside
    printable ASCII becomes ``?``, so no record can start a line or hide from a reader.
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` as one line."""
        text = "".join(c if " " <= c <= "~" else "?" for c in record.getMessage())
        _log(f"{record.levelname.lower()}: {text}")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the helper learns from the ``hello`` frame."""

    location: str
    policy: OwnerPolicy
    files: dict[str, str]
    appends: dict[str, str]
    workers: int
    #: ``pop3_reuse_xuidl`` (optional in the frame: false).
    reuse_xuidl: bool = False
    #: ``pop3_delete_retention`` in seconds (optional in the frame: 0, off).
    retention: int = 0
    #: ``oe-ns-eoh`` is on: header ends are cached in the index (optional: false).
    header_ends: bool = False

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> Settings:
        """Read the settings of a ``hello`` frame.

        Raises:
            InvalidRequest: a setting is missing or of the wrong type.
        """
        expected: dict[str, type | tuple[type, ...]] = {
            "location": str,
            "mail_uid": (int, type(None)),
            "mail_gid": (int, type(None)),
            "first_valid_uid": int,
            "last_valid_uid": int,
            "first_valid_gid": int,
            "last_valid_gid": int,
            "files": dict,
            "appends": dict,
            "workers": int,
        }
        reuse_xuidl = value.get("reuse_xuidl", False)
        if type(reuse_xuidl) is not bool:
            msg = "settings.reuse_xuidl: wrong type"
            raise InvalidRequest(msg)
        header_ends = value.get("header_ends", False)
        if type(header_ends) is not bool:
            msg = "settings.header_ends: wrong type"
            raise InvalidRequest(msg)
        retention = value.get("retention", 0)
        if type(retention) is not int or retention < 0:
            msg = "settings.retention: wrong type"
            raise InvalidRequest(msg)
        if set(value) - {"reuse_xuidl", "retention", "header_ends"} != set(expected):
            msg = (
                f"settings: expected {sorted(expected)} "
                "(and optionally reuse_xuidl, retention, header_ends)"
            )
            raise InvalidRequest(msg)
        for key, kind in expected.items():
            if not isinstance(value[key], kind) or isinstance(value[key], bool):
                msg = f"settings.{key}: wrong type"
                raise InvalidRequest(msg)
        for key in ("files", "appends"):
            paths = value[key]
            if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in paths.items()):
                msg = f"settings.{key}: expected an object of paths"
                raise InvalidRequest(msg)
        policy = OwnerPolicy(
            mail_uid=value["mail_uid"],
            mail_gid=value["mail_gid"],
            first_valid_uid=value["first_valid_uid"],
            last_valid_uid=value["last_valid_uid"],
            first_valid_gid=value["first_valid_gid"],
            last_valid_gid=value["last_valid_gid"],
            fallback=None,  # the helper is root: a user without an owner is refused
        )
        workers = max(1, min(value["workers"], 256))
        return cls(
            value["location"],
            policy,
            dict(value["files"]),
            dict(value["appends"]),
            workers,
            reuse_xuidl,
            retention,
            header_ends,
        )


@dataclass(slots=True)
class _Session:
    """A maildrop the helper holds open for the serving process."""

    owner: Owner
    maildrop: MaildirHandle | FolderHandle
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


class Helper:
    """Serves the requests of one serving process (see the module documentation)."""

    def __init__(self, main: socket.socket, files: socket.socket | None) -> None:
        """Serve ``main`` (and ``files``, if given)."""
        self._main = main
        self._files = files
        self._send_lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._next_handle = 1
        self._settings: Settings | None = None
        self._core: MaildirAccess | None = None
        self._receive_turn = threading.Lock()
        self._assembler = FrameAssembler(MAX_REQUEST)
        #: The directory of each file the settings name, as the hello found it (while the
        #: serving process was root), and the file's name in it; ``None`` if it could not
        #: be opened then.
        self._dirs: dict[str, tuple[int, str] | None] = {}
        #: The exit status, once the main socket has ended (or broke the protocol).
        self._status: int | None = None

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        """Serve until the main socket ends; return the exit status."""
        assembler = FrameAssembler(MAX_REQUEST)
        try:
            first = receive_frame(self._main, assembler)
            if first is None:
                return 0
            self._hello(*first)
        except (WireError, InvalidRequest) as exc:
            _log(f"bad hello from the serving process: {exc}")
            return EX_PROTOCOL
        assert self._settings is not None
        if self._files is not None:
            threading.Thread(target=self._serve_files, name="files", daemon=True).start()
        self._assembler = assembler
        workers = [
            threading.Thread(target=self._serve_main, name=f"mail-{n}")
            for n in range(self._settings.workers)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        self._release_all()
        return self._status or 0

    def _serve_main(self) -> None:
        """Take turns at reading a request, then serve it in this thread.

        Leader and followers: one thread at a time waits for the next frame, the others wait
        for their turn to read; the thread that read a request serves it while the next one
        reads. A request is never handed from one thread to another (one wake-up less per
        request), and a request that waits on a user's maildir holds only its own thread.
        """
        while True:
            with self._receive_turn:
                if self._status is not None:
                    return
                try:
                    received = receive_frame(self._main, self._assembler)
                except WireError as exc:
                    _log(f"the serving process broke the protocol, closing: {exc}")
                    self._status = EX_PROTOCOL
                    return
                except OSError as exc:
                    _log(f"the connection to the serving process failed: {exc}")
                    self._status = EX_PROTOCOL
                    return
                if received is None:
                    self._status = 0
                    return
            self._dispatch(*received)

    def _hello(self, frame: dict[str, Any], fds: list[int]) -> None:
        close_fds(fds)
        request_id, op, args = parse_request(frame)
        if op != "hello":
            msg = "the first request must be hello"
            raise InvalidRequest(msg, request_id)
        self._settings = Settings.from_wire(args["settings"])
        self._core = MaildirAccess(
            self._settings.location,
            reuse_xuidl=self._settings.reuse_xuidl,
            retention=self._settings.retention,
            header_ends=self._settings.header_ends,
        )
        for key, path in (*self._settings.files.items(), *self._settings.appends.items()):
            self._dirs[key] = _open_parent(path)
        self._reply(self._main, request_id, {"pid": os.getpid()})

    def _dispatch(self, frame: dict[str, Any], fds: list[int]) -> None:
        try:
            request_id, op, args = parse_request(frame)
            if op in ("hello", "file"):
                msg = f"{op}: not on this socket"
                raise InvalidRequest(msg, request_id)
            if len(fds) != _FDS_IN.get(op, 0):
                msg = f"{op}: expected {_FDS_IN.get(op, 0)} descriptors, got {len(fds)}"
                raise InvalidRequest(msg, request_id)
        except InvalidRequest as exc:
            close_fds(fds)
            self._refused(exc)
            self._reply_error(self._main, exc.request_id, exc)
            return
        self._work(request_id, op, args, fds)

    def _work(self, request_id: int, op: str, args: dict[str, Any], fds: list[int]) -> None:
        """Run one request in this worker thread and answer it."""
        out_fds: list[int] = []
        try:
            result, out_fds = self._operation(op, args, fds)
        except CredentialsError as exc:
            _log(f"cannot restore a thread's credentials, stopping: {exc}")
            os._exit(EX_SOFTWARE)  # the thread's rights are unknown: nothing may go on
        except Exception as exc:
            self._refused(exc)
            self._reply_error(self._main, request_id, exc)
            return
        finally:
            close_fds(fds)
        try:
            self._reply(self._main, request_id, result, out_fds)
        finally:
            close_fds(out_fds)

    @staticmethod
    def _refused(exc: BaseException) -> None:
        """Log a request refused for what it asked (not for what the maildir held)."""
        kind = error_to_wire(exc)["kind"]
        if kind in ("refused", "invalid"):
            _log(f"refused a request: {exc}")

    # ------------------------------------------------------------------ operations

    def _operation(
        self, op: str, args: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        core, policy = self._core, self._settings.policy if self._settings else None
        assert core is not None
        assert policy is not None
        if op in ("open", "open_folders"):
            user: User = args["user"]
            owner = policy.owner_of(user)
            root, lock = core.maildir_root(user), args["lock"]
            become(owner.uid, owner.gid)
            maildrop: MaildirHandle | FolderHandle | None
            if op == "open_folders":
                maildrop = open_folder_handle(
                    core, root, args["folders"], owner=owner.uid, lock=lock
                )
            else:
                # The snapshot cache answers an unchanged maildir in a dozen system calls.
                maildrop, taken = core.open_if_cached(root, owner=owner.uid, lock=lock)
                if maildrop is None:
                    maildrop = core.open_path(root, owner=owner.uid, lock=lock, taken=taken)
            handle = self._add(_Session(owner, maildrop))
            return {"handle": handle, "messages": messages_to_wire(list(maildrop.messages))}, []
        if op in ("fetch", "delete", "seen", "note_retrieved", "retrieved_before"):
            session = self._session(args["handle"])
            with session.lock:
                if session.closed:
                    msg = f"maildrop {args['handle']} is closed"
                    raise InvalidRequest(msg)
                become(session.owner.uid, session.owner.gid)
                if op == "fetch":
                    fd, size = session.maildrop.open_message(args["key"])
                    return {"size": size}, [fd]
                if op == "seen":
                    return {"failed": list(session.maildrop.mark_seen(args["keys"]))}, []
                if op == "note_retrieved":
                    times = dict(zip(args["keys"], args["times"], strict=False))
                    session.maildrop.note_retrieved(times)
                    return {}, []
                if op == "retrieved_before":
                    return {"keys": list(session.maildrop.retrieved_before(args["when"]))}, []
                result = session.maildrop.delete(args["keys"])
            return {"removed": list(result.removed), "failed": list(result.failed)}, []
        if op == "close":
            session = self._pop(args["handle"])
            self._close(session)
            return {}, []
        if op in ("deliver", "deliver_folder"):
            user = args["user"]
            owner = policy.owner_of(user)
            body = Spool.adopt(fds.pop(), wire_size=args["wire_size"], digest=args["digest"])
            message = IncomingMessage(args["header"], body)
            with body:
                become(owner.uid, owner.gid)
                key = core.deliver(
                    user,
                    message,
                    owner=owner.uid,
                    quota=args["quota"],
                    folder=args.get("folder", INBOX),
                )
            return {"key": key}, []
        # usage: the only op left after parse_request and _dispatch
        user = args["user"]
        owner = policy.owner_of(user)
        become(owner.uid, owner.gid)
        usage = core.usage(user, owner=owner.uid)
        return {"octets": usage.octets, "messages": usage.messages}, []

    def _add(self, session: _Session) -> int:
        with self._sessions_lock:
            handle = self._next_handle
            self._next_handle += 1
            self._sessions[handle] = session
        return handle

    def _session(self, handle: int) -> _Session:
        with self._sessions_lock:
            session = self._sessions.get(handle)
        if session is None:
            raise InvalidRequest(f"no open maildrop {handle}")
        return session

    def _pop(self, handle: int) -> _Session:
        with self._sessions_lock:
            session = self._sessions.pop(handle, None)
        if session is None:
            raise InvalidRequest(f"no open maildrop {handle}")
        return session

    @staticmethod
    def _close(session: _Session) -> None:
        with session.lock:
            if session.closed:
                return
            session.closed = True
            become(session.owner.uid, session.owner.gid)
            session.maildrop.close()

    def _release_all(self) -> None:
        """Close every maildrop still open: the serving process is gone."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            try:
                self._close(session)
            except CredentialsError as exc:
                _log(f"cannot restore a thread's credentials, stopping: {exc}")
                os._exit(EX_SOFTWARE)
            except Exception as exc:
                _log(f"releasing a maildrop failed: {exc}")

    # ------------------------------------------------------------------ files

    def _serve_files(self) -> None:
        """Answer ``file`` requests on the second socket until it ends."""
        assert self._files is not None
        assembler = FrameAssembler(MAX_REQUEST)
        try:
            while (received := receive_frame(self._files, assembler)) is not None:
                frame, fds = received
                close_fds(fds)
                try:
                    request_id, op, args = parse_request(frame)
                    if op != "file":
                        raise InvalidRequest(f"{op}: not on this socket", request_id)
                    fd = self._open_file(args["key"])
                except InvalidRequest as exc:
                    self._refused(exc)
                    self._reply_error(self._files, exc.request_id, exc)
                    continue
                except StorageTemporaryError as exc:
                    self._reply_error(self._files, request_id, exc)
                    continue
                try:
                    self._reply(self._files, request_id, {}, [fd])
                finally:
                    os.close(fd)
        except (WireError, OSError) as exc:
            _log(f"the file socket failed, closing it: {exc}")
        self._files.close()

    def _open_file(self, key: str) -> int:
        """Open the file the settings name ``key`` (as root): read-only, or for appending.

        Both relative to the file's directory as the hello found it, so a directory swapped
        for a link since leads nowhere. A read-only file may be a link (Let's Encrypt's
        ``live/`` files are) only in a directory that only root can change; elsewhere (a
        directory the serving process could write to) a link or a file with another name
        (a hard link to ``/etc/shadow``) is refused.
        """
        assert self._settings is not None
        path = self._settings.files.get(key)
        if path is None:
            return self._open_append(key)
        dir_fd, name = self._directory(key, path)
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        trusted = _root_only(dir_fd)
        if not trusted:
            flags |= os.O_NOFOLLOW
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            msg = f"cannot open {key} {path}: {exc.strerror}"
            raise StorageTemporaryError(msg) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (not trusted and st.st_nlink != 1):
            os.close(fd)
            msg = f"file: {key} ({path}) is not a regular file"
            if not trusted:
                msg += " with one name (its directory is not root's alone)"
            raise InvalidRequest(msg)
        return fd

    def _directory(self, key: str, path: str) -> tuple[int, str]:
        """Return the directory descriptor and name the hello found for ``key``.

        Raises:
            StorageTemporaryError: the directory could not be opened then.
        """
        where = self._dirs.get(key)
        if where is None:
            msg = f"cannot open {key} {path}: its directory could not be opened at start"
            raise StorageTemporaryError(msg)
        return where

    def _open_append(self, key: str) -> int:
        """Open the file ``key`` for appending in the directory the hello found, never a link.

        The serving process may be able to write to the log's directory (logrotate's
        ``create`` for it, a directory of its own): a link or a hard link planted there in
        place of the log, or the directory swapped for a link, must not get root to append to
        or create another file. So: relative to the directory's descriptor kept from the
        hello, ``O_NOFOLLOW``, and only a regular file with one name.
        """
        assert self._settings is not None
        path = self._settings.appends.get(key)
        if path is None:
            raise InvalidRequest(f"file: {key!r} names no configuration file")
        dir_fd, name = self._directory(key, path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(name, flags | os.O_CLOEXEC | os.O_NOCTTY, 0o640, dir_fd=dir_fd)
        except OSError as exc:
            msg = f"cannot open {key} {path}: {exc.strerror}"
            raise StorageTemporaryError(msg) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            msg = f"file: {key} ({path}) is not a regular file with one name"
            raise InvalidRequest(msg)
        return fd

    # ------------------------------------------------------------------ answers

    def _reply(
        self, sock: socket.socket, request_id: int, ok: dict[str, Any], fds: Sequence[int] = ()
    ) -> None:
        with self._send_lock:
            send_frame(sock, {"id": request_id, "ok": ok}, fds)

    def _reply_error(self, sock: socket.socket, request_id: int, exc: BaseException) -> None:
        with self._send_lock:
            send_frame(sock, {"id": request_id, "error": error_to_wire(exc)})


def _owner_rights(rights: object) -> contextlib.AbstractContextManager[None]:
    """Run a block with the filesystem ids :func:`thread_ids` returned."""
    uid, gid = cast("tuple[int, int]", rights)
    return owner_rights(uid, gid)


def _root_only(dir_fd: int) -> bool:
    """Tell whether only root can change the directory ``dir_fd`` (root's, not group- or
    world-writable)."""
    st = os.fstat(dir_fd)
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _open_parent(path: str) -> tuple[int, str] | None:
    """Open the directory of ``path`` (links followed: the admin's); ``None`` if it fails."""
    directory, name = os.path.split(path)
    if not name:
        return None
    try:
        fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        _log(f"cannot open the directory of {path}: {exc.strerror}")
        return None
    return fd, name


def main(argv: list[str] | None = None) -> int:
    """Run the helper on the socket descriptors named on the command line."""
    args = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if os.geteuid() == 0:
        os.setgroups([])  # the owners' rights only: no supplementary group adds to them
    core_log = logging.getLogger("pobox")
    core_log.addHandler(_LogToStderr())
    core_log.setLevel(logging.WARNING)
    # Session locks are refreshed (a thread of their own) and released with the owner's ids.
    use_thread_rights(thread_ids, _owner_rights)
    main_sock = socket.socket(fileno=int(args[0]))
    files_sock = socket.socket(fileno=int(args[1])) if len(args) > 1 else None
    return Helper(main_sock, files_sock).run()
