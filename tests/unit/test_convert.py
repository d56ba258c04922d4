"""``lazysnap convert`` without a network: OCI layouts in, OCI layouts out.

Covers the option parsers, the OCI layout reader/writer (round trip, digest and size checks,
index selection), and whole conversions whose output is read back with the project's own
parsers and compared entry by entry (attributes, xattrs, links, bytes) with the source tars.
The checks of converted images are ``tests.support.converted``, shared with the registry and
end-to-end tests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zstandard

from snapshotter import cli
from snapshotter.convert import (
    ConvertError,
    ConvertOptions,
    check_options,
    convert,
    decompress,
    parse_prefetch_file,
    parse_size,
)
from snapshotter.fetcher import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    InvalidReferenceError,
    Platform,
    parse_reference,
)
from snapshotter.image import (
    OCI_CONFIG,
    LayoutDigestError,
    LayoutError,
    LayoutLocation,
    LayoutSource,
    LayoutTarget,
    OciLayout,
    PlainProgress,
    RegistryLocation,
    descriptor_json,
    parse_location,
    summary_text,
)
from snapshotter.image.progress import BarProgress, Phase
from tests.support.converted import check_converted, read_layout_image, sha256

LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
MTIME = 1_600_000_000
SMALL_CHUNKS = 64 << 10


# -- source images ---------------------------------------------------------------------------------


def make_tar(entries: Sequence[tuple[str, bytes, dict[str, Any]]]) -> bytes:
    """A PAX tar of (name, data, attributes) where attributes may set type, mode, uid, gid,
    linkname and pax_headers (xattrs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, attrs in entries:
            info = tarfile.TarInfo(name)
            info.type = attrs.get("type", tarfile.REGTYPE)
            info.mode = attrs.get("mode", 0o755 if info.type == tarfile.DIRTYPE else 0o644)
            info.uid, info.gid = attrs.get("uid", 0), attrs.get("gid", 0)
            info.mtime = MTIME
            info.linkname = attrs.get("linkname", "")
            info.pax_headers = attrs.get("pax_headers", {})
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def pseudo_random(n: int, seed: bytes) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += hashlib.sha256(seed + len(out).to_bytes(8, "big")).digest()
    return bytes(out[:n])


def source_tars() -> list[bytes]:
    """Three layers with what a converter must carry over: modes, owners, xattrs, links, a file
    spanning several chunks, an empty file, a whiteout and an opaque directory."""
    d = {"type": tarfile.DIRTYPE}
    return [
        make_tar(
            [
                ("bin", b"", d),
                ("bin/tool", pseudo_random(200_000, b"tool"), {"mode": 0o4755}),
                ("etc", b"", d),
                ("etc/motd", b"motd 1\n", {}),
                ("data", b"", d),
                ("data/old", b"", d),
                ("data/old/a", b"old a\n", {}),
                ("data/gone", b"to be deleted\n", {}),
            ]
        ),
        make_tar(
            [
                ("etc", b"", d),
                ("etc/motd", b"motd 2\n", {"uid": 1000, "gid": 1000, "mode": 0o640}),
                ("etc/empty", b"", {}),
                ("etc/tagged", b"x", {"pax_headers": {"SCHILY.xattr.user.color": "blue"}}),
                ("etc/hard", b"", {"type": tarfile.LNKTYPE, "linkname": "etc/motd"}),
                ("etc/soft", b"", {"type": tarfile.SYMTYPE, "linkname": "motd", "mode": 0o777}),
            ]
        ),
        make_tar(
            [
                ("data", b"", d),
                ("data/.wh.gone", b"", {}),
                ("data/old", b"", d),
                ("data/old/.wh..wh..opq", b"", {}),
                ("data/old/b", b"new b\n", {}),
            ]
        ),
    ]


def compress(tar: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(tar, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


def write_image(
    path: Path,
    tars: Sequence[bytes],
    *,
    tag: str = "1",
    compressions: Sequence[str] = ("gzip", "zstd", "none"),
    config_type: str = OCI_CONFIG,
    manifest_type: str = OCI_MANIFEST,
    layer_types: Sequence[str] | None = None,
    diff_ids: Sequence[str] | None = None,
) -> OciLayout:
    """An OCI layout holding one image of ``tars`` (written with our own layout writer)."""
    layout = OciLayout(path)
    layout.create()
    layers = []
    for i, tar in enumerate(tars):
        how = compressions[i % len(compressions)]
        blob = compress(tar, how)
        media_type = layer_types[i] if layer_types else LAYER_TYPES[how]
        layers.append(Descriptor(media_type, layout.write_blob(blob), len(blob)))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids or [sha256(t) for t in tars])},
        "history": [{"created_by": f"step {i}"} for i in range(len(tars))],
    }
    layout.write_image(
        config,
        layers,
        tag=tag,
        media_type=manifest_type,
        config_media_type=config_type,
        annotations={"org.example.source": "unit test"},
    )
    return layout


