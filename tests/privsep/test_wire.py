"""Frames between the serving process and the helper: JSON over SOCK_SEQPACKET, SCM_RIGHTS."""

from __future__ import annotations

import array
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from pobox.storage.privsep._wire import (
    MAX_DATAGRAM,
    FrameAssembler,
    WireError,
    decode,
    encode,
    receive_datagram,
    receive_frame,
    send_frame,
    socket_pair,
    split,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected socket pair, closed at the end."""
    left, right = socket_pair()
    left.settimeout(10)
    right.settimeout(10)
    yield left, right
    left.close()
    right.close()


def _receive(sock: socket.socket, limit: int = 1 << 30) -> tuple[dict[str, object], list[int]]:
    """Receive one whole frame."""
    received = receive_frame(sock, FrameAssembler(limit))
    assert received is not None
    return received


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestFrames:
    """A frame is one JSON object in datagrams, each with a flag octet."""

    def test_small_frame_is_one_datagram(self) -> None:
        """A small frame is one datagram whose flag octet says "last"."""
        assert [b'\x00{"id":1}'] == split(encode({"id": 1}))

    def test_large_frame_round_trip(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A frame larger than a datagram arrives whole, in order."""
        left, right = pair
        keys = [f"key-{n}-" + "x" * 40 for n in range(5000)]
        assert len(encode({"keys": keys})) > 3 * MAX_DATAGRAM
        sender = threading.Thread(target=send_frame, args=(left, {"keys": keys}))
        sender.start()  # more than the socket buffer holds: the reader must read meanwhile
        received = _receive(right)
        sender.join(30)
        assert ({"keys": keys}, []) == received

    def test_surrogates_survive(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """File names that are not UTF-8 (lone surrogates) cross unchanged."""
        left, right = pair
        name = b"caf\xe9".decode("utf-8", "surrogateescape")
        send_frame(left, {"key": name})
        assert name == _receive(right)[0]["key"]

    def test_descriptor_passed(self, pair: tuple[socket.socket, socket.socket], tmp_path) -> None:
        """A descriptor sent with a frame arrives open, close-on-exec, on the same file."""
        left, right = pair
        path = tmp_path / "f"
        path.write_bytes(b"content")
        fd = os.open(path, os.O_RDONLY)
        send_frame(left, {"op": "x"}, [fd])
        os.close(fd)
        message, fds = _receive(right)
        try:
            assert 1 == len(fds)
            assert b"content" == os.pread(fds[0], 100, 0)
            assert not os.get_inheritable(fds[0])
        finally:
            for received in fds:
                os.close(received)
        assert {"op": "x"} == message

    def test_end_of_file(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A closed peer reads as None."""
        left, right = pair
        left.close()
        assert receive_datagram(right) is None


class TestLimits:
    """What breaks the rules is refused, and descriptors never leak."""

    def test_frame_over_limit(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A frame longer than the receiver allows is a WireError."""
        left, right = pair
        send_frame(left, {"pad": "x" * 50_000})
        with pytest.raises(WireError, match=r"frame over 1000 octets"):
            _receive(right, limit=1000)

    def test_bad_flag(self) -> None:
        """A flag octet other than 0 and 1 is refused."""
        with pytest.raises(WireError, match=r"malformed datagram"):
            FrameAssembler(100).feed(b"\x07{}", [])

    def test_descriptors_on_later_datagram_closed(self, tmp_path) -> None:
        """Descriptors riding on a datagram after the first are refused and closed."""
        assembler = FrameAssembler(1000)
        assert assembler.feed(b"\x01{", []) is None
        fd = os.open(tmp_path, os.O_RDONLY)
        with pytest.raises(WireError):
            assembler.feed(b"\x00}", [fd])
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)

    def test_too_many_descriptors_closed(
        self, pair: tuple[socket.socket, socket.socket], tmp_path
    ) -> None:
        """More descriptors than MAX_FDS: a WireError, and none of them stays open here."""
        left, right = pair
        fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(5)]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        left.sendmsg([b"\x00{}"], rights)
        for fd in fds:
            os.close(fd)
        before = _open_fds()
        with pytest.raises(WireError, match=r"over the limits"):
            receive_datagram(right)
        assert before == _open_fds()

    def test_truncated_datagram(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """A datagram longer than MAX_DATAGRAM is truncated by the kernel and refused."""
        left, right = pair
        left.send(b"\x00" + b" " * MAX_DATAGRAM)
        with pytest.raises(WireError):
            receive_datagram(right)

    @pytest.mark.parametrize(
        "payload",
        [b"[1, 2]", b"not json", b"\xff\xfe", b"[" * 100_000, b"1" * 5000],
    )
    def test_not_an_object(self, payload: bytes) -> None:
        """Anything but a JSON object (or JSON nested beyond reason) is a WireError."""
        with pytest.raises(WireError):
            decode(payload)
