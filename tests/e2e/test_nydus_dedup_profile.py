"""The Nydus-like format in the real containerd: chunks shared by two images are fetched once, and a
startup profile recorded by the daemon becomes the prefetch table of a re-conversion."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter import cli
from snapshotter.image import OciLayout, descriptor_json
from tests.e2e.conftest import LazysnapStack
from tests.support import oci
from tests.support.converted import read_index
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon, run_cli
from tests.support.proxy import CountingProxy
from tests.support.scratch import tmpdir
from tests.support.services import Containerd, Registry, require_privileges, run_in_container

SHARED_SIZE = 8 << 20  # eight 1 MiB chunks
SHARED = oci.pseudo_random(SHARED_SIZE, b"lazysnap-shared")
STARTUP = ("/data/{name}.txt", "/data/shared.bin")  # what each image's command reads, in order


@dataclass(frozen=True)
class Images:
    sources: dict[str, str]  # name -> gzip image reference (registry host)
    nydus: dict[str, str]  # name -> repository:tag of the Nydus-like conversion


@pytest.fixture(scope="module")
def images(registry: Registry) -> Iterator[Images]:
    """Two images with the same base layer and, in different top layers, the same 8 MiB file."""
    require_privileges()
    with tmpdir() as workdir:
        sources, converted = {}, {}
        for name in ("first", "second"):
            top = (
                oci.Dir("/data"),
                oci.File(f"/data/{name}.txt", f"I am the {name} image\n".encode()),
                oci.File("/data/shared.bin", SHARED),
            )
            script = f"cat /data/{name}.txt && sha256sum /data/shared.bin"
            image = oci.build_layout(
                workdir / name, (oci.busybox_entries(), top), tag="src", cmd=["/bin/sh", "-c", script]
            )
            sources[name] = oci.push(image.layout_dir, "src", registry.host, f"lztest/dedup-{name}")
            converted[name] = f"lztest/dedup-{name}:nydus"
            args = ["convert", sources[name], f"{registry.host}/{converted[name]}", "--format", "nydus", "-q"]
            assert cli.main(args) == 0
        yield Images(sources, converted)


@pytest.fixture
def recording_stack(lazysnap_stack: LazysnapStack) -> tuple[LazysnapDaemon, Containerd]:
    """lazysnap fetching only what is read (no prefetch, no background) and recording startup
    profiles, under a private containerd."""
    return lazysnap_stack(
        prefetch={"enabled": False},
        fetch={"rest": "off"},
        profile={"record": True, "window_seconds": 120},
    )


def test_shared_chunks_are_fetched_once_and_startup_is_profiled(
    images: Images, proxy: CountingProxy, recording_stack: tuple[LazysnapDaemon, Containerd], tmp_path: Path
) -> None:
    daemon, cd = recording_stack
    want = hashlib.sha256(SHARED).hexdigest()
    first = f"{proxy.host}/{images.nydus['first']}"
    cd.rpull(first)
    out = run_in_container(cd, first, snapshotter=SNAPSHOTTER)
    assert out.splitlines() == ["I am the first image", f"{want}  /data/shared.bin"]
    assert proxy.reset() >= SHARED_SIZE  # the first image had to fetch the shared file

    second = f"{proxy.host}/{images.nydus['second']}"
    cd.rpull(second)
    proxy.reset()
    out = run_in_container(cd, second, snapshotter=SNAPSHOTTER)
    assert out.splitlines() == ["I am the second image", f"{want}  /data/shared.bin"]
    # Its own small file is one chunk; all eight chunks of the shared file come from the cache.
    fetched = proxy.reset()
    assert fetched < 64 << 10, f"the second image fetched {fetched} bytes"
    st = daemon.stats()
    assert st["lazy_mounts"] == 3, st  # one shared base layer and two top layers
    assert {layer["format"] for layer in st["layers"].values()} == {"nydus"}
    # What an operator sees of it: one status line per mounted layer, and the metrics.
    status = run_cli("status", "--root", str(daemon.root))
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()[1:4]]
    assert sorted(r[1] for r in rows) == sorted(d.removeprefix("sha256:")[:12] for d in st["layers"])
    assert {r[2] for r in rows} == {"nydus"} and "3 lazy layers mounted" in status.stdout
    metrics = run_cli("metrics", "--root", str(daemon.root))
    assert metrics.returncode == 0 and "lazysnap_mounted_layers 3.0" in metrics.stdout
    assert 'lazysnap_fs_operation_duration_seconds_count{operation="read"}' in metrics.stdout

    # The profile: what each image's container read first, in order, ready for --prefetch-files.
    exported = run_cli("profile", "export", "--root", str(daemon.root), first)
    assert exported.returncode == 0, exported.stderr
    files = exported.stdout.splitlines()
    expected = [p.format(name="first") for p in STARTUP]
    assert [f for f in files if f.startswith("/data/")] == expected
    assert files.index("/bin/busybox") < files.index(expected[0])  # the shell ran before it read
    missing = run_cli("profile", "export", "--root", str(daemon.root), "127.0.0.1:1/never:run")
    assert missing.returncode == 1 and "no startup profile" in missing.stderr

    # Re-convert with the recorded profile: the files become each layer's prefetch table.
    profile = tmp_path / "startup.txt"
    profile.write_text(exported.stdout)
    layout = tmp_path / "layout"
    args = ["convert", images.sources["first"], f"oci:{layout}:tuned", "--format", "nydus", "-q"]
    assert cli.main([*args, "--prefetch-files", str(profile)]) == 0
    image = OciLayout(layout).resolve("tuned")
    prefetch = [
        read_index(OciLayout(layout).read_blob(d.digest, d.size), descriptor_json(d)).prefetch
        for d in image.layers
    ]
    assert prefetch == [["bin/busybox"], ["data/first.txt", "data/shared.bin"]]
