"""The benchmark's image plumbing without containerd or a registry: deterministic layouts and
tars, apt output parsing, and the Nydus-like variant written from a builder's blobs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, cast

import pytest

from benchmarks import debian, harness, images
from benchmarks import layout as oci_layout
from snapshotter.formats import TOC_DIGEST_ANNOTATION, build_estargz
from tests.support.services import Registry, require_privileges


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_gzip_layer_is_deterministic_and_records_diff_id(tmp_path: Path) -> None:
    src = _tar(tmp_path / "l.tar", {"a": b"x" * 100_000, "b/c": b"hello"})
    first = oci_layout.gzip_layer(tmp_path / "one", src)
    second = oci_layout.gzip_layer(tmp_path / "two", src)
    assert first == second
    assert first.diff_id == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    blob = (tmp_path / "one" / "blobs" / "sha256" / first.digest.split(":")[1]).read_bytes()
    assert len(blob) == first.size and gzip.decompress(blob) == src.read_bytes()
    assert [p.name for p in (tmp_path / "one" / "blobs" / "sha256").iterdir()] == [first.digest.split(":")[1]]


def test_write_image_tags_and_reads_back(tmp_path: Path) -> None:
    lay = tmp_path / "layout"
    src = _tar(tmp_path / "l.tar", {"f": b"data"})
    layer = oci_layout.gzip_layer(lay, src)
    oci_layout.write_image(lay, "gzip", [layer])
    oci_layout.write_image(lay, "gzip", [layer])  # re-tagging replaces, not duplicates
    oci_layout.write_image(lay, "other", [layer], env=["PATH=/x"])
    assert sorted(oci_layout.tags(lay)) == ["gzip", "other"]
    assert oci_layout.image_size(lay, "gzip") == layer.size
    assert oci_layout.env(lay, "other") == ["PATH=/x"]
    assert list(oci_layout.layer_tars(lay, "gzip")) == [src.read_bytes()]
    config_digest = oci_layout.manifest(lay, "gzip")["config"]["digest"]
    config = json.loads((lay / "blobs" / "sha256" / config_digest.split(":")[1]).read_text())
    assert config["rootfs"]["diff_ids"] == [layer.diff_id]


def test_model_image_is_reproducible(tmp_path: Path) -> None:
    require_privileges(binaries=("busybox",))  # busybox-static; a failure, not a skip, in CI
    source = images.ModelImage(shard_mib=1, shards=2)
    digests = []
    for name in ("a", "b"):
        scratch = tmp_path / name
        scratch.mkdir()
        source.build(scratch / "layout", scratch, tmp_path)
        digests.append(oci_layout.manifest(scratch / "layout", "gzip"))
    assert digests[0] == digests[1]
    assert len(digests[0]["layers"]) == 4  # base, config, two shards
    tars = list(oci_layout.layer_tars(tmp_path / "a" / "layout", "gzip"))
    with tarfile.open(fileobj=io.BytesIO(tars[2])) as tf:
        member = tf.getmember("model/shard-0.bin")
        data = cast(io.BufferedReader, tf.extractfile(member)).read()
    assert len(data) == 1 << 20 and len(gzip.compress(data)) > len(data)  # incompressible


def test_pseudo_random_blocks() -> None:
    blocks = list(images.pseudo_random_blocks(2_500_000, b"s"))
    assert [len(b) for b in blocks] == [1 << 20, 1 << 20, 2_500_000 - (2 << 20)]
    assert b"".join(blocks) == b"".join(images.pseudo_random_blocks(2_500_000, b"s"))
    assert blocks[0] != next(images.pseudo_random_blocks(1 << 20, b"t"))


def test_reader_serves_blocks_in_any_read_size() -> None:
    reader = images._Reader(iter([b"abc", b"", b"defg", b"h"]))
    assert reader.read(2) == b"ab"
    assert reader.read(4) == b"cdef"
    assert reader.read() == b"gh"
    assert reader.read(3) == b""


def test_write_tar_is_deterministic_with_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "a.so").write_bytes(b"elf")
    os.link(root / "usr" / "lib" / "a.so", root / "usr" / "lib" / "b.so")
    (root / "lib").symlink_to("usr/lib")
    (root / "usr" / "bin").mkdir()
    (root / "usr" / "bin" / "tool").symlink_to("../lib/a.so")
    debian.write_tar(root, tmp_path / "one.tar")
    os.utime(root / "usr" / "lib" / "a.so", (0, 0))  # time stamps do not matter
    debian.write_tar(root, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with tarfile.open(tmp_path / "one.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members["lib"].issym() and members["lib"].linkname == "usr/lib"
    assert members["usr/lib/b.so"].islnk() and members["usr/lib/b.so"].linkname == "usr/lib/a.so"
    assert {m.mtime for m in members.values()} == {debian.FIXED_MTIME}


def test_apt_simulate_lines_parse() -> None:
    lines = [
        "Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []",
        "Inst busybox-static (1:1.35.0-4+deb12u1+b1 Debian:12.15/oldstable [amd64])",
        "Inst media-types (10.0.0 Debian:12.15/oldstable [all])",
        "Conf libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])",
    ]
    found = [debian.Package(*m.groups()) for line in lines if (m := debian._INST.match(line))]
    assert [str(p) for p in found] == [
        "libc6=2.36-9+deb12u14",
        "busybox-static=1:1.35.0-4+deb12u1+b1",
        "media-types=10.0.0",
    ]
    assert found[1].filename == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
    assert found[2].arch == "all"


def test_base_files_add_busybox_applets(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busybox").write_bytes(b"")
    (tmp_path / "bin" / "cat").write_bytes(b"real cat")
    debian.add_base_files(tmp_path)
    assert os.readlink(tmp_path / "bin" / "sh") == "busybox"
    assert (tmp_path / "bin" / "cat").read_bytes() == b"real cat"  # a package's file wins
    assert (tmp_path / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (tmp_path / "etc" / "passwd").read_text().startswith("root:")


def test_nydus_variant_is_written_from_the_builders_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = tmp_path / "layout"
    descs = [
        oci_layout.gzip_layer(lay, _tar(tmp_path / f"{i}.tar", {f"f{i}": bytes([i]) * 5000}))
        for i in range(2)
    ]
    oci_layout.write_image(lay, "gzip", descs, env=["PATH=/bin", "X=1"])
    (tmp_path / "built.json").write_text(json.dumps({"variants": {}}))
    calls: list[dict[str, Any]] = []

    def fake_build(tars: list[bytes], chunk_size: int, prioritized_files: tuple[str, ...] = ()) -> list[Any]:
        calls.append({"n": len(tars), "chunk_size": chunk_size, "prioritized": prioritized_files})
        return [build_estargz(t, chunk_size=chunk_size) for t in tars]

    monkeypatch.setattr(harness, "nydus_builder", lambda: fake_build)
    image_set = harness.ImageSet(images.ModelImage(1, 1), cast(Registry, None), tmp_path, tmp_path)
    image_set._convert_nydus(lay)
    assert calls == [{"n": 2, "chunk_size": harness.NYDUS_CHUNK, "prioritized": ()}]
    manifest = oci_layout.manifest(lay, "nydus")
    assert [layer["mediaType"] for layer in manifest["layers"]] == [oci_layout.MEDIA_TYPE_LAYER_GZIP] * 2
    assert all(TOC_DIGEST_ANNOTATION in layer["annotations"] for layer in manifest["layers"])
    assert oci_layout.env(lay, "nydus") == ["PATH=/bin", "X=1"]
    assert "nydus" in images.variant_stamps(lay)


def test_cached_layout_builds_once(tmp_path: Path) -> None:
    built: list[Path] = []

    class Source:
        slug = "fake"

        def key(self, cache: Path) -> str:
            return "fake-1"

        def approx_bytes(self) -> int:
            return 1

        def build(self, layout: Path, scratch: Path, cache: Path) -> None:
            built.append(layout)
            (scratch / "junk").write_text("left over")
            oci_layout.write_image(layout, "gzip", [])

    first = images.cached_layout(Source(), tmp_path)
    second = images.cached_layout(Source(), tmp_path)
    assert first == second == tmp_path / "images" / "fake-1" / "layout"
    assert len(built) == 1
    assert sorted(p.name for p in first.parent.iterdir()) == ["built.json", "layout"]
    shutil.rmtree(first.parent / "layout")