# -- option parsing --------------------------------------------------------------------------------


def test_prefetch_file_lines_comments_and_records(tmp_path: Path) -> None:
    path = tmp_path / "prefetch"
    path.write_text(
        "# what the app reads at startup\n"
        "/bin/tool\n"
        "\n"
        "   etc/motd  \n"
        '{"path": "/etc/tagged"}\n'
        "/bin/tool\n"
        "  # indented comment\n"
        "/with space/and#hash\n"
    )
    assert parse_prefetch_file(path) == ("/bin/tool", "etc/motd", "/etc/tagged", "/with space/and#hash")


def test_prefetch_file_errors(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        parse_prefetch_file(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text("/ok\n{not json\n")
    with pytest.raises(ValueError, match=r"bad:2: a line starting with"):
        parse_prefetch_file(bad)
    bad.write_text('{"file": "/x"}\n')
    with pytest.raises(ValueError, match=r'bad:1: JSON line has no "path"'):
        parse_prefetch_file(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4194304", 4 << 20),
        ("4M", 4 << 20),
        ("4MiB", 4 << 20),
        ("4mb", 4 << 20),
        ("512K", 512 << 10),
        ("1G", 1 << 30),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "4X", "-1", "1.5M", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_check_options() -> None:
    check_options(ConvertOptions("estargz"))
    for bad, match in [
        (ConvertOptions("squashfs"), "unknown format"),
        (ConvertOptions("estargz", chunk_size=100), "chunk size 100 is outside"),
        (ConvertOptions("nydus", chunk_size=3 << 20), "nydus chunk size"),
        (ConvertOptions("estargz", compression_level=12), r"outside \[0, 9\]"),
        (ConvertOptions("zstdchunked", compression_level=0), r"outside \[1, 22\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_options(bad)


def test_locations() -> None:
    assert parse_location("oci:/tmp/dir:v1") == LayoutLocation(Path("/tmp/dir"), "v1")
    assert parse_location("oci:rel/dir") == LayoutLocation(Path("rel/dir"), None)
    assert parse_location("127.0.0.1:5000/a/b:1") == RegistryLocation(parse_reference("127.0.0.1:5000/a/b:1"))
    assert parse_location("docker://example.com/app") == RegistryLocation(
        parse_reference("example.com/app:latest")
    )
    assert str(parse_location("oci:/x:t")) == "oci:/x:t"
    for bad in ["oci:", "oci:/dir:", "Bad//ref", "oci-archive:/x.tar", "http://example.com/app"]:
        with pytest.raises(InvalidReferenceError):
            parse_location(bad)


# -- OCI layouts -----------------------------------------------------------------------------------


def test_layout_round_trip(tmp_path: Path) -> None:
    tars = source_tars()
    layout = write_image(tmp_path / "img", tars, tag="v1")
    assert (tmp_path / "img" / "oci-layout").read_text() == '{"imageLayoutVersion": "1.0.0"}'
    again = OciLayout(tmp_path / "img")
    image = again.resolve("v1")
    assert again.resolve() == image  # the only image: no tag needed
    assert [
        decompress(again.read_blob(d.digest, d.size), c)
        for d, c in zip(image.layers, ("gzip", "zstd", "none"), strict=True)
    ] == tars
    assert image.annotations == {"org.example.source": "unit test"}
    # Tagging again replaces the entry of that tag and keeps the others.
    layout.tag(Descriptor(OCI_MANIFEST, image.digest, len(image.manifest)), "v2")
    layout.tag(Descriptor(OCI_MANIFEST, image.digest, len(image.manifest)), "v1")
    assert sorted(layout.tags()) == ["v1", "v2"]
    # No temp files left behind, blobs readable by others.
    blob_dir = tmp_path / "img" / "blobs" / "sha256"
    assert not [p for p in blob_dir.iterdir() if p.name.startswith(".tmp")]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in blob_dir.iterdir())


def test_layout_rejects_corrupt_and_missing_blobs(tmp_path: Path) -> None:
    layout = write_image(tmp_path / "img", source_tars())
    image = layout.resolve("1")
    victim = layout.blob_path(image.layers[0].digest)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(LayoutDigestError, match="does not match its digest"):
        layout.read_blob(image.layers[0].digest)
    with pytest.raises(LayoutDigestError, match="descriptor says 5"):
        layout.read_blob(image.layers[1].digest, 5)
    layout.blob_path(image.layers[2].digest).unlink()
    with pytest.raises(LayoutError, match="is missing"):
        layout.read_blob(image.layers[2].digest)
    with pytest.raises(LayoutError, match="invalid digest"):
        layout.read_blob("sha256:../../etc/passwd")


def test_layout_selection(tmp_path: Path) -> None:
    tars = source_tars()
    layout = write_image(tmp_path / "img", tars[:1], tag="amd")
    amd = layout.resolve("amd")
    arm_config = {"architecture": "arm64", "os": "linux", "rootfs": {"diff_ids": []}}
    arm = layout.write_image(arm_config, [], tag="arm", platform=Platform("linux", "arm64")).digest
    # Two images, no tag: the linux/amd64 one (or the one asked for).
    assert layout.resolve().digest == amd.digest
    assert layout.resolve(platform=Platform("linux", "arm64")).digest == arm
    with pytest.raises(LayoutError, match=r"no image tagged 'x' \(tags: amd, arm\)"):
        layout.resolve("x")
    with pytest.raises(LayoutError, match=r"holds 2 images; name one as oci:.*:TAG \(tags: amd, arm\)"):
        layout.resolve(platform=Platform("linux", "s390x"))
    # A multi-platform index under one tag is narrowed to the platform.
    entries = [
        Descriptor(OCI_MANIFEST, image.digest, len(image.manifest), platform=platform)
        for image, platform in ((layout.resolve("arm"), Platform("linux", "arm64")), (amd, Platform()))
    ]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor_json(e) for e in entries]}
    layout.tag(layout.write_json(index, OCI_INDEX), "multi")
    assert layout.resolve("multi").digest == amd.digest
    assert layout.resolve("multi", Platform("linux", "arm64")).digest == arm


def test_layout_writes_streams_and_canonical_images(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "img")
    layout.create()
    chunks = [b"a" * 1000, b"", b"b" * 3000]
    digest, size = layout.write_blob_stream(iter(chunks))
    assert (digest, size) == (sha256(b"".join(chunks)), 4000)
    assert layout.read_blob(digest, size) == b"".join(chunks)

    def broken() -> Iterator[bytes]:
        yield b"half a blob"
        raise OSError("source went away")

    with pytest.raises(OSError, match="source went away"):
        layout.write_blob_stream(broken())
    blob_dir = tmp_path / "img" / "blobs" / "sha256"
    assert [p.name for p in blob_dir.iterdir()] == [digest.partition(":")[2]]  # no temp file, no blob

    layer = Descriptor(LAYER_TYPES["none"], digest, size, {"b": "2", "a": "1"})
    config = {"rootfs": {"type": "layers", "diff_ids": [digest]}, "os": "linux", "architecture": "amd64"}
    first = layout.write_image(config, [layer], tag="v1")
    again = layout.write_image(dict(reversed(config.items())), [layer], tag="v1")
    assert again.digest == first.digest  # key order does not change the bytes
    doc = json.loads(first.manifest)
    assert first.manifest == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()  # canonical
    assert layout.resolve("v1") == first
    assert layout.tagged("v1") == Descriptor(
        OCI_MANIFEST, first.digest, len(first.manifest), {"org.opencontainers.image.ref.name": "v1"},
        platform=Platform(),
    )  # fmt: skip
    with pytest.raises(LayoutError, match=r"no image tagged 'v2' \(tags: v1\)"):
        layout.tagged("v2")
    missing = Descriptor(LAYER_TYPES["none"], sha256(b"never written"), 13)
    with pytest.raises(LayoutError, match="is not written"):
        layout.write_image(config, [missing], tag="v2")
    assert layout.tags() == ["v1"]


def test_layout_refuses_what_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="not an OCI image layout"):
        OciLayout(tmp_path / "nothing").resolve()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(LayoutError, match="refusing to write into it"):
        OciLayout(stranger).create()
    (stranger / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(LayoutError, match="unsupported imageLayoutVersion"):
        OciLayout(stranger).check()


# -- conversions -----------------------------------------------------------------------------------


async def run_convert(
    src: Path, dst: Path, options: ConvertOptions, tag: str = "1", out_tag: str = "conv"
) -> Any:
    source = LayoutSource(LayoutLocation(src, tag))
    target = LayoutTarget(LayoutLocation(dst, out_tag))
    return await convert(source, target, options)


@pytest.mark.parametrize("fmt", ["estargz", "zstdchunked", "nydus"])
async def test_convert_layout_to_layout(tmp_path: Path, fmt: str) -> None:
    tars = source_tars()
    write_image(tmp_path / "src", tars)
    prioritized = ("/etc/motd", "bin/tool", "/not/there")
    options = ConvertOptions(fmt, chunk_size=SMALL_CHUNKS, prioritized_files=prioritized)
    summary = await run_convert(tmp_path / "src", tmp_path / "dst", options)
    out = OciLayout(tmp_path / "dst")
    manifest, config, blobs = read_layout_image(out, "conv")
    indexes = check_converted(manifest, config, blobs, tars, fmt, prioritized=prioritized[:2])
    # Chunked by the option: the 200 000-byte file spans four 64 KiB chunks.
    assert len(indexes[0].entries["bin/tool"].chunks) == 4
    assert summary.missing_prioritized == ("/not/there",)
    assert summary.manifest_digest == out.resolve("conv").digest
    assert summary.reference == f"oci:{tmp_path / 'dst'}:conv"
    assert [r.digest for r in summary.layers] == [d["digest"] for d in manifest["layers"]]
    assert summary.stats.uploaded == 4 and summary.stats.manifests == 1
    # Everything else in the config and manifest is kept.
    assert config["config"] == {"Cmd": ["/bin/tool"]} and len(config["history"]) == 3
    assert manifest["annotations"]["org.example.source"] == "unit test"


async def test_reconverting_gives_the_same_blobs(tmp_path: Path) -> None:
    tars = source_tars()
    write_image(tmp_path / "src", tars)
    options = ConvertOptions("estargz", prioritized_files=("/etc/motd",))
    first = await run_convert(tmp_path / "src", tmp_path / "dst", options)
    # Converting the converted image again: deterministic output, so nothing new is written.
    second = await run_convert(tmp_path / "dst", tmp_path / "dst", options, tag="conv", out_tag="again")
    assert second.manifest_digest == first.manifest_digest
    assert (second.stats.existed, second.stats.uploaded) == (4, 0)


async def test_docker_media_types_and_zstd_chunked_sources(tmp_path: Path) -> None:
    tars = source_tars()
    write_image(
        tmp_path / "src",
        tars,
        compressions=("gzip",),
        config_type="application/vnd.docker.container.image.v1+json",
        manifest_type="application/vnd.docker.distribution.manifest.v2+json",
        layer_types=["application/vnd.docker.image.rootfs.diff.tar.gzip"] * 3,
    )
    await run_convert(tmp_path / "src", tmp_path / "zc", ConvertOptions("zstdchunked"))
    # A zstd:chunked source (skippable TOC frames) converts back to eStargz.
    await run_convert(tmp_path / "zc", tmp_path / "esgz", ConvertOptions("estargz"), tag="conv")
    manifest, config, blobs = read_layout_image(OciLayout(tmp_path / "esgz"), "conv")
    check_converted(manifest, config, blobs, tars, "estargz")


async def test_foreign_layers_are_refused(tmp_path: Path) -> None:
    write_image(
        tmp_path / "src",
        source_tars()[:1],
        layer_types=["application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"],
        compressions=("gzip",),
    )
    with pytest.raises(ConvertError, match=r"layer 1 \(sha256:.*\) is a non-distributable \(foreign\) layer"):
        await run_convert(tmp_path / "src", tmp_path / "dst", ConvertOptions("estargz"))
    assert not (tmp_path / "dst").exists()  # refused before anything was written


async def test_an_artifact_is_not_an_image(tmp_path: Path) -> None:
    write_image(tmp_path / "src", source_tars()[:1], config_type="application/vnd.cncf.helm.config.v1+json")
    with pytest.raises(ConvertError, match="not a container image: its config has media type"):
        await run_convert(tmp_path / "src", tmp_path / "dst", ConvertOptions("estargz"))


async def test_layer_that_does_not_match_its_diff_id(tmp_path: Path) -> None:
    write_image(tmp_path / "src", source_tars()[:1], diff_ids=[sha256(b"something else")])
    with pytest.raises(
        ConvertError, match=r"layer 1 .*uncompressed content is sha256:.*the image config says"
    ):
        await run_convert(tmp_path / "src", tmp_path / "dst", ConvertOptions("zstdchunked"))


# -- progress and the command line -----------------------------------------------------------------


async def test_progress_reports_and_summary(tmp_path: Path) -> None:
    write_image(tmp_path / "src", source_tars())
    stream = io.StringIO()
    source = LayoutSource(LayoutLocation(tmp_path / "src", "1"))
    summary = await convert(
        source,
        LayoutTarget(LayoutLocation(tmp_path / "dst")),
        ConvertOptions("estargz"),
        PlainProgress(stream),
    )
    lines = stream.getvalue().splitlines()
    for i in range(3):
        mine = [line.split()[3] for line in lines if line.startswith(f"layer {i + 1}/3 ")]
        assert mine == ["fetch", "convert", "push", "done:"]
    assert lines[-1].startswith("storing manifest sha256:") and lines[-1].endswith(":latest")
    text = summary_text(summary)
    assert f"manifest {summary.manifest_digest}" in text and "total:" in text and "4 uploaded" in text
    # The bar reporter draws on any stream (a terminal in real use).
    bars = BarProgress(io.StringIO())
    bars.start([("sha256:" + "a" * 64, 10)])
    bars.phase(0, Phase.FETCH, 10)
    bars.advance(0, 10)
    bars.layer_done(summary.layers[0])
    bars.close()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "src", source_tars())
    src = f"oci:{tmp_path / 'src'}:1"
    assert (
        cli.main(
            [
                "convert",
                src,
                f"oci:{tmp_path / 'out'}:q",
                "--format",
                "zstdchunked",
                "--chunk-size",
                "64K",
                "-q",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out == f"oci:{tmp_path / 'out'}:q\n" and err == ""
    prefetch = tmp_path / "prefetch"
    prefetch.write_text("/etc/motd\n/nowhere\n")
    dst = f"oci:{tmp_path / 'out'}:p"
    assert cli.main(["convert", src, dst, "--format", "estargz", "--prefetch-files", str(prefetch)]) == 0
    out, err = capsys.readouterr()
    assert "converted" in out and "layer 3:" in out
    assert "1 prefetch file(s) found in no layer: /nowhere" in err
    # Bad input: exit 2, nothing written; failures: exit 1.
    for args, code, message in [
        (["Bad//ref", dst], 2, "invalid reference"),
        ([src, dst, "--prefetch-files", str(tmp_path / "nope")], 2, "cannot read"),
        ([src, dst, "--compression-level", "99"], 2, "compression level 99"),
        ([f"oci:{tmp_path / 'none'}", dst], 1, "is not an OCI image layout"),
        ([f"oci:{tmp_path / 'src'}:2", dst], 1, "no image tagged '2' (tags: 1)"),
    ]:
        assert cli.main(["convert", *args, "--format", "estargz"]) == code, args
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", src, dst, "--format", "squashfs"])
    assert info.value.code == 2
