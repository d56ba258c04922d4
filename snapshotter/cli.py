"""The ``lazysnap`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from snapshotter import __version__
from snapshotter.config import LOG_LEVELS, load
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

    check = commands.add_parser("check-config", help="validate a config file and print the result")
    check.add_argument("config", type=Path)

    stats = commands.add_parser("stats", help="print a running daemon's lazy-pull statistics (JSON)")
    stats.add_argument("--config", type=Path, help="the daemon's config file")
    stats.add_argument("--root", type=Path, help="the daemon's root (overrides config `root`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        try:
            config = load(args.config)
        except ConfigError as exc:
            print(f"lazysnap: {exc}", file=sys.stderr)
            return 2
        print(config)
        return 0
    if args.command == "stats":
        return _stats(args)
    return _serve(args)


def _stats(args: argparse.Namespace) -> int:
    from snapshotter.admin import admin_socket, fetch_stats

    try:
        config = load(args.config, root=args.root)
    except ConfigError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    address = admin_socket(config.root)
    try:
        stats = fetch_stats(address)
    except OSError as exc:
        print(f"lazysnap: cannot read stats from {address} (is the daemon running?): {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from snapshotter.daemon import StartupError, serve  # grpc loads only for the daemon

    try:
        config = load(args.config, root=args.root, address=args.address)
    except ConfigError as exc:
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log.level, config.log.format)
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        log.error("refusing to start: %s", exc)
        return 1
    return 0
