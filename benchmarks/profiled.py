"""Profiled variants of the benchmark images: each image converted with its workload's startup
profile, the way a user optimizes an image after running it once.

* ``estargz-profiled`` (lazysnap's): the workload runs once, lazily, from the ``estargz`` image
  under a lazysnap daemon with ``[profile] record = true``; ``lazysnap profile export`` lists the
  files it read first, in order; ``lazysnap convert --format estargz --prefetch-files LIST``
  converts the gzip image with them stored first and prefetched.
* ``estargz-optimized`` (for the stargz peer): ``ctr-remote image optimize`` runs the workload in
  a container from the gzip image, records the files it accesses (fanotify) and converts to
  eStargz with those files first and a landmark after them, as stargz users do.

* ``lazysnap-estargz-shared`` (:data:`benchmarks.harness.SHARED`): the plain ``estargz`` image,
  not converted again; the list lazysnap recorded (the one ``estargz-profiled`` is converted
  with) is attached to it in the registry with ``lazysnap profile push --files`` before the
  run (:func:`profile_attached`; detached after it), and a daemon with its default config finds it there.

A profile belongs to a workload, not to an image (model and model-full share one image), so the
tag is ``<variant>.<workload>`` (:func:`benchmarks.harness.image_tag`). Converted tags are cached
in the image's layout with a stamp naming the converter and the workload's command; the recorded
lists are kept beside the layout, under ``profiles/`` (stamped as ``profile.<workload>``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import snapshotter
from benchmarks import layout as oci_layout
from benchmarks.harness import (
    OPTIMIZED,
    PROFILED,
    SNAPSHOTTER,
    ImageSet,
    Workload,
    copy_to_layout,
    ctr_remote_stamp,
    image_tag,
    run_workload,
)
from benchmarks.images import locked, set_variant_stamp, variant_stamps
from snapshotter.fetcher.manifest import referrers_tag
from snapshotter.image import OciLayout
from tests.support import oci
from tests.support.daemon import LazysnapDaemon, write_config
from tests.support.scratch import remove_tmpdir
from tests.support.services import Containerd

VARIANTS = (PROFILED, OPTIMIZED)
OPTIMIZE_PERIOD_S = 20  # ctr-remote records accesses this long (a one-shot workload ends earlier)
_CONVERTER_CODE = ("convert.py", "formats", "image", "profile.py")


def _workload_stamp(workload: Workload) -> str:
    text = json.dumps([list(workload.command), workload.marker, workload.long_running])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _lazysnap_stamp() -> str:
    """Names lazysnap's converter and profile recorder: a change to either re-profiles."""
    package = Path(snapshotter.__file__).parent
    digest = hashlib.sha256()
    for name in _CONVERTER_CODE:
        top = package / name
        for path in sorted(top.rglob("*.py")) if top.is_dir() else [top]:
            digest.update(path.read_bytes())
    return "lazysnap-" + digest.hexdigest()[:16]


def stamp(variant: str, workload: Workload) -> str:
    converter = _lazysnap_stamp() if variant == PROFILED else ctr_remote_stamp()
    return f"{converter} workload-{_workload_stamp(workload)}"


def ensure(images: ImageSet, workload: Workload, variants: Sequence[str]) -> None:
    """Make sure the profiled ``variants`` of ``workload``'s image are cached and in the registry
    (``images`` was built with the ``estargz`` tag when ``PROFILED`` is wanted)."""
    layout = images.layout
    if not variants:
        return
    if layout is None:
        raise RuntimeError("ImageSet.build() first")
    with locked(images.cache):
        stamps = variant_stamps(layout)
        have = set(oci_layout.tags(layout))
        for variant in variants:
            if variant not in VARIANTS:
                raise ValueError(f"not a profiled variant: {variant!r}")
            tag = image_tag(variant, workload)
            wanted = stamp(variant, workload)
            if tag in have and stamps.get(tag) == wanted:
                continue
            if variant == PROFILED:
                _convert(layout, _recorded(images, workload, layout), tag)
            else:
                work = images.workdir / "prof"
                try:
                    _optimize(images, workload, layout, tag, work)
                finally:
                    remove_tmpdir(work)
            set_variant_stamp(layout, tag, wanted)
    for variant in variants:
        tag = image_tag(variant, workload)
        oci.push(layout, tag, images.registry.host, images.repo, timeout=3600)
        images.sizes[tag] = oci_layout.image_size(layout, tag)


