"""Scratch directories of tests and benchmarks: short paths under /tmp, unmounted and removed after.

Paths are short (``/tmp/lzXXXXXXXX``) because unix socket paths are limited to 108 bytes. Removal
unmounts everything below first and never deletes through a mount that would not go away; it uses
``rm -rf``, which has no recursion limit (tests build very deep trees). Set ``LZ_KEEP_TMP=1`` to
keep the directories for debugging.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.mounts import unmount_all


def make_tmpdir(prefix: str = "lz") -> Path:
    """A new private directory ``/tmp/<prefix>XXXXXXXX``."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_tmpdir(path: Path) -> None:
    """Unmount everything at or below ``path``, then delete it; RuntimeError (and ``path`` left in
    place) if a mount stays."""
    left = unmount_all(path)
    if left:
        raise RuntimeError(f"could not unmount {[m.target for m in left]}; leaving {path} in place")
    if os.environ.get("LZ_KEEP_TMP") != "1":
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


@contextmanager
def tmpdir(prefix: str = "lz") -> Iterator[Path]:
    """:func:`make_tmpdir`, removed with :func:`remove_tmpdir` on the way out, also on failure."""
    path = make_tmpdir(prefix)
    try:
        yield path
    finally:
        remove_tmpdir(path)
