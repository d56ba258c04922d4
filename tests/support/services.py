"""Process wrappers for a loopback registry and a private containerd, for e2e tests.

Every process is started by us and stopped by PID; nothing is ever killed by
name, because other containerd instances (e.g. a developer's) may be running.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.support import mounts, oci

CTR_NAMESPACE = "lztest"
RUNC_RUNTIME = "io.containerd.runc.v2"


class ServiceError(RuntimeError):
    """A service failed to start or behaved unexpectedly."""


class CtrError(subprocess.CalledProcessError):
    """``ctr`` exited non-zero; ``str()`` includes stdout, stderr and containerd's log tail."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str, log_tail: str) -> None:
        super().__init__(returncode, list(cmd), stdout, stderr)
        self.log_tail = log_tail

    def __str__(self) -> str:
        return (
            f"{' '.join(self.cmd)} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}\n"
            f"--- containerd log (tail) ---\n{self.log_tail}"
        )


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: str | os.PathLike[str], lines: int = 40) -> str:
    """Last ``lines`` lines of a log file (or a note that it is missing)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<no log {path}: {exc.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


def terminate_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, wait up to ``timeout`` s, then SIGKILL. Ignores vanished processes."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie; reaps it if it is our child."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test process dies (no orphaned daemons)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Daemon:
    """A long-running child process logging to a file, stopped by PID."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args, preexec = list(args), None
        # PDEATHSIG is per spawning *thread*: only safe from the main thread. util-linux's setpriv
        # sets it in the child; a Python preexec_fn would force a plain fork(), whose atfork
        # handlers restart gRPC's poller threads in the child when the test process uses gRPC,
        # and that child then sometimes dies (SIGABRT/SIGSEGV) before it can exec.
        if _in_main_thread():
            setpriv = shutil.which("setpriv")
            if setpriv:
                args = [setpriv, "--pdeathsig", "TERM", "--", *args]
            else:
                preexec = _die_with_parent
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                preexec_fn=preexec,
            )

    @property
    def pid(self) -> int | None:
        """PID of the running daemon."""
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        """True if the daemon process is still alive."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """Tail of the daemon's log."""
        return log_tail(self.log_path, lines)

    def _terminate(self, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def bcrypt_hash(password: str, cost: int = 5) -> str:
    """A bcrypt hash (``$2b$``) of ``password``, as distribution's htpasswd auth requires.

    Made by the system's libcrypt (libxcrypt, which every Debian system has): no Python package
    or ``htpasswd`` binary needed. Go's bcrypt accepts ``$2b$``; cost 5 keeps the registry fast.
    """
    lib = ctypes.CDLL("libcrypt.so.1", use_errno=True)
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2b$", cost, None, 0)
    hashed = lib.crypt(password.encode(), salt) if salt else None
    if not hashed or not hashed.startswith(b"$2b$"):
        raise ServiceError("libcrypt cannot make bcrypt hashes")
    return str(hashed.decode())


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """An htpasswd file (``user:bcrypt``) for distribution's ``auth: htpasswd``."""
    path.write_text("".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in users.items()))
    path.chmod(0o600)
    return path


