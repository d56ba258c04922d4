"""build_nydus.py: blobs round-trip through nydus.py, give the eStargz index of the same tar (but
for chunks and landmarks), store each chunk once per image, put prioritized files first, and are
deterministic. Hypothesis checks random trees against the eStargz path."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from snapshotter.formats import (
    LANDMARK_NAMES,
    Compression,
    Entry,
    EntryType,
    FormatError,
    LayerIndex,
    build_estargz,
    decompress_chunk,
)
from snapshotter.formats.build import BuiltBlob
from snapshotter.formats.build_nydus import build_nydus, build_nydus_image
from snapshotter.formats.nydus import DEFAULT_CHUNK_SIZE, MEDIA_TYPE
from snapshotter.formats.zstdchunked import ZSTD_FRAME_MAGIC
from tests.support.oci import Dir, File, Hardlink, Layer, Opaque, Symlink, Whiteout, layer_tar
from tests.unit.formats import BIG, MTIME, parse_blob, sample_tar, tar_members
from tests.unit.formats.test_nydus import parse_built

CHUNK = 4 << 10


def rich_tar() -> bytes:
    """A layer like a real one, from the e2e tests' builders."""
    return layer_tar(
        [
            Dir("/etc"),
            File("/etc/hosts", b"127.0.0.1 localhost\n"),
            Dir("/bin"),
            File("/bin/busybox", BIG, mode=0o755),
            Symlink("/bin/sh", "busybox"),
            Hardlink("/bin/ls", "/bin/busybox"),
            Hardlink("/bin/cat", "/bin/ls"),
            Whiteout("/var/old"),
            Opaque("/var/cache"),
            File("/var/cache/new", b""),
            Dir("/tmp", mode=0o1777),
            File("/usr/bin/sudo", b"#!", mode=0o4755, uid=1000, gid=1000),
            File("/deep/a/b/c/d.txt", b"deep"),
        ]
    )


def read_file(index: LayerIndex, own: bytes, blobs: Mapping[str, bytes], name: str) -> bytes:
    """A file's bytes from the blobs its chunks name ("" = ``own``), each frame decoded alone."""
    out = []
    for c in index.entries[name].chunks:
        src = blobs[c.blob] if c.blob else own
        frame = src[c.compressed_offset : c.compressed_offset + c.compressed_size]
        assert frame[:4] == ZSTD_FRAME_MAGIC
        out.append(decompress_chunk(Compression.ZSTD, frame, c))
    return b"".join(out)


def comparable(index: LayerIndex) -> dict[str, Entry]:
    """Entries without chunk positions and eStargz landmarks: what both formats must agree on."""
    return {n: replace(e, chunks=[]) for n, e in index.entries.items() if n not in LANDMARK_NAMES}


def estargz_index(tar: bytes) -> LayerIndex:
    built = build_estargz(tar, chunk_size=CHUNK)
    return parse_blob(built.blob, built.toc_digest)


def check_contents(tar: bytes, built: BuiltBlob, blobs: Mapping[str, bytes]) -> LayerIndex:
    """Every regular file of ``tar`` reassembles from the blobs; returns the index."""
    index = parse_built(built)
    for name, (info, data) in tar_members(tar).items():
        entry = index.entries[name.strip("/")]
        if info.isreg():
            assert read_file(index, built.blob, blobs, entry.name) == data, name
            assert entry.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    return index


# -- one layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_tar", [sample_tar, rich_tar])
def test_index_equals_the_estargz_index(make_tar: object) -> None:
    assert callable(make_tar)
    tar = make_tar()
    nydus = parse_built(build_nydus(tar, chunk_size=CHUNK))
    assert comparable(nydus) == comparable(estargz_index(tar))
    assert not set(nydus.entries) & LANDMARK_NAMES


@pytest.mark.parametrize("make_tar", [sample_tar, rich_tar])
def test_round_trip(make_tar: object) -> None:
    assert callable(make_tar)
    tar = make_tar()
    built = build_nydus(tar, chunk_size=CHUNK)
    index = check_contents(tar, built, {})
    assert (index.format, index.compression, index.blobs) == ("nydus", Compression.ZSTD, {})
    assert (index.toc_offset, index.blob_size) == (built.toc_offset, len(built.blob))
    assert index.no_prefetch and index.prefetch == [] and index.prefetch_end == 0
    for entry in index.entries.values():
        assert [c.file_offset for c in entry.chunks] == list(range(0, entry.size, CHUNK))
        for c in entry.chunks:
            assert (c.inner_offset, c.blob) == (0, "")
            assert c.size == min(CHUNK, entry.size - c.file_offset)
            assert c.compressed_offset + c.compressed_size <= built.toc_offset
        if entry.type is not EntryType.REG:
            assert entry.chunks == [] and entry.digest == ""


