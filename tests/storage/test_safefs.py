"""``pobox.storage._safefs``: file operations under a maildir against a hostile tree.

Every test runs twice: with ``openat2(2)`` (``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``) and
with the plain ``openat(2)`` + ``O_NOFOLLOW`` fallback used where the kernel lacks it. The
"outside" files are canaries next to the tree, which must come out unread and unchanged.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pobox.storage import _safefs
from pobox.storage._safefs import (
    Dir,
    LockBusy,
    UnsafeFile,
    check_name,
    flocked,
    flocked_if_free,
    open_by_real_path,
    openat2_available,
    read_chunks,
    read_upto,
    storage_error,
)
from pobox.storage.base import StorageError, StoragePermanentError

SECRET = b"outside the maildir\n"
ME = os.geteuid()


@pytest.fixture(params=["openat2", "openat"], autouse=True)
def resolver(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run each test with ``openat2`` and again with the ``openat`` fallback."""
    assert openat2_available()  # probe before switching
    _safefs._openat2.enabled = request.param == "openat2"
    try:
        yield str(request.param)
    finally:
        _safefs._openat2.enabled = True


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A maildir-like tree: ``root/cur/msg`` and an outside canary ``outside/secret``."""
    root = tmp_path / "root"
    (root / "cur").mkdir(parents=True)
    (root / "cur" / "msg").write_bytes(b"message\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(SECRET)
    return root


@pytest.fixture
def root(tree: Path) -> Iterator[Dir]:
    """The tree's root, opened for this process's uid."""
    with Dir.open_root(tree, ME) as directory:
        yield directory


def in_thread(function: object, *args: object) -> object:
    """Run ``function(*args)`` in a thread and wait at most five seconds for it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result(timeout=5)  # type: ignore[arg-type]


class TestOpenat2:
    """The ``openat2`` probe."""

    def test_this_kernel_has_openat2(self) -> None:
        """Linux 5.6 and later (this machine's kernel) has ``openat2``: the probe finds it."""
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
        assert ((major, minor) >= (5, 6)) == (_safefs._probe_openat2() is not None)


class TestNames:
    """Only single path components are accepted."""

    @pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "a\0b"])
    def test_refused(self, name: str) -> None:
        """Empty names, dots, slashes and NUL are refused."""
        with pytest.raises(UnsafeFile, match="single path component"):
            check_name(name)

    @pytest.mark.parametrize("name", ["msg", "1.M1P1.h,S=3:2,S", "..a", "a."])
    def test_accepted(self, name: str) -> None:
        """Ordinary names, dots inside included, are returned as they are."""
        assert name == check_name(name)

    def test_names_are_checked_before_any_open(self, root: Dir) -> None:
        """``open_file`` refuses ``..`` rather than climbing out of the tree."""
        with pytest.raises(UnsafeFile):
            root.open_file("..", "outside", "secret")


class TestOpenRoot:
    """The root is opened by path and must belong to the owner."""

    def test_root_of_another_owner_is_refused(self, tree: Path) -> None:
        """A root that belongs to another uid is refused."""
        with pytest.raises(UnsafeFile, match=f"owned by uid {ME}, not by the mail's owner"):
            Dir.open_root(tree, ME + 1)

    def test_links_above_and_at_the_root_are_followed(self, tree: Path, tmp_path: Path) -> None:
        """The admin's links to the root (a data disk) are followed."""
        (tmp_path / "link").symlink_to(tree)
        with Dir.open_root(tmp_path / "link", ME) as directory:
            assert directory.open_file("cur", "msg") is not None

    def test_missing_root_has_enoent_as_cause(self, tmp_path: Path) -> None:
        """A missing root raises a storage error caused by ``FileNotFoundError``."""
        with pytest.raises(StorageError) as raised:
            Dir.open_root(tmp_path / "missing", ME)
        assert isinstance(raised.value.__cause__, FileNotFoundError)

    def test_file_as_root_is_refused(self, tree: Path) -> None:
        """A regular file is not a maildir root."""
        with pytest.raises(StoragePermanentError, match="ENOTDIR"):
            Dir.open_root(tree / "cur" / "msg", ME)


