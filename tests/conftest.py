"""Fixtures every kind of test uses (unit, integration, end-to-end), each defined once here.

Fixtures of one kind live next to its tests: ``tests/integration/conftest.py`` (a started daemon),
``tests/e2e/conftest.py`` (registry, containerd, the standard image).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:  # allow `from tests.support ...` under any pytest import mode
    sys.path.insert(0, _REPO_ROOT)

from tests.support.lazy import running_loop  # noqa: E402
from tests.support.scratch import tmpdir  # noqa: E402
from tests.support.services import require_privileges  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_the_working_directory() -> Iterator[None]:
    """libfuse's loop (the per-file FUSE backend, in-process in some tests) moves the process to
    "/"; tests that start ``python -m tests...`` subprocesses need the repository as cwd."""
    yield
    if os.getcwd() != _REPO_ROOT:
        os.chdir(_REPO_ROOT)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private directory under /tmp (unix sockets fit); whatever the test mounted below it
    is unmounted and the directory removed, also when the test fails."""
    with tmpdir() as path:
        yield path


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as the daemon's loop runs beside FUSE threads."""
    with running_loop() as loop:
        yield loop


@pytest.fixture
def privileged() -> None:
    """Root and /dev/fuse, for tests that mount (a skip, or a failure with ``CI=true``, without)."""
    require_privileges(binaries=())
