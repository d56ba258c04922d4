"""Build deterministic test images in pure Python and push them with skopeo.

Layers are described declaratively with :class:`File`, :class:`Dir`,
:class:`Symlink`, :class:`Hardlink`, :class:`Whiteout` and :class:`Opaque`
entries. :func:`build_layout` turns them into tars and an image in an OCI image
layout (written by ``snapshotter.image.OciLayout``), :func:`push` copies it to a
registry unchanged, and :func:`apply_layers` computes the filesystem a correct
snapshotter must present.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from snapshotter.eager import chain_ids  # (containerd's committed snapshot names; re-exported)
from snapshotter.fetcher import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Descriptor
from snapshotter.formats.build import MEDIA_TYPE_GZIP as MEDIA_TYPE_LAYER_GZIP
from snapshotter.image import OciLayout, image_config

#: mtime written into every tar header (2020-01-01T00:00:00Z).
FIXED_MTIME = 1577836800
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


# --------------------------------------------------------------------------
# Layer entries
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    """A regular file."""

    path: str
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Dir:
    """A directory."""

    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Symlink:
    """A symbolic link; ``target`` is stored verbatim."""

    path: str
    target: str
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Hardlink:
    """A hard link to ``target`` (an absolute image path earlier in the same layer)."""

    path: str
    target: str


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` from lower layers (emits ``dir/.wh.name``)."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides all lower-layer children of ``dirpath`` (emits ``dirpath/.wh..wh..opq``)."""

    dirpath: str


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque
Layer = Sequence[Entry]


def _norm(path: str) -> str:
    """Normalise an image path to absolute form without trailing slash."""
    p = "/" + str(PurePosixPath("/" + path)).strip("/")
    if ".." in PurePosixPath(p).parts:
        raise ValueError(f"path escapes root: {path!r}")
    return p


def _rel(path: str) -> str:
    """Image path as stored in the tar (no leading slash)."""
    return _norm(path).lstrip("/")