class TestOpenFile:
    """Files are regular files of the owner, reached without any link."""

    def test_regular_file_is_read_with_its_fstat_size(self, root: Dir) -> None:
        """A regular file opens, with the size ``fstat`` gives, and reads whole."""
        handle = root.open_file("cur", "msg")
        assert handle is not None
        with handle:
            assert (8, b"message\n") == (handle.size, handle.read())

    def test_missing_file_is_none(self, root: Dir) -> None:
        """A missing file, or a missing directory on the way, is ``None``."""
        assert (None, None) == (root.open_file("cur", "gone"), root.open_file("new", "msg"))

    def test_link_to_outside_is_refused(self, root: Dir, tree: Path) -> None:
        """A file that is a link (here to a file outside the tree) is refused, not followed."""
        (tree / "cur" / "link").symlink_to(tree.parent / "outside" / "secret")
        with pytest.raises(UnsafeFile, match="symbolic link"):
            root.open_file("cur", "link")

    def test_link_inside_the_tree_is_refused_too(self, root: Dir, tree: Path) -> None:
        """A link is refused even when it points inside the tree."""
        (tree / "cur" / "link").symlink_to("msg")
        with pytest.raises(UnsafeFile):
            root.open_file("cur", "link")

    def test_linked_directory_on_the_way_is_refused(self, root: Dir, tree: Path) -> None:
        """A directory on the way that is a link (``new -> ../outside``) is refused."""
        (tree / "new").symlink_to(tree.parent / "outside")
        with pytest.raises(UnsafeFile):
            root.open_file("new", "secret")

    def test_fifo_is_refused_without_blocking(self, root: Dir, tree: Path) -> None:
        """A FIFO is refused at once: the open does not wait for a writer."""
        os.mkfifo(tree / "cur" / "fifo")
        with pytest.raises(UnsafeFile, match="not a regular file"):
            in_thread(root.open_file, "cur", "fifo")

    def test_socket_is_refused(self, root: Dir, tree: Path) -> None:
        """A Unix socket is not a regular file."""
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(tree / "cur" / "sock"))
            with pytest.raises(UnsafeFile):
                root.open_file("cur", "sock")

    def test_directory_is_refused(self, root: Dir, tree: Path) -> None:
        """A directory where a file belongs is refused."""
        (tree / "cur" / "dir").mkdir()
        with pytest.raises(UnsafeFile):
            root.open_file("cur", "dir")

    def test_file_of_another_owner_is_refused(self, tree: Path) -> None:
        """A file of another uid (a hard link to someone's file) is refused."""
        if ME == 0:
            os.chown(tree / "cur" / "msg", 4321, 4321)
            owner = 0
            os.chown(tree, owner, -1)
        else:
            owner = ME
            os.link("/etc/passwd", tree / "cur" / "passwd")
        with Dir.open_root(tree, owner) as directory, pytest.raises(UnsafeFile, match="owned by"):
            directory.open_file("cur", "msg" if ME == 0 else "passwd")

    def test_read_stops_at_the_size_at_open(self, root: Dir, tree: Path) -> None:
        """A file growing after the open is read up to the size it had."""
        handle = root.open_file("cur", "msg")
        assert handle is not None
        with (tree / "cur" / "msg").open("ab") as grow:
            grow.write(b"more\n" * 1000)
        with handle:
            assert b"message\n" == b"".join(handle.chunks(3))

    def test_small_file_too_large_is_refused(self, root: Dir, tree: Path) -> None:
        """``read_file`` refuses a file over its limit instead of reading it."""
        (tree / "index").write_bytes(b"x" * 100)
        with pytest.raises(StoragePermanentError, match="more than 99"):
            root.read_file("index", 99)


class TestByRealPath:
    """The one-call open by the maildir's real path refuses links, or defers to the careful way."""

    def test_real_path_has_no_links(self, tree: Path, tmp_path: Path) -> None:
        """A root opened through a link reports the path of the directory itself."""
        (tmp_path / "link").symlink_to(tree)
        with Dir.open_root(tmp_path / "link", ME) as directory:
            assert str(tree.resolve()) == directory.real_path()

    def test_opens_a_regular_file(self, root: Dir, resolver: str) -> None:
        """A message below the real path opens in one call (only with ``openat2``)."""
        real = root.real_path()
        assert real is not None
        handle = open_by_real_path(real, ME, "cur", "msg")
        if resolver == "openat":
            assert handle is None  # no openat2: always the careful way
            return
        assert handle is not None
        with handle:
            assert b"message\n" == handle.read()

    @pytest.mark.parametrize("where", ["file", "directory", "root"])
    def test_a_link_anywhere_defers(self, root: Dir, tree: Path, where: str) -> None:
        """A link as the file, as ``cur/`` or as the root itself: ``None``, nothing opened."""
        real = root.real_path()
        assert real is not None
        if where == "file":
            (tree / "cur" / "msg").unlink()
            (tree / "cur" / "msg").symlink_to(tree.parent / "outside" / "secret")
        elif where == "directory":
            (tree / "cur").rename(tree / "cur.real")
            (tree / "cur").symlink_to(tree / "cur.real")
        else:
            tree.rename(tree.parent / "moved")
            tree.symlink_to(tree.parent / "moved")
        assert open_by_real_path(real, ME, "cur", "msg") is None

    def test_foreign_file_is_refused(self, root: Dir, tree: Path, resolver: str) -> None:
        """What is found must still be a regular file of the owner."""
        real = root.real_path()
        assert real is not None
        os.mkfifo(tree / "cur" / "fifo")
        if resolver == "openat":
            assert open_by_real_path(real, ME, "cur", "fifo") is None
            return
        with pytest.raises(UnsafeFile, match="not a regular file"):
            open_by_real_path(real, ME, "cur", "fifo")


