"""The Nydus-like format in the real containerd: chunks shared by two images are fetched once, and a
startup profile recorded by the daemon becomes the prefetch table of a re-conversion."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter import cli
from snapshotter.formats import nydus
from snapshotter.image.ocilayout import OciLayout
from tests.e2e.conftest import ContainerdFactory, make_tmpdir, remove_tmpdir
from tests.support import oci
from tests.support.daemon import LazysnapDaemon, run_cli, write_config
from tests.support.proxy import CountingProxy
from tests.support.services import Registry, require_privileges, run_in_container

SNAPSHOTTER = "lazysnap"
SHARED_SIZE = 8 << 20  # eight 1 MiB chunks
SHARED = oci._pseudo_random(SHARED_SIZE, b"lazysnap-shared")
STARTUP = ("/data/{name}.txt", "/data/shared.bin")  # what each image's command reads, in order


@dataclass(frozen=True)
class Images:
    sources: dict[str, str]  # name -> gzip image reference (registry host)
    nydus: dict[str, str]  # name -> repository:tag of the Nydus-like conversion


def busybox_layer() -> tuple[oci.Entry, ...]:
    bb = Path("/bin/busybox").read_bytes()
    applets = (oci.Symlink(f"/bin/{a}", "busybox") for a in oci.BUSYBOX_APPLETS)
    return (oci.Dir("/bin"), oci.File("/bin/busybox", bb, mode=0o755), *applets)


@pytest.fixture(scope="module")
def images(registry: Registry) -> Iterator[Images]:
    """Two images with the same base layer and, in different top layers, the same 8 MiB file."""
    require_privileges()
    workdir = make_tmpdir()
    try:
        sources, converted = {}, {}
        for name in ("first", "second"):
            top = (
                oci.Dir("/data"),
                oci.File(f"/data/{name}.txt", f"I am the {name} image\n".encode()),
                oci.File("/data/shared.bin", SHARED),
            )
            script = f"cat /data/{name}.txt && sha256sum /data/shared.bin"
            image = oci.build_layout(
                workdir / name, (busybox_layer(), top), tag="src", cmd=["/bin/sh", "-c", script]
            )
            sources[name] = oci.push(image.layout_dir, "src", registry.host, f"lztest/dedup-{name}")
            converted[name] = f"lztest/dedup-{name}:nydus"
            args = ["convert", sources[name], f"{registry.host}/{converted[name]}", "--format", "nydus", "-q"]
            assert cli.main(args) == 0
        yield Images(sources, converted)
    finally:
        remove_tmpdir(workdir)


@pytest.fixture
def proxy(registry: Registry) -> Iterator[CountingProxy]:
    host, port = registry.host.split(":")
    p = CountingProxy(host, int(port)).start()
    yield p
    p.stop()


@pytest.fixture
def recording_stack(containerd_factory: ContainerdFactory) -> Iterator[tuple[LazysnapDaemon, object]]:
    """lazysnap fetching only what is read (no prefetch, no background) and recording startup
    profiles, under a private containerd."""
    workdir = make_tmpdir()
    config = write_config(
        workdir / "config.toml",
        {
            "prefetch": {"enabled": False, "background": False, "fetch_whole_below_bytes": 0},
            "profile": {"record": True, "window_seconds": 120},
        },
    )
    daemon = LazysnapDaemon(workdir, config=config)
    try:
        daemon.start()
        cd = containerd_factory(proxy_plugins={SNAPSHOTTER: str(daemon.address)})
        yield daemon, cd
        cd.stop()
    finally:
        daemon.stop()
        remove_tmpdir(workdir)


def test_shared_chunks_are_fetched_once_and_startup_is_profiled(
    images: Images, proxy: CountingProxy, recording_stack: tuple[LazysnapDaemon, object]
) -> None:
    daemon, cd = recording_stack
    want = hashlib.sha256(SHARED).hexdigest()
    first = f"{proxy.host}/{images.nydus['first']}"
    cd.rpull(first)  # type: ignore[attr-defined]
    out = run_in_container(cd, first, snapshotter=SNAPSHOTTER)  # type: ignore[arg-type]
    assert out.splitlines() == ["I am the first image", f"{want}  /data/shared.bin"]
    assert proxy.reset() >= SHARED_SIZE  # the first image had to fetch the shared file

    second = f"{proxy.host}/{images.nydus['second']}"
    cd.rpull(second)  # type: ignore[attr-defined]
    proxy.reset()
    out = run_in_container(cd, second, snapshotter=SNAPSHOTTER)  # type: ignore[arg-type]
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
    workdir = make_tmpdir()
    try:
        profile = workdir / "startup.txt"
        profile.write_text(exported.stdout)
        layout = workdir / "layout"
        args = ["convert", images.sources["first"], f"oci:{layout}:tuned", "--format", "nydus", "-q"]
        assert cli.main([*args, "--prefetch-files", str(profile)]) == 0
        image = OciLayout(layout).resolve("tuned")
        prefetch = []
        for desc in image.layers:
            blob = OciLayout(layout).read_blob(desc.digest, desc.size)
            location = nydus.locate_bootstrap(blob[-nydus.FOOTER_SIZE :], len(blob))
            raw = blob[location.offset : location.offset + location.length]
            expected_digest = desc.annotations[nydus.BOOTSTRAP_DIGEST_ANNOTATION]
            index = nydus.parse_bootstrap(raw, location, blob_size=len(blob), expected_digest=expected_digest)
            prefetch.append(index.prefetch)
        assert prefetch == [["bin/busybox"], ["data/first.txt", "data/shared.bin"]]
    finally:
        remove_tmpdir(workdir)
