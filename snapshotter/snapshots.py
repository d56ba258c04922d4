"""The snapshotter: containerd's overlayfs semantics on top of the metadata store.

Owns the on-disk layout under the root and the mounts handed to containerd::

    ROOT/metadata.db          the store (store.py)
    ROOT/snapshots/ID/fs      a snapshot's files: upperdir while active, a lowerdir once committed
    ROOT/snapshots/ID/work    overlayfs workdir of an active snapshot

Directory changes follow the store's transactions so that a crash leaves, at worst, directories no
snapshot owns; those are removed by ``cleanup()``, which also runs at start.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.contract import (
    REMOTE_LABEL,
    REMOTE_LABEL_VALUE,
    TARGET_REF_LABEL,
    LazyMounts,
    NotLazyError,
    Served,
    layer_digest,
)
from snapshotter.diskusage import disk_usage
from snapshotter.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError, UnavailableError
from snapshotter.mounts import mount_type, remove_tree, unmount
from snapshotter.store import Info, Kind, Snapshot, Store, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    """One entry of containerd's []mount.Mount."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)


def overlay_supports_index() -> bool:
    """containerd adds index=off when the kernel knows the option, so that a lower layer shared by
    several overlays never trips overlayfs' inode index checks."""
    return Path("/sys/module/overlay/parameters/index").exists()


