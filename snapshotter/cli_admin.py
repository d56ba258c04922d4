"""Subcommands that talk to a running daemon over its root-only admin socket (ROOT/admin.sock),
``restart-manager``, which hands the FUSE manager of a root over to a successor process, and
``profile push``, which attaches a profile the daemon recorded to its image in the registry."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter import admin
from snapshotter.config import LOG_LEVELS, load
from snapshotter.errors import ConfigError
from snapshotter.image.progress import human_size
from snapshotter.status import format_status

if TYPE_CHECKING:  # subscripting the class fails at run time
    Parsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _daemon_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, help="the daemon's config file")
    parser.add_argument("--root", type=Path, help="the daemon's root (overrides config `root`)")
    return parser


def registry_options(
    parser: argparse.ArgumentParser,
    plain_http_help: str = "speak plain HTTP to the registry (loopback always is)",
) -> None:
    """--hosts-dir, --docker-config and --plain-http: how a command reaches registries."""
    from snapshotter.fetcher import DEFAULT_CONFIG_DIR, default_docker_config

    parser.add_argument(
        "--hosts-dir",
        metavar="DIR",
        type=Path,
        default=DEFAULT_CONFIG_DIR,
        help=f"containerd hosts.toml directory (default {DEFAULT_CONFIG_DIR})",
    )
    parser.add_argument(
        "--docker-config",
        metavar="FILE",
        type=Path,
        default=default_docker_config(),
        help="docker config.json with registry credentials (default: $DOCKER_CONFIG or ~/.docker)",
    )
    parser.add_argument("--plain-http", action="store_true", help=plain_http_help)


def add_admin_parsers(commands: Parsers) -> None:
    _daemon_args(commands.add_parser("stats", help="print a running daemon's lazy-pull statistics (JSON)"))
    _daemon_args(
        commands.add_parser(
            "status", help="mounted lazy layers: image, format, bytes fetched, prefetch state"
        )
    )
    profile = _daemon_args(
        commands.add_parser(
            "profile",
            help="export an image's recorded startup profile, or push it to the registry for other nodes",
            description="export: print the files IMAGE's containers read first after its layers were "
            "mounted, in first-read order (needs [profile] record = true): the list `lazysnap convert "
            "--prefetch-files` takes. push: attach that profile (or the list in --files) to IMAGE's "
            "manifest in the registry as an OCI referrer artifact; every lazysnap node pulling that "
            "manifest lazily then fetches those files first (docs/PROFILES.md).",
        )
    )
    profile.add_argument("action", choices=("export", "push"))
    profile.add_argument("image", metavar="IMAGE", help="the image reference, as it was pulled")
    profile.add_argument("-o", "--output", type=Path, help="export: write the list here instead of stdout")
    profile.add_argument(
        "-f",
        "--files",
        type=Path,
        metavar="FILE",
        help="push: the paths to push, one per line ('#' comments), instead of the daemon's recorded profile",
    )
    profile.add_argument(
        "--manifest",
        metavar="DIGEST",
        help="push: attach to this manifest digest (default: the one the profile was recorded with, "
        "else what IMAGE resolves to)",
    )
    registry_options(profile)
    cache = _daemon_args(commands.add_parser("cache", help="show the chunk cache's size, or prune it"))
    cache.add_argument("action", nargs="?", choices=("show", "prune"), default="show")
    cache.add_argument(
        "--keep-bytes", type=int, default=0, metavar="N", help="prune: keep the N most recently used bytes"
    )
    level = _daemon_args(commands.add_parser("log-level", help="change a running daemon's log level"))
    level.add_argument("level", choices=LOG_LEVELS)
    _daemon_args(commands.add_parser("metrics", help="print the daemon's Prometheus metrics"))
    _daemon_args(
        commands.add_parser(
            "restart-manager",
            help="hand the FUSE manager's lazy layers over to a new manager process (upgrade, restart)",
            description="Send the FUSE manager of the root SIGUSR2: it answers the reads it has taken "
            "and exits, leaving lazy layers mounted; wait until a successor serves them (started by "
            "the daemon, or by this command when no daemon runs, logging to ROOT/fuse-manager.log). "
            "Running containers keep reading. Needs the EROFS backend.",
        )
    )


def run_admin(args: argparse.Namespace) -> int | None:
    """Run an admin subcommand; None when ``args`` names another command."""
    handlers: dict[str, Callable[[Path, argparse.Namespace], int]] = {
        "stats": _stats,
        "status": _status,
        "profile": _profile,
        "cache": _cache,
        "log-level": _log_level,
        "metrics": _metrics,
    }
    if args.command == "restart-manager":
        return _restart_manager(args)
    handler = handlers.get(args.command)
    if handler is None:
        return None
    try:
        config = load(args.config, root=args.root)
    except ConfigError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    address = admin.admin_socket(config.root)
    try:
        return handler(address, args)
    except admin.AdminError as exc:  # the daemon answered with a reason
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"lazysnap: cannot reach the daemon at {address} (is the daemon running?): {exc}", file=sys.stderr
        )
        return 1


def _stats(address: Path, _: argparse.Namespace) -> int:
    print(json.dumps(admin.fetch_stats(address), indent=2, sort_keys=True))
    return 0


def _status(address: Path, _: argparse.Namespace) -> int:
    print(format_status(admin.fetch_stats(address)))
    return 0


def _profile(address: Path, args: argparse.Namespace) -> int:
    if args.action == "push":
        return _profile_push(address, args)
    files = admin.fetch_profile(address, args.image)
    text = "".join(f"{f}\n" for f in files)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"{len(files)} files written to {args.output}", file=sys.stderr)
    return 0


def _profile_push(address: Path, args: argparse.Namespace) -> int:
    """Exit 0 when attached, 2 for a profile that would not be used, 1 when the push failed."""
    import asyncio

    from snapshotter.fetcher import FetchError, InvalidReferenceError
    from snapshotter.referrers import AttachError
    from snapshotter.sharedprofile import BadProfileError, push_recorded

    manifest = args.manifest or ""
    if args.files is not None:
        try:
            lines = [line.strip() for line in args.files.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            print(f"lazysnap: cannot read {args.files}: {exc}", file=sys.stderr)
            return 2
        files = [line for line in lines if line and not line.startswith("#")]
    else:
        recorded = admin.fetch_profile_doc(address, args.image)
        files = [str(f) for f in recorded["files"]]
        manifest = manifest or str(recorded.get("manifest") or "")
    try:
        pushed = asyncio.run(
            push_recorded(
                args.image,
                files,
                manifest,
                hosts_dir=args.hosts_dir,
                docker_config=args.docker_config,
                plain_http=args.plain_http,
            )
        )
    except (BadProfileError, InvalidReferenceError) as exc:
        print(f"lazysnap: profile not pushed: {exc}", file=sys.stderr)
        return 2
    except (FetchError, AttachError) as exc:
        print(f"lazysnap: profile push failed: {exc}", file=sys.stderr)
        return 1
    print(f"{pushed.files} files attached to {pushed.manifest} as referrer {pushed.artifact}")
    if pushed.referrers_tag:
        print(f"  listed under the referrers tag {pushed.referrers_tag} (no referrers API)")
    return 0


def _cache(address: Path, args: argparse.Namespace) -> int:
    if args.action == "prune":
        result = admin.prune_cache(address, args.keep_bytes)
        print(
            f"removed {result['chunks']} chunks ({human_size(result['bytes'])}); "
            f"{human_size(result['remaining_bytes'])} remain"
        )
        return 0
    cache = admin.fetch_stats(address)["cache"]
    print(
        f"{human_size(cache['bytes'])} of chunks cached; {cache['hits']} hits, {cache['misses']} misses, "
        f"{cache['evictions']} evictions since start"
    )
    return 0


def _log_level(address: Path, args: argparse.Namespace) -> int:
    admin.set_log_level(address, args.level)
    print(f"log level is now {args.level}")
    return 0


def _metrics(address: Path, _: argparse.Namespace) -> int:
    sys.stdout.write(admin.fetch_metrics(address))
    return 0


def _restart_manager(args: argparse.Namespace) -> int:
    from snapshotter.managerrestart import RestartError, restart_manager

    try:
        root = load(args.config, root=args.root).root
    except ConfigError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    try:
        done = restart_manager(root)
    except RestartError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 1
    print(
        f"FUSE manager of {root} handed over: pid {done.old_pid} -> pid {done.new_pid} "
        f"(started by {done.started_by})"
    )
    return 0
