"""A CRI image-service proxy: the kubelet's pull secrets reach lazysnap's registry client.

containerd never passes registry credentials to a snapshotter, so under Kubernetes lazysnap could
only lazily pull public images. This gRPC server sits between the kubelet
(``--image-service-endpoint=unix:///run/lazysnap/cri.sock``) and containerd's CRI socket and
forwards every call of ``runtime.v1.ImageService`` (and the wire-identical
``runtime.v1alpha2.ImageService`` of older kubelets) **unchanged**: requests, responses, metadata,
deadlines and errors travel as raw bytes, so fields this code does not know pass through intact.
Only ``PullImage`` is read, and only for its ``auth``: its credentials are recorded in
``PullSecrets`` before the pull is forwarded (containerd prepares the layers, and lazysnap needs
them, while the call is in flight) and dropped again if the pull fails.

Credentials are never logged; log lines say which kind of secret a pull carried.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from snapshotter.api.runtime.v1 import api_pb2
from snapshotter.cri.secrets import PullSecrets, Remembered, auth_kind

log = logging.getLogger(__name__)

SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
# The kubelet's CRI client limit (pkg/kubelet/cri/remote: maxMsgSize); ListImages can be large.
MAX_MESSAGE_BYTES = 16 << 20
# Metadata that belongs to one HTTP/2 hop or that gRPC sets itself; everything else is forwarded.
_HOP_METADATA = frozenset(
    {"user-agent", "content-type", "te", "host", "grpc-accept-encoding", "grpc-encoding"}
)
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # containerd may start after lazysnap (the unit is ordered before it): reconnect promptly.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

Behavior = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


def _forwardable(metadata: Iterable[Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, v) for k, v in metadata or () if not k.startswith((":", "grpc-")) and k not in _HOP_METADATA
    )


class _Handler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, behavior: Callable[[str], Behavior]) -> None:
        self._behavior = behavior

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        service, _, _name = handler_call_details.method.lstrip("/").partition("/")
        if service not in SERVICES:
            return None  # UNIMPLEMENTED, as containerd would answer for a service it lacks
        return grpc.unary_unary_rpc_method_handler(self._behavior(handler_call_details.method))


class ImageServiceProxy:
    """Serves the CRI image service on a unix socket and forwards it to ``upstream`` (containerd's
    socket): ``bind(listen)``, ``await start()``, then ``await stop(grace)``."""

    def __init__(self, upstream: str | Path, secrets: PullSecrets) -> None:
        self.upstream = str(upstream)
        self.secrets = secrets
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self._listen = Path()
        self._listen_inode = 0
        self.calls = collections.Counter[str]()  # method name -> calls forwarded
        self.errors = collections.Counter[str]()  # status code name -> calls that failed upstream
        self.pulls_with_credentials = 0

    def bind(self, listen: str | Path) -> None:
        """Create the server and its unix socket ``listen`` (mode per the caller's umask)."""
        self._channel = grpc.aio.insecure_channel(f"unix:{self.upstream}", options=_CHANNEL_OPTIONS)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        server.add_generic_rpc_handlers((_Handler(self._behavior),))
        server.add_insecure_port(f"unix:{listen}")
        self._server = server
        self._listen = Path(listen)
        self._listen_inode = self._listen.stat().st_ino

    async def start(self) -> None:
        """Serve on the socket made by ``bind``."""
        assert self._server is not None, "bind() first"
        await self._server.start()
        log.info(
            "CRI image service proxy serving", extra={"address": str(self._listen), "upstream": self.upstream}
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let those in flight finish for ``grace`` seconds, close upstream,
        and remove our socket (unless another process has replaced it)."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
            with contextlib.suppress(OSError):
                if self._listen.stat().st_ino == self._listen_inode:
                    self._listen.unlink()
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    def stats(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "errors": dict(self.errors),
            "pulls_with_credentials": self.pulls_with_credentials,
            "credentials": len(self.secrets),
        }

    def _behavior(self, method: str) -> Behavior:
        async def forward(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return await self._forward(method, request, context)

        return forward

    async def _forward(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        assert self._channel is not None
        name = method.rsplit("/", 1)[-1]
        self.calls[name] += 1
        remembered: Remembered | None = None
        image, kind = "", ""
        if name == "PullImage":
            # Off the loop: with persist_credentials the secrets file is written and fsynced.
            image, kind, remembered = await asyncio.to_thread(self._capture, request)
        started = time.monotonic()
        ok = False
        try:
            # No (de)serializers: raw bytes both ways.
            call = self._channel.unary_unary(method, None, None)
            response: bytes = await call(
                request,
                timeout=context.time_remaining(),
                metadata=_forwardable(context.invocation_metadata()),
            )
            ok = True
        except grpc.aio.AioRpcError as e:
            self.errors[e.code().name] += 1
            if name == "PullImage":
                log.info(
                    "CRI pull failed",
                    extra={"image": image, "auth": kind, "code": e.code().name, "seconds": _since(started)},
                )
            else:
                log.debug("CRI call failed", extra={"method": name, "code": e.code().name})
            trailing = _forwardable(e.trailing_metadata())
            if remembered is not None:  # before the kubelet hears of the failure
                await asyncio.to_thread(self.secrets.forget, remembered)
                remembered = None
            await context.abort(e.code(), e.details() or "", trailing)
            raise AssertionError("unreachable: abort raises") from None
        finally:
            if remembered is not None and not ok:
                await asyncio.to_thread(self.secrets.forget, remembered)
        if name == "PullImage":
            log.info("CRI pull done", extra={"image": image, "auth": kind, "seconds": _since(started)})
        return response

    def _capture(self, request: bytes) -> tuple[str, str, Remembered | None]:
        """Read a PullImageRequest's image and auth; remember the credentials. Never raises: a
        request we cannot parse is still forwarded, and containerd answers it."""
        try:
            parsed = api_pb2.PullImageRequest.FromString(request)
        except Exception:  # containerd will reject it with the proper error
            return "", "unparsable", None
        image = str(parsed.image.image)
        kind = auth_kind(parsed.auth) if parsed.HasField("auth") else "none"
        remembered = self.secrets.remember(image, parsed.auth) if parsed.HasField("auth") else None
        if remembered is not None:
            self.pulls_with_credentials += 1
        elif kind == "registry-token":
            log.info(
                "CRI pull carries only a registry_token, which lazysnap cannot use", extra={"image": image}
            )
        log.info(
            "CRI pull",
            extra={"image": image, "auth": kind, "credentials_recorded": remembered is not None},
        )
        return image, kind, remembered


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
