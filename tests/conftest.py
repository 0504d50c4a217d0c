"""Test-session setup shared by every test module."""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # The native CPU kernel is built into a cache on first use: the suite builds its own,
    # from the checked-out source, and leaves the user's ~/.cache alone.
    os.environ.setdefault("DROPGRAD_CACHE_DIR", tempfile.mkdtemp(prefix="dropgrad-test-cache-"))
