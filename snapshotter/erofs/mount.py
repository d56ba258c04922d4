"""Mount a layer's EROFS metadata image with its data blob as the extra device; unmount; probe support.

Two ways to give the kernel the two files:

- file-backed (Linux >= 6.12, ``CONFIG_EROFS_FS_BACKED_BY_FILE``): ``mount(META, target, "erofs",
  MS_RDONLY, "device=BLOB")`` with both regular files. util-linux's ``mount`` command cannot do it:
  it sets up a loop device for a regular-file source and then fails on the extra device, so this
  module calls mount(2) itself.
- loop devices (older kernels; chunk-based files and device tables date from Linux 5.15/5.16):
  both files are attached read-only to loop devices with ``LOOP_CONFIGURE`` (Linux >= 5.8) and
  autoclear, and mounted as ``mount(/dev/loopN, target, "erofs", MS_RDONLY, "device=/dev/loopM")``.
  The mount holds both devices; they detach themselves when it is unmounted.

``kernel_support`` mounts a tiny image written by ``snapshotter.erofs.writer`` in a temporary
directory, reads a file back, and caches the answer for the life of the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import platform
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from snapshotter.erofs.layout import plan_layout
from snapshotter.erofs.writer import build_metadata
from snapshotter.formats.index import Compression, Entry, EntryType, LayerIndex
from snapshotter.layertree import LayerTree

MS_RDONLY = 1
MNT_DETACH = 2
LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; } where
# loop_info64 is 5 u64 (device, inode, rdevice, offset, sizelimit), 4 u32 (number, encrypt_type,
# encrypt_key_size, flags), file_name[64], crypt_name[64], encrypt_key[32], u64 init[2].
_LOOP_CONFIG = struct.Struct("<II40xIIII64s64x32x16x64x")
_LOOP_ATTEMPTS = 8  # another process may take the free device between GET_FREE and CONFIGURE
_PROBE_CONTENT = b"lazysnap erofs probe\n"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class ErofsMountError(OSError):
    """A mount(2) or loop device setup failed; ``errno`` is the kernel's answer."""


def _mount(source: str, target: Path, options: str) -> None:
    if _libc.mount(source.encode(), os.fsencode(target), b"erofs", MS_RDONLY, options.encode()) != 0:
        err = ctypes.get_errno()
        raise ErofsMountError(err, f"mount -t erofs -o {options} {source} {target}: {os.strerror(err)}")


@contextlib.contextmanager
def _loop_device(backing: Path) -> Iterator[str]:
    """Attach ``backing`` read-only to a free loop device with autoclear; yields its path. Closing
    our descriptor at the end detaches it unless a mount holds it by then."""
    with open(backing, "rb") as file:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_LOOP_ATTEMPTS):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                name = os.fsencode(backing)[-63:]
                config = _LOOP_CONFIG.pack(
                    file.fileno(), 0, number, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, name
                )
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno == errno.EBUSY:
                        continue
                    raise ErofsMountError(
                        exc.errno, f"attach {backing} to {device}: {exc.strerror}"
                    ) from None
                break
            else:
                raise ErofsMountError(errno.EBUSY, f"no free loop device for {backing}")
        finally:
            os.close(control)
    try:
        yield device
    finally:
        os.close(fd)


def mount_erofs(meta: Path, blob: Path, target: Path, *, loop: bool = False) -> None:
    """Mount the metadata image ``meta`` read-only on ``target`` with ``blob`` as its device 1,
    file-backed, or over two loop devices with ``loop=True``. Raises ``ErofsMountError``."""
    if not loop:
        _mount(str(meta), target, f"device={blob}")
        return
    with _loop_device(meta) as meta_device, _loop_device(blob) as blob_device:
        _mount(meta_device, target, f"device={blob_device}")


def unmount(target: Path, *, lazy: bool = True) -> None:
    """Unmount ``target`` (lazily by default, so a busy mount does not block shutdown). Loop
    devices under it detach by themselves once the kernel lets the mount go."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise ErofsMountError(err, f"umount {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def is_erofs_mountpoint(path: Path) -> bool:
    """Whether an EROFS file system is mounted on ``path`` (as /proc/self/mounts spells it)."""
    target = os.path.abspath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "erofs" and _unescape(fields[1]) == target:
                return True
    return False


def _probe_image(directory: Path) -> tuple[Path, Path]:
    entries = {
        "": Entry("", EntryType.DIR, 0o755),
        "probe": Entry("probe", EntryType.REG, 0o644, size=len(_PROBE_CONTENT)),
    }
    tree = LayerTree(LayerIndex("probe", Compression.NONE, entries))
    layout = plan_layout(tree)
    meta, blob = directory / "meta.erofs", directory / "blob"
    meta.write_bytes(build_metadata(tree, layout))
    blob.write_bytes(_PROBE_CONTENT.ljust(layout.blob_size, b"\0"))
    return meta, blob


def _filesystem_listed() -> bool:
    try:
        with open("/proc/filesystems") as listing:
            return any(line.split()[-1:] == ["erofs"] for line in listing)
    except OSError:
        return False


@functools.cache
def kernel_support(*, loop: bool = False) -> tuple[bool, str]:
    """Whether this kernel mounts an EROFS image with an extra device, file-backed (default) or
    over loop devices, and why not. Mounts a tiny image once; the answer is cached."""
    kernel = f"Linux {platform.release()}"
    if os.geteuid() != 0:
        return False, "mounting EROFS needs root (CAP_SYS_ADMIN)"
    if loop and not os.path.exists(LOOP_CONTROL):
        return False, f"{LOOP_CONTROL} is missing: no loop devices"
    listed = _filesystem_listed()  # may load on first mount (a module); the mount decides
    directory = Path(tempfile.mkdtemp(prefix="lazysnap-erofs-probe-"))
    target = directory / "mnt"
    target.mkdir()
    try:
        meta, blob = _probe_image(directory)
        try:
            mount_erofs(meta, blob, target, loop=loop)
        except ErofsMountError as exc:
            why = exc.strerror or str(exc)
            if not listed and exc.errno == errno.ENODEV:
                why = "the kernel has no EROFS support"
            elif not loop and exc.errno in (errno.ENOTBLK, errno.EINVAL):
                why = f"no file-backed EROFS mounts (they need Linux 6.12): {why}"
            return False, f"{kernel}: {why}"
        try:
            if (target / "probe").read_bytes() != _PROBE_CONTENT:
                return False, f"{kernel}: a file read back from the probe image differs"
        finally:
            unmount(target, lazy=False)
        how = "over loop devices" if loop else "file-backed"
        return True, f"{kernel} mounts EROFS {how} with an extra device"
    except OSError as exc:
        return False, f"{kernel}: probing EROFS failed: {exc}"
    finally:
        _remove_probe(directory, target)


def _remove_probe(directory: Path, target: Path) -> None:
    if is_erofs_mountpoint(target):  # only when reading or unmounting failed half-way
        unmount(target)  # detached from the tree at once, so the files can go
    shutil.rmtree(directory, ignore_errors=True)
