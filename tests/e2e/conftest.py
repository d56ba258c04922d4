"""Fixtures for end-to-end tests: a loopback registry, the standard test image, private containerds,
lazysnap under a containerd, byte-counting proxies in front of the registries.

All state lives in short ``/tmp/lz*`` directories (``tests.support.scratch``) that are unmounted
and removed at teardown, also when a test fails. Set ``LZ_KEEP_TMP=1`` to keep them for debugging.
``workdir`` and ``loop`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon, write_config
from tests.support.oci import PushedImage
from tests.support.proxy import CountingProxy

# Re-exported: test_registry_faults imports make_tmpdir and remove_tmpdir from here.
from tests.support.scratch import make_tmpdir as make_tmpdir
from tests.support.scratch import remove_tmpdir as remove_tmpdir
from tests.support.scratch import tmpdir
from tests.support.services import Containerd, Registry, require_privileges

BASE_REPO = "lztest/base"
BASE_TAG = "1"


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A CNCF distribution registry on 127.0.0.1 for the whole session."""
    require_privileges()
    with tmpdir() as workdir, Registry(workdir) as reg:
        yield reg


# One htpasswd user of the password-protected registry; the password must never show up in
# lazysnap's log (the tests grep for it).
AUTH_USER = "lzuser"
AUTH_PASSWORD = "Lz-pa55word-7f3a"


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[Registry]:
    """A second registry on 127.0.0.1 that requires Basic auth (htpasswd) as AUTH_USER."""
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    with tmpdir() as workdir, Registry(workdir, users={AUTH_USER: AUTH_PASSWORD}) as reg:
        yield reg


@pytest.fixture
def proxy(registry: Registry) -> Iterator[CountingProxy]:
    """A byte-counting proxy in front of the session's registry: what clients really download."""
    with CountingProxy.in_front_of(registry.host) as p:
        yield p


@pytest.fixture
def auth_proxy(auth_registry: Registry) -> Iterator[CountingProxy]:
    """A byte-counting proxy in front of the password-protected registry."""
    with CountingProxy.in_front_of(auth_registry.host) as p:
        yield p


@pytest.fixture(scope="session")
def base_image(registry: Registry) -> Iterator[PushedImage]:
    """The standard three-layer test image, pushed as ``<registry>/lztest/base:1``."""
    with tmpdir() as workdir:
        spec = oci.test_image_layers()
        image = oci.build_layout(workdir / "layout", spec.layers, tag=BASE_TAG, cmd=list(spec.cmd))
        ref = oci.push(image.layout_dir, BASE_TAG, registry.host, BASE_REPO)
        yield PushedImage(ref=ref, image=image, expected=spec.expected)


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


LazysnapStack = Callable[..., tuple[LazysnapDaemon, Containerd]]


@pytest.fixture
def lazysnap_stack(containerd_factory: ContainerdFactory) -> Iterator[LazysnapStack]:
    """Start lazysnap and a private containerd using it: ``daemon, cd = lazysnap_stack(**sections)``
    with the daemon's config sections as ``write_config`` takes them, in a directory of its own;
    ``prepare=fn`` runs ``fn(workdir)`` before the daemon starts. At teardown each containerd stops
    before its daemon (it holds mounts of the daemon's layers), then the directory is removed."""
    started: list[tuple[LazysnapDaemon, list[Containerd], Path]] = []

    def make(
        prepare: Callable[[Path], None] | None = None, **sections: Mapping[str, object]
    ) -> tuple[LazysnapDaemon, Containerd]:
        require_privileges()
        workdir = make_tmpdir()
        config = write_config(workdir / "config.toml", sections)
        daemon = LazysnapDaemon(workdir, config=config)
        containerds: list[Containerd] = []
        started.append((daemon, containerds, workdir))
        if prepare is not None:
            prepare(workdir)
        daemon.start()
        containerds.append(containerd_factory(proxy_plugins={SNAPSHOTTER: str(daemon.address)}))
        return daemon, containerds[0]

    yield make
    for daemon, containerds, workdir in reversed(started):
        try:
            for cd in containerds:
                cd.stop()
        finally:
            try:
                daemon.stop()
            finally:
                remove_tmpdir(workdir)


@pytest.fixture
def lazy_stack(lazysnap_stack: LazysnapStack) -> tuple[LazysnapDaemon, Containerd]:
    """lazysnap without background or whole-layer fetch, nor the small-file readahead that
    fetches a file's neighbours (so that what is fetched is what containers read), and a
    containerd that uses it."""
    return lazysnap_stack(
        fetch={"rest": "off"},
    )


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
