"""The contract between the snapshotter and the lazy side: all either half knows of the other.

The snapshotter (``snapshots.py``) decides per layer whether to ask for a lazy mount, commits lazy
snapshots itself and keeps them mounted; the lazy side (``remote.py``, run by the FUSE manager
process) fetches, verifies and mounts. Between them there is only this module:

- the Prepare labels containerd sends that matter to both (``TARGET_REF_LABEL`` triggers the
  remote-snapshot handshake; the reference and digest labels say what to fetch; ``REMOTE_LABEL``
  marks a committed lazy snapshot so it is mounted again after a restart);
- ``LazyMounts``, the four calls the snapshotter makes, and ``NotLazyError``, the one answer that
  means "not lazily; containerd downloads it" (or, when ``required``, "no one can"); ``mount``
  answers ``Served``: the layer is *mounted* lazily at the directory, or (the eager fallback) the
  directory was *filled* with the unpacked, verified layer, to be committed as a plain snapshot;
- the FUSE manager's socket, pid file and the wire form of those calls.

Nothing here imports the lazy side; importing it loads no FUSE, HTTP or format code.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from snapshotter.digest import InvalidDigestError, validate_digest

# Set by containerd's unpacker on the Prepare of each layer: the chain ID to commit it as.
TARGET_REF_LABEL = "containerd.io/snapshot.ref"
# Set by lazysnap on a committed lazy snapshot (stargz-snapshotter uses the same label and value).
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_LABEL_VALUE = "remote snapshot"
# Image reference and layer digest, from ctr-remote's handler or from the CRI plugin/nerdctl.
REFERENCE_LABELS = ("containerd.io/snapshot/remote/stargz.reference", "containerd.io/snapshot/cri.image-ref")
DIGEST_LABELS = ("containerd.io/snapshot/remote/stargz.digest", "containerd.io/snapshot/cri.layer-digest")
# The digest of the image manifest containerd pulled (CRI plugin, nerdctl); lazy layers are read
# from that manifest, never from whatever the tag points to by now.
MANIFEST_DIGEST_LABELS = ("containerd.io/snapshot/cri.manifest-digest",)
# Comma-separated digests of this layer and the ones above it in the image.
NEIGHBOUR_LABELS = ("containerd.io/snapshot/remote/stargz.layers", "containerd.io/snapshot/cri.image-layers")
MAX_REFERENCE_LENGTH = 4096  # containerd's own label limit (key + value)


class NotLazyError(Exception):
    """This layer will not be served lazily; ``reason`` is a short machine-readable word.

    ``required``: the layer is in a format only lazysnap can mount (Nydus-like), so a normal pull
    cannot work either and Prepare must fail with this error instead."""

    def __init__(self, reason: str, detail: str, *, required: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.required = required

    def to_wire(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail, "required": self.required}

    @classmethod
    def from_wire(cls, value: Mapping[str, Any], *, required: bool) -> NotLazyError:
        return cls(
            str(value.get("reason", "unknown")),
            str(value.get("detail", "")),
            required=bool(value.get("required", required)),
        )


class Served(enum.Enum):
    """How ``LazyMounts.mount`` provided a layer at the directory it was given."""

    MOUNTED = "mounted"  # a lazy layer is mounted there: commit it as a remote snapshot
    FILLED = "filled"  # the directory now holds the unpacked layer: commit it as a plain snapshot


class LazyMounts(Protocol):
    """What the snapshotter asks of lazy layers: ``RemoteLayers`` in the FUSE manager, or the
    daemon's client of it (``FuseManagerClient``). Calls block; make them from worker threads."""

    def mount(self, labels: Mapping[str, str], mountpoint: Path, lowerdirs: Sequence[Path] = ()) -> Served:
        """Provide the layer the labels name at ``mountpoint`` (idempotent for lazy mounts), or
        NotLazyError. ``lowerdirs``: the directories of the snapshot's parent chain, nearest first
        (an eager fill gives the directories it creates their attributes, as containerd does)."""

    def check(self, mountpoint: Path) -> bool:
        """Whether the lazy layer at ``mountpoint`` is mounted and served."""

    def unmount(self, mountpoint: Path) -> None:
        """Take the layer at ``mountpoint`` down; logs, never raises."""

    def forget_unused(self, digests_in_use: set[str]) -> None:
        """Drop the stored metadata of layers no snapshot uses any more."""


