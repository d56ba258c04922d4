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
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import AUTH_PASSWORD, AUTH_USER, LazysnapStack
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon
from tests.support.mounts import lazy_layer_mounts
from tests.support.proxy import CountingProxy
from tests.support.scratch import tmpdir
from tests.support.services import (
    Containerd,
    EstargzImage,
    Registry,
    build_estargz_image,
    run_in_container,
    verify_container_fs,
)

LAYERS = 4

Stack = Callable[[str], tuple[LazysnapDaemon, Containerd]]


@pytest.fixture(scope="module")
def private_image(registry: Registry, auth_registry: Registry) -> Iterator[EstargzImage]:
    with tmpdir() as workdir:
        yield build_estargz_image(
            workdir,
            registry,
            auth_registry.host,
            "lztest/private:esgz",
            push_user=f"{AUTH_USER}:{AUTH_PASSWORD}",
        )


@pytest.fixture
def stack(lazysnap_stack: LazysnapStack, tmp_path: Path) -> Stack:
    """``stack(docker_config_json)``: lazysnap reading that docker config (none for ""), without
    background fetch so laziness shows, and a containerd using it."""

    def make(docker_config: str) -> tuple[LazysnapDaemon, Containerd]:
        config_json = Path(tempfile.mkdtemp(dir=tmp_path)) / "config.json"  # a 0700 directory
        if docker_config:
            config_json.write_text(docker_config)
            config_json.chmod(0o600)
        return lazysnap_stack(
            fetch={"rest": "off", "docker_config": str(config_json)},
        )

    return make


def docker_config(host: str, user: str, password: str) -> str:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}})


def assert_password_not_logged(daemon: LazysnapDaemon) -> None:
    log = daemon.log_path.read_text(errors="replace")
    encoded = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    assert AUTH_PASSWORD not in log and encoded not in log


def test_lazy_pull_with_credentials_from_docker_config(
    private_image: EstargzImage, auth_proxy: CountingProxy, stack: Stack
) -> None:
    daemon, cd = stack(docker_config(auth_proxy.host, AUTH_USER, AUTH_PASSWORD))
    ref = f"{auth_proxy.host}/{private_image.repo_tag}"
    cd.rpull(ref, extra_args=["--user", f"{AUTH_USER}:{AUTH_PASSWORD}"])
    pulled = auth_proxy.reset()
    st = daemon.stats()
    assert st["lazy_mounts"] == LAYERS and not st["not_lazy"], st
    assert len(lazy_layer_mounts(daemon.root)) == LAYERS
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
    private_image: EstargzImage, auth_proxy: CountingProxy, stack: Stack, creds: str
) -> None:
    config = (
        docker_config(auth_proxy.host, AUTH_USER, "not-" + AUTH_PASSWORD[::-1]) if creds != "none" else ""
    )
    daemon, cd = stack(config)
    ref = f"{auth_proxy.host}/{private_image.repo_tag}"
    cd.rpull(ref, extra_args=["--user", f"{AUTH_USER}:{AUTH_PASSWORD}"])  # containerd itself has them
    st = daemon.stats()
    assert st["lazy_mounts"] == 0 and st["not_lazy"] == {"auth-failed": LAYERS}, st
    assert lazy_layer_mounts(daemon.root) == []
    assert auth_proxy.reset() >= private_image.total_size  # containerd downloaded every layer
    assert verify_container_fs(cd, ref, private_image.expected, snapshotter=SNAPSHOTTER) == []
    assert "auth-failed" in daemon.log_path.read_text(errors="replace")
    assert_password_not_logged(daemon)
