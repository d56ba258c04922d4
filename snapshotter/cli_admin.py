"""Subcommands that talk to a running daemon over its root-only admin socket (ROOT/admin.sock), and
``restart-manager``, which hands the FUSE manager of a root over to a successor process."""

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
            help="export an image's recorded startup profile (needs [profile] record = true)",
            description="Print the files IMAGE's containers read first after its layers were mounted, "
            "in first-read order: the list `lazysnap convert --prefetch-files` takes.",
        )
    )
    profile.add_argument("action", choices=("export",))
    profile.add_argument("image", metavar="IMAGE", help="the image reference, as it was pulled")
    profile.add_argument("-o", "--output", type=Path, help="write the list here instead of stdout")
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
    files = admin.fetch_profile(address, args.image)
    text = "".join(f"{f}\n" for f in files)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"{len(files)} files written to {args.output}", file=sys.stderr)
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
