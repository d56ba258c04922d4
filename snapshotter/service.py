"""gRPC Snapshots service: maps containerd's wire API onto the Snapshotter.

Owns the translation between protobuf messages and our types, and between our exceptions and gRPC
status codes (containerd's errgrpc mapping). Blocking work runs in worker threads so the event
loop keeps serving while a large snapshot is measured or removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.containerd.types import mount_pb2
from snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SnapshotError,
    UnavailableError,
)
from snapshotter.filters import Adaptor, parse_all
from snapshotter.snapshots import Mount, Snapshotter
from snapshotter.store import Info, Kind

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

T = TypeVar("T")

STATUS_OF: dict[type[SnapshotError], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}

GRPC_WORKERS = 32
LIST_BATCH = 100  # Infos per List message, as containerd's own service streams them


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status that tells containerd which errdefs error ``exc`` is."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),  # type: ignore[arg-type]
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=info.labels,
    )


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def info_adaptor(info: Info) -> Adaptor:
    """Field lookup for filters, as containerd's metadata adaptSnapshot does."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            names = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}
            return (names[info.kind], True) if info.kind in names else ("", False)
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            key = ".".join(path[1:])
            return (info.labels[key], True) if key in info.labels else ("", False)
        return "", False

    return field


# Told after every call: method, seconds, gRPC status name ("OK" on success). Metrics hang off it.
CallObserver = Callable[[str, float, str], None]


class SnapshotsService(pb_grpc.SnapshotsServicer):  # type: ignore[misc]
    def __init__(self, snapshotter: Snapshotter, observer: CallObserver | None = None) -> None:
        self.snapshotter = snapshotter
        self.observer = observer
        # Calls block (disk, waiting for a lazy mount); a pool of their own keeps them from
        # starving the threads that decode chunks or mount layers.
        self.executor = ThreadPoolExecutor(GRPC_WORKERS, thread_name_prefix="lazysnap-grpc")

    async def _call(self, context: Context, method: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread; turn our errors into the matching gRPC status."""
        started = time.monotonic()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        except SnapshotError as exc:
            code = status_code(exc)
            log.debug("%s failed", method, extra={"key": key, "code": code.name, "error": str(exc)})
            self._observe(method, started, code)
            await context.abort(code, str(exc))
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed unexpectedly", method, extra={"key": key})
            self._observe(method, started, code)
            await context.abort(code, f"{method} {key}: {exc}")
        self._observe(method, started, grpc.StatusCode.OK)
        log.debug("%s", method, extra={"key": key, "ms": round((time.monotonic() - started) * 1000, 1)})
        return result

    def _observe(self, method: str, started: float, code: grpc.StatusCode) -> None:
        # Before the answer is sent: a client that then reads the metrics finds its call counted.
        if self.observer is not None:
            self.observer(method, time.monotonic() - started, code.name)

    async def Prepare(  # noqa: N802 - gRPC method names are containerd's
        self, request: pb.PrepareSnapshotRequest, context: Context
    ) -> pb.PrepareSnapshotResponse:
        mounts = await self._call(
            context,
            "Prepare",
            request.key,
            lambda: self.snapshotter.prepare(request.key, request.parent, dict(request.labels)),
        )
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def View(  # noqa: N802
        self, request: pb.ViewSnapshotRequest, context: Context
    ) -> pb.ViewSnapshotResponse:
        mounts = await self._call(
            context,
            "View",
            request.key,
            lambda: self.snapshotter.view(request.key, request.parent, dict(request.labels)),
        )
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def Mounts(  # noqa: N802
        self, request: pb.MountsRequest, context: Context
    ) -> pb.MountsResponse:
        mounts = await self._call(
            context, "Mounts", request.key, lambda: self.snapshotter.mounts(request.key)
        )
        return pb.MountsResponse(mounts=mounts_to_pb(mounts))

    async def Commit(  # noqa: N802
        self, request: pb.CommitSnapshotRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._call(
            context,
            "Commit",
            request.key,
            lambda: self.snapshotter.commit(request.name, request.key, dict(request.labels), request.parent),
        )
        return empty_pb2.Empty()

    async def Remove(  # noqa: N802
        self, request: pb.RemoveSnapshotRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._call(context, "Remove", request.key, lambda: self.snapshotter.remove(request.key))
        return empty_pb2.Empty()

    async def Stat(  # noqa: N802
        self, request: pb.StatSnapshotRequest, context: Context
    ) -> pb.StatSnapshotResponse:
        info = await self._call(context, "Stat", request.key, lambda: self.snapshotter.stat(request.key))
        return pb.StatSnapshotResponse(info=info_to_pb(info))

    async def Update(  # noqa: N802
        self, request: pb.UpdateSnapshotRequest, context: Context
    ) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        key = request.info.name
        info = await self._call(
            context,
            "Update",
            key,
            lambda: self.snapshotter.update(key, dict(request.info.labels), paths),
        )
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    async def List(  # noqa: N802
        self, request: pb.ListSnapshotsRequest, context: Context
    ) -> AsyncIterator[pb.ListSnapshotsResponse]:
        filters = list(request.filters)

        def matching() -> list[Info]:
            flt = parse_all(filters)
            return [i for i in self.snapshotter.infos() if flt.matches(info_adaptor(i))]

        infos = await self._call(context, "List", ",".join(filters), matching)
        for start in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(i) for i in infos[start : start + LIST_BATCH]])

    async def Usage(  # noqa: N802
        self, request: pb.UsageRequest, context: Context
    ) -> pb.UsageResponse:
        usage = await self._call(context, "Usage", request.key, lambda: self.snapshotter.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(  # noqa: N802
        self, request: pb.CleanupRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._call(context, "Cleanup", "", self.snapshotter.cleanup)
        return empty_pb2.Empty()


def add_to_server(
    server: grpc.aio.Server, snapshotter: Snapshotter, observer: CallObserver | None = None
) -> None:
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter, observer), server)