def test_rich_layer_entries() -> None:
    index = parse_built(build_nydus(rich_tar()))
    e = index.entries
    assert e["bin/ls"].type is EntryType.HARDLINK and e["bin/ls"].link_name == "bin/busybox"
    assert e["bin/cat"].link_name == "bin/busybox"  # chains resolve to the file
    assert e["bin/sh"].link_name == "busybox"
    assert e["var/.wh.old"].type is EntryType.REG and e["var/cache/.wh..wh..opq"].size == 0
    assert e["tmp"].mode == 0o1777 and e["usr/bin/sudo"].mode == 0o4755
    assert (e["usr/bin/sudo"].uid, e["usr/bin/sudo"].gid) == (1000, 1000)
    assert e["usr"].mode == 0o755 and e["usr"].mtime_ns == 0  # implied parent
    assert e["etc"].mtime_ns == MTIME * 10**9
    names = list(e)
    assert names[0] == "" and all(names.index(n.rpartition("/")[0]) < i for i, n in enumerate(names) if n)


def test_parents_come_first_even_when_the_tar_lists_them_later() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, typ in (("d/f", tarfile.REGTYPE), ("d", tarfile.DIRTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = typ, 0o700
            tf.addfile(ti)
    index = parse_built(build_nydus(buf.getvalue()))
    assert list(index.entries) == ["", "d", "d/f"]
    assert index.entries["d"].mode == 0o700  # the tar's entry, not an implied one
    assert comparable(index) == comparable(estargz_index(buf.getvalue()))


def test_pax_mtime_keeps_nanoseconds() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, mtime in (("late", "1577836800.123456789"), ("early", "-1.5"), ("huge", "1e30")):
            ti = tarfile.TarInfo(name)
            ti.pax_headers = {"mtime": mtime}
            tf.addfile(ti, io.BytesIO(b""))
    e = parse_built(build_nydus(buf.getvalue())).entries
    assert e["late"].mtime_ns == 1577836800_123456789
    assert e["early"].mtime_ns == -1_500_000_000
    assert e["huge"].mtime_ns == 0  # beyond int64 ns, like the TOC drops unformattable times


def test_default_chunk_size_is_1mib() -> None:
    data = random.Random(1).randbytes(DEFAULT_CHUNK_SIZE + 1)
    tar = layer_tar([File("/f", data)])
    index = parse_built(build_nydus(tar))
    assert [c.size for c in index.entries["f"].chunks] == [1 << 20, 1]
    assert build_nydus(tar).toc_json[16:20] == (1 << 20).to_bytes(4, "little")


def test_packaging_fields() -> None:
    tar = sample_tar()
    built = build_nydus(tar)
    assert built.media_type == MEDIA_TYPE
    assert built.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert built.uncompressed_size == len(tar)
    stored = built.blob[built.toc_offset : -64]
    assert built.toc_digest == "sha256:" + hashlib.sha256(stored).hexdigest()
    assert zstandard.ZstdDecompressor().decompress(stored) == built.toc_json


def test_deterministic_and_compressed_input() -> None:
    tar = rich_tar()
    a = build_nydus(tar, prioritized_files=["etc/hosts"])
    assert build_nydus(tar, prioritized_files=["etc/hosts"]) == a
    for packed in (gzip.compress(tar), zstandard.ZstdCompressor().compress(tar)):
        assert build_nydus(packed, prioritized_files=["etc/hosts"]) == a  # diff_id of the plain tar


@pytest.mark.parametrize("size", [0, 2048, 5000, 3 << 20, 32 << 20])
def test_bad_chunk_size(size: int) -> None:
    with pytest.raises(
        ValueError, match=f"chunk size {size} is not a power of two between 4096 and 16777216"
    ):
        build_nydus(sample_tar(), chunk_size=size)


def test_empty_layer() -> None:
    built = build_nydus(b"")
    index = parse_built(built)
    assert list(index.entries) == [""] and built.toc_offset == 0


def _tar(*infos: tuple[str, bytes, dict[str, object]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, typ, attrs in infos:
            ti = tarfile.TarInfo(name)
            ti.type = typ
            for k, v in attrs.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(b"x" * ti.size) if ti.isreg() else None)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("tar", "message"),
    [
        (_tar(("l", tarfile.LNKTYPE, {"linkname": "f"})), r"hardlink to 'f', which is missing or later"),
        (
            _tar(("l", tarfile.LNKTYPE, {"linkname": "f"}), ("f", tarfile.REGTYPE, {})),
            r"hardlink to 'f', which is missing or later",
        ),
        (_tar(("d", tarfile.DIRTYPE, {}), ("l", tarfile.LNKTYPE, {"linkname": "d"})), "which is a dir"),
        (_tar(("a/../../b", tarfile.REGTYPE, {})), r"'\.\.' in the name"),
        (_tar(("f", tarfile.REGTYPE, {"size": 1}), ("f/g", tarfile.REGTYPE, {})), "parent 'f' is a reg"),
        (_tar(("./", tarfile.REGTYPE, {})), "the layer root must be a directory"),
        (_tar(("s", tarfile.SYMTYPE, {"linkname": ""})), "symlink without linkName"),
        (_tar(("f", tarfile.REGTYPE, {"uid": 1 << 40})), "uid 1099511627776 does not fit in 32 bits"),
    ],
)
def test_writer_rejects_what_readers_would(tar: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        build_nydus(tar)
    # the eStargz path refuses the same tars (when it builds them, its parser does not accept them)
    with pytest.raises(FormatError):
        estargz_index(tar)


# -- dedup -----------------------------------------------------------------------------------------


def test_identical_chunks_are_stored_once_per_layer() -> None:
    data = random.Random(2).randbytes(5 * CHUNK + 100)
    zeros = bytes(4 * CHUNK)
    one = build_nydus(layer_tar([File("/a", data)]), chunk_size=CHUNK)
    two_tar = layer_tar([File("/a", data), File("/b", data), File("/z", zeros)])
    two = build_nydus(two_tar, chunk_size=CHUNK)
    index = check_contents(two_tar, two, {})
    a, b, z = (index.entries[n].chunks for n in ("a", "b", "z"))
    assert [c.compressed_offset for c in a] == [c.compressed_offset for c in b]
    assert len({c.compressed_offset for c in z}) == 1  # four equal chunks, one frame
    zero_frame = z[0].compressed_size
    assert two.toc_offset == one.toc_offset + zero_frame  # b added no data
    assert len(two.blob) < len(one.blob) + zero_frame + 300  # only its bootstrap records


def _image_tars() -> list[bytes]:
    shared = random.Random(3).randbytes(3 * CHUNK + 7)
    return [
        layer_tar([File("/lib/a", shared), File("/lib/b", b"only in layer 0" * 400)]),
        layer_tar([File("/copy/a", shared), File("/new", b"layer 1" * 1000), Whiteout("/lib/b")]),
        layer_tar([File("/lib/a", shared), File("/lib/b", b"only in layer 0" * 400), Symlink("/x", "lib/a")]),
    ]


def test_chunks_in_lower_layers_are_referenced_not_stored() -> None:
    tars = _image_tars()
    built = build_nydus_image(tars, chunk_size=CHUNK)
    blobs = {b.digest: b.blob for b in built}
    indexes = [check_contents(tar, b, blobs) for tar, b in zip(tars, built, strict=True)]
    base, mid, top = built
    assert [b.diff_id for b in built] == ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    assert indexes[0].blobs == {}
    assert {c.blob for c in indexes[1].entries["copy/a"].chunks} == {base.digest}
    assert indexes[1].blobs == {base.digest: len(base.blob)}
    assert mid.toc_offset == sum(c.compressed_size for c in indexes[1].entries["new"].chunks)
    # the top layer stores nothing: every chunk is in the base blob, where the bytes are
    assert top.toc_offset == 0 and indexes[2].blobs == {base.digest: len(base.blob)}
    assert [replace(c, blob="") for c in indexes[2].entries["lib/a"].chunks] == indexes[0].entries[
        "lib/a"
    ].chunks
    # apart from chunk positions, each layer's index is what it would be on its own
    for tar, index in zip(tars, indexes, strict=True):
        assert comparable(index) == comparable(parse_built(build_nydus(tar, chunk_size=CHUNK)))


def test_dedup_across_layers_can_be_turned_off() -> None:
    tars = _image_tars()
    built = build_nydus_image(tars, chunk_size=CHUNK, dedup_across_layers=False)
    assert built == [build_nydus(t, chunk_size=CHUNK) for t in tars]
    for tar, b in zip(tars, built, strict=True):
        assert check_contents(tar, b, {}).blobs == {}


# -- prefetch --------------------------------------------------------------------------------------


def test_prioritized_files_come_first() -> None:
    order = ["/data/link2", "etc/hosts", "data/big.bin", "dev/null", "data", "nope"]
    built = build_nydus(sample_tar(), chunk_size=CHUNK, prioritized_files=order)
    index = check_contents(sample_tar(), built, {})
    # hardlinks resolve to their file; devices and directories have nothing to fetch
    assert index.prefetch == ["data/small", "etc/hosts", "data/big.bin"]
    assert not index.no_prefetch and built.missing_prioritized == ("nope",)
    frames = [c for n in index.prefetch for c in index.entries[n].chunks]
    assert [c.compressed_offset for c in frames] == sorted(c.compressed_offset for c in frames)
    assert frames[0].compressed_offset == 0
    assert index.prefetch_end == frames[-1].compressed_offset + frames[-1].compressed_size
    others = [c for n, e in index.entries.items() if n not in index.prefetch for c in e.chunks]
    assert others and min(c.compressed_offset for c in others) == index.prefetch_end


def test_missing_prioritized_files() -> None:
    with pytest.raises(FormatError, match="prioritized file 'nope' is not in the layer"):
        build_nydus(sample_tar(), prioritized_files=["nope"], allow_missing_prioritized=False)
    with pytest.raises(FormatError, match="prioritized file 'nope' is not in any layer"):
        build_nydus_image(_image_tars(), prioritized_files=["new", "nope"], allow_missing_prioritized=False)


def test_prioritized_files_apply_to_each_layer_that_has_them() -> None:
    built = build_nydus_image(_image_tars(), chunk_size=CHUNK, prioritized_files=["/new", "lib/a", "x"])
    base, mid, top = (parse_built(b) for b in built)
    assert all(b.missing_prioritized == () for b in built)
    assert base.prefetch == ["lib/a"] and mid.prefetch == ["new"] and top.prefetch == ["lib/a"]
    assert base.prefetch_end == sum(c.compressed_size for c in base.entries["lib/a"].chunks)
    # lib/a of the top layer lives in the base blob: nothing of its own blob to prefetch
    assert top.prefetch_end == 0 and not top.no_prefetch


# -- property -------------------------------------------------------------------------------------

_SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5]
_paths = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(lambda p: "/" + "/".join(p))
_content = st.builds(
    lambda seed, size: random.Random(seed).randbytes(size), st.integers(0, 2), st.sampled_from(_SIZES)
)
_entries = st.one_of(
    st.builds(
        File, _paths, _content, mode=st.sampled_from([0o644, 0o755, 0o4755]), uid=st.sampled_from([0, 7])
    ),
    st.builds(Dir, _paths, mode=st.sampled_from([0o755, 0o1777])),
    st.builds(Symlink, _paths, st.sampled_from(["a", "../b/c", "/c"])),
    st.builds(Hardlink, _paths, _paths),
    st.builds(Whiteout, _paths),
    st.builds(Opaque, _paths),
)
_layers = st.lists(st.lists(_entries, max_size=8), min_size=1, max_size=3)


def _or_none(build: object) -> LayerIndex | None:
    assert callable(build)
    try:
        index = build()
    except FormatError:
        return None
    assert isinstance(index, LayerIndex)
    return index


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layers)
def test_random_trees_round_trip(layers: Sequence[Layer]) -> None:
    """Each random layer gives the eStargz index (or both formats refuse it), and an image of
    them reassembles every file from the right blobs."""
    tars = [layer_tar(layer) for layer in layers]
    for tar in tars:
        nydus = _or_none(lambda tar=tar: parse_built(build_nydus(tar, chunk_size=CHUNK)))
        estargz = _or_none(lambda tar=tar: estargz_index(tar))
        assert (nydus is None) == (estargz is None)
        if nydus is None or estargz is None:
            event("a layer both formats refuse")
            return
        assert comparable(nydus) == comparable(estargz)
    event(f"{len(tars)} valid layer(s)")
    built = build_nydus_image(tars, chunk_size=CHUNK, prioritized_files=["a", "b/c"])
    blobs = {b.digest: b.blob for b in built}
    for tar, b in zip(tars, built, strict=True):
        index = check_contents(tar, b, blobs)
        assert set(index.blobs) <= set(blobs) - {b.digest}
        prefetch_frames = [c for n in index.prefetch for c in index.entries[n].chunks if not c.blob]
        assert all(c.compressed_offset < index.prefetch_end for c in prefetch_frames)
