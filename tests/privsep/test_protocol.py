"""The helper's requests: every field checked as if the serving process were hostile."""

from __future__ import annotations

from typing import Any

import pytest

from pobox.records import Quota, User
from pobox.storage.base import (
    MaildropLocked,
    MessageGone,
    MessageInfo,
    QuotaExceeded,
    StoragePermanentError,
    StorageTemporaryError,
)
from pobox.storage.privsep import OwnerRefused
from pobox.storage.privsep._protocol import (
    InvalidRequest,
    error_from_wire,
    error_to_wire,
    messages_from_wire,
    messages_to_wire,
    parse_request,
    user_to_wire,
)

USER = {"name": "alice", "uid": 1000, "gid": 1000, "home": "/home/alice", "mail": None}


class TestParseRequest:
    """parse_request returns checked values or refuses, naming the field."""

    def test_open(self) -> None:
        """A well-formed open request gives a User record and the lock flag."""
        request_id, op, args = parse_request({"id": 7, "op": "open", "user": USER, "lock": True})
        assert (7, "open") == (request_id, op)
        assert User("alice", uid=1000, gid=1000, home="/home/alice") == args["user"]
        assert args["lock"] is True

    def test_open_folders(self) -> None:
        """Folder names come back canonical (``inbox`` is ``INBOX``)."""
        _, op, args = parse_request(
            {
                "id": 1,
                "op": "open_folders",
                "user": USER,
                "lock": False,
                "folders": ["inbox", "Junk"],
            }
        )
        assert ("open_folders", ("INBOX", "Junk")) == (op, args["folders"])

    @pytest.mark.parametrize(
        "folders", [[], ["../x"], [".Junk"], ["a/b"], ["Junk\nX"], [7], "Junk", ["J"] * 65]
    )
    def test_open_folders_refused(self, folders: object) -> None:
        """A folder that could leave the maildir, or a list that is not one, is refused."""
        frame = {"id": 1, "op": "open_folders", "user": USER, "lock": True, "folders": folders}
        with pytest.raises(InvalidRequest, match="folder"):
            parse_request(frame)

    def test_messages_keep_their_folder(self) -> None:
        """A snapshot's folders and header ends survive the wire; INBOX messages go as four
        fields, the folder fifth."""
        messages = (
            MessageInfo("a", 1, "u1"),
            MessageInfo("Junk/b", 2, "u2", header_end=True, folder="Junk"),
        )
        wire = messages_to_wire(messages)
        assert [["a", 1, "u1", None], ["Junk/b", 2, "u2", True, "Junk"]] == wire
        assert messages == messages_from_wire(wire)

    def test_deliver(self) -> None:
        """A deliver request's header becomes bytes (Latin-1 code points) and quota a Quota."""
        _, _, args = parse_request(
            {
                "id": 1,
                "op": "deliver",
                "user": USER,
                "header": "Return-Path: <\u00e9>\n",
                "quota": [100, 2],
                "wire_size": 10,
                "digest": "0" * 64,
            }
        )
        assert b"Return-Path: <\xe9>\n" == args["header"]
        assert Quota(100, 2) == args["quota"]

    @pytest.mark.parametrize(
        ("frame", "error"),
        [
            ({"op": "open", "user": USER, "lock": True}, r"^id: expected a positive integer"),
            ({"id": 0, "op": "close", "handle": 1}, r"^id: "),
            ({"id": True, "op": "close", "handle": 1}, r"^id: "),
            ({"id": 1, "op": "exec", "cmd": "sh"}, r"^op: expected one of"),
            ({"id": 1, "op": "open", "user": USER}, r"^open: expected the fields"),
            ({"id": 1, "op": "open", "user": USER, "lock": 1}, r"^lock: expected true or false"),
            (
                {"id": 1, "op": "open", "user": USER, "lock": True, "uid": 0},
                r"^open: expected the fields",
            ),
            ({"id": 1, "op": "open", "user": {**USER, "uid": -1}, "lock": True}, r"^user.uid: "),
            (
                {"id": 1, "op": "open", "user": {**USER, "uid": 2**32 - 1}, "lock": True},
                r"^user.uid: ",
            ),
            ({"id": 1, "op": "open", "user": {**USER, "uid": "0"}, "lock": True}, r"^user.uid: "),
            ({"id": 1, "op": "open", "user": {**USER, "name": ""}, "lock": True}, r"^user.name: "),
            (
                {"id": 1, "op": "open", "user": {**USER, "home": "/a\0b"}, "lock": True},
                r"^user.home: ",
            ),
            ({"id": 1, "op": "open", "user": {"name": "a"}, "lock": True}, r"^user: expected"),
            ({"id": 1, "op": "fetch", "handle": 0, "key": "k"}, r"^handle: "),
            ({"id": 1, "op": "fetch", "handle": 1, "key": "x" * 5000}, r"^key: "),
            ({"id": 1, "op": "delete", "handle": 1, "keys": "abc"}, r"^keys: "),
            ({"id": 1, "op": "delete", "handle": 1, "keys": [1]}, r"^keys\[\]: "),
            ({"id": 1, "op": "file", "key": None}, r"^key: "),
        ],
    )
    def test_refused(self, frame: dict[str, Any], error: str) -> None:
        """Missing, extra, mistyped and out-of-range fields are refused, naming the field."""
        with pytest.raises(InvalidRequest, match=error):
            parse_request(frame)

    @pytest.mark.parametrize(
        ("field", "value", "error"),
        [
            ("header", "\u0100", r"^header: characters above U\+00FF"),
            ("header", "x" * 70_000, r"^header: expected a string"),
            ("quota", [1], r"^quota: "),
            ("quota", [-1, 0], r"^quota\[0\]: "),
            ("wire_size", 1.5, r"^wire_size: "),
            ("digest", "A" * 64, r"^digest: "),
        ],
    )
    def test_deliver_refused(self, field: str, value: object, error: str) -> None:
        """Each field of a deliver request is checked."""
        frame = {
            "id": 3,
            "op": "deliver",
            "user": USER,
            "header": "",
            "quota": None,
            "wire_size": 0,
            "digest": "0" * 64,
            field: value,
        }
        with pytest.raises(InvalidRequest, match=error) as caught:
            parse_request(frame)
        assert 3 == caught.value.request_id

    def test_user_round_trip(self) -> None:
        """A user record sent by the proxy reads back the same."""
        user = User("bob@example.org", uid=None, gid=1234, home=None, mail="maildir:/m/%u")
        _, _, args = parse_request({"id": 1, "op": "usage", "user": user_to_wire(user)})
        assert user == args["user"]


class TestErrors:
    """Storage errors cross the boundary as kinds and come back as the same classes."""

    @pytest.mark.parametrize(
        "exc",
        [
            MaildropLocked("locked"),
            MessageGone("gone"),
            QuotaExceeded("full"),
            OwnerRefused("uid 0"),
            StoragePermanentError("perm"),
            StorageTemporaryError("temp"),
            InvalidRequest("bad"),
        ],
    )
    def test_round_trip(self, exc: Exception) -> None:
        """Each kind comes back as its own class with its message."""
        back = error_from_wire(error_to_wire(exc))
        assert (type(exc), str(exc)) == (type(back), str(back))

    def test_other_exceptions_hide_their_text(self) -> None:
        """An unexpected exception crosses as a temporary error naming only its type."""
        back = error_from_wire(error_to_wire(KeyError("/secret/path")))
        assert (StorageTemporaryError, "storage helper: KeyError") == (type(back), str(back))

    def test_malformed_error(self) -> None:
        """A malformed error field is a temporary error."""
        assert isinstance(error_from_wire("oops"), StorageTemporaryError)