class Snapshotter:
    """containerd's ``snapshots.Snapshotter``, with the overlayfs snapshotter's semantics.

    - **Keys and names share one key space.** ``Prepare(key, parent)`` and ``View(key, parent)``
      create an active (writable) or view (read-only) snapshot under ``key``; ``parent`` must name
      a committed snapshot (or be empty). A second Prepare/View with a used key is AlreadyExists.
    - **Commit(name, key)** turns the active snapshot ``key`` into the committed snapshot ``name``:
      ``key`` is gone afterwards, and the directory (same id) becomes a read-only lower layer of
      whatever is prepared on top of ``name``. Only active snapshots commit; views never do.
    - **Remove(key)** deletes a snapshot that has no children (FailedPrecondition otherwise). The
      metadata goes in one transaction first; the directory is then renamed to ``rm-ID`` and
      deleted, so a crash in between leaves only a directory that ``cleanup`` removes.
    - **Mounts(key)** of an active snapshot or view: a bind mount of its own directory when it has
      no parent, a read-only bind of the parent for a one-parent view, else an overlay whose lower
      directories are the parent chain, nearest first. Committed snapshots have no mounts.
    - **The remote-snapshot handshake**: a Prepare carrying ``TARGET_REF_LABEL`` (containerd's
      unpacker, per layer) asks the lazy side to mount the layer at the new snapshot's directory;
      if it can, the snapshot is committed here under the label's chain ID, marked with
      ``REMOTE_LABEL``, and the answer is AlreadyExists, so containerd neither downloads nor
      unpacks the layer. With the eager fallback the lazy side may instead *fill* the directory
      with the layer, unpacked and verified; then the snapshot is committed under the chain ID
      as a plain snapshot (no ``REMOTE_LABEL``) and the answer is AlreadyExists too. If it can do
      neither, the Prepare answers like any other and containerd fills the directory itself —
      unless the layer is in a format only lazysnap can read, which fails the Prepare with the
      reason.
    - Lazy layers stay mounted while the daemon runs and are mounted again at start; a snapshot
      whose lazy lower layer cannot be mounted answers Unavailable.
    """

    def __init__(
        self,
        root: Path,
        *,
        overlay_options: list[str] | None = None,
        remote: LazyMounts | None = None,
    ) -> None:
        self.root = root
        self.remote = remote
        # Committed remote snapshots: id -> the labels that say how to mount them again.
        self._remote_labels: dict[int, dict[str, str]] = {}
        self.snapshots_dir = root / "snapshots"
        self.snapshots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = Store(root / "metadata.db")
        if overlay_options is None:
            overlay_options = ["index=off"] if overlay_supports_index() else []
        self.overlay_options = overlay_options
        # Held while a snapshot directory is created and while cleanup scans, so cleanup never
        # mistakes a directory being created for an orphan.
        self._dirs_lock = threading.Lock()

    def close(self) -> None:
        self.store.close()

    # --- paths and mounts ---------------------------------------------------------------------

    def fs_path(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid) / "fs"

    def work_path(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid) / "work"

    def mounts_for(self, snap: Snapshot) -> list[Mount]:
        self._ensure_remote_parents(snap.parent_ids)
        if not snap.parent_ids:
            mode = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(self.fs_path(snap.id)), [mode, "rbind"])]
        options = list(self.overlay_options)
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(snap.id)}", f"upperdir={self.fs_path(snap.id)}"]
        elif len(snap.parent_ids) == 1:
            return [Mount("bind", str(self.fs_path(snap.parent_ids[0])), ["ro", "rbind"])]
        options.append("lowerdir=" + ":".join(str(self.fs_path(p)) for p in snap.parent_ids))
        return [Mount("overlay", "overlay", options)]

    # --- the Snapshots API --------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        target = labels.get(TARGET_REF_LABEL, "")
        if not target or self.remote is None:
            return self._create(Kind.ACTIVE, key, parent, labels)
        return self._prepare_remote(key, parent, labels, target)

    def _prepare_remote(self, key: str, parent: str, labels: Mapping[str, str], target: str) -> list[Mount]:
        """containerd's remote-snapshot handshake: if the layer can be mounted lazily, commit it
        as ``target`` ourselves and answer AlreadyExists, so containerd skips the download.
        Otherwise answer like any snapshotter, and containerd unpacks the layer."""
        assert self.remote is not None
        try:
            existing = self.store.get_info(target)
        except NotFoundError:
            existing = None
        if existing is not None and existing.kind == Kind.COMMITTED and existing.parent == parent:
            raise AlreadyExistsError(f"target snapshot {target!r} already exists")
        mounts = self._create(Kind.ACTIVE, key, parent, labels)
        snap = self.store.get_snapshot(key)
        sid = snap.id
        lowerdirs = [self.fs_path(p) for p in snap.parent_ids]
        try:
            served = self.remote.mount(labels, self.fs_path(sid), lowerdirs)
        except NotLazyError as exc:
            if not exc.required:
                return mounts
            self.remove(key)  # containerd could not unpack this layer either: say why instead
            raise FailedPreconditionError(
                f"layer {layer_digest(labels) or target} is in a format only lazysnap reads "
                f"(Nydus-like), and mounting it lazily failed: {exc}"
            ) from None
        if served is Served.FILLED:
            self._commit_filled(key, target, labels, sid)
        committed_labels = {**labels, REMOTE_LABEL: REMOTE_LABEL_VALUE}
        try:
            self.store.commit(key, target, committed_labels, Usage())
        except Exception:
            self.remote.unmount(self.fs_path(sid))
            self.remove(key)
            raise
        self._remote_labels[sid] = committed_labels
        raise AlreadyExistsError(f"target snapshot {target!r} already exists (mounted lazily)")

    def _commit_filled(self, key: str, target: str, labels: Mapping[str, str], sid: int) -> None:
        """The lazy side unpacked the layer into the snapshot's directory (eager fallback): commit
        it as containerd's own Commit would, and tell containerd the layer exists."""
        try:
            self.store.commit(key, target, labels, disk_usage(self.fs_path(sid)))
        except Exception:
            self.remove(key)
            raise
        raise AlreadyExistsError(f"target snapshot {target!r} already exists (unpacked by lazysnap)")

    def restore_remote(self) -> None:
        """Mount again the lazy layers the store knows (after a restart or crash), and forget the
        stored TOCs of layers no snapshot uses any more."""
        if self.remote is None:
            return
        in_use: set[str] = set()
        for info in self.store.list_infos():
            if info.kind == Kind.COMMITTED and info.labels.get(REMOTE_LABEL) == REMOTE_LABEL_VALUE:
                self._remote_labels[info.id] = info.labels
                digest = layer_digest(info.labels)
                if digest:
                    in_use.add(digest)
                self._remount(info.id)
        self.remote.forget_unused(in_use)

    def remote_snapshots(self) -> int:
        """How many committed lazy snapshots this snapshotter keeps mounted."""
        return len(self._remote_labels)

    def _remount(self, sid: int) -> bool:
        assert self.remote is not None
        fs = self.fs_path(sid)
        if self.remote.check(fs):
            return True
        try:  # also replaces a dead mount left by a previous daemon process
            self.remote.mount(self._remote_labels[sid], fs)
        except NotLazyError as exc:
            log.error("cannot mount lazy layer again", extra={"id": sid, "error": str(exc)})
            return False
        return True

    def _ensure_remote_parents(self, parent_ids: tuple[int, ...]) -> None:
        for pid in parent_ids:
            if pid in self._remote_labels and not self._remount(pid):
                name = self._remote_labels[pid].get(TARGET_REF_LABEL, str(pid))
                raise UnavailableError(f"lazy layer {name} cannot be mounted (registry unreachable?)")

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        if parent:  # a lazy layer below that cannot be mounted: fail before creating anything
            self._ensure_remote_parents(self.store.chain_ids(parent))
        with self._dirs_lock, self.store.create(kind, key, parent, labels) as snap:
            directory = self.snapshots_dir / str(snap.id)
            try:
                if directory.exists():  # left by a crash before its transaction committed
                    self._delete(directory)
                directory.mkdir(mode=0o700)
                fs = self.fs_path(snap.id)
                fs.mkdir(mode=0o755)
                if kind == Kind.ACTIVE:
                    self.work_path(snap.id).mkdir(mode=0o711)
                if snap.parent_ids:
                    # The new upper directory takes the owner of the layer below, as containerd's
                    # overlay snapshotter does, so that the container's / keeps its owner.
                    st = self.fs_path(snap.parent_ids[0]).stat()
                    os.lchown(fs, st.st_uid, st.st_gid)
            except BaseException:
                self._delete(directory)
                raise
        return self.mounts_for(snap)

    def mounts(self, key: str) -> list[Mount]:
        return self.mounts_for(self.store.get_snapshot(key))

    def commit(self, name: str, key: str, labels: Mapping[str, str], parent: str = "") -> Info:
        info = self.store.get_info(key)
        usage = disk_usage(self.fs_path(info.id)) if info.kind == Kind.ACTIVE else Usage()
        return self.store.commit(key, name, labels, usage, parent or None)

    def remove(self, key: str) -> None:
        sid, _ = self.store.remove(key)
        self._remote_labels.pop(sid, None)
        self._remove_directory(sid)

    def stat(self, key: str) -> Info:
        return self.store.get_info(key)

    def update(self, key: str, labels: Mapping[str, str], fieldpaths: list[str]) -> Info:
        return self.store.update(key, labels, fieldpaths)

    def infos(self) -> list[Info]:
        return self.store.list_infos()

    def usage(self, key: str) -> Usage:
        info = self.store.get_info(key)
        if info.kind == Kind.ACTIVE:
            return disk_usage(self.fs_path(info.id))
        return info.usage

    def cleanup(self) -> list[Path]:
        """Remove snapshot directories that no snapshot owns; return what was removed. Runs at
        start, where it must never stop the daemon: a directory it cannot remove is logged and
        left for the next cleanup."""
        doomed: list[Path] = []
        with self._dirs_lock:
            owned = {str(sid) for sid in self.store.ids()}
            for entry in self.snapshots_dir.iterdir():
                if entry.name in owned or entry.name.startswith("rm-"):
                    continue
                target = self.snapshots_dir / f"rm-{entry.name}"
                try:
                    self._release_mount(entry / "fs")
                    entry.rename(target)
                except OSError as exc:
                    log.error(
                        "cannot clean up a snapshot directory", extra={"path": str(entry), "error": str(exc)}
                    )
                    continue
                doomed.append(target)
        doomed += [e for e in self.snapshots_dir.iterdir() if e.name.startswith("rm-") and e not in doomed]
        removed = []
        for path in doomed:
            if self._delete(path):
                log.info("removed orphaned snapshot directory", extra={"path": str(path)})
                removed.append(path)
        return removed

    def _release_mount(self, fs: Path) -> None:
        """Never delete through a mount: unmount a lazy layer first (through the FUSE manager that
        serves it, and here if the manager could not), and anything else left mounted there."""
        if mount_type(fs) is None:
            return
        if self.remote is not None:
            self.remote.unmount(fs)
        while mount_type(fs) is not None:
            unmount(fs)

    def _delete(self, directory: Path) -> bool:
        """Delete a snapshot directory (iteratively: a container may nest directories thousands
        deep); log instead of raising, so that neither Remove nor start-up cleanup can fail on
        what a container left behind. True when it is gone."""
        try:
            self._release_mount(directory / "fs")
            left = remove_tree(directory)
        except OSError as exc:
            log.error("cannot delete a snapshot directory", extra={"path": str(directory), "error": str(exc)})
            return False
        if left:
            log.error(
                "snapshot directory holds mounts lazysnap did not make; left in place",
                extra={"path": str(directory), "mounts": left[:8]},
            )
            return False
        return True

    def _remove_directory(self, sid: int) -> None:
        directory = self.snapshots_dir / str(sid)
        target = self.snapshots_dir / f"rm-{sid}"
        try:
            self._release_mount(self.fs_path(sid))
            directory.rename(target)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot remove a snapshot directory", extra={"path": str(directory), "error": str(exc)})
            return
        self._delete(target)