def profile_path(layout: Path, tag: str) -> Path:
    """Where the list of files recorded for ``tag`` is kept."""
    return layout.parent / "profiles" / f"{tag}.txt"


def recorded_profile(layout: Path, workload: Workload) -> Path:
    """Where the list of files lazysnap recorded for ``workload`` is kept (:func:`ensure_profile`)."""
    return profile_path(layout, image_tag(PROFILED, workload))


def ensure_profile(images: ImageSet, workload: Workload) -> Path:
    """The list of files lazysnap records as ``workload``'s startup profile, from the cache or
    recorded now (``images`` was built with the ``estargz`` tag)."""
    if images.layout is None:
        raise RuntimeError("ImageSet.build() first")
    with locked(images.cache):
        return _recorded(images, workload, images.layout)


def _recorded(images: ImageSet, workload: Workload, layout: Path) -> Path:
    """``ensure_profile`` with the cache lock held. The list is current when stamped by this
    recorder, or when the ``estargz-profiled`` tag converted from it is."""
    listing = recorded_profile(layout, workload)
    wanted = stamp(PROFILED, workload)
    stamps = variant_stamps(layout)
    key = f"profile.{workload.name}"
    if listing.exists() and wanted in (stamps.get(key), stamps.get(image_tag(PROFILED, workload))):
        return listing
    work = images.workdir / "prof"
    try:
        _record(images, workload, listing, work)
    finally:
        remove_tmpdir(work)
    set_variant_stamp(layout, key, wanted)
    return listing


