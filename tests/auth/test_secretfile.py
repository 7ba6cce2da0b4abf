"""The server secret file (scram_secret_file): made once, kept, checked."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pobox.auth.secretfile import load_secret
from pobox.errors import ConfigError


class TestLoadSecret:
    """load_secret()."""

    def test_made_once_and_kept(self, tmp_path: Path) -> None:
        """A missing file is made (0600, 32 random bytes in hex); later loads read it back."""
        path = tmp_path / "s"
        first = load_secret(path)
        assert (32, 0o600) == (len(first), path.stat().st_mode & 0o777)
        assert first == load_secret(path)
        assert first.hex() + "\n" == path.read_text()
        assert [] == [p.name for p in tmp_path.iterdir() if p.name != "s"]  # no temp files

    def test_concurrent_starts_agree(self, tmp_path: Path) -> None:
        """Servers starting at once end up with one key."""
        path = tmp_path / "s"
        with ThreadPoolExecutor(8) as pool:
            keys = set(pool.map(lambda _: load_secret(path), range(16)))
        assert 1 == len(keys)

    @pytest.mark.parametrize("text", ["", "xyz\n", "ab" * 15 + "\n"])
    def test_unusable_content_refused(self, tmp_path: Path, text: str) -> None:
        """A file without at least 32 hex digits is an error naming the key."""
        path = tmp_path / "s"
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"^scram_secret_file: .* hexadecimal digits"):
            load_secret(path)

    def test_symlink_refused(self, tmp_path: Path) -> None:
        """The secret is not read through a symlink."""
        (tmp_path / "real").write_text("ab" * 32 + "\n")
        os.symlink(tmp_path / "real", tmp_path / "s")
        with pytest.raises(ConfigError, match=r"^scram_secret_file: "):
            load_secret(tmp_path / "s")

    def test_unwritable_folder(self, tmp_path: Path) -> None:
        """A file that cannot be made is an error naming the key."""
        with pytest.raises(ConfigError, match=r"^scram_secret_file: "):
            load_secret(tmp_path / "missing-dir" / "s")
