"""The blob server: one FUSE mount, a flat directory of read-only files, one per lazy layer's blob.

The kernel serves each lazy layer from an EROFS metadata image whose file data lives in the layer's
data blob; this module serves those blobs. It speaks the kernel protocol on /dev/fuse itself
(``protocol``): a READ of [a, b) goes straight to the blob's ``BlobSource.read`` in a worker thread,
with nothing in between. It owns the mount (mount(2) through ctypes), the INIT negotiation, the
table of files (name → node id, size, source), the serving threads, and the handover of the
connection to a successor process (``start`` resumes a connection a keeper held; see ``holder`` and
``fdstore``), including FUSE_NOTIFY_RESEND for the requests a killed server had read.

Threads: ``readers`` threads read /dev/fuse (non-blocking; they poll it, and a wake-up pipe that
lets ``stop`` end them without closing the fd under them, only when it is empty) and answer
metadata requests inline, as well as small READs a source has at hand (``read_cached``). Other
READs go to a fair, bounded queue (``readqueue``) served by ``workers`` threads, of which a slow
blob can take at most three quarters. All threads read the one fd the keeper holds, never a
FUSE_DEV_IOC_CLONE clone: the kernel ends the requests a clone had read with ECONNABORTED when the
clone is closed (as on SIGKILL), while those read through the shared file stay queued for the
successor to have resent.

A ``BlobServer`` object starts once; a restart is a new object (usually in a new process).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import logging
import os
import select
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from snapshotter.fuse import kernel as k
from snapshotter.fuse import protocol as p
from snapshotter.fuse.readqueue import ReadQueue
from snapshotter.fuse.session import FileRecord, Negotiated, SessionState, StateError, valid_name

log = logging.getLogger(__name__)

FSTYPE = "fuse.lazysnap-blobs"
FS_SOURCE = "lazysnap-blobs"
DEFAULT_MAX_READ = 1 << 20
# Blobs are immutable: the kernel may keep names, attributes and pages as long as it likes.
CACHE_TIMEOUT_SECONDS = 365 * 86400.0
# Small READs a source has at hand are answered by the thread that read them (a hand-off to a
# worker costs more than the copy); big ones go to the workers, which copy in parallel.
INLINE_READ_MAX = 128 * 1024
# Requests are small (no WRITE on a read-only mount); the kernel insists on at least 8 KiB.
_REQUEST_BUFFER = 64 * 1024
_INIT_TIMEOUT_SECONDS = 30.0
_DT_DIR = 4
_DT_REG = 8


class BlobSource(Protocol):
    """The bytes of one blob. ``read`` runs in a worker thread and may block (cache miss, registry
    fetch); it returns exactly ``size`` bytes (the server never asks past ``self.size``), as any
    buffer (a memoryview saves a copy), or raises OSError, which becomes EIO for that read only."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, size: int) -> p.Buffer: ...


class CachedBlobSource(BlobSource, Protocol):
    """A source that can also say at once whether bytes are at hand: ``read_cached`` returns them
    (exactly ``size``) if it can without waiting on the network, else None. For READs up to
    ``INLINE_READ_MAX`` the server calls it in the thread that read the request, saving the
    hand-off to a worker, and calls ``read`` in a worker only when it returns None."""

    def read_cached(self, offset: int, size: int) -> p.Buffer | None: ...


class FdKeeper(Protocol):
    """Something that keeps a copy of the /dev/fuse fd while servers come and go (``holder``,
    ``fdstore``)."""

    def keep(self, name: str, fd: int) -> None: ...

    def take(self, name: str) -> int | None: ...

    def forget(self, name: str) -> None: ...


class BlobServerError(Exception):
    """The mount could not be set up or resumed."""


@dataclass(eq=False)
class _Node:
    nodeid: int
    name: str
    size: int
    source: BlobSource

    @property
    def read_cached(self) -> Callable[[int, int], p.Buffer | None] | None:
        return getattr(self.source, "read_cached", None)

    def attr(self) -> p.Attr:
        return p.Attr(self.nodeid, self.size, stat.S_IFREG | 0o444)


@dataclass(eq=False)
class _ReadJob:
    unique: int
    pid: int  # the reading thread, as the kernel reports it
    node: _Node
    offset: int
    size: int
    answered: bool = False  # guarded by BlobServer._inflight_lock

    @property
    def key(self) -> int:
        return self.node.nodeid


