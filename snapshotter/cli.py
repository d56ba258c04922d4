"""The ``lazysnap`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from snapshotter import __version__
from snapshotter.cli_admin import add_admin_parsers, registry_options, run_admin
from snapshotter.config import FS_BACKENDS, LOG_LEVELS, deprecation_warnings, load, with_backend
from snapshotter.errors import ConfigError
from snapshotter.logsetup import setup as setup_logging

log = logging.getLogger("lazysnap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazysnap", description="containerd remote snapshotter that pulls image layers lazily"
    )
    parser.add_argument("--version", action="version", version=f"lazysnap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve containerd's Snapshots API on a unix socket")
    serve.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    serve.add_argument("--root", type=Path, help="state directory (overrides config `root`)")
    serve.add_argument("--address", type=Path, help="unix socket path (overrides config `address`)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="overrides config `log.level`")
    serve.add_argument("--fs-backend", choices=FS_BACKENDS, help="overrides config `fs.backend`")

    manager = commands.add_parser(
        "fuse-manager",
        help="serve lazy layers' FUSE mounts (started by `serve`; outlives it so containers keep "
        "their layers across daemon restarts)",
    )
    manager.add_argument("--config", type=Path, help="TOML config file (the daemon's)")
    manager.add_argument("--root", type=Path, help="state directory (overrides config `root`)")
    manager.add_argument("--log-level", choices=LOG_LEVELS, help="overrides config `log.level`")
    manager.add_argument("--fs-backend", choices=FS_BACKENDS, help="overrides config `fs.backend`")

    check = commands.add_parser("check-config", help="validate a config file and print the result")
    check.add_argument("config", type=Path)

    add_admin_parsers(commands)
    _add_convert_parser(commands)
    _add_index_parser(commands)
    return parser


def _size(text: str) -> int:
    from snapshotter.convert import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_convert_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    convert = commands.add_parser(
        "convert",
        help="convert an image to a lazily pullable format (eStargz, zstd:chunked, nydus)",
        description="Convert every layer of SRC to FORMAT and store the image as DST. SRC and DST are "
        "registry references (HOST/REPO[:TAG], optionally with docker://) or OCI image layout "
        "directories as skopeo writes them: oci:DIR[:TAG] (for DST the tag defaults to latest).",
    )
    convert.add_argument("source", metavar="SRC", help="image to convert")
    convert.add_argument("destination", metavar="DST", help="where to store the converted image")
    convert.add_argument("--format", required=True, choices=("estargz", "zstdchunked", "nydus"))
    convert.add_argument(
        "--prefetch-files",
        metavar="FILE",
        type=Path,
        help="paths read at startup, one per line in access order ('#' comments; JSON lines "
        'with a "path", as ctr-remote records them, work too): stored first and prefetched',
    )
    convert.add_argument(
        "--chunk-size",
        metavar="BYTES",
        type=_size,
        help="chunk size, e.g. 1M or 4MiB (default 4MiB for estargz/zstdchunked, 1MiB for nydus)",
    )
    convert.add_argument(
        "--compression-level", metavar="N", type=int, help="gzip 0-9 (default 9) or zstd 1-22 (default 3)"
    )
    registry_options(
        convert,
        plain_http_help="speak plain HTTP to the SRC and DST registries (loopback registries always are)",
    )
    convert.add_argument(
        "--quiet", "-q", action="store_true", help="no progress or summary; print only the result's name"
    )


def _add_index_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    index = commands.add_parser(
        "index",
        help="build seekable indexes of an image's plain gzip layers, so they can be pulled lazily unchanged",
        description="For each tar+gzip layer of SRC (HOST/REPO[:TAG] or oci:DIR[:TAG]) build a gzip index: "
        "checkpoints to resume inflating from, the tar entries and a digest of every chunk. With --push "
        "the indexes are attached to the image as an OCI referrer artifact (docs/GZIP-INDEX.md); the "
        "image itself is not changed.",
    )
    index.add_argument("source", metavar="SRC", help="image whose layers to index")
    index.add_argument("--push", action="store_true", help="attach the indexes to SRC (a referrer artifact)")
    index.add_argument(
        "--span",
        metavar="BYTES",
        type=_size,
        default=None,
        help="uncompressed bytes between checkpoints, e.g. 1M or 4MiB (default 4MiB): smaller spans "
        "fetch less per read and make bigger indexes",
    )
    registry_options(index)
    index.add_argument("--quiet", "-q", action="store_true", help="print only the artifact digest")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        try:
            config = load(args.config)
        except ConfigError as exc:
            print(f"lazysnap: {exc}", file=sys.stderr)
            return 2
        for warning in deprecation_warnings:
            print(f"lazysnap: warning: {warning}", file=sys.stderr)
        print(config)
        return 0
    if (code := run_admin(args)) is not None:
        return code
    if args.command == "convert":
        return _convert(args)
    if args.command == "index":
        return _index(args)
    if args.command == "fuse-manager":
        return _fuse_manager(args)
    return _serve(args)


def _convert(args: argparse.Namespace) -> int:
    """Exit 0 when converted, 2 for bad input (arguments, files, config), 1 when the work failed."""
    from snapshotter.convert import ConvertError, ConvertOptions, convert_image, parse_prefetch_file
    from snapshotter.fetcher import FetchError
    from snapshotter.image import LayoutError, parse_location, reporter, summary_text

    try:
        source, destination = parse_location(args.source), parse_location(args.destination)
        prioritized = parse_prefetch_file(args.prefetch_files) if args.prefetch_files else ()
        options = ConvertOptions(
            format=args.format,
            chunk_size=args.chunk_size,
            prioritized_files=prioritized,
            compression_level=args.compression_level,
        )
    except OSError as exc:
        print(f"lazysnap: cannot read {args.prefetch_files}: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    setup_logging("warning", "logfmt")  # the registry client's warnings (retries, failovers)
    progress = reporter(quiet=args.quiet)
    try:
        summary = asyncio.run(
            convert_image(
                source,
                destination,
                options,
                hosts_dir=args.hosts_dir,
                docker_config=args.docker_config,
                plain_http=args.plain_http,
                progress=progress,
            )
        )
    except (ConvertError, FetchError, LayoutError) as exc:
        print(f"lazysnap: convert failed: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # options, hosts.toml or docker config rejected
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    if summary.missing_prioritized:
        print(
            f"lazysnap: warning: {len(summary.missing_prioritized)} prefetch file(s) found in no layer: "
            + ", ".join(summary.missing_prioritized),
            file=sys.stderr,
        )
    print(summary.reference if args.quiet else summary_text(summary))
    return 0


def _index(args: argparse.Namespace) -> int:
    """Exit 0 when indexed (and attached), 2 for bad input, 1 when the work failed."""
    from snapshotter.fetcher import FetchError
    from snapshotter.formats import gzindex
    from snapshotter.image import LayoutError, parse_location
    from snapshotter.indexer import IndexingError, IndexOptions, index_location, summary_text

    try:
        location = parse_location(args.source)
        options = IndexOptions(span=args.span or gzindex.DEFAULT_SPAN, push=args.push)
    except ValueError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    setup_logging("warning", "logfmt")
    try:
        summary = asyncio.run(
            index_location(
                location,
                options,
                hosts_dir=args.hosts_dir,
                docker_config=args.docker_config,
                plain_http=args.plain_http,
            )
        )
    except (IndexingError, FetchError, LayoutError) as exc:
        print(f"lazysnap: index failed: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    if not any(layer.index_digest for layer in summary.layers):
        print("lazysnap: warning: no layer of the image could be indexed", file=sys.stderr)
    print(summary.artifact_digest if args.quiet else summary_text(summary))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from snapshotter.daemon import serve  # grpc loads only for the daemon
    from snapshotter.ownership import StartupError

    try:
        config = with_backend(load(args.config, root=args.root, address=args.address), args.fs_backend)
    except ConfigError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log.level, config.log.format)
    for warning in deprecation_warnings:
        log.warning(warning)
    try:
        asyncio.run(serve(config, args.config, args.log_level, args.fs_backend))
    except StartupError as exc:
        log.error("refusing to start: %s", exc)
        return 1
    return 0


def _fuse_manager(args: argparse.Namespace) -> int:
    from snapshotter.fusemanager import ManagerRunningError, serve_manager
    from snapshotter.ownership import StartupError

    try:
        config = with_backend(load(args.config, root=args.root), args.fs_backend)
    except ConfigError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log.level, config.log.format)
    for warning in deprecation_warnings:
        log.warning(warning)
    try:
        asyncio.run(serve_manager(config))
    except ManagerRunningError as exc:
        log.error("refusing to start: %s", exc)
        return 3
    except StartupError as exc:
        log.error("refusing to start: %s", exc)
        return 1
    # Served and stopped: exit now, without joining worker threads still ending (their pools are
    # shut down). The root's lock, released only by the exit, keeps a successor waiting until then.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)
