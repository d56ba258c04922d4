"""Fixtures of the integration tests (the daemon, FUSE and kernel mounts, without containerd).

``workdir`` and ``loop`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import LazysnapDaemon


@pytest.fixture
def daemon(workdir: Path) -> Iterator[LazysnapDaemon]:
    """``lazysnap serve`` with its defaults, its root, socket and log under ``workdir``, started;
    stopped (with its FUSE manager) after the test."""
    d = LazysnapDaemon(workdir)
    try:
        d.start()
        yield d
    finally:
        d.stop()