class TestSub:
    """Subdirectories are real directories of the owner."""

    def test_linked_subdirectory_is_refused(self, root: Dir, tree: Path) -> None:
        """A subdirectory that is a link is refused."""
        (tree / "new").symlink_to(tree.parent / "outside")
        with pytest.raises(UnsafeFile):
            root.sub("new")

    def test_missing_is_created_mode_0700(self, root: Dir, tree: Path) -> None:
        """``create=True`` makes a missing subdirectory, private."""
        root.sub("tmp", create=True).close()
        assert 0o700 == stat.S_IMODE((tree / "tmp").stat().st_mode)

    def test_created_for_another_owner_is_given_to_it(self, tree: Path) -> None:
        """As root for another owner, what is created is given to that owner."""
        if ME != 0:
            pytest.fail("only root can create files for another uid: run the suite as root")
        os.chown(tree, 4321, 4322)
        with Dir.open_root(tree, 4321) as directory:
            directory.sub("tmp", create=True).close()
            fd = directory.create("file")
            assert fd is not None
            os.close(fd)
        made = [(tree / name).stat() for name in ("tmp", "file")]
        assert [(4321, 4322)] * 2 == [(st.st_uid, st.st_gid) for st in made]


class TestCreateAndReplace:
    """Files are created with ``O_EXCL`` and replaced by rename, never through a link."""

    def test_create_over_a_link_creates_nothing(self, root: Dir, tree: Path) -> None:
        """``create`` on a link to a missing file makes no file there."""
        target = tree.parent / "outside" / "made"
        (tree / "new-file").symlink_to(target)
        assert (None, False) == (root.create("new-file"), target.exists())

    def test_create_of_existing_file_is_none(self, root: Dir) -> None:
        """``create`` never reuses an existing file."""
        assert root.create("cur") is None

    def test_replace_over_a_link_replaces_the_link(self, root: Dir, tree: Path) -> None:
        """``replace`` of a name that is a link replaces the link; its target is unchanged."""
        secret = tree.parent / "outside" / "secret"
        (tree / "index").symlink_to(secret)
        root.replace("index", b"new index\n")
        assert (b"new index\n", False, SECRET) == (
            (tree / "index").read_bytes(),
            (tree / "index").is_symlink(),
            secret.read_bytes(),
        )

    def test_planted_temporary_link_is_not_written_through(self, root: Dir, tree: Path) -> None:
        """A link planted as ``<name>.tmp`` is removed, not truncated through."""
        secret = tree.parent / "outside" / "secret"
        (tree / "index.tmp").symlink_to(secret)
        root.replace("index", b"new index\n")
        assert (SECRET, False) == (secret.read_bytes(), os.path.lexists(tree / "index.tmp"))


class TestLinkAndUnlink:
    """Hard links check what they linked; unlink removes names, never targets."""

    def test_unlink_of_a_link_keeps_the_target(self, root: Dir, tree: Path) -> None:
        """Unlinking a link removes the link alone."""
        secret = tree.parent / "outside" / "secret"
        (tree / "link").symlink_to(secret)
        assert (True, SECRET) == (root.unlink("link"), secret.read_bytes())

    def test_link_of_a_swapped_file_is_undone(self, root: Dir, tree: Path) -> None:
        """A file swapped for a link between writing and linking is not linked in."""
        fd = root.create("written")
        assert fd is not None
        written = os.fstat(fd)
        (tree / "written").unlink()
        (tree / "written").symlink_to(tree.parent / "outside" / "secret")
        try:
            with root.sub("cur") as cur, pytest.raises(UnsafeFile, match="replaced"):
                root.link("written", cur, "delivered", expect=written)
        finally:
            os.close(fd)
        assert not os.path.lexists(tree / "cur" / "delivered")

    def test_link_never_replaces(self, root: Dir) -> None:
        """Linking onto an existing name says so and changes nothing."""
        fd = root.create("written")
        assert fd is not None
        written = os.fstat(fd)
        os.close(fd)
        with root.sub("cur") as cur:
            assert not root.link("written", cur, "msg", expect=written)


