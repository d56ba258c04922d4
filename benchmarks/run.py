"""`make bench`: cold-start times per image, mode and network profile, against overlayfs and T_ideal.

For each profile (a shaped link in front of a local registry) and each image, every mode starts
the image's workload from a cold state --reps times (fresh containerd and snapshotter, page cache
dropped), modes interleaved within a repetition:

  overlayfs             containerd's default snapshotter, full pull of the gzip image
  lazysnap-estargz      lazysnap, image converted to eStargz by ctr-remote
  lazysnap-zstdchunked  lazysnap, image converted to zstd:chunked by ctr-remote
  lazysnap-nydus        lazysnap, Nydus-like image (snapshotter.formats.build_nydus; skipped
                        with a note when this checkout does not have it)
  lazysnap-eager        lazysnap, the plain gzip image with the eager fallback ([fallback] mode =
                        "eager"): layers fetched in parallel and unpacked by lazysnap as they arrive
  lazysnap-estargz-profiled
                        lazysnap, eStargz converted by `lazysnap convert --prefetch-files` with
                        the workload's startup profile, recorded by lazysnap in a first run
                        (`[profile] record = true`, `lazysnap profile export`)
  lazysnap-estargz-shared
                        lazysnap with its default config, the plain eStargz image (not converted
                        again) with that same recorded profile attached in the registry as a
                        referrer (`lazysnap profile push --files`, before the workload's runs);
                        a run that did not mount the image with it ([profile] shared, the daemon's
                        `profiles` statistics) is recorded as failed
  stargz                the stargz-snapshotter 0.12, built from Debian's packaged Go sources
                        (benchmarks.stargz_peer; the first run installs golang-go and
                        golang-github-containerd-stargz-snapshotter-dev with apt and builds it,
                        ~2 min; skipped with a note if that fails), pulling the eStargz image
  stargz-profiled       the same peer, eStargz optimized with `ctr-remote image optimize` (runs
                        the workload once and records the files it accesses)
  NAME                  a peer snapshotter given with --peer

--fs-backend NAME puts `[fs] backend = NAME` into every lazysnap daemon's config, in the cold
runs and in the small-file walk micro-benchmark (default: unset, lazysnap's own default).

Once per image, the workload also runs with its image local ("warm", overlayfs, 3 times): the
image sits on a loop-device ext4 without readahead; after dropping the page cache, the image
bytes resident after a run are the bytes it reads; a second run, cache warm, gives the time.
T_ideal = warm + bytes read / bandwidth + 2 RTT.

Images (built from this machine's Debian sources and cached under --cache, keyed by package
versions, so repeated runs do not rebuild them):
  model       busybox + 4 x 64 MiB incompressible shards; reads 3 MiB of each
  model-full  the same image; reads all of every shard
  python      python3; imports 10 stdlib modules
  gcc         gcc + libc6-dev; compiles and runs hello.c
  redis       redis-server; ready at its "ready to accept connections" log line, then stopped
  sympy       python3-sympy (base, python3 and sympy layers); imports sympy, one integral
  model-8g    with --big: 4 x 2 GiB shards, the working set of model; lazysnap modes (no
              Nydus-like variant) and one overlayfs run; skipped with a note unless the disk has
              room for the formats not cached yet, all formats in the registry and one run
              (5 x 8 GiB with the images cached, 8 x 8 GiB the first time)

Peers: --peer NAME='COMMAND' runs another proxy snapshotter per run, registered in containerd's
proxy_plugins as NAME and measured like lazysnap. In COMMAND (split like a shell would, not run
by one) {address} is the unix socket it must serve, {root} an empty state directory, {config}
a config file: empty, or the text of --peer-config NAME=FILE with the same placeholders filled
in. The peer gets the image in --peer-format NAME=estargz|zstdchunked|nydus|gzip (estargz).
It is stopped with SIGTERM (SIGKILL after 20 s). Example, lazysnap without prefetch:
  --peer 'nopf=.venv/bin/python -m snapshotter serve --root {root} --address {address} --config {config}'
  --peer-config nopf=nopf.toml     (nopf.toml: [prefetch] enabled = false, background = false)

Output, per profile: benchmarks/results/<date>-<profile>.json (summary rows and every run),
.md (tables: every mode, then overlayfs / lazysnap / stargz side by side) and .png (chart); with
the micro-benchmarks (FUSE metadata ops and read throughput of a cached lazy layer; the
small-file walk through overlayfs, lazysnap and the stargz peer): <date>-micro.json and .md.
Results of an earlier run of the same day are kept: the new ones get a suffix (-2, -3, ...).
One progress line per run on the terminal.

Duration on a 2-core VM: the default (profile cloud, all six images, all ten modes, 3 reps,
micro-benchmarks) about 20 minutes with the images cached; the first run also builds, converts
and profiles them and builds the peer (about 15 minutes more). --profiles slow adds about 25
minutes, far about 45 (at 150 ms RTT each of the sympy start's many small first reads waits on
the link), --profiles all about 90 in total.
--big: the first run builds and converts the 8 GiB image (about 25 minutes), each profile then
takes a few minutes more.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import micro, profiled, report, stargz_peer
from benchmarks.harness import (
    EAGER,
    GZIP_INDEX,
    NYDUS_MODULE,
    OPTIMIZED,
    OVERLAYFS,
    PER_WORKLOAD_VARIANTS,
    PROFILED,
    SHARED,
    ImageSet,
    Mode,
    RunResult,
    WarmResult,
    Workload,
    as_json,
    cold_run,
    disk_shortfall,
    eager_mode,
    gcc_workload,
    image_tag,
    lazysnap_mode,
    model_workload,
    nydus_builder,
    python_workload,
    redis_workload,
    serve_registry,
    shaped,
    shared_profile_mode,
    sympy_workload,
    warm_runs,
)
from benchmarks.images import DEFAULT_CACHE, cached_tags
from benchmarks.shaping_proxy import PROFILES, ShapingProxy
from tests.support.scratch import make_tmpdir, remove_tmpdir

RESULTS = Path(__file__).parent / "results"
IMAGES = ("model", "model-full", "python", "gcc", "redis", "sympy")
LAZY_VARIANTS = ("estargz", "zstdchunked", "nydus", GZIP_INDEX, PROFILED)
STARGZ_MODES = {stargz_peer.NAME: "estargz", f"{stargz_peer.NAME}-profiled": OPTIMIZED}
MODES = ("overlayfs", *(f"lazysnap-{v}" for v in LAZY_VARIANTS), SHARED, EAGER, *STARGZ_MODES)
PEER_FORMATS = ("estargz", "zstdchunked", "nydus", "gzip")
BIG_SHARD_MIB = 2048


def workloads(
    names: list[str], shard_mib: int, shards: int, big: bool, big_shard_mib: int = BIG_SHARD_MIB
) -> list[Workload]:
    read_mib = max(1, int(shard_mib * 0.05))
    catalogue = {
        "model": lambda: model_workload("model", shard_mib, shards, read_mib=read_mib),
        "model-full": lambda: model_workload("model-full", shard_mib, shards, read_fraction=1.0),
        "python": python_workload,
        "gcc": gcc_workload,
        "redis": redis_workload,
        "sympy": sympy_workload,
    }
    chosen = [catalogue[n]() for n in names]
    if big:
        name = f"model-{shards * big_shard_mib / 1024:g}g"
        chosen.append(model_workload(name, big_shard_mib, shards, read_mib=read_mib, big=True))
    return chosen


def image_sizes(images: ImageSet, w: Workload) -> dict[str, int]:
    """Compressed size per variant of ``w``'s image (profiled variants: ``w``'s own tag)."""
    sizes = {v: n for v, n in images.sizes.items() if "." not in v}
    for variant in PER_WORKLOAD_VARIANTS:
        if image_tag(variant, w) in images.sizes:
            sizes[variant] = images.sizes[image_tag(variant, w)]
    return sizes


def fresh_stem(out: Path, name: str) -> Path:
    """``out/name``, or ``out/name-2``, ``-3``... if an earlier run wrote results under it."""
    stem, n = out / name, 1
    while any(stem.with_suffix(ext).exists() for ext in (".json", ".md", ".png")):
        n += 1
        stem = out / f"{name}-{n}"
    return stem


def modes_for(w: Workload, modes: list[Mode]) -> list[Mode]:
    """All modes, but the 8 GiB image has no Nydus-like variant (the builder works in memory)
    and no profiled ones (a profile would prefetch whole 2 GiB shards)."""
    return [
        m
        for m in modes
        if not (w.big and (m.variant in ("nydus", *PER_WORKLOAD_VARIANTS) or m.shared_profile))
    ]


def wants_shared_profile(w: Workload, modes: list[Mode]) -> bool:
    """Whether ``w`` runs a mode that pulls with its startup profile attached in the registry."""
    return any(m.shared_profile for m in modes_for(w, modes))


def base_variants(w: Workload, modes: list[Mode]) -> list[str]:
    """The image's tags that ``w``'s modes need (``estargz`` also for profiling with lazysnap)."""
    variants = {"gzip", *(m.variant for m in modes_for(w, modes))}
    if PROFILED in variants:
        variants.add("estargz")
    return sorted(variants - set(PER_WORKLOAD_VARIANTS))


def _pairs(values: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise SystemExit(f"{option} wants NAME=VALUE with a plain NAME, got {value!r}")
        out[name] = rest
    return out


def _note(notes: list[str], note: str) -> None:
    print(f"note: {note}", flush=True)
    notes.append(note)


def stargz_binary(cache: Path, notes: list[str]) -> Path | None:
    """The built stargz peer, or None (with a note saying why) when it cannot be built here."""
    try:
        return stargz_peer.build(cache)
    except (stargz_peer.PeerUnavailableError, OSError, subprocess.SubprocessError) as exc:
        _note(notes, f"stargz peer skipped: {str(exc).strip()[-600:]}")
        return None


def build_modes(args: argparse.Namespace, notes: list[str]) -> list[Mode]:
    modes: list[Mode] = []
    peer_binary: Path | None = None
    peer_tried = False
    lazysnap_overrides = {"fs": {"backend": args.fs_backend}} if args.fs_backend else {}
    for name in args.modes.split(",") if args.modes else []:
        if name not in MODES:
            raise SystemExit(f"unknown mode {name!r}; choose from {', '.join(MODES)} (peers: --peer)")
        if name == "overlayfs":
            modes.append(OVERLAYFS)
            continue
        if name == EAGER:
            modes.append(eager_mode(**lazysnap_overrides))
            continue
        if name == SHARED:
            modes.append(shared_profile_mode(**lazysnap_overrides))
            continue
        if name in STARGZ_MODES:
            if not peer_tried:
                peer_binary, peer_tried = stargz_binary(args.cache, notes), True
            if peer_binary is not None:
                modes.append(stargz_peer.mode(peer_binary, name, STARGZ_MODES[name]))
            continue
        variant = name.removeprefix("lazysnap-")
        if variant == "nydus" and nydus_builder() is None:
            _note(notes, f"lazysnap-nydus skipped: {NYDUS_MODULE} is not in this checkout")
            continue
        modes.append(lazysnap_mode(variant, **lazysnap_overrides))
    peers = _pairs(args.peer, "--peer")
    formats = _pairs(args.peer_format, "--peer-format")
    configs = _pairs(args.peer_config, "--peer-config")
    for name in (*formats, *configs):
        if name not in peers:
            raise SystemExit(f"--peer-format/--peer-config name {name!r} has no --peer")
    for name, command in peers.items():
        if name in MODES or name == "lazysnap":
            raise SystemExit(f"peer name {name!r} is taken by a built-in mode")
        fmt = formats.get(name, "estargz")
        if fmt not in PEER_FORMATS:
            raise SystemExit(f"--peer-format {name}={fmt}: choose from {', '.join(PEER_FORMATS)}")
        if fmt == "nydus" and nydus_builder() is None:
            _note(notes, f"peer {name} skipped: it wants nydus and {NYDUS_MODULE} is not in this checkout")
            continue
        config = Path(configs[name]).read_text() if name in configs else ""
        modes.append(Mode(name, fmt, "peer", command=command, config=config))
    if not modes:
        raise SystemExit("no modes to run")
    return modes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    known = ", ".join(PROFILES)
    parser.add_argument(
        "--profiles", default="cloud", help=f"comma-separated, or 'all' (cloud,slow,far); known: {known}"
    )
    parser.add_argument(
        "--images", default=",".join(IMAGES), help=f"comma-separated subset of {','.join(IMAGES)}"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated built-in modes (default: all)"
    )
    parser.add_argument("--reps", type=int, default=3, help="cold runs per image and mode (default 3)")
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another proxy snapshotter to measure (repeatable; see above)",
    )
    parser.add_argument(
        "--peer-format",
        action="append",
        default=[],
        metavar="NAME=FORMAT",
        help="image format a peer pulls: estargz (default), zstdchunked, nydus, gzip",
    )
    parser.add_argument(
        "--peer-config",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="text of the peer's {config} file ({root}, {address}, {config} filled in)",
    )
    parser.add_argument(
        "--fs-backend",
        metavar="NAME",
        help="lazysnap's [fs] backend (e.g. erofs, fuse) in every daemon config (default: unset)",
    )
    parser.add_argument("--big", action="store_true", help="add model-8g (4 x 2 GiB shards)")
    parser.add_argument(
        "--big-shard-mib", type=int, default=BIG_SHARD_MIB, help="shard size of --big (default 2048)"
    )
    parser.add_argument(
        "--no-micro", dest="micro", action="store_false", help="skip the FUSE micro-benchmarks"
    )
    parser.add_argument("--micro-files", type=int, default=10_000, help="small files in the metadata test")
    parser.add_argument("--micro-mib", type=int, default=256, help="file size of the throughput test")
    parser.add_argument(
        "--walk-files", type=int, default=5_000, help="files in the small-file walk (0: skip it)"
    )
    parser.add_argument("--shard-mib", type=int, default=64, help="model shard size (default 64)")
    parser.add_argument("--shards", type=int, default=4, help="model shards, one layer each (default 4)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"image cache (default {DEFAULT_CACHE})"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)"
    )
    args = parser.parse_args(argv)
    args.profile_list = ["cloud", "slow", "far"] if args.profiles == "all" else args.profiles.split(",")
    for p in args.profile_list:
        if p not in PROFILES:
            parser.error(f"unknown profile {p!r}; choose from {', '.join(PROFILES)}")
    args.image_list = [i for i in args.images.split(",") if i]
    for i in args.image_list:
        if i not in IMAGES:
            parser.error(f"unknown image {i!r}; choose from {', '.join(IMAGES)}")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def progress(profile: str, r: RunResult, reps: int, wall: float) -> str:
    line = (
        f"[{profile}] {r.image:<10} {r.mode:<22} #{r.rep + 1}/{reps}  pull {r.pull_s:6.2f}s"
        f"  run {r.run_s:6.2f}s  total {r.total_s:6.2f}s  fetched {_mb(r.bytes_fetched):>9}"
        f" (before ready {_mb(r.bytes_fetched_ready)})"
    )
    return line + f"  [{wall:.0f}s]"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    modes = build_modes(args, notes)
    chosen = workloads(args.image_list, args.shard_mib, args.shards, args.big, args.big_shard_mib)
    for w in [w for w in chosen if w.big]:
        if len(modes_for(w, modes)) < len(modes):
            _note(
                notes,
                f"{w.name}: no Nydus-like image (its builder holds the whole image in memory)"
                " and no profiled ones",
            )
        formats = set(base_variants(w, modes))
        # Peak use: the formats not cached yet, every format in the registry, and one run's
        # containerd (content store + unpacked snapshots); plus 1 GiB of slack.
        uncached = formats - cached_tags(w.source, args.cache)
        need = w.source.approx_bytes() * (len(uncached) + len(formats) + 2) + (1 << 30)
        short = disk_shortfall([args.cache, Path("/tmp"), Path("/var/lib")], need)
        if short:
            _note(notes, f"{w.name} skipped: not enough free disk ({short})")
            chosen.remove(w)
    if not chosen:
        raise SystemExit("no images to run")

    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    failures: list[dict[str, object]] = []
    bench_started = time.monotonic()
    workdir = make_tmpdir("lzbench")
    try:
        with serve_registry() as registry:
            image_sets: dict[str, ImageSet] = {}
            for w in chosen:
                slug = w.source.slug
                started = time.monotonic()
                same = [x for x in chosen if x.source.slug == slug]
                variants = sorted({v for x in same for v in base_variants(x, modes)})
                if slug not in image_sets:
                    print(f"[images] {w.name}: preparing {slug} ...", flush=True)
                    image_set = ImageSet(w.source, registry, workdir / slug, args.cache)
                    image_sets[slug] = image_set.build(variants)
                wanted = [v for v in PER_WORKLOAD_VARIANTS if v in {m.variant for m in modes_for(w, modes)}]
                try:
                    profiled.ensure(image_sets[slug], w, wanted)
                    if wants_shared_profile(w, modes):
                        profiled.ensure_profile(image_sets[slug], w)
                except Exception as exc:  # its runs fail too (no such tag); the other modes go on
                    traceback.print_exc()
                    print(f"[images] {w.name}: profiled variants FAILED: {exc}", flush=True)
                    failures.append(
                        {"profile": "", "image": w.name, "mode": "profiled images", "error": str(exc)[-2000:]}
                    )
                sizes = ", ".join(f"{v} {_mb(n)}" for v, n in image_sizes(image_sets[slug], w).items())
                print(f"[images] {w.name}: {sizes} ({time.monotonic() - started:.0f}s)", flush=True)
            warm: dict[str, WarmResult] = {}
            for w in chosen:
                try:
                    warm[w.name] = warm_runs(image_sets[w.source.slug], w, registry)
                except Exception as exc:
                    traceback.print_exc()
                    print(f"[warm] {w.name}: FAILED: {exc}", flush=True)
                    failures.append(
                        {"profile": "", "image": w.name, "mode": "warm", "error": str(exc)[-2000:]}
                    )
                    continue
                wr = warm[w.name]
                print(
                    f"[warm] {w.name:<10} image local: ready in {statistics.median(wr.warm_s):.2f}s,"
                    f" reads {_mb(int(statistics.median(wr.bytes_read)))} of the image {wr.note}",
                    flush=True,
                )
            images_info = {
                w.name: {
                    "source": w.source.slug,
                    "description": w.description,
                    "command": list(w.command),
                    "sizes_mb": {
                        v: round(n / 1e6, 1) for v, n in image_sizes(image_sets[w.source.slug], w).items()
                    },
                    "warm": asdict(warm[w.name]) if w.name in warm else None,
                }
                for w in chosen
            }
            for profile in args.profile_list:
                results: list[RunResult] = []
                with shaped(registry, profile) as proxy:
                    for w in chosen:
                        for rep in range(args.reps):
                            for mode in modes_for(w, modes):
                                if w.big and mode.kind == "overlayfs" and rep > 0:
                                    continue
                                run_started = time.monotonic()
                                try:
                                    result = measured_run(
                                        image_sets[w.source.slug],
                                        w,
                                        proxy,
                                        mode,
                                        rep=rep,
                                        profile=profile,
                                    )
                                except Exception as exc:
                                    traceback.print_exc()
                                    print(
                                        f"[{profile}] {w.name} {mode.name} #{rep + 1}: FAILED: {exc}",
                                        flush=True,
                                    )
                                    failures.append(
                                        {
                                            "profile": profile,
                                            "image": w.name,
                                            "mode": mode.name,
                                            "rep": rep,
                                            "error": str(exc)[-2000:],
                                        }
                                    )
                                    continue
                                results.append(result)
                                wall = time.monotonic() - run_started
                                print(progress(profile, result, args.reps, wall), flush=True)
                write_profile(args, date, profile, results, warm, modes, images_info, failures, notes)
    finally:
        remove_tmpdir(workdir)
    if args.micro:
        print("[micro] FUSE metadata, throughput and the small-file walk ...", flush=True)
        peer = next((m for m in modes if m.name in STARGZ_MODES), None)
        data = micro.run_all(
            args.micro_files, args.micro_mib, walk_files=args.walk_files, backend=args.fs_backend, stargz=peer
        )
        stem = fresh_stem(args.out, f"{date}-micro")
        stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        table = report.micro_markdown(data)
        stem.with_suffix(".md").write_text(table)
        print(table, flush=True)
    print(f"done in {(time.monotonic() - bench_started) / 60:.1f} min; results in {args.out}", flush=True)
    if failures:
        print(f"{len(failures)} run(s) failed; see the JSON's 'failures'", file=sys.stderr)
        return 1
    return 0


def measured_run(
    images: ImageSet, w: Workload, proxy: ShapingProxy, mode: Mode, *, rep: int, profile: str
) -> RunResult:
    """``cold_run``; a mode that wants ``w``'s startup profile in the registry gets it attached to
    the image for its run only (the other modes pull the same image without it)."""
    if not mode.shared_profile:
        return cold_run(images, w, proxy, mode, rep=rep, profile=profile)
    with profiled.profile_attached(images, w) as said:
        print(f"[profile] {w.name}: {' / '.join(said.splitlines())}", flush=True)
        return cold_run(images, w, proxy, mode, rep=rep, profile=profile)


def write_profile(
    args: argparse.Namespace,
    date: str,
    profile: str,
    results: list[RunResult],
    warm: dict[str, WarmResult],
    modes: list[Mode],
    images_info: dict[str, dict[str, Any]],
    failures: list[dict[str, object]],
    notes: list[str],
) -> None:
    rows = report.summarize(results, profile, warm)
    rtt_ms, bandwidth = PROFILES[profile]
    stem = fresh_stem(args.out, f"{date}-{profile}")
    doc = {
        "profile": profile,
        "date": date,
        "link": {"rtt_ms": rtt_ms, "bandwidth_bps": bandwidth if bandwidth != float("inf") else None},
        "reps": args.reps,
        "machine": micro.machine(),
        "images": images_info,
        "modes": [{k: v for k, v in asdict(m).items() if k != "config"} for m in modes],
        "notes": notes,
        "summary": rows,
        "runs": as_json(results),
        "failures": [f for f in failures if f["profile"] in (profile, "")],
    }
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    table = report.markdown(rows, profile, args.reps, images=images_info, notes=notes)
    stem.with_suffix(".md").write_text(table)
    if rows:
        report.chart(rows, profile, args.reps, stem.with_suffix(".png"))
    print(table, flush=True)


if __name__ == "__main__":
    sys.exit(main())
