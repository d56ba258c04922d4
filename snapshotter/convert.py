"""``lazysnap convert``: turn an image's layers into a lazily pullable format and store the result.

For each layer of the source image the blob is fetched (and verified against its digest),
decompressed by its media type (gzip, zstd or none), checked against the config's DiffID, and
rebuilt as eStargz or zstd:chunked (``snapshotter.formats.build``; prioritized files first) and
stored at the destination. Layers are converted in worker threads (zlib and zstd release the GIL)
but at most ``parallel_layers`` at once, so memory stays bounded by a few layers whatever the image
size. The nydus format builds all layers in one call (chunks are deduplicated across layers), so
there every decompressed layer is held at once.

The new config is the source's with ``rootfs.diff_ids`` replaced; the new manifest is OCI, with
the builder's media types and annotations per layer. Blobs go first, the manifest last, so a
destination never names a blob it lacks. A prioritized file found in no layer is reported, not
fatal: a recorded file list outlives the image it was recorded on.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
import zlib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import zstandard

from snapshotter.fetcher import (
    DEFAULT_CONFIG_DIR,
    MANIFEST_TYPES,
    OCI_MANIFEST,
    CredentialStore,
    Descriptor,
    HostsConfig,
    Platform,
    RegistryClient,
)
from snapshotter.fetcher.manifest import digest_of
from snapshotter.formats import BuiltBlob, FormatError, build_estargz, build_zstdchunked, nydus
from snapshotter.image import (
    OCI_CONFIG,
    ImageSource,
    ImageTarget,
    LayerResult,
    Location,
    Phase,
    Progress,
    RegistryLocation,
    RegistryTarget,
    SourceImage,
    Summary,
    open_source,
    open_target,
)

FORMATS = ("estargz", "zstdchunked", "nydus")
# ctr-remote's chunk size for the stargz family; nydus chunks are smaller (and dedup better).
DEFAULT_CHUNK_SIZES = {"estargz": 4 << 20, "zstdchunked": 4 << 20, "nydus": 1 << 20}
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 1 << 30
COMPRESSION_LEVELS = {"estargz": (0, 9), "zstdchunked": (1, 22), "nydus": (1, 22)}
DEFAULT_PARALLEL_LAYERS = 2
PUSH_CHUNK_SIZE = 8 << 20  # blobs above this are uploaded in PATCH pieces of this size

CONFIG_TYPES = frozenset({OCI_CONFIG, "application/vnd.docker.container.image.v1+json"})
_LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
_FOREIGN_LAYERS = frozenset(
    {
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
T = TypeVar("T")
_SIZE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)


class ConvertError(Exception):
    """The image cannot be converted as asked; the message says why and which layer."""


@dataclass(frozen=True)
class ConvertOptions:
    format: str
    chunk_size: int | None = None  # None: the format's default
    prioritized_files: tuple[str, ...] = ()
    compression_level: int | None = None  # None: the format's default
    parallel_layers: int = DEFAULT_PARALLEL_LAYERS

    @property
    def effective_chunk_size(self) -> int:
        return self.chunk_size or DEFAULT_CHUNK_SIZES[self.format]


# -- option parsing (shared with the CLI) ---------------------------------------------------------


def parse_size(text: str) -> int:
    """``4194304``, ``4M``, ``4MiB``, ``512k``: K, M and G are powers of 1024 (as docker's units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r} (examples: 1048576, 512K, 4M, 4MiB)")
    return int(m.group(1)) << (10 * " kmg".index(m.group(2).lower() or " "))


def parse_prefetch_file(path: str | Path) -> tuple[str, ...]:
    """Paths to prioritize, one per line in access order; ``#`` comments and blank lines skipped.

    A line that is a JSON object with a ``path`` (what ``ctr-remote image optimize --record-out``
    writes) counts as that path. Duplicates keep their first position. OSError if unreadable.
    """
    text = Path(path).read_text(encoding="utf-8")
    out: dict[str, None] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{n}: a line starting with '{{' must be a JSON object") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("path"), str) or not doc["path"]:
                raise ValueError(f'{path}:{n}: JSON line has no "path" string')
            line = doc["path"]
        out.setdefault(line, None)
    return tuple(out)


def check_options(options: ConvertOptions) -> None:
    """ValueError for options no format could use; called before any network traffic."""
    if options.format not in FORMATS:
        raise ValueError(f"unknown format {options.format!r} (choose from {', '.join(FORMATS)})")
    size = options.effective_chunk_size
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {size} is outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    if options.format == "nydus":
        try:
            nydus.check_chunk_size(size)
        except FormatError as e:
            raise ValueError(f"nydus {e}") from None
    low, high = COMPRESSION_LEVELS[options.format]
    level = options.compression_level
    if level is not None and not low <= level <= high:
        raise ValueError(f"compression level {level} is outside [{low}, {high}] for {options.format}")
    if options.parallel_layers < 1:
        raise ValueError("parallel_layers must be at least 1")


# -- layers ----------------------------------------------------------------------------------------


def layer_compression(desc: Descriptor, index: int) -> str:
    """How a layer we can convert is compressed ("gzip", "zstd", "none"); ConvertError if we cannot."""
    where = f"layer {index + 1} ({desc.digest})"
    if desc.media_type in _FOREIGN_LAYERS or desc.urls:
        raise ConvertError(
            f"{where} is a non-distributable (foreign) layer ({desc.media_type}): it is not in the "
            "registry and its license may forbid redistribution; lazysnap convert does not convert it"
        )
    compression = _LAYER_COMPRESSION.get(desc.media_type)
    if compression is None:
        raise ConvertError(
            f"{where} has media type {desc.media_type!r}, which is not a tar layer we can read"
        )
    return compression


def decompress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.decompress(data)  # every member, as a multi-member eStargz blob has
    if compression == "zstd":
        # Across frames, skipping skippable ones (a zstd:chunked source's TOC and footer).
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
            return reader.read()
    return data


def _tar_of(blob: bytes, compression: str, diff_id: str, where: str) -> bytes:
    """The layer's tar, checked against the config's DiffID (which proves the config belongs)."""
    try:
        tar = decompress(blob, compression)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise ConvertError(f"{where}: cannot decompress the {compression} blob: {e}") from None
    got = digest_of(tar)
    if got != diff_id:
        raise ConvertError(f"{where}: uncompressed content is {got}, the image config says {diff_id}")
    return tar


@dataclass(frozen=True)
class _Built:
    """A converted layer without its bytes (they are gone once stored)."""

    digest: str
    size: int
    media_type: str
    diff_id: str
    annotations: dict[str, str]
    missing: tuple[str, ...]


def _build_stargz(tar: bytes, options: ConvertOptions) -> BuiltBlob:
    build = build_estargz if options.format == "estargz" else build_zstdchunked
    kwargs: dict[str, Any] = {}
    if options.compression_level is not None:
        kwargs["compression_level"] = options.compression_level
    return build(
        tar,
        chunk_size=options.effective_chunk_size,
        prioritized_files=options.prioritized_files,
        allow_missing_prioritized=True,
        **kwargs,
    )


# -- the conversion --------------------------------------------------------------------------------


class _Run:
    """One conversion: shared state of the per-layer tasks."""

    def __init__(
        self, source: ImageSource, target: ImageTarget, options: ConvertOptions, progress: Progress
    ) -> None:
        self.source, self.target, self.options, self.progress = source, target, options, progress
        self.sem = asyncio.Semaphore(options.parallel_layers)
        self.results: dict[int, LayerResult] = {}

    async def fetch(self, i: int, desc: Descriptor) -> bytes:
        self.progress.phase(i, Phase.FETCH, desc.size)
        blob = await self.source.read_blob(desc)
        self.progress.advance(i, len(blob))
        return blob

    async def store(self, i: int, desc: Descriptor | None, built: BuiltBlob) -> _Built:
        """Store layer ``i``'s new blob; ``desc`` is its source layer (None for an extra blob)."""
        digest = await asyncio.to_thread(lambda: built.digest)  # a property that hashes the blob
        if desc is None:
            outcome = await self.target.put_blob(digest, built.blob)
        else:
            self.progress.phase(i, Phase.PUSH, len(built.blob))
            outcome = await self.target.put_blob(
                digest, built.blob, progress=lambda n: self.progress.advance(i, n)
            )
            self.results[i] = LayerResult(
                i, desc.digest, desc.size, desc.media_type, digest, len(built.blob), built.media_type, outcome
            )
            self.progress.layer_done(self.results[i])
        return _Built(
            digest,
            len(built.blob),
            built.media_type,
            built.diff_id,
            dict(built.annotations),
            tuple(built.missing_prioritized),
        )

    async def stargz_layer(self, i: int, desc: Descriptor, compression: str, diff_id: str) -> _Built:
        async with self.sem:  # fetch, convert and store hold the layer in memory: bound them together
            blob = await self.fetch(i, desc)
            self.progress.phase(i, Phase.CONVERT, len(blob))
            where = f"layer {i + 1} ({desc.digest})"

            def convert() -> BuiltBlob:
                tar = _tar_of(blob, compression, diff_id, where)
                try:
                    return _build_stargz(tar, self.options)
                except FormatError as e:
                    raise ConvertError(f"{where}: {e}") from None

            built = await asyncio.to_thread(convert)
            blob = b""  # the source blob is not needed any more: free it before the upload
            return await self.store(i, desc, built)

    async def nydus_layers(
        self, layers: Sequence[Descriptor], compressions: Sequence[str], diff_ids: Sequence[str]
    ) -> tuple[list[_Built], dict[str, str]]:
        from snapshotter.formats.build_nydus import build_nydus_image  # only this format needs it

        async def tar(i: int) -> bytes:
            async with self.sem:
                blob = await self.fetch(i, layers[i])
                self.progress.phase(i, Phase.CONVERT, len(blob))
                where = f"layer {i + 1} ({layers[i].digest})"
                return await asyncio.to_thread(_tar_of, blob, compressions[i], diff_ids[i], where)

        tars = await _all([tar(i) for i in range(len(layers))])
        kwargs: dict[str, Any] = {}
        if self.options.compression_level is not None:
            kwargs["compression_level"] = self.options.compression_level
        try:
            built = await asyncio.to_thread(
                lambda: build_nydus_image(
                    tars,
                    chunk_size=self.options.effective_chunk_size,
                    prioritized_files=self.options.prioritized_files,
                    allow_missing_prioritized=True,
                    **kwargs,
                )
            )
        except (FormatError, ValueError) as e:
            raise ConvertError(f"nydus build failed: {e}") from None
        tars = []  # free the decompressed layers before the uploads
        results: list[_Built] = []
        for i, blob in enumerate(built):
            # One blob per source layer is expected; any extra (say a separate bootstrap) is pushed
            # the same way but reported as a note rather than on a layer's bar.
            if i >= len(layers):
                self.progress.note(f"pushing extra nydus blob {i + 1} ({len(blob.blob)} bytes)")
            results.append(await self.store(i, layers[i] if i < len(layers) else None, blob))
        return results, nydus.manifest_annotations()


async def _all(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; the first failure cancels the others and is raised as itself."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _load_config(desc: Descriptor, raw: bytes, layers: int) -> dict[str, Any]:
    if desc.media_type not in CONFIG_TYPES:
        raise ConvertError(
            f"the source is not a container image: its config has media type {desc.media_type!r}"
        )
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ConvertError(f"the image config {desc.digest} is not JSON") from None
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ConvertError(f"the image config {desc.digest} has no rootfs.diff_ids list")
    if len(diff_ids) != layers:
        raise ConvertError(f"the image config lists {len(diff_ids)} DiffIDs for {layers} layers")
    return cast(dict[str, Any], doc)


def _new_config(config: dict[str, Any], built: Sequence[_Built], fmt: str) -> dict[str, Any]:
    """The source config with the new DiffIDs (key order and everything else kept)."""
    new = dict(config)
    new["rootfs"] = {**config["rootfs"], "diff_ids": [b.diff_id for b in built]}
    history = config.get("history")
    if isinstance(history, list):
        # History entries that are not empty_layer pair up with layers; keep that true if the
        # format added layers.
        real = sum(1 for h in history if isinstance(h, dict) and not h.get("empty_layer"))
        if real == len(config["rootfs"]["diff_ids"]) and len(built) > real:
            added = {"created_by": f"lazysnap convert --format {fmt}", "comment": "added by the conversion"}
            new["history"] = [*history, *([added] * (len(built) - real))]
    return new


def _platform(config: dict[str, Any]) -> Platform | None:
    os_, arch = config.get("os"), config.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str):
        return None
    variant = config.get("variant")
    return Platform(os=os_, architecture=arch, variant=variant if isinstance(variant, str) else "")


def _missing(options: ConvertOptions, built: Sequence[_Built]) -> tuple[str, ...]:
    if not options.prioritized_files or not built:
        return ()
    if options.format == "nydus":
        # The nydus builder looks files up in the whole image: whatever a blob reports is missing.
        reported = {p for b in built for p in b.missing}
        return tuple(p for p in options.prioritized_files if p in reported)
    # Each stargz layer reports what it lacks: a path is missing if no layer has it.
    return tuple(p for p in options.prioritized_files if all(p in b.missing for b in built))


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _manifest(
    image: SourceImage, config: bytes, built: Sequence[_Built], annotations: dict[str, str]
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [
            {
                "mediaType": b.media_type,
                "digest": b.digest,
                "size": b.size,
                **({"annotations": b.annotations} if b.annotations else {}),
            }
            for b in built
        ],
    }
    merged = {**image.annotations, **annotations}
    if merged:
        doc["annotations"] = merged
    return _dumps(doc)


async def convert(
    source: ImageSource, target: ImageTarget, options: ConvertOptions, progress: Progress | None = None
) -> Summary:
    """Convert ``source``'s image into ``options.format`` and store it at ``target``.

    Raises ConvertError for an image that cannot be converted, ValueError for bad options, and
    the fetcher's FetchError / the layout's LayoutError for I/O failures.
    """
    check_options(options)
    progress = progress or Progress()
    started = time.monotonic()
    image = await source.resolve()
    if image.media_type not in MANIFEST_TYPES:
        raise ConvertError(f"{source.location} is a {image.media_type}, not an image manifest")
    compressions = [layer_compression(d, i) for i, d in enumerate(image.layers)]
    config = _load_config(image.config, await source.read_blob(image.config), len(image.layers))
    diff_ids: list[str] = config["rootfs"]["diff_ids"]
    if isinstance(target, RegistryTarget) and isinstance(source.location, RegistryLocation):
        # An output blob equal to an input one (re-converting a converted image) needs no upload.
        target.offer_mounts(source.location.ref, [image.config.digest, *(d.digest for d in image.layers)])
    await target.prepare()

    run = _Run(source, target, options, progress)
    progress.start([(d.digest, d.size) for d in image.layers])
    try:
        format_annotations: dict[str, str] = {}
        if options.format == "nydus":
            built, format_annotations = await run.nydus_layers(image.layers, compressions, diff_ids)
        else:
            built = await _all(
                [run.stargz_layer(i, d, compressions[i], diff_ids[i]) for i, d in enumerate(image.layers)]
            )
        config_bytes = _dumps(_new_config(config, built, options.format))
        progress.note(f"storing config {digest_of(config_bytes)}")
        await target.put_blob(digest_of(config_bytes), config_bytes)
        manifest = _manifest(image, config_bytes, built, format_annotations)
        progress.note(f"storing manifest {digest_of(manifest)} as {target.name}")
        digest = await target.put_manifest(manifest, OCI_MANIFEST, _platform(config))
    finally:
        progress.close()
    return Summary(
        source=str(source.location),
        target=target.name,
        reference=target.reference(digest),
        format=options.format,
        layers=tuple(run.results[i] for i in sorted(run.results)),
        source_size=sum(d.size for d in image.layers),
        size=sum(b.size for b in built),
        manifest_digest=digest,
        stats=target.stats,
        missing_prioritized=_missing(options, built),
        seconds=time.monotonic() - started,
    )


async def convert_image(
    source: Location,
    destination: Location,
    options: ConvertOptions,
    *,
    hosts_dir: str | Path | None = DEFAULT_CONFIG_DIR,
    docker_config: str | Path | None = None,
    plain_http: bool = False,
    progress: Progress | None = None,
) -> Summary:
    """``convert`` between locations: one registry client (hosts.toml, credentials) serves both.

    ``plain_http`` speaks HTTP to the registries of SRC and DST (loopback registries always are).
    """
    check_options(options)
    registries = [loc.ref.host for loc in (source, destination) if isinstance(loc, RegistryLocation)]
    hosts = HostsConfig(hosts_dir, plain_http_hosts=registries if plain_http else ())
    credentials = CredentialStore(docker_config)
    async with RegistryClient(hosts, credentials) as client:
        target = open_target(destination, client, chunk_size=PUSH_CHUNK_SIZE)
        return await convert(open_source(source, client), target, options, progress)
