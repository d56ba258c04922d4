"""Fixtures for end-to-end tests: a loopback registry, the standard test image, private containerds.

All state lives in short ``/tmp/lz*`` directories (unix sockets are limited to
108 bytes) that are unmounted and removed at teardown, also when a test fails.
Set ``LZ_KEEP_TMP=1`` to keep them for debugging.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:  # allow `from tests.support ...` under any pytest import mode
    sys.path.insert(0, _REPO_ROOT)

from tests.support import mounts, oci  # noqa: E402
from tests.support.daemon import LazysnapDaemon, write_config  # noqa: E402
from tests.support.oci import PushedImage  # noqa: E402
from tests.support.services import Containerd, Registry, require_privileges  # noqa: E402

BASE_REPO = "lztest/base"
BASE_TAG = "1"


def make_tmpdir() -> Path:
    """A short private temp dir (``/tmp/lzXXXXXXXX``)."""
    return Path(tempfile.mkdtemp(prefix="lz", dir="/tmp"))


def remove_tmpdir(path: Path) -> None:
    """Unmount everything below ``path``, then delete it (never deletes through a mount)."""
    left = mounts.unmount_all(path)
    if left:
        raise RuntimeError(f"could not unmount {[m.target for m in left]}; leaving {path} in place")
    if os.environ.get("LZ_KEEP_TMP") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A CNCF distribution registry on 127.0.0.1 for the whole session."""
    require_privileges()
    workdir = make_tmpdir()
    reg = Registry(workdir)
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()
        remove_tmpdir(workdir)


# One htpasswd user of the password-protected registry; the password must never show up in
# lazysnap's log (the tests grep for it).
AUTH_USER = "lzuser"
AUTH_PASSWORD = "Lz-pa55word-7f3a"


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[Registry]:
    """A second registry on 127.0.0.1 that requires Basic auth (htpasswd) as AUTH_USER."""
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    workdir = make_tmpdir()
    reg = Registry(workdir, users={AUTH_USER: AUTH_PASSWORD})
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()
        remove_tmpdir(workdir)


@pytest.fixture(scope="session")
def base_image(registry: Registry) -> Iterator[PushedImage]:
    """The standard three-layer test image, pushed as ``<registry>/lztest/base:1``."""
    workdir = make_tmpdir()
    try:
        spec = oci.test_image_layers()
        image = oci.build_layout(workdir / "layout", spec.layers, tag=BASE_TAG, cmd=list(spec.cmd))
        ref = oci.push(image.layout_dir, BASE_TAG, registry.host, BASE_REPO)
        yield PushedImage(ref=ref, image=image, expected=spec.expected)
    finally:
        remove_tmpdir(workdir)


ContainerdFactory = Callable[..., Containerd]


@pytest.fixture
def containerd_factory() -> Iterator[ContainerdFactory]:
    """Start private containerd instances: ``containerd_factory(proxy_plugins={"lazysnap": sock})``.

    Every instance is stopped at teardown (tasks and shims killed by PID, mounts
    removed) and its temp dir deleted.
    """
    started: list[tuple[Containerd, Path]] = []

    def make(proxy_plugins: Mapping[str, str] | None = None, **kwargs: object) -> Containerd:
        require_privileges()
        workdir = make_tmpdir()
        cd = Containerd(workdir, proxy_plugins, **kwargs)  # type: ignore[arg-type]
        started.append((cd, workdir))
        return cd.start()

    yield make
    errors: list[str] = []
    for cd, workdir in reversed(started):
        try:
            left = cd.stop()
            if left:
                errors.append(f"mounts left under {workdir}: {[m.target for m in left]}")
            remove_tmpdir(workdir)
        except Exception as exc:
            errors.append(f"{workdir}: {exc}")
    if errors:
        pytest.fail("containerd teardown problems:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def lazy_stack(containerd_factory: ContainerdFactory) -> Iterator[tuple[LazysnapDaemon, Containerd]]:
    """lazysnap without background or whole-layer fetch, nor the small-file readahead that
    fetches a file's neighbours (so that what is fetched is what containers read), and a
    containerd that uses it; containerd stops first."""
    require_privileges()
    workdir = make_tmpdir()
    config = write_config(
        workdir / "config.toml",
        {
            "prefetch": {"background": False, "fetch_whole_below_bytes": 0},
            "read": {"small_file_readahead_bytes": 0},
        },
    )
    daemon = LazysnapDaemon(workdir, config=config)
    try:
        daemon.start()
        cd = containerd_factory(proxy_plugins={"lazysnap": str(daemon.address)})
        yield daemon, cd
        cd.stop()
    finally:
        daemon.stop()
        remove_tmpdir(workdir)


@pytest.fixture
def containerd(containerd_factory: ContainerdFactory) -> Containerd:
    """A private containerd with only built-in snapshotters (default: overlayfs)."""
    return containerd_factory()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e with ``e2e``."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)
