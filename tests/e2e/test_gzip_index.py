"""Plain gzip images made lazy by a gzip index (``lazysnap index --push``), end to end.

An image of ordinary ``tar+gzip`` layers is pushed to a real distribution registry (which has no
referrers API: the index is found through the referrers tag schema), indexed by the CLI, and
pulled lazily with ``ctr-remote image rpull`` and through CRI ``PullImage``; its tree must equal
containerd's own unpack. Indexes that lie are pushed to repositories of their own (so discovery
finds them for the same image): one for another layer is refused at mount (that layer is pulled
normally, the reason logged), one with a wrong checkpoint fails the reads of its span with EIO,
again and again, while the rest of the file reads fine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.fetcher import CredentialStore, HostsConfig, RegistryClient, parse_reference
from snapshotter.formats import gzindex
from snapshotter.image import LayoutSource
from snapshotter.image.locations import LayoutLocation
from snapshotter.indexer import IndexOptions, build_indexes, push_to_registry
from tests.e2e.test_cri_pull import K8S_NAMESPACE, MakeStack, cri_stack, pull
from tests.support import oci
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon
from tests.support.gzindex import parsed, rewrite, span_of
from tests.support.lazy import wait_until
from tests.support.mounts import lazy_layer_mounts
from tests.support.proxy import CountingProxy
from tests.support.scratch import tmpdir
from tests.support.services import (
    Containerd,
    Registry,
    require_privileges,
    run_container,
    verify_container_fs,
)

__all__ = ["cri_stack"]  # the CRI stack fixture, shared with test_cri_pull

REPO, BAD_SPAN_REPO, WRONG_LAYER_REPO = "lztest/gzidx", "lztest/gzidx-badspan", "lztest/gzidx-wronglayer"
TAG = "plain"
SPAN = 256 << 10  # small spans: several checkpoints inside the text file
LAYERS = 4


def text_file() -> bytes:
    """2 MiB of compressible text, every line different."""
    lines = (f"line {i:07d} of a compressible text file, {i * 7919 % 104729:06d}\n" for i in range(40000))
    return "".join(lines).encode()[: 2 << 20]


@dataclass(frozen=True)
class IndexedImage:
    expected: dict[str, oci.Node]
    text: bytes
    total_size: int  # compressed bytes of all layers
    index_bytes: int
    bad_offset: int  # where the span whose checkpoint lies starts in text.txt


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter", *args], capture_output=True, text=True, check=False, timeout=300
    )


async def push_lying_indexes(host: str, layout: Path, text_layer: str) -> int:
    """Index the image again and push two lying artifacts: under WRONG_LAYER_REPO the first
    layer's index named as another layer's, under BAD_SPAN_REPO an index whose checkpoint inside
    text.txt is one bit off. Returns the text.txt offset whose span lies."""
    source = LayoutSource(LayoutLocation(layout, TAG))
    image = await source.resolve()
    indexes = await build_indexes(source, image, IndexOptions(span=SPAN))
    async with RegistryClient(HostsConfig(None), CredentialStore(None)) as client:
        swapped = list(indexes)
        (first, first_data), (second, _) = swapped[0], swapped[1]
        # The first layer's index blob, announced as the second layer's.
        swapped[1] = (dataclasses.replace(first, digest=second.digest), first_data)
        await push_to_registry(client, parse_reference(f"{host}/{WRONG_LAYER_REPO}:{TAG}"), image, swapped)

        position = next(i for i, (outcome, _) in enumerate(indexes) if outcome.digest == text_layer)
        outcome, data = indexes[position]
        index = parsed(data, outcome.digest, outcome.size)
        chunk = index.entries["data/text.txt"].chunks[2]  # starts at a checkpoint inside the file
        delta = 1 if index.resume_points[chunk.compressed_offset].bit < 7 else -1
        bad = rewrite(data, span_of(index, chunk.compressed_offset), bit_delta=delta)
        lying = list(indexes)
        digest = "sha256:" + hashlib.sha256(bad).hexdigest()
        lying[position] = (dataclasses.replace(outcome, index_digest=digest, index_size=len(bad)), bad)
        await push_to_registry(client, parse_reference(f"{host}/{BAD_SPAN_REPO}:{TAG}"), image, lying)
    return chunk.file_offset


@pytest.fixture(scope="module")
def indexed(registry: Registry) -> Iterator[IndexedImage]:
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    with tmpdir() as workdir:
        spec = oci.test_image_layers()
        text = text_file()
        extra = (
            oci.Dir("/data"),
            oci.File("/data/text.txt", text),
            oci.File("/data/random.bin", oci.pseudo_random(512 << 10, b"gzindex")),
        )
        layers = (*spec.layers, extra)
        image = oci.build_layout(workdir / "layout", layers, tag=TAG, cmd=list(spec.cmd))
        for repo in (REPO, BAD_SPAN_REPO, WRONG_LAYER_REPO):
            oci.push(image.layout_dir, TAG, registry.host, repo)
        done = cli(
            "index", f"{registry.host}/{REPO}:{TAG}", "--push", "--span", "256K", "--hosts-dir", str(workdir)
        )
        assert done.returncode == 0, done.stderr
        print(done.stdout)
        index_bytes = sum(
            int(line.split(" -> index ")[1].split()[0])
            for line in done.stdout.splitlines()
            if " -> index " in line
        )
        text_layer = image.layers[-1].digest
        bad_offset = asyncio.run(push_lying_indexes(registry.host, image.layout_dir, text_layer))
        yield IndexedImage(
            expected=oci.apply_layers(layers),
            text=text,
            total_size=sum(b.size for b in image.layers),
            index_bytes=index_bytes,
            bad_offset=bad_offset,
        )


def formats(daemon: LazysnapDaemon) -> list[str]:
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict)
    return sorted(layer["format"] for layer in layers.values())


def read_text(cd: Containerd, ref: str, offset: int, size: int = 65536) -> subprocess.CompletedProcess[str]:
    """The sha256 of the ``size`` bytes at ``offset`` of text.txt, read in a container (which fails
    when the read does)."""
    dd = f"/bin/busybox dd if=/data/text.txt of=/tmp/piece bs={size} skip={offset // size} count=1"
    script = f"{dd} 2>/dev/null && /bin/busybox sha256sum /tmp/piece"
    return run_container(cd, ref, "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER)


def test_index_is_small_and_rpull_is_lazy(
    indexed: IndexedImage, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    assert indexed.index_bytes < indexed.total_size * 0.05, (indexed.index_bytes, indexed.total_size)
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{REPO}:{TAG}"
    cd.rpull(ref)
    pulled = proxy.reset()
    st = daemon.stats()
    assert st["lazy_mounts"] == LAYERS and not st["not_lazy"], st
    assert formats(daemon) == [gzindex.FORMAT] * LAYERS
    assert len(lazy_layer_mounts(daemon.root)) == LAYERS
    # Manifests, the referrers list, the artifact and the indexes: a few percent of the image.
    assert pulled < indexed.total_size * 0.1, f"rpull downloaded {pulled} of {indexed.total_size} bytes"

    offset = 1 << 20
    done = read_text(cd, ref, offset)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == hashlib.sha256(indexed.text[offset : offset + 65536]).hexdigest()
    read_cost = proxy.reset()
    assert read_cost < indexed.total_size / 2, f"reading 64 KiB fetched {read_cost} bytes"

    assert verify_container_fs(cd, ref, indexed.expected, snapshotter=SNAPSHOTTER) == []
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict) and all(layer["verify_failures"] == 0 for layer in layers.values())


def test_cri_pull_of_an_indexed_image_is_lazy(
    indexed: IndexedImage, proxy: CountingProxy, cri_stack: MakeStack
) -> None:
    stack = cri_stack([proxy.host])
    ref = f"{proxy.host}/{REPO}:{TAG}"
    pull(stack.containerd_cri, ref)
    pulled = proxy.reset()
    st = stack.daemon.stats()
    assert st["lazy_mounts"] == LAYERS and not st["not_lazy"], st
    assert formats(stack.daemon) == [gzindex.FORMAT] * LAYERS
    assert pulled < indexed.total_size * 0.1
    assert stack.containerd.namespace == K8S_NAMESPACE
    assert verify_container_fs(stack.containerd, ref, indexed.expected, snapshotter=SNAPSHOTTER) == []


def test_an_index_for_another_layer_is_refused_and_that_layer_pulled_normally(
    indexed: IndexedImage, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{WRONG_LAYER_REPO}:{TAG}"
    cd.rpull(ref)
    st = daemon.stats()
    assert st["not_lazy"] == {"bad-gzip-index": 1}, st
    assert st["lazy_mounts"] == LAYERS - 1, st
    log = daemon.log_path.read_text(errors="replace")
    assert "bad-gzip-index" in log and "index is for layer" in log
    assert verify_container_fs(cd, ref, indexed.expected, snapshotter=SNAPSHOTTER) == []


def test_a_lying_checkpoint_fails_its_span_and_nothing_of_it_is_served(
    indexed: IndexedImage, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{BAD_SPAN_REPO}:{TAG}"
    cd.rpull(ref)
    assert daemon.stats()["lazy_mounts"] == LAYERS
    good = read_text(cd, ref, 0)
    assert good.returncode == 0 and good.stdout.split()[0] == hashlib.sha256(indexed.text[:65536]).hexdigest()
    # A read that starts inside the span (one that starts before it returns the bytes before it:
    # a short read). Failed bytes are never cached: the second read fails the same way.
    inside = (indexed.bad_offset // 65536 + 1) * 65536
    for _ in range(2):
        bad = read_text(cd, ref, inside)
        assert bad.returncode != 0, bad.stdout
    whole = run_container(cd, ref, "/bin/busybox", "cat", "/data/text.txt", snapshotter=SNAPSHOTTER)
    assert whole.returncode != 0 and len(whole.stdout) < indexed.bad_offset + 4096
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict) and sum(layer["verify_failures"] for layer in layers.values()) >= 2
    assert "chunk failed verification" in daemon.log_path.read_text(errors="replace")


def test_a_restarted_daemon_mounts_indexed_layers_from_their_stored_index(
    indexed: IndexedImage, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{REPO}:{TAG}"
    cd.rpull(ref)
    first = read_text(cd, ref, 0)
    assert first.returncode == 0, first.stderr
    targets = sorted(lazy_layer_mounts(daemon.root))
    daemon.stop()
    proxy.stop()  # the registry is gone while the daemon restarts: the stored indexes suffice
    daemon.start()
    assert sorted(lazy_layer_mounts(daemon.root)) == targets
    assert formats(daemon) == [gzindex.FORMAT] * LAYERS
    # containerd's channel to the snapshotter may back off for a few seconds after the restart.
    assert wait_until(lambda: read_text(cd, ref, 0).stdout == first.stdout, timeout=30)  # the chunk cache
