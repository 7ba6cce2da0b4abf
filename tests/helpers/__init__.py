"""Helpers shared by pobox's tests and benchmarks (real external servers, fixtures)."""

from __future__ import annotations

import shutil

import pytest

__all__ = ["need"]


def need(tool: str) -> str:
    """Return the path of ``tool``; fail (never skip) when it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/install-deps --test")
    return path