def _tarinfo(name: str, type_: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.uname = ""
    ti.gname = ""
    ti.mtime = FIXED_MTIME
    return ti


def layer_tar(layer: Layer) -> bytes:
    """Return the uncompressed, deterministic tar stream for ``layer`` (entries in given order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in layer:
            if isinstance(e, File):
                ti = _tarinfo(_rel(e.path), tarfile.REGTYPE, e.mode, e.uid, e.gid)
                ti.size = len(e.data)
                tar.addfile(ti, io.BytesIO(e.data))
            elif isinstance(e, Dir):
                tar.addfile(_tarinfo(_rel(e.path), tarfile.DIRTYPE, e.mode, e.uid, e.gid))
            elif isinstance(e, Symlink):
                ti = _tarinfo(_rel(e.path), tarfile.SYMTYPE, 0o777, e.uid, e.gid)
                ti.linkname = e.target
                tar.addfile(ti)
            elif isinstance(e, Hardlink):
                ti = _tarinfo(_rel(e.path), tarfile.LNKTYPE, 0o644, 0, 0)
                ti.linkname = _rel(e.target)
                tar.addfile(ti)
            elif isinstance(e, Whiteout):
                p = PurePosixPath(_norm(e.path))
                name = str(p.parent / (WHITEOUT_PREFIX + p.name)).lstrip("/")
                tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, 0, 0))
            elif isinstance(e, Opaque):
                name = (_rel(e.dirpath) + "/" + OPAQUE_MARKER).lstrip("/")
                tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, 0, 0))
            else:  # pragma: no cover - exhaustive
                raise TypeError(f"unknown layer entry {e!r}")
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip (mtime 0, no file name)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# Image layout
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBlob:
    """One compressed layer as stored in the layout."""

    digest: str
    size: int
    diff_id: str
    uncompressed_size: int
    media_type: str = MEDIA_TYPE_LAYER_GZIP
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class EncodedLayer:
    """What an encoder makes of a layer's uncompressed tar: the blob and how to describe it."""

    blob: bytes
    media_type: str = MEDIA_TYPE_LAYER_GZIP
    annotations: Mapping[str, str] = field(default_factory=dict)
    diff_id: str = ""  # digest of what the blob decompresses to, if not the input tar itself


def gzip_layer(raw: bytes) -> EncodedLayer:
    return EncodedLayer(gzip_bytes(raw))


@dataclass(frozen=True)
class Image:
    """What :func:`build_layout` wrote."""

    layout_dir: Path
    tag: str
    manifest_digest: str
    manifest_size: int
    config_digest: str
    config_size: int
    layers: tuple[LayerBlob, ...]

    @property
    def layer_digests(self) -> list[str]:
        """Compressed layer digests, bottom first."""
        return [layer.digest for layer in self.layers]

    @property
    def diff_ids(self) -> list[str]:
        """Uncompressed layer digests, bottom first."""
        return [layer.diff_id for layer in self.layers]

    @property
    def chain_ids(self) -> list[str]:
        """Chain IDs, bottom first (the last one names the top committed snapshot)."""
        return chain_ids(self.diff_ids)

    def blob_path(self, digest: str) -> Path:
        """Path of a blob inside the layout."""
        return OciLayout(self.layout_dir).blob_path(digest)


def build_layout(
    layout_dir: str | os.PathLike[str],
    layers: Sequence[Layer],
    *,
    tag: str,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] | None = None,
    encode: Callable[[bytes], EncodedLayer] = gzip_layer,
) -> Image:
    """Write (or add ``tag`` to) an OCI image layout containing one image built from ``layers``;
    ``encode`` turns each layer's tar into its blob (gzip by default; tests craft eStargz)."""
    layout = OciLayout(layout_dir)
    layout.create()
    blobs: list[LayerBlob] = []
    for layer in layers:
        raw = layer_tar(layer)
        encoded = encode(raw)
        digest = layout.write_blob(encoded.blob)
        annotations = tuple(sorted(encoded.annotations.items()))
        diff_id = encoded.diff_id or sha256_digest(raw)
        blobs.append(LayerBlob(digest, len(encoded.blob), diff_id, len(raw), encoded.media_type, annotations))
    config = image_config(
        [b.diff_id for b in blobs],
        env=env if env is not None else ["PATH=/bin"],
        cmd=cmd,
        created_by="lazysnap tests",
    )
    descriptors = [Descriptor(b.media_type, b.digest, b.size, dict(b.annotations)) for b in blobs]
    written = layout.write_image(config, descriptors, tag=tag)
    manifest_size, config_desc = len(written.manifest), written.config
    return Image(
        layout.path, tag, written.digest, manifest_size, config_desc.digest, config_desc.size, tuple(blobs)
    )


# --------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------


class PushError(RuntimeError):
    """skopeo failed or the registry does not hold the image byte-for-byte."""


def _skopeo_supports_preserve_digests() -> bool:
    out = subprocess.run(["skopeo", "copy", "--help"], capture_output=True, text=True, check=False)
    return "--preserve-digests" in out.stdout


def registry_manifest_digest(registry_host: str, repo: str, ref: str) -> str:
    """Return the ``Docker-Content-Digest`` the registry reports for ``repo:ref``."""
    req = urllib.request.Request(
        f"http://{registry_host}/v2/{repo}/manifests/{ref}",
        method="HEAD",
        headers={"Accept": ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST])},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.headers["Docker-Content-Digest"])