class Registry(_Daemon):
    """CNCF distribution (``docker-registry``) on 127.0.0.1:<free port>, storage under ``workdir``.

    Options: ``users`` turns on Basic auth (``auth: htpasswd``; a bcrypt htpasswd file is written
    to ``workdir``); ``proxy_remote_url`` makes it a pull-through cache of another registry
    (``proxy: remoteurl``), optionally with ``proxy_username``/``proxy_password`` for it.
    """

    binary = "/usr/bin/docker-registry"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        users: Mapping[str, str] | None = None,
        proxy_remote_url: str | None = None,
        proxy_username: str = "",
        proxy_password: str = "",
        log_level: str = "warn",
    ) -> None:
        super().__init__(Path(workdir), "registry")
        self.port = 0
        self.users = dict(users or {})
        self.proxy_remote_url = proxy_remote_url
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        self.log_level = log_level

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (use with ``--plain-http``)."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Registry:
        """Write config.yml, start the registry and wait for ``GET /v2/`` to answer 200."""
        self.port = free_port()
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        text = (
            "version: 0.1\n"
            f"log:\n  level: {self.log_level}\n  accesslog:\n    disabled: true\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        if self.users:
            htpasswd = write_htpasswd(self.workdir / "htpasswd", self.users)
            text += f"auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {htpasswd}\n"
        if self.proxy_remote_url:
            text += f"proxy:\n  remoteurl: {self.proxy_remote_url}\n"
            if self.proxy_username:
                text += f"  username: {self.proxy_username}\n  password: {self.proxy_password}\n"
        config.write_text(text)
        config.chmod(0o600)
        # OTEL/bugsnag-free; the registry needs no environment of its own.
        self._spawn([self.binary, "serve", str(config)])
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running():
                raise ServiceError(f"registry exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return self
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and self.users:  # serving, and asking for credentials
                    return self
                last = str(exc)
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.1)
        self.stop()
        raise ServiceError(f"registry not ready on {self.host} after {timeout}s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s."""
        self._terminate(timeout)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Containerd(_Daemon):
    """A private containerd whose root, state, sockets and runc state all live in ``workdir``.

    Keep ``workdir`` short (e.g. ``tempfile.mkdtemp(prefix="lz", dir="/tmp")``):
    unix socket paths are limited to 108 bytes.
    """

    binary = "containerd"
    cri_plugin = "io.containerd.grpc.v1.cri"
    disabled = (
        "io.containerd.grpc.v1.cri",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.aufs",
    )

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        proxy_plugins: Mapping[str, str] | None = None,
        *,
        namespace: str = CTR_NAMESPACE,
        log_level: str = "info",
        cri: bool = False,
        cri_snapshotter: str = "lazysnap",
        cri_registry_config_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """``cri=True`` enables the CRI plugin (images in namespace ``k8s.io``) with
        ``cri_snapshotter``, snapshot annotations on (the labels a remote snapshotter needs), CNI
        and sandbox state in ``workdir`` and, if given, ``cri_registry_config_path`` as its
        certs.d (hosts.toml) directory."""
        super().__init__(Path(workdir), "containerd")
        self.proxy_plugins = dict(proxy_plugins or {})
        self.cri = cri
        self.cri_snapshotter = cri_snapshotter
        self.cri_registry_config_path = cri_registry_config_path
        self.namespace = namespace
        self.log_level = log_level
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.address = str(self.workdir / "c.sock")
        self.runc_root = self.workdir / "runc"
        self.fifo_dir = self.workdir / "fifo"
        #: cgroup (v1 hierarchies and cgroup2 "unified") parent of our containers.
        self.cgroup_parent = f"/{self.workdir.name}-{namespace}"
        self.config_path = self.workdir / "config.toml"
        # (namespace, container id) of containers created through this object.
        self.containers: set[tuple[str, str]] = set()
        if len(self.address) + len(".ttrpc") >= 100:
            raise ValueError(f"workdir too long for unix sockets: {self.workdir}")

    def log_tail(self, lines: int = 40) -> str:
        """Tail of containerd's log, without the start-up "loading plugin" noise."""
        text = log_tail(self.log_path, 10_000)
        kept = [ln for ln in text.splitlines() if 'msg="loading plugin' not in ln]
        return "\n".join(kept[-lines:])

    def write_config(self) -> Path:
        """Write the version-2 config.toml and return its path."""
        w = self.workdir
        lines = [
            "version = 2",
            f"root = {_toml_str(str(self.root))}",
            f"state = {_toml_str(str(self.state))}",
            "disabled_plugins = ["
            + ", ".join(_toml_str(p) for p in self.disabled if not (self.cri and p == self.cri_plugin))
            + "]",
            "",
            "[grpc]",
            f"  address = {_toml_str(self.address)}",
            "[ttrpc]",
            f"  address = {_toml_str(self.address + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            f"  level = {_toml_str(self.log_level)}",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_str(str(w / 'opt'))}",
            "",
        ]
        if self.cri:
            lines += self._cri_config()
        for name, addr in self.proxy_plugins.items():
            lines += [
                f"[proxy_plugins.{_toml_str(name)}]",
                '  type = "snapshot"',
                f"  address = {_toml_str(addr)}",
                "",
            ]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines))
        return self.config_path

    def _cri_config(self) -> list[str]:
        """containerd 1.6's CRI plugin, kept inside ``workdir``: it needs no CNI to pull images
        (the conf dir is created and watched, so it must be ours) and never pulls the sandbox
        image unless a pod is run."""
        w = self.workdir
        plugin = f'[plugins."{self.cri_plugin}"]'
        lines = [
            plugin,
            '  sandbox_image = "registry.k8s.io/pause:3.6"',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f"{plugin[:-1]}.containerd]",
            f"  snapshotter = {_toml_str(self.cri_snapshotter)}",
            "  disable_snapshot_annotations = false",
            f"{plugin[:-1]}.cni]",
            f"  bin_dir = {_toml_str(str(w / 'cni' / 'bin'))}",
            f"  conf_dir = {_toml_str(str(w / 'cni' / 'conf'))}",
        ]
        if self.cri_registry_config_path is not None:
            lines += [
                f"{plugin[:-1]}.registry]",
                f"  config_path = {_toml_str(str(self.cri_registry_config_path))}",
            ]
        return [*lines, ""]

    def start(self, timeout: float = 30.0) -> Containerd:
        """Write the config, start containerd and wait until ``ctr version`` succeeds."""
        self.write_config()
        self._spawn([self.binary, "--config", str(self.config_path)])
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running():
                raise ServiceError(f"containerd exited early:\n{self.log_tail()}")
            if os.path.exists(self.address):
                proc = subprocess.run(
                    ["ctr", "--address", self.address, "version"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
                if proc.returncode == 0:
                    return self
                last = proc.stderr
            time.sleep(0.1)
        self.stop()
        raise ServiceError(f"containerd not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        binary: str = "ctr",
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCK -n NS ARGS...``; raise :class:`CtrError` on failure if ``check``.

        ``binary="ctr-remote"`` runs stargz-snapshotter's ctr (same flags, adds ``image rpull``).
        """
        cmd = [binary, "--address", self.address, "-n", namespace or self.namespace, *args]
        stdin: dict[str, Any] = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **stdin)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            raise CtrError(cmd, -1, out, err + f"\n<timed out after {timeout}s>", self.log_tail()) from None
        if check and proc.returncode != 0:
            raise CtrError(cmd, proc.returncode, proc.stdout, proc.stderr, self.log_tail())
        return proc

    def pull(
        self,
        ref: str,
        *,
        snapshotter: str | None = None,
        plain_http: bool = True,
        extra_args: Sequence[str] = (),
        binary: str = "ctr",
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr image pull [--plain-http] [--snapshotter S] ARGS REF`` (default snapshotter: overlayfs).

        With ``binary="ctr-remote"`` this still runs ``image pull``; use
        ``ctr("image", "rpull", ..., binary="ctr-remote")`` for a lazy pull.
        """
        args = ["image", "pull"]
        if plain_http:
            args.append("--plain-http")
        if snapshotter:
            args += ["--snapshotter", snapshotter]
        return self.ctr(*args, *extra_args, ref, timeout=timeout, binary=binary)

    def rpull(
        self,
        ref: str,
        *,
        snapshotter: str = "lazysnap",
        timeout: float = 180,
        plain_http: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``ctr-remote image rpull``: a pull that passes the labels a remote snapshotter needs.

        ``extra_args`` go before the reference (``--user U:P``, ``--hosts-dir DIR``).
        """
        args = ["image", "rpull", *(["--plain-http"] if plain_http else []), "--snapshotter", snapshotter]
        self.ctr(*args, *extra_args, ref, binary="ctr-remote", timeout=timeout)

    # -- teardown ---------------------------------------------------------

    def _shim_pids(self) -> set[int]:
        """PIDs of containerd-shim-runc-v2 processes started by *this* containerd.

        A v2 shim's command line is ``containerd-shim-runc-v2 -namespace NS -id ID
        -address <our grpc socket>``; the shim's pid file under our state dir is
        used as well.
        """
        pids: set[int] = set()
        for pidfile in self.state.glob("io.containerd.runtime.v2.task/*/*/shim.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(pidfile.read_text().strip()))
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            try:
                argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not argv or not argv[0].endswith(b"containerd-shim-runc-v2"):
                continue
            with contextlib.suppress(ValueError, IndexError):
                if argv[argv.index(b"-address") + 1].decode() == self.address:
                    pids.add(int(proc_dir.name))
        # Only keep PIDs that really are shims (pid files may be stale).
        out: set[int] = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                if (
                    Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .split(b"\0")[0]
                    .endswith(b"containerd-shim-runc-v2")
                ):
                    out.add(pid)
        return out

    def _task_pids(self) -> set[int]:
        """Container init PIDs recorded under our state dir."""
        pids: set[int] = set()
        for pidfile in self.state.glob("io.containerd.runtime.v2.task/*/*/init.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(pidfile.read_text().strip()))
        return pids

    def _kill_tasks(self) -> None:
        if not self.running():
            return
        namespaces = {ns for ns, _ in self.containers} | {self.namespace}
        for ns in namespaces:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                tasks = self.ctr("task", "ls", "-q", namespace=ns, check=False, timeout=15).stdout.split()
                for t in tasks:
                    self.ctr("task", "kill", "-s", "SIGKILL", t, namespace=ns, check=False, timeout=15)
                for t in tasks:
                    self.ctr("task", "rm", "-f", t, namespace=ns, check=False, timeout=15)
                for c in self.ctr(
                    "container", "ls", "-q", namespace=ns, check=False, timeout=15
                ).stdout.split():
                    self.ctr("container", "rm", c, namespace=ns, check=False, timeout=15)

    def stop(self, timeout: float = 10.0) -> list[mounts.Mount]:
        """Kill tasks, stop containerd and its shims (by PID), unmount everything under workdir.

        Returns mounts that could not be removed (normally empty).
        """
        with contextlib.suppress(Exception):
            self._kill_tasks()
        task_pids = self._task_pids()
        self._terminate(timeout)
        for pid in task_pids:
            _kill_if_alive(pid)
        for pid in self._shim_pids():
            terminate_pid(pid, timeout=5)
        # Shim sockets live in a global dir, named by a hash of (our address, ns, id).
        for ns, cid in self.containers:
            digest = hashlib.sha256(os.path.join(self.address, ns, cid).encode()).hexdigest()
            with contextlib.suppress(OSError):
                os.unlink(f"/run/containerd/s/{digest}")
        self._remove_cgroups()
        return mounts.unmount_all(self.workdir)

    def _remove_cgroups(self) -> None:
        """rmdir our (now empty) cgroup parents in every mounted hierarchy."""
        base = Path("/sys/fs/cgroup")
        for hierarchy in [base, *(p for p in base.iterdir() if p.is_dir())]:
            parent = hierarchy / self.cgroup_parent.lstrip("/")
            if not parent.is_dir():
                continue
            for child in parent.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_if_alive(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


_counter = itertools.count()


def unique_id(prefix: str = "lz") -> str:
    """A container/snapshot id unique across calls and processes."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


def run_args(containerd: Containerd, cid: str) -> list[str]:
    """Extra ``ctr run`` flags for container ``cid``, keeping host state inside the workdir.

    runc works here with plain defaults (cgroup v1 hybrid hierarchy, cgroupfs
    driver, no systemd); these flags only isolate state so teardown is exact:
    ``--runc-root`` (instead of the shared ``/run/containerd/runc``),
    ``--fifo-dir`` (instead of ``/run/containerd/fifo``) and a cgroup parent
    private to this containerd instance (removed in :meth:`Containerd.stop`).
    """
    return [
        "--runtime",
        RUNC_RUNTIME,
        "--runc-root",
        str(containerd.runc_root),
        "--fifo-dir",
        str(containerd.fifo_dir),
        "--cgroup",
        f"{containerd.cgroup_parent}/{cid}",
    ]


def run_container(
    containerd: Containerd,
    image: str,
    *cmd: str,
    snapshotter: str | None = None,
    timeout: float = 60,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``ctr run --rm IMAGE <unique id> CMD...``; returns the completed process unchecked."""
    cid = unique_id()
    containerd.containers.add((containerd.namespace, cid))
    args = ["run", "--rm", *run_args(containerd, cid), *extra_args]
    if snapshotter:
        args += ["--snapshotter", snapshotter]
    return containerd.ctr(*args, image, cid, *cmd, check=False, timeout=timeout)


def run_in_container(
    containerd: Containerd,
    image: str,
    *cmd: str,
    snapshotter: str | None = None,
    timeout: float = 60,
    extra_args: Sequence[str] = (),
) -> str:
    """Run ``cmd`` in a fresh container of ``image`` and return its stdout.

    Raises :class:`CtrError` (with containerd's log tail) on a non-zero exit.
    Pass ``snapshotter="lazysnap"`` to use the proxy snapshotter.
    """
    proc = run_container(
        containerd, image, *cmd, snapshotter=snapshotter, timeout=timeout, extra_args=extra_args
    )
    if proc.returncode != 0:
        raise CtrError(proc.args, proc.returncode, proc.stdout, proc.stderr, containerd.log_tail())
    return proc.stdout


def require_privileges(
    binaries: Sequence[str] = ("containerd", "ctr", "docker-registry", "skopeo", "runc"),
) -> None:
    """Skip (or, with ``CI=true``, fail) unless we are root with /dev/fuse and the needed binaries."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    problems += [f"{b} not found on PATH" for b in binaries if shutil.which(b) is None]
    if problems:
        missing_prerequisite("e2e prerequisites missing: " + "; ".join(problems))


def missing_prerequisite(reason: str) -> NoReturn:
    """Skip the test for ``reason``; with ``CI=true`` fail it instead (CI must run every test)."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


_FS_REPORT_SCRIPT = r"""
tops=$1; shift
for p in "$@"; do
  if /bin/busybox stat -c 'S|%n|%F|%a|%u|%g|%i|%h' "$p"; then
    if [ -L "$p" ]; then echo "L|$p|$(/bin/busybox readlink "$p")"
    elif [ -f "$p" ]; then echo "H|$p|$(/bin/busybox sha256sum "$p")"; fi
  else echo "M|$p"; fi
done
for d in $tops; do /bin/busybox find "$d" -xdev | /bin/busybox sed 's/^/F|/'; done
"""

_KINDS = {
    "regular file": "file",
    "regular empty file": "file",
    "directory": "dir",
    "symbolic link": "symlink",
}


def verify_container_fs(
    containerd: Containerd,
    image: str,
    expected: Mapping[str, oci.Node],
    *,
    snapshotter: str | None = None,
    exact: bool = True,
    timeout: float = 60,
) -> list[str]:
    """Check, from inside one container, that its root filesystem matches ``expected``.

    Compares type, mode, owner, content sha256, symlink target and hard-link inode
    sharing (via busybox ``stat``/``sha256sum``/``readlink``); with ``exact`` also
    reports unexpected paths below the image's top-level directories. Returns a
    list of human-readable mismatches (empty when everything matches).
    """
    paths = sorted(expected)
    tops = sorted({"/" + p.strip("/").split("/")[0] for p in paths})
    out = run_in_container(
        containerd,
        image,
        "/bin/busybox",
        "sh",
        "-c",
        _FS_REPORT_SCRIPT,
        "sh",
        " ".join(tops),
        *paths,
        snapshotter=snapshotter,
        timeout=timeout,
    )
    stats: dict[str, list[str]] = {}
    hashes: dict[str, str] = {}
    links: dict[str, str] = {}
    found: set[str] = set()
    problems: list[str] = []
    for line in out.splitlines():
        tag, _, rest = line.partition("|")
        if tag == "S":
            fields = rest.split("|")
            stats[fields[0]] = fields[1:]
        elif tag == "H":
            path, _, h = rest.partition("|")
            hashes[path] = h.split()[0] if h.split() else ""
        elif tag == "L":
            path, _, target = rest.partition("|")
            links[path] = target
        elif tag == "M":
            problems.append(f"{rest}: missing")
        elif tag == "F":
            found.add(rest)
    for path in paths:
        node = expected[path]
        if path not in stats:
            continue
        ftype, mode, uid, gid, ino, _nlink = stats[path]
        kind = _KINDS.get(ftype, ftype)
        if kind != node.kind:
            problems.append(f"{path}: is {ftype}, expected {node.kind}")
            continue
        if node.kind == "symlink":
            if links.get(path) != node.target:
                problems.append(f"{path}: symlink -> {links.get(path)!r}, expected {node.target!r}")
            continue
        if int(mode, 8) != node.mode:
            problems.append(f"{path}: mode {mode}, expected {node.mode:o}")
        if (int(uid), int(gid)) != (node.uid, node.gid):
            problems.append(f"{path}: owner {uid}:{gid}, expected {node.uid}:{node.gid}")
        if node.kind == "file":
            if hashes.get(path) != node.sha256:
                problems.append(f"{path}: content sha256 {hashes.get(path)}, expected {node.sha256}")
            if node.hardlink_of and node.hardlink_of in stats and stats[node.hardlink_of][4] != ino:
                problems.append(f"{path}: inode {ino} differs from {node.hardlink_of} (not a hard link)")
    if exact:
        problems += [f"{p}: unexpected" for p in sorted(found - set(paths))]
    return problems


# --- eStargz test images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EstargzImage:
    """An image converted by ``ctr-remote image convert --oci --estargz`` and pushed."""

    repo_tag: str  # "repo:tag", without the registry host
    expected: dict[str, oci.Node] = field(repr=False)
    large: bytes = field(repr=False)  # content of /data/large.bin
    layer_sizes: tuple[int, ...] = ()  # compressed sizes of the pushed layers, bottom first

    @property
    def total_size(self) -> int:
        return sum(self.layer_sizes)


def manifest_layer_sizes(containerd: Containerd, ref: str) -> tuple[int, ...]:
    """Compressed layer sizes of ``ref``'s (single-platform) manifest in containerd's content store."""
    for line in containerd.ctr("image", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ref:
            digest = next(f for f in fields if f.startswith("sha256:"))
            manifest = json.loads(containerd.ctr("content", "get", digest).stdout)
            return tuple(int(layer["size"]) for layer in manifest["layers"])
    raise ServiceError(f"{ref} not in ctr image ls")


def build_estargz_image(
    workdir: Path,
    staging: Registry,
    target_host: str,
    repo_tag: str,
    *,
    large_size: int = 8 << 20,
    push_user: str | None = None,
) -> EstargzImage:
    """The standard test image plus ``/data/large.bin`` (incompressible), pushed as gzip to the
    plain ``staging`` registry, converted to eStargz by a throwaway containerd and pushed to
    ``target_host/repo_tag`` (with ``--user push_user`` for a registry that wants credentials).
    """
    spec = oci.test_image_layers()
    large = oci.pseudo_random(large_size, repo_tag.encode())
    layers = (*spec.layers, (oci.Dir("/data"), oci.File("/data/large.bin", large)))
    repo = repo_tag.partition(":")[0]
    image = oci.build_layout(workdir / "layout", layers, tag="gzip", cmd=list(spec.cmd))
    gzip_ref = oci.push(image.layout_dir, "gzip", staging.host, repo)
    cd = Containerd(workdir / f"cd{uuid.uuid4().hex[:8]}")  # unique: it names a cgroup parent
    try:
        cd.start()
        cd.pull(gzip_ref)
        target = f"{target_host}/{repo_tag}"
        cd.ctr("image", "convert", "--oci", "--estargz", gzip_ref, target, binary="ctr-remote", timeout=300)
        auth = ["--user", push_user] if push_user else []
        cd.ctr("image", "push", "--plain-http", *auth, target, timeout=300)
        sizes = manifest_layer_sizes(cd, target)
    finally:
        cd.stop()
    return EstargzImage(repo_tag, oci.apply_layers(layers), large, sizes)
