"""Lazy pulls from a registry that wants credentials (distribution with ``auth: htpasswd``, Basic).

containerd gets the credentials on its command line (``rpull --user``); lazysnap gets them from a
docker ``config.json`` (``fetch.docker_config``). Without them lazysnap cannot read the registry,
so every layer is pulled normally by containerd, and the stats say why: ``auth-failed``. The
password never appears in lazysnap's log.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import AUTH_PASSWORD, AUTH_USER, ContainerdFactory, make_tmpdir, remove_tmpdir
from tests.support import mounts
from tests.support.daemon import LazysnapDaemon, write_config
from tests.support.proxy import CountingProxy
from tests.support.services import (
    Containerd,
    EstargzImage,
    Registry,
    build_estargz_image,
    require_privileges,
    run_in_container,
    verify_container_fs,
)

SNAPSHOTTER = "lazysnap"
LAYERS = 4

Stack = Callable[[str], tuple[LazysnapDaemon, Containerd]]


@pytest.fixture(scope="module")
def private_image(registry: Registry, auth_registry: Registry) -> Iterator[EstargzImage]:
    workdir = make_tmpdir()
    try:
        yield build_estargz_image(
            workdir,
            registry,
            auth_registry.host,
            "lztest/private:esgz",
            push_user=f"{AUTH_USER}:{AUTH_PASSWORD}",
        )
    finally:
        remove_tmpdir(workdir)


@pytest.fixture
def proxy(auth_registry: Registry) -> Iterator[CountingProxy]:
    host, port = auth_registry.host.split(":")
    p = CountingProxy(host, int(port)).start()
    yield p
    p.stop()


@pytest.fixture
def stack(containerd_factory: ContainerdFactory) -> Iterator[Stack]:
    """``stack(docker_config_json)``: lazysnap reading that docker config (no background fetch, so
    laziness shows), and a containerd using it."""
    started: list[tuple[LazysnapDaemon, Containerd | None, Path]] = []

    def make(docker_config: str) -> tuple[LazysnapDaemon, Containerd]:
        require_privileges()
        workdir = make_tmpdir()
        config_json = workdir / "docker" / "config.json"  # absent unless docker_config is given
        if docker_config:
            config_json.parent.mkdir(mode=0o700)
            config_json.write_text(docker_config)
            config_json.chmod(0o600)
        config = write_config(
            workdir / "config.toml",
            {
                "prefetch": {"background": False, "fetch_whole_below_bytes": 0},
                "fetch": {"docker_config": str(config_json)},
            },
        )
        daemon = LazysnapDaemon(workdir, config=config)
        started.append((daemon, None, workdir))
        daemon.start()
        cd = containerd_factory(proxy_plugins={SNAPSHOTTER: str(daemon.address)})
        started[-1] = (daemon, cd, workdir)
        return daemon, cd

    yield make
    for daemon, cd, workdir in started:  # containerd first: it holds mounts of lazysnap's layers
        try:
            if cd is not None:
                cd.stop()
        finally:
            daemon.stop()
            remove_tmpdir(workdir)


def docker_config(host: str, user: str, password: str) -> str:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}})


def fuse_mounts_under(path: Path) -> list[str]:
    return [m.target for m in mounts.mounts_under(path) if m.fstype.startswith("fuse")]


def assert_password_not_logged(daemon: LazysnapDaemon) -> None:
    log = daemon.log_path.read_text(errors="replace")
    encoded = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    assert AUTH_PASSWORD not in log and encoded not in log


def test_lazy_pull_with_credentials_from_docker_config(
    private_image: EstargzImage, proxy: CountingProxy, stack: Stack
) -> None:
    daemon, cd = stack(docker_config(proxy.host, AUTH_USER, AUTH_PASSWORD))
    ref = f"{proxy.host}/{private_image.repo_tag}"
    cd.rpull(ref, extra_args=["--user", f"{AUTH_USER}:{AUTH_PASSWORD}"])
    pulled = proxy.reset()
    st = daemon.stats()
    assert st["lazy_mounts"] == LAYERS and not st["not_lazy"], st
    assert len(fuse_mounts_under(daemon.root)) == LAYERS
    assert pulled < private_image.total_size * 0.1, f"rpull fetched {pulled} of {private_image.total_size}"

    # A range of the large file, read through FUSE with lazysnap's own credentials.
    script = (
        "/bin/busybox dd if=/data/large.bin bs=65536 skip=40 count=16 2>/dev/null | /bin/busybox sha256sum"
    )
    out = run_in_container(cd, ref, "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER)
    assert out.split()[0] == hashlib.sha256(private_image.large[40 * 65536 : 56 * 65536]).hexdigest()
    assert verify_container_fs(cd, ref, private_image.expected, snapshotter=SNAPSHOTTER) == []
    layers = daemon.stats()["layers"]
    assert sum(layer["bytes"]["on_demand"] for layer in layers.values()) > 0
    assert_password_not_logged(daemon)


@pytest.mark.parametrize("creds", ["none", "wrong-password"])
def test_without_valid_credentials_layers_are_pulled_normally(
    private_image: EstargzImage, proxy: CountingProxy, stack: Stack, creds: str
) -> None:
    config = docker_config(proxy.host, AUTH_USER, "not-" + AUTH_PASSWORD[::-1]) if creds != "none" else ""
    daemon, cd = stack(config)
    ref = f"{proxy.host}/{private_image.repo_tag}"
    cd.rpull(ref, extra_args=["--user", f"{AUTH_USER}:{AUTH_PASSWORD}"])  # containerd itself has them
    st = daemon.stats()
    assert st["lazy_mounts"] == 0 and st["not_lazy"] == {"auth-failed": LAYERS}, st
    assert fuse_mounts_under(daemon.root) == []
    assert proxy.reset() >= private_image.total_size  # containerd downloaded every layer
    assert verify_container_fs(cd, ref, private_image.expected, snapshotter=SNAPSHOTTER) == []
    assert "auth-failed" in daemon.log_path.read_text(errors="replace")
    assert_password_not_logged(daemon)