class TestRenameExclusive:
    """``renameat2(RENAME_NOREPLACE)``: renames unless the target exists; moves links themselves."""

    def test_renames_to_a_free_name(self, root: Dir, tree: Path) -> None:
        """The file moves, the same inode under the new name."""
        (tree / "a").write_bytes(b"a")
        before = os.stat(tree / "a").st_ino
        assert root.rename_exclusive("a", "b") is True
        assert (False, before) == ((tree / "a").exists(), os.stat(tree / "b").st_ino)

    def test_never_replaces(self, root: Dir, tree: Path) -> None:
        """An existing target: ``False``, and both files stay as they were."""
        (tree / "a").write_bytes(b"a")
        (tree / "b").write_bytes(b"b")
        assert root.rename_exclusive("a", "b") is False
        assert (b"a", b"b") == ((tree / "a").read_bytes(), (tree / "b").read_bytes())

    def test_missing_source(self, root: Dir) -> None:
        """Nothing to rename: ``None``."""
        assert root.rename_exclusive("nothing", "b") is None

    def test_a_link_is_moved_not_followed(self, root: Dir, tree: Path) -> None:
        """A link at the source is renamed itself; its target stays where it is."""
        secret = tree.parent / "outside" / "secret"
        (tree / "link").symlink_to(secret)
        assert root.rename_exclusive("link", "moved") is True
        assert (True, SECRET) == ((tree / "moved").is_symlink(), secret.read_bytes())

    def test_without_renameat2(
        self, root: Dir, tree: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Where libc has no ``renameat2``: ``None``, and nothing moves."""
        monkeypatch.setattr(_safefs, "_renameat2", None)
        (tree / "a").write_bytes(b"a")
        assert root.rename_exclusive("a", "b") is None
        assert (tree / "a").exists()


class TestFlocked:
    """The ``flock`` helper never waits without a bound."""

    def test_free_lock_is_held(self, root: Dir, tree: Path) -> None:
        """A free lock is taken: another descriptor cannot take it meanwhile."""
        with flocked(root, "lock", timeout=1), (tree / "lock").open("a") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_busy_lock_times_out(self, root: Dir, tree: Path) -> None:
        """A lock held elsewhere raises :class:`LockBusy` after the timeout."""
        with (tree / "lock").open("a") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            with pytest.raises(LockBusy, match=r"locked by another process for more than 0\.2 s"):
                in_thread(_enter, root, 0.2)

    def test_timeout_zero_tries_once(self, root: Dir, tree: Path) -> None:
        """With timeout 0 a busy lock raises at once (for callers that wait elsewhere)."""
        with (tree / "lock").open("a") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            with pytest.raises(LockBusy):
                in_thread(_enter, root, 0)

    def test_busy_lock_without_waiting(self, root: Dir, tree: Path) -> None:
        """``flocked_if_free`` runs the block at once, told the lock is not held."""
        with (tree / "lock").open("a") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            with flocked_if_free(root, "lock") as held:
                assert not held

    def test_free_lock_if_free(self, root: Dir) -> None:
        """``flocked_if_free`` holds a free lock and says so."""
        with flocked_if_free(root, "lock") as held:
            assert held

    def test_linked_lock_file_is_refused_and_creates_nothing(self, root: Dir, tree: Path) -> None:
        """A lock file that is a link to a missing file: refused, nothing created there."""
        target = tree.parent / "outside" / "made"
        (tree / "lock").symlink_to(target)
        with pytest.raises(UnsafeFile), flocked(root, "lock", timeout=1):
            pass
        assert not target.exists()


def _enter(root: Dir, timeout: float) -> None:
    """Take and release the lock ``lock`` of ``root``."""
    with flocked(root, "lock", timeout=timeout):
        pass


class TestReads:
    """The bounded readers."""

    def test_read_upto_stops_at_size(self, tmp_path: Path) -> None:
        """``read_upto`` reads no more than asked, even from a longer file."""
        (tmp_path / "f").write_bytes(b"0123456789")
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            assert b"01234" == read_upto(fd, 5)
        finally:
            os.close(fd)

    def test_read_chunks_stops_at_size(self, tmp_path: Path) -> None:
        """``read_chunks`` yields chunks of at most ``chunk`` octets, ``size`` in all."""
        (tmp_path / "f").write_bytes(b"0123456789")
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            assert [b"012", b"345", b"67"] == list(read_chunks(fd, 8, 3))
        finally:
            os.close(fd)


class TestErrors:
    """``OSError`` becomes the storage error an operator can act on."""

    def test_eloop_is_an_unsafe_file(self) -> None:
        """``ELOOP`` (a link where none may be) is :class:`UnsafeFile`, a permanent error."""
        error = storage_error(OSError(errno.ELOOP, "Too many levels"), "open", "/m/cur/x")
        assert (UnsafeFile, "cannot open /m/cur/x: a symbolic link is on its way (ELOOP)") == (
            type(error),
            str(error),
        )