@dataclass(frozen=True)
class LayerRef:
    """Which layer to serve: where to fetch it, its blob digest and, when containerd says, the
    digest of the manifest it was pulled with."""

    reference: str
    digest: str
    manifest_digest: str = ""


def _first(labels: Mapping[str, str], keys: tuple[str, ...]) -> str:
    return next((labels[k] for k in keys if labels.get(k)), "")


def layer_ref(labels: Mapping[str, str]) -> LayerRef:
    """The image reference and layer digest from Prepare labels, or NotLazyError saying why.

    Digests are validated strictly here: they become file names under the root."""
    reference = _first(labels, REFERENCE_LABELS)
    digest = _first(labels, DIGEST_LABELS)
    if not reference or not digest:
        raise NotLazyError(
            "no-remote-labels",
            "containerd sent no image reference/layer digest labels (plain `ctr image pull`, or the "
            "CRI plugin with disable_snapshot_annotations = true)",
        )
    if len(reference) > MAX_REFERENCE_LENGTH:
        raise NotLazyError("bad-labels", f"image reference of {len(reference)} bytes")
    manifest = _first(labels, MANIFEST_DIGEST_LABELS)
    try:
        validate_digest(digest)
        if manifest:
            validate_digest(manifest)
    except InvalidDigestError as exc:
        raise NotLazyError("bad-labels", str(exc)) from None
    return LayerRef(reference, digest, manifest)


def layer_digest(labels: Mapping[str, str]) -> str:
    """The layer digest label when it is a valid digest, else ""."""
    digest = _first(labels, DIGEST_LABELS)
    try:
        return validate_digest(digest)
    except InvalidDigestError:
        return ""


def neighbour_digests(labels: Mapping[str, str], limit: int) -> list[str]:
    """The valid digests of the layers above this one, at most ``limit`` (the label is a hint)."""
    listed = _first(labels, NEIGHBOUR_LABELS)
    digests: list[str] = []
    for item in listed.split(","):
        item = item.strip()
        if item and len(digests) < limit:
            try:
                digests.append(validate_digest(item))
            except InvalidDigestError:
                continue
    return digests


# --- the FUSE manager's side of the wire ---------------------------------------------------------


def manager_socket(root: Path) -> Path:
    """Where the FUSE manager of ``root`` listens (root only)."""
    return root / "fuse.sock"


def holder_socket(root: Path) -> Path:
    """Where the fd holder that keeps the blob server's FUSE connection listens (EROFS backend).
    While it exists with no manager running, a killed manager left the holder behind."""
    return root / "fuse-holder.sock"


def manager_pidfile(root: Path) -> Path:
    """The running FUSE manager's pid: ``kill -TERM $(cat ROOT/fuse.pid)`` unmounts lazy layers."""
    return root / "fuse.pid"


def mount_request(
    labels: Mapping[str, str], mountpoint: Path, lowerdirs: Sequence[Path] = ()
) -> dict[str, Any]:
    """``POST /mount`` body. The answer is ``{"served": "mounted" | "filled"}`` (an older manager
    answers ``{}``: mounted) or ``{"not_lazy": {...}}``."""
    return {"labels": dict(labels), "mountpoint": str(mountpoint), "lowerdirs": [str(p) for p in lowerdirs]}


def parse_mount_request(body: Any) -> tuple[dict[str, str], Path, list[Path]]:
    """The labels, mountpoint and lower directories of a ``POST /mount`` body; ValueError when
    malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("labels"), dict):
        raise ValueError("mount request needs a labels object and a mountpoint")
    mountpoint = body.get("mountpoint")
    if not isinstance(mountpoint, str) or not mountpoint.startswith("/"):
        raise ValueError("mount request needs an absolute mountpoint")
    lowerdirs = body.get("lowerdirs", [])
    if not isinstance(lowerdirs, list) or not all(isinstance(p, str) and p[:1] == "/" for p in lowerdirs):
        raise ValueError("mount request lowerdirs must be a list of absolute paths")
    labels = {str(k): str(v) for k, v in body["labels"].items()}
    return labels, Path(mountpoint), [Path(p) for p in lowerdirs]


def served_from_answer(answer: Mapping[str, Any]) -> Served:
    """``Served`` from a ``POST /mount`` answer that was not a refusal; ValueError if unknown."""
    return Served(answer.get("served", Served.MOUNTED.value))