def push(
    layout_dir: str | os.PathLike[str],
    tag: str,
    registry_host: str,
    repo: str,
    *,
    expected_manifest_digest: str | None = None,
    timeout: float = 120,
) -> str:
    """Copy ``oci:layout_dir:tag`` to ``docker://registry_host/repo:tag`` without altering blobs.

    Uses ``--preserve-digests`` (skopeo >= 1.6) so skopeo refuses to recompress or
    convert; afterwards the registry's manifest digest is checked against
    ``expected_manifest_digest`` (defaults to the digest recorded in ``index.json``).
    Returns the pushed image reference ``registry_host/repo:tag``.
    """
    layout = Path(layout_dir)
    if expected_manifest_digest is None:
        expected_manifest_digest = OciLayout(layout).tagged(tag).digest
    args = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if _skopeo_supports_preserve_digests():
        args.append("--preserve-digests")
    ref = f"{registry_host}/{repo}:{tag}"
    args += [f"oci:{layout}:{tag}", f"docker://{ref}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise PushError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    got = registry_manifest_digest(registry_host, repo, tag)
    if got != expected_manifest_digest:
        raise PushError(f"registry has {ref} as {got}, expected {expected_manifest_digest}")
    return ref


@dataclass(frozen=True)
class PushedImage:
    """An image built by :func:`build_layout`, pushed to a registry, with its expected rootfs."""

    ref: str
    image: Image
    expected: dict[str, Node]


# --------------------------------------------------------------------------
# Expected filesystem
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """Expected state of one path in the final root filesystem.

    ``kind`` is ``"file"``, ``"dir"`` or ``"symlink"``. For hard links ``hardlink_of``
    names another path whose inode must be shared (within the same layer).
    """

    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    hardlink_of: str | None = None

    @property
    def sha256(self) -> str:
        """Hex sha256 of a file's content."""
        return hashlib.sha256(self.data).hexdigest()


def _remove_tree(fs: dict[str, Node], path: str, *, keep_self: bool = False) -> None:
    prefix = path.rstrip("/") + "/"
    for p in [p for p in fs if p.startswith(prefix) or (p == path and not keep_self)]:
        del fs[p]


def _ensure_parents(fs: dict[str, Node], path: str) -> None:
    for parent in reversed(PurePosixPath(path).parents):
        sp = str(parent)
        if sp == "/":
            continue
        if sp not in fs or fs[sp].kind != "dir":
            _remove_tree(fs, sp)
            fs[sp] = Node("dir", mode=0o755)


def apply_layers(layers: Iterable[Layer]) -> dict[str, Node]:
    """Apply ``layers`` with overlay/whiteout semantics; returns path -> :class:`Node` (no ``/``)."""
    fs: dict[str, Node] = {}
    for layer in layers:
        # Whiteouts and opaque markers only affect lower layers.
        for e in layer:
            if isinstance(e, Whiteout):
                _remove_tree(fs, _norm(e.path))
            elif isinstance(e, Opaque):
                _remove_tree(fs, _norm(e.dirpath), keep_self=True)
        for e in layer:
            if isinstance(e, Whiteout | Opaque):
                continue
            path = _norm(e.path)
            _ensure_parents(fs, path)
            if isinstance(e, Dir):
                if path in fs and fs[path].kind != "dir":
                    del fs[path]
                fs[path] = Node("dir", mode=e.mode, uid=e.uid, gid=e.gid)
                continue
            _remove_tree(fs, path)
            if isinstance(e, File):
                fs[path] = Node("file", mode=e.mode, uid=e.uid, gid=e.gid, data=e.data)
            elif isinstance(e, Symlink):
                fs[path] = Node("symlink", mode=0o777, uid=e.uid, gid=e.gid, target=e.target)
            elif isinstance(e, Hardlink):
                src = fs[_norm(e.target)]
                fs[path] = Node(
                    src.kind, src.mode, src.uid, src.gid, src.data, src.target, hardlink_of=_norm(e.target)
                )
    return fs


def check_tree(
    root: str | os.PathLike[str], expected: Mapping[str, Node], *, exact: bool = True
) -> list[str]:
    """Compare a directory on the host (e.g. a mounted snapshot) with ``expected``.

    Returns human-readable mismatches (empty list = identical). With ``exact``,
    extra paths under ``root`` are reported too.
    """
    rootp = Path(root)
    problems: list[str] = []
    for path, node in sorted(expected.items()):
        p = rootp / path.lstrip("/")
        try:
            st = p.lstat()
        except OSError as exc:
            problems.append(f"{path}: missing ({exc.strerror})")
            continue
        if node.kind == "dir" and not stat.S_ISDIR(st.st_mode):
            problems.append(f"{path}: not a directory")
        elif node.kind == "file" and not stat.S_ISREG(st.st_mode):
            problems.append(f"{path}: not a regular file")
        elif node.kind == "symlink":
            if not stat.S_ISLNK(st.st_mode):
                problems.append(f"{path}: not a symlink")
            elif os.readlink(p) != node.target:
                problems.append(f"{path}: symlink -> {os.readlink(p)!r}, expected {node.target!r}")
            continue
        if stat.S_IMODE(st.st_mode) != node.mode:
            problems.append(f"{path}: mode {stat.S_IMODE(st.st_mode):o}, expected {node.mode:o}")
        if (st.st_uid, st.st_gid) != (node.uid, node.gid):
            problems.append(f"{path}: owner {st.st_uid}:{st.st_gid}, expected {node.uid}:{node.gid}")
        if node.kind == "file" and stat.S_ISREG(st.st_mode):
            if hashlib.sha256(p.read_bytes()).hexdigest() != node.sha256:
                problems.append(f"{path}: content differs")
            if node.hardlink_of is not None:
                other = rootp / node.hardlink_of.lstrip("/")
                if other.exists() and other.lstat().st_ino != st.st_ino:
                    problems.append(f"{path}: not a hard link of {node.hardlink_of}")
    if exact:
        seen = {"/" + str(p.relative_to(rootp)) for p in rootp.rglob("*")}
        for extra in sorted(seen - set(expected)):
            problems.append(f"{extra}: unexpected")
    return problems


# --------------------------------------------------------------------------
# The standard test image
# --------------------------------------------------------------------------

BUSYBOX_APPLETS = ("sh", "cat", "ls", "sha256sum", "test")


def busybox_entries(
    applets: tuple[str, ...] = BUSYBOX_APPLETS, busybox: str | os.PathLike[str] = "/bin/busybox"
) -> list[Entry]:
    """``/bin`` with the host's static busybox and symlinks for ``applets``."""
    links = [Symlink(f"/bin/{a}", "busybox") for a in applets]
    return [Dir("/bin"), File("/bin/busybox", Path(busybox).read_bytes(), mode=0o755), *links]


def pseudo_random(n: int, seed: bytes) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:n])