def _profile_files(listing: Path) -> list[str]:
    return [ln for ln in listing.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _record(images: ImageSet, workload: Workload, listing: Path, work: Path) -> None:
    work.mkdir(parents=True)
    config = write_config(work / "lazysnap.toml", {"profile": {"record": True}})
    daemon = LazysnapDaemon(work / "s", config=config, extra_args=["--log-level", "info"])
    containerd = Containerd(work / "cd", {SNAPSHOTTER: str(daemon.address)})
    listing.parent.mkdir(exist_ok=True)
    ref = images.ref(images.registry.host, "estargz")
    print(f"[images] {workload.name}: recording its startup profile with lazysnap ...", flush=True)
    (work / "s").mkdir()
    try:
        daemon.start()
        containerd.start()
        containerd.rpull(ref, snapshotter=SNAPSHOTTER, timeout=3600)
        run_workload(containerd, ref, workload, snapshotter=SNAPSHOTTER)
        export = [sys.executable, "-m", "snapshotter", "profile", "export", ref]
        export += ["--config", str(config), "--root", str(daemon.root), "--output", str(listing)]
        subprocess.run(export, check=True, capture_output=True, text=True, timeout=60)
    finally:
        with contextlib.suppress(Exception):
            containerd.stop()
        daemon.stop()
    files = _profile_files(listing)
    if not files:
        raise RuntimeError(f"{workload.name}: the recorded startup profile is empty")
    print(f"[images] {workload.name}: {len(files)} files in the profile", flush=True)


def _convert(layout: Path, listing: Path, tag: str) -> None:
    print(f"[images] converting {tag} with {listing.name} ...", flush=True)
    convert = [sys.executable, "-m", "snapshotter", "convert", "--format", "estargz", "--quiet"]
    convert += ["--prefetch-files", str(listing), f"oci:{layout}:gzip", f"oci:{layout}:{tag}"]
    proc = subprocess.run(convert, capture_output=True, text=True, timeout=7200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"lazysnap convert exited {proc.returncode}:\n{proc.stderr[-3000:]}")


@contextlib.contextmanager
def profile_attached(images: ImageSet, workload: Workload) -> Iterator[str]:
    """``workload``'s recorded profile (:func:`ensure_profile`) attached to the ``estargz`` image
    in the benchmark's registry, with ``lazysnap profile push``, as the image's only startup
    profile while the block runs (it gives what the push printed), and none after it: the other
    modes pull the same image and must not find it, and model's profile is not model-full's.
    RuntimeError, saying why, when the profile is missing or the push fails.

    The registry has no referrers API (distribution 2.8): the image's referrers tag lists the
    artifacts, so pointing it at an empty list detaches them."""
    layout = images.layout
    if layout is None:
        raise RuntimeError("ImageSet.build() first")
    listing = recorded_profile(layout, workload)
    if not listing.exists() or not _profile_files(listing):
        raise RuntimeError(
            f"{workload.name}: no recorded startup profile to attach ({listing} is missing or empty)"
        )
    subject = OciLayout(layout).tagged("estargz")
    if subject.media_type != _OCI_MANIFEST:
        raise RuntimeError(f"{workload.name}: the estargz tag is a {subject.media_type}, not a manifest")
    _empty_referrers(images, subject.digest)
    try:
        ref = images.ref(images.registry.host, "estargz")
        push = [sys.executable, "-m", "snapshotter", "profile", "push", ref, "--files", str(listing)]
        push += ["--manifest", subject.digest, "--hosts-dir", str(images.workdir)]
        try:
            proc = subprocess.run(push, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{workload.name}: lazysnap profile push did not finish in 600 s") from None
        if proc.returncode != 0:
            raise RuntimeError(
                f"{workload.name}: lazysnap profile push exited {proc.returncode}: "
                f"{proc.stderr.strip()[-2000:]}"
            )
        yield proc.stdout.strip()
    finally:
        _empty_referrers(images, subject.digest)


def _empty_referrers(images: ImageSet, subject: str) -> None:
    """Point the referrers tag of manifest ``subject`` at an empty list."""
    url = f"http://{images.registry.host}/v2/{images.repo}/manifests/{referrers_tag(subject)}"
    body = json.dumps({"schemaVersion": 2, "mediaType": _OCI_INDEX, "manifests": []}).encode()
    request = urllib.request.Request(url, data=body, method="PUT", headers={"Content-Type": _OCI_INDEX})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status = response.status
    except OSError as exc:  # HTTPError and URLError too
        raise RuntimeError(f"emptying the referrers tag of {subject} in the registry: {exc}") from None
    if status != 201:
        raise RuntimeError(f"emptying the referrers tag of {subject} in the registry: HTTP {status}")


_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _optimize(images: ImageSet, workload: Workload, layout: Path, tag: str, work: Path) -> None:
    work.mkdir(parents=True)
    containerd = Containerd(work / "cd")
    source = images.ref(images.registry.host, "gzip")
    target = images.ref(images.registry.host, tag)
    record = profile_path(layout, tag).with_suffix(".json")
    record.parent.mkdir(exist_ok=True)
    print(f"[images] {workload.name}: ctr-remote image optimize ...", flush=True)
    try:
        containerd.start()
        containerd.ctr("content", "fetch", "--plain-http", source, timeout=3600)
        containerd.ctr(
            "image",
            "optimize",
            "--oci",
            "--period",
            str(OPTIMIZE_PERIOD_S),
            "--record-out",
            str(record),
            "--entrypoint",
            json.dumps(list(workload.command[:1])),
            "--args",
            json.dumps(list(workload.command[1:])),
            source,
            target,
            binary="ctr-remote",
            timeout=7200,
        )
        containerd.ctr("image", "push", "--plain-http", target, timeout=3600)
        copy_to_layout(target, layout, tag)
    finally:
        containerd.stop()
    if not record.exists() or not record.read_text().strip():
        raise RuntimeError(f"{workload.name}: ctr-remote image optimize recorded no access")
