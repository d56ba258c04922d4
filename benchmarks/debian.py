"""Root filesystems made of Debian packages, for the benchmark images.

Packages come from this machine's configured apt sources, with their dependencies resolved by apt
itself against an empty dpkg status (so nothing installed on the host counts as present): ``apt-get
install --simulate`` gives the closure and its exact versions, ``apt-get install --download-only``
fetches the .debs into a private archive directory, and ``dpkg-deb -x`` unpacks each one. No
maintainer script runs, as in a ``--variant=extract`` debootstrap; what the workloads need from
those scripts is done here: busybox applet links, ``/etc/passwd``, and Python byte code compiled
ahead of time (Debian's postinst would compile it, and an image without it would spend its start
compiling). Documentation, man pages and locales are left out, as in ``debian:*-slim``.

Layers are cumulative: layer *i* holds the packages that the union of layers 0..*i* needs and
no lower layer has, so the ``python3`` layer of the ``sympy`` image is the same blob as the
``python`` image's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BASE_PACKAGES = ("busybox-static", "libc6")
BUSYBOX_APPLETS = (
    "sh",
    "cat",
    "cp",
    "dd",
    "echo",
    "env",
    "grep",
    "head",
    "kill",
    "ls",
    "mkdir",
    "printf",
    "rm",
    "sed",
    "sleep",
    "test",
    "true",
    "uname",
    "usleep",
    "wc",
)
DROPPED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")
FIXED_MTIME = 1577836800  # 2020-01-01, on every entry: layers depend only on package contents
_INST = re.compile(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) .*\[(\S+)\]\)")


class DebianError(RuntimeError):
    """apt or dpkg failed."""


@dataclass(frozen=True, order=True)
class Package:
    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        """The name apt gives the downloaded .deb (an epoch's colon is escaped)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    def __str__(self) -> str:
        return f"{self.name}={self.version}"


def _apt_options(workdir: Path) -> list[str]:
    status = workdir / "status"
    status.parent.mkdir(parents=True, exist_ok=True)
    status.touch()
    archives = workdir / "debs"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    return [
        "-q",
        "-o",
        f"Dir::State::status={status}",
        "-o",
        f"Dir::Cache::archives={archives}",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "APT::Install-Recommends=false",
        "-o",
        "APT::Install-Suggests=false",
    ]


def _apt(args: Sequence[str], workdir: Path, timeout: float) -> str:
    cmd = ["apt-get", *_apt_options(workdir), *args]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise DebianError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


_updated = False


def resolve(packages: Sequence[str], workdir: Path) -> list[Package]:
    """The packages ``apt-get install packages`` would unpack on an empty system, with versions.
    Runs ``apt-get update`` once if apt does not know a package (lists never fetched)."""
    global _updated
    try:
        out = _apt(["install", "--simulate", *packages], workdir, timeout=300)
    except DebianError as exc:
        if _updated or "Unable to locate package" not in str(exc):
            raise
        _updated = True
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, timeout=600)
        out = _apt(["install", "--simulate", *packages], workdir, timeout=300)
    found = [Package(*m.groups()) for line in out.splitlines() if (m := _INST.match(line))]
    if not found:
        raise DebianError(f"apt resolved nothing for {packages}:\n{out}")
    return sorted(found)


def plan_layers(layers: Sequence[Sequence[str]], workdir: Path) -> list[list[Package]]:
    """Cumulative closures: layer 0 is the base (busybox + libc), each next layer what its
    packages add to everything below."""
    wanted: list[str] = list(BASE_PACKAGES)
    seen: set[Package] = set()
    plan: list[list[Package]] = []
    for extra in [(), *layers]:
        wanted += extra
        closure = resolve(wanted, workdir)
        below = {p.name: p for p in seen}
        changed = [p for p in closure if p.name in below and below[p.name] != p]
        if changed:
            raise DebianError(f"adding {extra} changes packages of a lower layer: {changed}")
        new = [p for p in closure if p not in seen]
        plan.append(new)
        seen.update(new)
    return plan


def download(packages: Sequence[Package], workdir: Path) -> list[Path]:
    """The .deb of each package, downloaded into ``workdir/debs`` unless it is there already."""
    debs = workdir / "debs"
    missing = [p for p in packages if not (debs / p.filename).exists()]
    if missing:
        _apt(["install", "--download-only", "--yes", *(str(p) for p in missing)], workdir, timeout=1800)
    paths = [debs / p.filename for p in packages]
    absent = [p.name for p in paths if not p.exists()]
    if absent:
        raise DebianError(f"apt did not download {absent}")
    return paths


def extract(debs: Sequence[Path], rootfs: Path) -> None:
    rootfs.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(rootfs)], check=True, capture_output=True)
    for rel in DROPPED:
        shutil.rmtree(rootfs / rel, ignore_errors=True)


def add_base_files(rootfs: Path) -> None:
    """What a bootstrap's maintainer scripts would add and the workloads need."""
    bindir = rootfs / "bin"
    for applet in BUSYBOX_APPLETS:
        link = bindir / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")
    etc = rootfs / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name, mode in (("tmp", 0o1777), ("root", 0o700), ("proc", 0o755), ("sys", 0o755), ("dev", 0o755)):
        (rootfs / name).mkdir(exist_ok=True)
        (rootfs / name).chmod(mode)


def compile_python(rootfs: Path) -> bool:
    """Byte-compile the Python modules of this layer, as Debian's postinst does, with this
    machine's Python of the same minor version. Unchecked-hash .pyc files are used without
    looking at source time stamps (which the layers fix to one date). False if no Python fits."""
    dirs = [
        d
        for pattern in ("usr/lib/python3.*", "usr/lib/python3/dist-packages")
        for d in sorted(rootfs.glob(pattern))
        if d.is_dir()
    ]
    if not dirs:
        return True
    versions = {
        m.group(1) for d in rootfs.glob("usr/lib/python3.*") if (m := re.search(r"3\.(\d+)$", d.name))
    }
    minor = versions.pop() if len(versions) == 1 else str(sys.version_info.minor)
    python = sys.executable if str(sys.version_info.minor) == minor else shutil.which(f"python3.{minor}")
    if python is None:
        print(f"note: no python3.{minor} on this machine; {rootfs} stays without byte code", flush=True)
        return False
    cmd = [python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"]
    cmd += ["-s", str(rootfs), "-p", "/", "-x", r"/(test|tests|idlelib|lib2to3/tests)/"]
    # compileall prints errors for the odd Python-2-only file shipped as data; those stay uncompiled.
    subprocess.run([*cmd, *(str(d) for d in dirs)], capture_output=True, check=False, timeout=1800)
    return True


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = FIXED_MTIME
    info.uname = info.gname = ""
    return info


def write_tar(rootfs: Path, out: Path) -> None:
    """A deterministic tar of ``rootfs``: sorted, one time stamp, hard links kept."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            base = Path(dirpath)
            rel = base.relative_to(rootfs)
            if rel != Path("."):
                tar.add(base, arcname=str(rel), recursive=False, filter=_normalize)
            for name in sorted(filenames):
                tar.add(base / name, arcname=str(rel / name), recursive=False, filter=_normalize)
            # Symlinks to directories are listed in dirnames but not descended into.
            for name in [d for d in dirnames if (base / d).is_symlink()]:
                tar.add(base / name, arcname=str(rel / name), recursive=False, filter=_normalize)
                dirnames.remove(name)
