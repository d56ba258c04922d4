"""A startup profile recorded by one daemon, pushed to the registry, used by another (issue 13.4).

Daemon A records what a container of an eStargz image (converted with no prioritized files, so
its layers carry no prefetch list of their own) reads first; ``lazysnap profile push`` attaches
that profile to the image manifest in a real distribution registry (no referrers API: the
referrers tag schema). Daemon B, with a root of its own and nothing recorded, pulls the image
lazily: it finds the profile pinned to the pulled manifest, fetches those files before the
container asks and says so in its stats; the container's files verify and it reads nothing on
demand. Daemon C, the same but with ``[profile] shared = false``, does not use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from snapshotter import cli
from tests.e2e.conftest import LazysnapStack
from tests.support import oci
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon, run_cli
from tests.support.lazy import wait_until
from tests.support.scratch import tmpdir
from tests.support.services import Registry, require_privileges, run_in_container, verify_container_fs

READ = {
    "/data/config.txt": b"threads = 4\n",
    "/data/model.bin": oci.pseudo_random(3 << 20, b"lazysnap-profile-model"),
}
UNREAD = oci.pseudo_random(4 << 20, b"lazysnap-profile-unread")  # never read: never prefetched
SCRIPT = "cat /data/config.txt && sha256sum /data/model.bin"


@dataclass(frozen=True)
class Image:
    reference: str
    expected: dict[str, oci.Node]


@pytest.fixture(scope="module")
def image(registry: Registry) -> Iterator[Image]:
    require_privileges()
    with tmpdir() as workdir:
        top = (
            oci.Dir("/data"),
            *(oci.File(path, data) for path, data in READ.items()),
            oci.File("/data/unread.bin", UNREAD),
        )
        layers = (oci.busybox_entries(), top)
        built = oci.build_layout(workdir / "src", layers, tag="src", cmd=["/bin/sh", "-c", SCRIPT])
        source = oci.push(built.layout_dir, "src", registry.host, "lztest/profile-src")
        reference = f"{registry.host}/lztest/profile:estargz"
        assert cli.main(["convert", source, reference, "--format", "estargz", "-q"]) == 0
        yield Image(reference, oci.apply_layers(layers))


def expected_output() -> list[str]:
    return ["threads = 4", f"{hashlib.sha256(READ['/data/model.bin']).hexdigest()}  /data/model.bin"]


def lazy_layers(daemon: LazysnapDaemon) -> dict[str, Any]:
    layers: dict[str, Any] = daemon.stats()["layers"]
    return layers


def test_a_profile_recorded_by_one_daemon_is_used_by_another(
    lazysnap_stack: LazysnapStack, image: Image
) -> None:
    # A records what the container reads first. (Its per-file FUSE backend sees reads file by
    # file; the EROFS backend sees blob ranges, whose readahead may touch a neighbouring file.)
    recorder, cd_a = lazysnap_stack(
        fs={"backend": "fuse"}, fetch={"rest": "off"}, profile={"record": True, "window_seconds": 120}
    )
    cd_a.rpull(image.reference)
    assert run_in_container(cd_a, image.reference, snapshotter=SNAPSHOTTER).splitlines() == expected_output()
    assert {layer["startup_source"] for layer in lazy_layers(recorder).values()} == {"layer"}
    pushed = run_cli("profile", "push", "--root", str(recorder.root), image.reference)
    assert pushed.returncode == 0, pushed.stderr
    assert "attached to sha256:" in pushed.stdout and "referrers tag" in pushed.stdout  # distribution 2.8

    # B, a fresh root with nothing recorded, finds it pinned to the manifest it pulls.
    daemon, cd_b = lazysnap_stack(fetch={"rest": "off"})
    cd_b.rpull(image.reference)
    layers = lazy_layers(daemon)
    assert len(layers) == 2 and {layer["startup_source"] for layer in layers.values()} == {"shared"}
    assert wait_until(lambda: all(layer["prefetch_done"] for layer in lazy_layers(daemon).values()))
    layers = lazy_layers(daemon)
    profiles = daemon.stats()["profiles"]
    assert profiles["shared_found"] == 1 and profiles["layers_by_source"] == {"shared": 2}
    assert sum(layer["startup_files"] for layer in layers.values()) >= 3  # busybox, config, model
    data_layer = max(layers.values(), key=lambda layer: layer["blob_size"])
    prefetched = data_layer["bytes"]["prefetch"]
    assert len(READ["/data/model.bin"]) // 2 < prefetched < len(UNREAD)  # the model, not unread.bin
    assert run_in_container(cd_b, image.reference, snapshotter=SNAPSHOTTER).splitlines() == expected_output()
    after = lazy_layers(daemon)
    assert sum(layer["bytes"]["on_demand"] for layer in after.values()) == 0  # all there before it asked
    assert verify_container_fs(cd_b, image.reference, image.expected, snapshotter=SNAPSHOTTER) == []
    assert "using a shared startup profile" in daemon.log_path.read_text()

    # C: discovery switched off: the layers' own (empty) prefetch lists.
    off, cd_c = lazysnap_stack(fetch={"rest": "off"}, profile={"shared": False})
    cd_c.rpull(image.reference)
    layers = lazy_layers(off)
    assert {layer["startup_source"] for layer in layers.values()} == {"layer"}
    assert all(layer["bytes"]["prefetch"] == 0 for layer in layers.values())
    assert off.stats()["profiles"]["shared_found"] == 0
    assert "shared startup profile" not in off.log_path.read_text()