#: Size of ``/data/big.bin`` (spans several fetch chunks of typical sizes).
BIG_FILE_SIZE = 768 * 1024


@dataclass(frozen=True)
class TestImage:
    """The standard three-layer image and the root filesystem it must produce."""

    __test__ = False  # not a pytest class

    layers: tuple[Layer, ...]
    expected: dict[str, Node] = field(repr=False)
    cmd: tuple[str, ...] = ("/bin/sh",)


def test_image_layers(busybox: str | os.PathLike[str] = "/bin/busybox") -> TestImage:
    """Return the standard test image layers and expected final filesystem.

    Layer 1: static busybox + applet symlinks, ``/etc`` ``/tmp`` (1777) ``/data``.
    Layer 2: files under ``/data`` incl. ``gone.txt``, ``olddir/`` and a 768 KiB ``big.bin``.
    Layer 3: whiteout of ``/data/gone.txt``, opaque ``/data/olddir`` with only
    ``new.txt``, a hard link, a symlink, an 0755 script and a file owned by 1000:1000.
    """
    layer1: list[Entry] = [
        *busybox_entries(busybox=busybox),
        Dir("/etc"),
        File("/etc/motd", b"motd from layer 1\n"),
        Dir("/tmp", mode=0o1777),
        Dir("/data"),
    ]
    layer2: list[Entry] = [
        Dir("/data"),
        File("/data/hello.txt", b"hello from layer 2\n"),
        File("/data/gone.txt", b"this file is deleted by layer 3\n"),
        File("/data/big.bin", pseudo_random(BIG_FILE_SIZE, b"lazysnap-big")),
        Dir("/data/olddir"),
        File("/data/olddir/a.txt", b"old a\n"),
        File("/data/olddir/b.txt", b"old b\n"),
        Dir("/data/olddir/sub", mode=0o700),
        File("/data/olddir/sub/c.txt", b"old c\n"),
        Dir("/etc"),
        File("/etc/motd", b"motd from layer 2\n"),
    ]
    layer3: list[Entry] = [
        Dir("/data"),
        Whiteout("/data/gone.txt"),
        Dir("/data/olddir"),
        Opaque("/data/olddir"),
        File("/data/olddir/new.txt", b"new in layer 3\n"),
        File("/data/orig.txt", b"hardlinked content\n"),
        Hardlink("/data/hardlink.txt", "/data/orig.txt"),
        Symlink("/data/symlink.txt", "hello.txt"),
        File("/data/run.sh", b"#!/bin/sh\necho run-ok\n", mode=0o755),
        File("/data/owned.txt", b"owned by 1000\n", mode=0o640, uid=1000, gid=1000),
    ]
    layers = (tuple(layer1), tuple(layer2), tuple(layer3))
    return TestImage(layers=layers, expected=apply_layers(layers))


test_image_layers.__test__ = False  # type: ignore[attr-defined]  # keep pytest from collecting it