@dataclass
class _Stats:
    reads: int = 0
    read_bytes: int = 0
    read_errors: int = 0
    interrupts: int = 0  # INTERRUPT requests received
    interrupted: int = 0  # READs answered EINTR because their caller was being killed
    resent: int = 0  # requests the kernel resent after a handover
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, n in counts.items():
                setattr(self, key, getattr(self, key) + n)


def keeper_name_for(mountpoint: Path) -> str:
    """The name a mount's fd is kept under: stable per mount point, valid for holder and systemd."""
    return "lazysnap-blobs-" + hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]


class BlobServer:
    """Serves blobs as ``mountpoint/NAME`` (see the module docstring).

    ``state_path`` records the session for a successor; ``keeper`` keeps the fd across restarts
    (without one, the mount ends with the process). ``max_read`` and ``readahead`` apply to a new
    mount; a resumed one keeps what its INIT negotiated.
    """

    def __init__(
        self,
        mountpoint: Path | str,
        *,
        state_path: Path | str,
        keeper: FdKeeper | None = None,
        keeper_name: str | None = None,
        max_read: int = DEFAULT_MAX_READ,
        readahead: int = DEFAULT_MAX_READ,
        workers: int = 16,
        readers: int = 1,
        max_waiting_reads: int = 1024,
        max_background: int = 256,
    ) -> None:
        if max_read < p.PAGE_SIZE or max_read % p.PAGE_SIZE or max_read > 65535 * p.PAGE_SIZE:
            raise ValueError(f"max_read must be a multiple of {p.PAGE_SIZE}, got {max_read}")
        # Real directories, as /proc/self/mountinfo names them (the mount point itself may be a
        # dead mount that cannot be resolved).
        mountpoint = Path(os.path.abspath(mountpoint))
        self.mountpoint = Path(os.path.realpath(mountpoint.parent)) / mountpoint.name
        self.state_path = Path(state_path)
        self.keeper = keeper
        self.keeper_name = keeper_name or keeper_name_for(self.mountpoint)
        self._max_read = max_read
        self._readahead = readahead
        self._workers = max(1, workers)
        self._readers = max(1, readers)
        self._max_waiting = max(1, max_waiting_reads)
        self._max_background = min(max(1, max_background), 65535)
        self.resumed = False
        self.kept = False
        self._started = False
        self._fd = -1
        self._state: SessionState | None = None
        self._nodes: dict[int, _Node] = {}
        self._by_name: dict[str, _Node] = {}
        self._lock = threading.Lock()  # add/remove and the state file
        self._threads: list[threading.Thread] = []
        self._worker_threads: list[threading.Thread] = []
        self._queue: ReadQueue[_ReadJob] = ReadQueue(self._workers * 3 // 4, self._max_waiting)
        self._stopping = threading.Event()
        self._gone = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._inflight: dict[int, _ReadJob] = {}  # READs taken and not yet answered, by unique
        self._inflight_lock = threading.Lock()
        self._early_interrupts: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._stats = _Stats()

    # -- public API ---------------------------------------------------------------------------

    @property
    def negotiated(self) -> Negotiated:
        if self._state is None:
            raise RuntimeError("the blob server has not started")
        return self._state.negotiated

    def start(self, sources: Mapping[str, BlobSource] | None = None) -> None:
        """Serve ``sources``: resume the connection the keeper holds for this mount point if there
        is one and the state file matches it (files not in ``sources`` are removed), else mount
        afresh (clearing a dead mount left at the mount point)."""
        if self._started:
            raise RuntimeError("a BlobServer starts once; make a new one to serve again")
        self._started = True
        sources = dict(sources or {})
        for name in sources:
            _check_name(name)
        fd, state = self._resumable()
        self.resumed = fd is not None
        try:
            if fd is None:
                fd, state = self._mount()
            assert state is not None
            self._fd = fd
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            dropped = self._bind(state, sources)
            state.save(self.state_path)
            self._state = state
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._start_threads()
        except BaseException:
            self._abandon(fd)
            raise
        if self.resumed:
            for name, nodeid in dropped:
                self._invalidate(name, nodeid)
            if state.negotiated.can_resend:
                # Requests the previous server had read but not answered wait in the kernel's
                # processing queue; have them queued again for us.
                self._notify(p.resend())
            else:
                log.warning(
                    "kernel lacks FUSE_NOTIFY_RESEND (Linux < 6.9): requests the previous blob server "
                    "had read stay unanswered",
                    extra={"mountpoint": str(self.mountpoint)},
                )
        else:
            self.keep()
        log.info(
            "blob server %s",
            "resumed" if self.resumed else "mounted",
            extra={"mountpoint": str(self.mountpoint), "blobs": len(self._by_name)},
        )

    def keep(self) -> bool:
        """Hand (again) a copy of the fd to the keeper, e.g. after the holder was restarted."""
        if self.keeper is None or self._fd < 0:
            return False
        try:
            self.keeper.keep(self.keeper_name, self._fd)
        except Exception as exc:  # serving goes on without survival
            log.warning("cannot hand the FUSE fd to its keeper; a restart will unmount the blobs: %s", exc)
            self.kept = False
        else:
            self.kept = True
        return self.kept

    def add(self, name: str, source: BlobSource) -> Path:
        """Serve ``source`` as ``mountpoint/name``; a name already served with the same size gets
        the new source (so a restarted caller can re-add what it had)."""
        _check_name(name)
        size = source.size
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"blob {name}: bad size {size!r}")
        with self._lock:
            state = self._require_state()
            node = self._by_name.get(name)
            if node is not None:
                if node.size != size:
                    raise FileExistsError(f"blob {name} is served with size {node.size}, not {size}")
                node.source = source
                return self.mountpoint / name
            node = _Node(state.next_nodeid, name, size, source)
            state.next_nodeid += 1
            state.files[name] = FileRecord(node.nodeid, size)
            state.save(self.state_path)
            self._nodes[node.nodeid] = node
            self._by_name[name] = node
        return self.mountpoint / name

    def remove(self, name: str) -> None:
        """Stop serving ``name``: later lookups fail, its cached pages are dropped, reads of files
        still open get EIO. Waits for reads of it that are under way in the kernel."""
        with self._lock:
            state = self._require_state()
            node = self._by_name.pop(name, None)
            if node is None:
                raise FileNotFoundError(f"blob {name} is not served")
            del self._nodes[node.nodeid]
            del state.files[name]
            state.save(self.state_path)
        self._invalidate(name, node.nodeid)

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def is_alive(self) -> bool:
        """True while the connection serves (not stopped, not aborted or unmounted from outside)."""
        return self._fd >= 0 and not self._gone.is_set() and not self._stopping.is_set()

    def stats(self) -> dict[str, int]:
        s = self._stats
        with self._inflight_lock:
            inflight = len(self._inflight)
        with s.lock:
            return {
                "reads": s.reads,
                "read_bytes": s.read_bytes,
                "read_errors": s.read_errors,
                "reads_in_flight": inflight,
                "interrupts": s.interrupts,
                "interrupted": s.interrupted,
                "resent": s.resent,
            }

    def stop(self, *, handover: bool = False, timeout: float = 30.0) -> None:
        """Stop serving. Without ``handover``: unmount (lazily if busy), have the keeper drop its
        copy, and end the connection (files still open then fail). With ``handover``: leave the
        mount and the keeper's fd for a successor; stop reading requests and answer the READs
        already taken (a successor has the rest resent). Threads are joined either way."""
        if self._fd < 0:
            return
        if handover and not self.kept:
            raise BlobServerError("no keeper holds the FUSE fd: a handover would end the mount")
        self._stopping.set()
        if not handover:
            try:
                k.unmount(self.mountpoint)
            except OSError as exc:
                log.error("cannot unmount the blob mount: %s", exc)
            self._forget_kept()
        os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(timeout)
        self._queue.close(discard=not handover)  # dropped READs end with the connection
        for t in self._worker_threads:
            t.join(timeout)
        alive = [t.name for t in self._threads + self._worker_threads if t.is_alive()]
        if alive:
            # A source still blocks in a worker that would write to the fd: closing it now could
            # let a reused fd number receive the reply. Leave it open; the process ends soon.
            log.error("blob server threads did not stop; leaving the FUSE fd open", extra={"threads": alive})
        else:
            os.close(self._fd)
        self._fd = -1
        os.close(self._wake_r)
        os.close(self._wake_w)
        if not handover:
            self.state_path.unlink(missing_ok=True)
        log.info("blob server stopped", extra={"mountpoint": str(self.mountpoint), "handover": handover})

    # -- setting up -----------------------------------------------------------------------------

    def _resumable(self) -> tuple[int | None, SessionState | None]:
        """The kept fd and the state of a connection this server can resume, or (None, None)."""
        if self.keeper is None:
            return None, None
        try:
            fd = self.keeper.take(self.keeper_name)
        except Exception as exc:  # no keeper means a fresh mount
            log.warning("cannot ask the FUSE fd keeper: %s", exc)
            return None, None
        if fd is None:
            return None, None
        try:
            state = SessionState.load(self.state_path)
            if state.mountpoint != str(self.mountpoint):
                raise StateError(f"state is for {state.mountpoint}")
            mounted = k.mount_at(self.mountpoint)
            if mounted is None or mounted[1] != FSTYPE or mounted[0] != state.dev:
                raise StateError(f"no blob mount {state.dev} at {self.mountpoint} (found {mounted})")
        except StateError as exc:
            log.error("cannot resume the kept FUSE connection; mounting afresh: %s", exc)
            self._forget_kept()
            os.close(fd)
            return None, None
        self.kept = True
        return fd, state

    def _mount(self) -> tuple[int, SessionState]:
        k.clear_dead_mounts(self.mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            options = (
                f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,"
                f"max_read={self._max_read}"
            )
            k.mount_readonly(FS_SOURCE, self.mountpoint, FSTYPE, options)
            try:
                negotiated = self._negotiate(fd)
                mounted = k.mount_at(self.mountpoint)
                if mounted is None:
                    raise BlobServerError(f"{self.mountpoint} vanished from the mount table")
                k.set_readahead(mounted[0], self._readahead)
            except BaseException:
                k.unmount(self.mountpoint)
                raise
        except BaseException:
            os.close(fd)
            raise
        return fd, SessionState(str(self.mountpoint), mounted[0], negotiated, next_nodeid=2)

    def _negotiate(self, fd: int) -> Negotiated:
        """Answer the kernel's INIT (the first request of a new connection)."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(_INIT_TIMEOUT_SECONDS * 1000):
            raise BlobServerError("the kernel sent no INIT")
        buf = bytearray(_REQUEST_BUFFER)
        req = p.parse_request(buf, os.readv(fd, [buf]))
        if req.opcode != p.Opcode.INIT:
            raise BlobServerError(f"expected INIT, got opcode {req.opcode}")
        init = p.parse_init(req.body)
        if init.major != p.KERNEL_VERSION or init.minor < p.OLDEST_MINOR:
            os.writev(fd, p.reply(req.unique, error=errno.EPROTO))
            raise BlobServerError(f"kernel FUSE protocol {init.major}.{init.minor} is too old")
        wanted = (
            p.InitFlag.ASYNC_READ  # several READs of one file in flight (readahead)
            | p.InitFlag.ASYNC_DIO  # direct I/O (EROFS on the blob may use it) split into parallel READs
            | p.InitFlag.MAX_PAGES  # READs up to max_read instead of 128 KiB
            | p.InitFlag.PARALLEL_DIROPS  # lookups need no directory lock
            | p.InitFlag.EXPLICIT_INVAL_DATA  # pages of an immutable blob are never stale
            | p.InitFlag.INIT_EXT
        )
        flags = int(wanted) & init.flags
        max_pages = min(self._max_read // p.PAGE_SIZE, k.max_pages_limit())
        out = p.InitOut(
            minor=min(init.minor, p.SUPPORTED_MINOR),
            max_readahead=self._readahead,
            flags=flags,
            # The kernel stops sending readahead and async direct I/O of *every* file once this
            # many are outstanding: keep it well above the workers, so that a stalled blob fills
            # our fair queue rather than the kernel's global one.
            max_background=self._max_background,
            congestion_threshold=max(1, self._max_background * 3 // 4),
            max_write=p.PAGE_SIZE,  # read-only: nothing is ever written
            max_pages=max_pages,
        )
        os.writev(fd, p.reply(req.unique, out.pack()))
        return Negotiated(out.minor, init.flags, flags, max_pages * p.PAGE_SIZE, self._readahead)

    def _bind(self, state: SessionState, sources: dict[str, BlobSource]) -> list[tuple[str, int]]:
        """Attach sources to the state's files (keeping node ids); returns files without a source."""
        dropped: list[tuple[str, int]] = []
        for name, record in list(state.files.items()):
            source = sources.pop(name, None)
            if source is None or source.size != record.size:
                dropped.append((name, record.nodeid))
                del state.files[name]
                if source is not None:
                    sources[name] = source  # same name, other size: a new node
                continue
            node = _Node(record.nodeid, name, record.size, source)
            self._nodes[node.nodeid] = node
            self._by_name[name] = node
        for name, source in sorted(sources.items()):
            node = _Node(state.next_nodeid, name, source.size, source)
            state.next_nodeid += 1
            state.files[name] = FileRecord(node.nodeid, node.size)
            self._nodes[node.nodeid] = node
            self._by_name[name] = node
        return dropped

    def _start_threads(self) -> None:
        for i in range(self._readers):
            t = threading.Thread(target=self._read_requests, name=f"blobfs-reader-{i}", daemon=True)
            self._threads.append(t)
        for i in range(self._workers):
            t = threading.Thread(target=self._serve_reads, name=f"blobfs-worker-{i}", daemon=True)
            self._worker_threads.append(t)
        for t in self._threads + self._worker_threads:
            t.start()

    def _abandon(self, fd: int | None) -> None:
        """Undo a failed start."""
        self._stopping.set()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(5)
        self._queue.close(discard=True)
        for t in self._worker_threads:
            t.join(5)
        if fd is not None:
            if not self.resumed:
                k.unmount(self.mountpoint)
            os.close(fd)
        self._fd = -1

    def _require_state(self) -> SessionState:
        if self._state is None or self._fd < 0:
            raise RuntimeError("the blob server is not running")
        return self._state

    def _forget_kept(self) -> None:
        if self.keeper is None:
            return
        try:
            self.keeper.forget(self.keeper_name)
        except Exception as exc:  # the holder drops dead connections by itself
            log.warning("cannot have the FUSE fd keeper drop its copy: %s", exc)
        self.kept = False

    # -- serving ----------------------------------------------------------------------------------

    def _read_requests(self) -> None:
        buf = bytearray(_REQUEST_BUFFER)
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            try:
                length = os.readv(self._fd, [buf])
            except (BlockingIOError, InterruptedError):
                # Nothing queued (or another reader took it): sleep until a request or stop().
                events = dict(poller.poll())
                if self._wake_r in events:
                    return
                if events.get(self._fd, 0) & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._connection_gone("poll reported an error")
                    return
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # the request was interrupted while being copied
                self._connection_gone(exc.strerror or str(exc))
                return
            try:
                req = p.parse_request(buf, length)
            except p.ProtocolError as exc:
                log.error("unparsable FUSE request: %s", exc)
                continue
            try:
                self._dispatch(req)
            except Exception:
                log.exception("FUSE request %d failed", req.opcode)
                if req.opcode not in p.NO_REPLY:
                    self._send(p.reply(req.unique, error=errno.EIO))

    def _connection_gone(self, why: str) -> None:
        if not self._stopping.is_set() and not self._gone.is_set():
            log.warning("the blob FUSE connection ended: %s", why, extra={"mountpoint": str(self.mountpoint)})
        self._gone.set()

    def _dispatch(self, req: p.Request) -> None:
        op = req.opcode
        if req.resent:
            self._stats.add(resent=1)
        if op == p.Opcode.READ:
            self._on_read(req)
        elif op == p.Opcode.LOOKUP:
            self._on_lookup(req)
        elif op == p.Opcode.GETATTR:
            self._on_getattr(req)
        elif op == p.Opcode.OPEN:
            self._on_open(req)
        elif op in (p.Opcode.RELEASE, p.Opcode.RELEASEDIR):
            self._send(p.reply(req.unique))
        elif op in (p.Opcode.FORGET, p.Opcode.BATCH_FORGET):
            pass  # node ids live until remove(); lookup counts are not needed
        elif op == p.Opcode.INTERRUPT:
            self._on_interrupt(req)
        elif op == p.Opcode.OPENDIR:
            if req.nodeid == p.ROOT_ID:
                self._send(p.reply(req.unique, p.open_out(0, 0)))
            else:
                self._send(p.reply(req.unique, error=errno.ENOTDIR))
        elif op == p.Opcode.READDIR:
            self._on_readdir(req)
        elif op == p.Opcode.STATFS:
            nodes = list(self._nodes.values())  # a snapshot: add() and remove() may run meanwhile
            blocks = sum((n.size + p.PAGE_SIZE - 1) // p.PAGE_SIZE for n in nodes)
            self._send(p.reply(req.unique, p.statfs_out(blocks, len(nodes) + 1)))
        elif op == p.Opcode.DESTROY:
            self._send(p.reply(req.unique))
        elif op == p.Opcode.INIT:
            self._send(p.reply(req.unique, error=errno.EPROTO))  # the connection is initialized
        else:
            # ENOSYS is remembered by the kernel for FLUSH, ACCESS, GETXATTR, LISTXATTR, STATX, ...:
            # it stops asking (getxattr then fails with EOPNOTSUPP, access checks use the mode).
            self._send(p.reply(req.unique, error=errno.ENOSYS))

    def _on_lookup(self, req: p.Request) -> None:
        name = p.parse_name(req.body).decode("utf-8", "replace")
        node = self._by_name.get(name) if req.nodeid == p.ROOT_ID else None
        if node is None:
            # A plain ENOENT, not a cached negative entry: a blob added later must be found at once.
            self._send(p.reply(req.unique, error=errno.ENOENT))
        else:
            self._send(p.reply(req.unique, p.entry_out(node.nodeid, node.attr(), CACHE_TIMEOUT_SECONDS)))

    def _on_getattr(self, req: p.Request) -> None:
        if req.nodeid == p.ROOT_ID:
            attr = p.Attr(p.ROOT_ID, 0, stat.S_IFDIR | 0o555, nlink=2)
        else:
            node = self._nodes.get(req.nodeid)
            if node is None:
                self._send(p.reply(req.unique, error=errno.ENOENT))
                return
            attr = node.attr()
        self._send(p.reply(req.unique, p.attr_out(attr, CACHE_TIMEOUT_SECONDS)))

    def _on_open(self, req: p.Request) -> None:
        flags = p.OPEN_IN.unpack_from(req.body, 0)[0] if len(req.body) >= p.OPEN_IN.size else 0
        if req.nodeid == p.ROOT_ID:
            self._send(p.reply(req.unique, error=errno.EISDIR))
        elif req.nodeid not in self._nodes:
            self._send(p.reply(req.unique, error=errno.ENOENT))
        elif flags & os.O_ACCMODE != os.O_RDONLY:
            self._send(p.reply(req.unique, error=errno.EROFS))
        else:
            # KEEP_CACHE: pages read through earlier opens stay valid (the blob never changes).
            self._send(p.reply(req.unique, p.open_out(req.nodeid, p.OpenFlag.KEEP_CACHE)))

    def _on_readdir(self, req: p.Request) -> None:
        if req.nodeid != p.ROOT_ID:
            self._send(p.reply(req.unique, error=errno.ENOTDIR))
            return
        r = p.parse_read(req.body)
        # Cookies: 1 ".", 2 "..", node id + 2 for a file. Node ids only grow, so a listing read
        # in several calls neither repeats nor skips a file that stays, whatever is added meanwhile.
        entries = [(p.ROOT_ID, 1, _DT_DIR, b"."), (p.ROOT_ID, 2, _DT_DIR, b"..")]
        nodes = sorted(self._nodes.values(), key=lambda n: n.nodeid)  # a snapshot, in id order
        entries += [(n.nodeid, n.nodeid + 2, _DT_REG, n.name.encode()) for n in nodes]
        data, _ = p.dirents([e for e in entries if e[1] > r.offset], r.size)
        self._send(p.reply(req.unique, data))

    def _on_read(self, req: p.Request) -> None:
        r = p.parse_read(req.body)
        node = self._nodes.get(req.nodeid)
        if node is None:
            self._send(p.reply(req.unique, error=errno.EIO))
            return
        size = max(0, min(r.size, node.size - r.offset))
        if size == 0:
            self._send(p.reply(req.unique))  # at or past the end: no data is EOF
            return
        read_cached = node.read_cached if size <= INLINE_READ_MAX else None
        if read_cached is not None and self._answer_cached(req.unique, node, read_cached, r.offset, size):
            return
        job = _ReadJob(req.unique, req.pid, node, r.offset, size)
        with self._inflight_lock:
            self._inflight[job.unique] = job
            early = self._early_interrupts.pop(job.unique, None) is not None
        if early and self._interrupt(job):
            return
        if not self._queue.put(job):
            with self._inflight_lock:
                self._inflight.pop(job.unique, None)  # stopping: a successor gets it resent

    def _on_interrupt(self, req: p.Request) -> None:
        self._stats.add(interrupts=1)
        target = p.parse_interrupt(req.body)
        with self._inflight_lock:
            job = self._inflight.get(target)
            if job is None and self._readers > 1:
                # With several reader threads the interrupt may overtake its request.
                self._early_interrupts[target] = None
                while len(self._early_interrupts) > 1024:
                    self._early_interrupts.popitem(last=False)
        if job is not None:
            self._interrupt(job)

    def _interrupt(self, job: _ReadJob) -> bool:
        """Answer EINTR at once if the reader is being killed (it cannot exit before the answer);
        a read interrupted by any other signal completes normally, as a read of a regular file
        that returned EINTR would surprise most programs. The source's late answer is dropped."""
        if not k.fatal_signal_pending(job.pid) or not self._claim(job):
            return False
        self._queue.cancel(job.unique)
        self._stats.add(interrupted=1)
        self._send(p.reply(job.unique, error=errno.EINTR))
        return True

    def _claim(self, job: _ReadJob) -> bool:
        """Take the right to answer ``job``: True once, for whoever comes first."""
        with self._inflight_lock:
            if job.answered:
                return False
            job.answered = True
            self._inflight.pop(job.unique, None)
            return True

    def _answer_cached(
        self,
        unique: int,
        node: _Node,
        read_cached: Callable[[int, int], p.Buffer | None],
        offset: int,
        size: int,
    ) -> bool:
        """Answer from the source's fast path if it has the bytes at hand; False to queue the READ."""
        try:
            data = read_cached(offset, size)
        except Exception as exc:
            log.warning("blob read_cached failed: %s", exc, extra={"blob": node.name, "offset": offset})
            return False  # the slow path decides
        if data is None:
            return False
        if len(data) != size:
            log.warning(
                "blob read_cached returned %d of %d bytes", len(data), size, extra={"blob": node.name}
            )
            return False
        self._stats.add(reads=1, read_bytes=size)
        self._send(p.reply(unique, data))
        return True

    def _serve_reads(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._answer_read(job)
            finally:
                self._queue.done(job)

    def _answer_read(self, job: _ReadJob) -> None:
        node = job.node
        try:
            data = node.source.read(job.offset, job.size)
            if len(data) != job.size:
                # A short reply would be taken as end of file and zero-filled into the page cache.
                raise OSError(errno.EIO, f"source returned {len(data)} of {job.size} bytes")
        except Exception as exc:
            self._stats.add(reads=1, read_errors=1)
            log.warning(
                "blob read failed: %s",
                exc,
                extra={"blob": node.name, "offset": job.offset, "size": job.size},
                exc_info=not isinstance(exc, OSError),
            )
            if self._claim(job):
                self._send(p.reply(job.unique, error=errno.EIO))
            return
        self._stats.add(reads=1, read_bytes=job.size)
        if self._claim(job):
            self._send(p.reply(job.unique, data))

    def _send(self, buffers: list[p.Buffer]) -> None:
        try:
            os.writev(self._fd, buffers)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return  # the request was interrupted and answered meanwhile, or aborted
            if exc.errno in (errno.ENODEV, errno.EBADF):
                self._connection_gone(exc.strerror or str(exc))
                return
            log.warning("cannot answer a FUSE request: %s", exc)

    def _notify(self, buffers: list[p.Buffer]) -> None:
        try:
            os.writev(self._fd, buffers)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel has nothing cached to invalidate
                log.warning("FUSE notification failed: %s", exc, extra={"mountpoint": str(self.mountpoint)})

    def _invalidate(self, name: str, nodeid: int) -> None:
        if self._fd < 0 or self._gone.is_set():
            return
        self._notify(p.inval_entry(p.ROOT_ID, name.encode()))
        self._notify(p.inval_inode(nodeid))


# -- mounts ---------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not valid_name(name):
        raise ValueError(f"bad blob name {name!r}: expected sha256-<64 hex> or sha512-<128 hex>")
