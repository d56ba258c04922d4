"""The CRI image-service proxy against a fake upstream (containerd's CRI plugin stand-in).

The fake records the raw bytes, metadata and deadline of every call it gets and answers with canned
raw bytes or errors, so the tests state exactly what "forwarded unchanged" means. Also: the pull
secrets store, the CredentialStore hook, the [cri] config section, and our runtime.v1 proto
checked against the CRI descriptor compiled into containerd itself.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import stat
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2

from snapshotter.api.runtime.v1 import api_pb2 as cri
from snapshotter.api.runtime.v1 import api_pb2_grpc as cri_grpc
from snapshotter.config import ConfigError, CriConfig, load
from snapshotter.cri import ImageServiceProxy, PullSecrets, credentials_from_auth
from snapshotter.fetcher import Credentials, CredentialStore
from tests.support.services import missing_prerequisite

SECRET = "pa55-w0rd-never-logged"
REGISTRY = "registry.example:5000"
IMAGE = f"{REGISTRY}/team/app:1"


@dataclass
class Seen:
    method: str
    request: bytes
    metadata: dict[str, Any]
    time_remaining: float | None
    secret_during_call: Credentials | None = None


Answer = Callable[[bytes], bytes]


@dataclass
class FakeUpstream:
    """A generic gRPC server: records each call, answers from ``answers`` (raw bytes) or aborts
    with ``errors[method]``. ``secrets``, when set, is read during PullImage (what lazysnap sees
    while containerd is unpacking)."""

    seen: list[Seen] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)
    errors: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    secrets: PullSecrets | None = None

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        fake = self

        class Handler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
                method = details.method

                async def behavior(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
                    entry = Seen(
                        method, request, dict(context.invocation_metadata() or ()), context.time_remaining()
                    )
                    if fake.secrets is not None and method.endswith("/PullImage"):
                        entry.secret_during_call = fake.secrets.lookup(REGISTRY, "team/app")
                    fake.seen.append(entry)
                    if method in fake.errors:
                        code, details_ = fake.errors[method]
                        await context.abort(code, details_)
                    return fake.answers.get(method, lambda _req: b"")(request)

                return grpc.unary_unary_rpc_method_handler(behavior)

        return Handler()


@dataclass
class Rig:
    upstream: FakeUpstream
    proxy: ImageServiceProxy
    secrets: PullSecrets
    channel: grpc.aio.Channel
    listen: Path

    @property
    def stub(self) -> cri_grpc.ImageServiceStub:
        return cri_grpc.ImageServiceStub(self.channel)

    async def raw(self, method: str, request: bytes, **kwargs: Any) -> bytes:
        call = self.channel.unary_unary(method, None, None)
        result: bytes = await call(request, **kwargs)
        return result


@pytest.fixture
async def rig(workdir: Path) -> AsyncIterator[Rig]:
    upstream = FakeUpstream()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((upstream.handler(),))
    server.add_insecure_port(f"unix:{workdir / 'containerd.sock'}")
    await server.start()
    secrets = PullSecrets()
    upstream.secrets = secrets
    proxy = ImageServiceProxy(workdir / "containerd.sock", secrets)
    listen = workdir / "cri.sock"
    proxy.bind(listen)
    await proxy.start()
    channel = grpc.aio.insecure_channel(f"unix:{listen}")
    try:
        yield Rig(upstream, proxy, secrets, channel, listen)
    finally:
        await channel.close(None)
        await proxy.stop(1)
        await server.stop(None)


def pull_request(image: str = IMAGE, **auth: str) -> cri.PullImageRequest:
    req = cri.PullImageRequest(image=cri.ImageSpec(image=image, annotations={"a": "b"}))
    if auth:
        req.auth.CopyFrom(cri.AuthConfig(**auth))
    req.sandbox_config.metadata.name = "pod"
    return req


# An unknown field (number 1000, a length-delimited string) as a newer kubelet or containerd may
# send: the proxy must pass it through byte for byte.
UNKNOWN_FIELD = bytes([0xC2, 0x3E, 0x05]) + b"extra"


# --- forwarding -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "request_msg", "response_msg"),
    [
        (
            "PullImage",
            pull_request(username="u", password=SECRET),
            cri.PullImageResponse(image_ref="sha256:ab"),
        ),
        (
            "ImageStatus",
            cri.ImageStatusRequest(image=cri.ImageSpec(image=IMAGE), verbose=True),
            cri.ImageStatusResponse(
                image=cri.Image(id="sha256:ab", repo_tags=[IMAGE], size=123, uid=cri.Int64Value(value=0)),
                info={"info": "{}"},
            ),
        ),
        (
            "ListImages",
            cri.ListImagesRequest(filter=cri.ImageFilter(image=cri.ImageSpec(image=IMAGE))),
            cri.ListImagesResponse(images=[cri.Image(id="sha256:ab", repo_digests=["x@sha256:cd"])]),
        ),
        ("RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image=IMAGE)), cri.RemoveImageResponse()),
        (
            "ImageFsInfo",
            cri.ImageFsInfoRequest(),
            cri.ImageFsInfoResponse(
                image_filesystems=[
                    cri.FilesystemUsage(
                        timestamp=1,
                        fs_id=cri.FilesystemIdentifier(mountpoint="/var/lib/x"),
                        used_bytes=cri.UInt64Value(value=7),
                    )
                ]
            ),
        ),
    ],
)
async def test_every_method_is_forwarded_byte_for_byte(
    rig: Rig, method: str, request_msg: Any, response_msg: Any
) -> None:
    path = f"/runtime.v1.ImageService/{method}"
    request = request_msg.SerializeToString() + UNKNOWN_FIELD
    response = response_msg.SerializeToString() + UNKNOWN_FIELD
    rig.upstream.answers[path] = lambda _req: response
    got = await rig.raw(path, request, metadata=(("x-trace", "t-1"),), timeout=30)
    assert got == response
    (seen,) = rig.upstream.seen
    assert (seen.method, seen.request) == (path, request)
    assert seen.metadata.get("x-trace") == "t-1"
    assert seen.time_remaining is not None and 25 < seen.time_remaining <= 31  # the deadline travels
    assert rig.proxy.calls[method] == 1


async def test_generated_stub_round_trip(rig: Rig) -> None:
    answer = cri.ImageStatusResponse(image=cri.Image(id="sha256:ab", repo_tags=[IMAGE], size=5))
    rig.upstream.answers["/runtime.v1.ImageService/ImageStatus"] = lambda _req: answer.SerializeToString()
    got = await rig.stub.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=IMAGE)))
    assert got == answer
    assert rig.upstream.seen[0].time_remaining is None  # no deadline given, none invented


async def test_upstream_errors_come_back_with_code_and_message(rig: Rig) -> None:
    path = "/runtime.v1.ImageService/ImageStatus"
    rig.upstream.errors[path] = (grpc.StatusCode.NOT_FOUND, 'image "x" not found')
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.stub.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image="x")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == 'image "x" not found'
    assert rig.proxy.errors == {"NOT_FOUND": 1}


async def test_older_kubelets_v1alpha2_is_forwarded_and_secrets_captured(rig: Rig) -> None:
    # runtime.v1alpha2's PullImageRequest/AuthConfig are wire-identical to v1's.
    path = "/runtime.v1alpha2.ImageService/PullImage"
    await rig.raw(path, pull_request(username="u", password=SECRET).SerializeToString())
    assert rig.upstream.seen[0].method == path
    assert rig.secrets.lookup(REGISTRY, "team/app") == Credentials("u", SECRET)


async def test_other_services_are_unimplemented(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.raw("/runtime.v1.RuntimeService/Version", b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert rig.upstream.seen == []


async def test_containerd_down_is_unavailable(workdir: Path) -> None:
    proxy = ImageServiceProxy(workdir / "absent.sock", PullSecrets())
    proxy.bind(workdir / "cri.sock")
    await proxy.start()
    channel = grpc.aio.insecure_channel(f"unix:{workdir / 'cri.sock'}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cri_grpc.ImageServiceStub(channel).ImageFsInfo(cri.ImageFsInfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close(None)
        await proxy.stop(1)
    assert not (workdir / "cri.sock").exists()  # stop removes its socket


# --- credential capture -----------------------------------------------------------------------------


async def test_pull_secret_is_available_while_the_pull_runs_and_kept_after(rig: Rig) -> None:
    await rig.stub.PullImage(pull_request(username="alice", password=SECRET))
    assert rig.upstream.seen[0].secret_during_call == Credentials("alice", SECRET)
    assert rig.secrets.lookup(REGISTRY, "team/app") == Credentials("alice", SECRET)
    assert rig.secrets.lookup(REGISTRY) is None  # a secret is for its repository only
    assert rig.secrets.lookup("other.example:5000", "team/app") is None
    assert rig.proxy.pulls_with_credentials == 1


async def test_a_failed_pull_takes_its_secret_back(rig: Rig) -> None:
    await rig.stub.PullImage(pull_request(username="alice", password="good"))
    rig.upstream.errors["/runtime.v1.ImageService/PullImage"] = (grpc.StatusCode.UNKNOWN, "401 Unauthorized")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.stub.PullImage(pull_request(username="alice", password="wrong"))
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert rig.upstream.seen[1].secret_during_call == Credentials("alice", "wrong")  # tried during the pull
    assert rig.secrets.lookup(REGISTRY, "team/app") == Credentials("alice", "good")  # then restored


async def test_anonymous_pulls_record_nothing(rig: Rig) -> None:
    await rig.stub.PullImage(pull_request())
    await rig.stub.PullImage(pull_request(registry_token="opaque-bearer"))
    assert len(rig.secrets) == 0 and rig.proxy.pulls_with_credentials == 0


async def test_secrets_never_reach_the_log(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    encoded = base64.b64encode(f"bob:{SECRET}".encode()).decode()
    await rig.stub.PullImage(pull_request(username="alice", password=SECRET))
    await rig.stub.PullImage(pull_request(auth=encoded))
    await rig.stub.PullImage(pull_request(identity_token=SECRET))
    rig.upstream.errors["/runtime.v1.ImageService/PullImage"] = (grpc.StatusCode.UNKNOWN, "denied")
    with pytest.raises(grpc.aio.AioRpcError):
        await rig.stub.PullImage(pull_request(username="alice", password=SECRET))
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "CRI pull" in text and "auth': 'username'" in text
    assert SECRET not in text and encoded not in text
    assert SECRET not in repr(rig.secrets.lookup(REGISTRY, "team/app"))


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"username": "u", "password": "p", "identity_token": "t"}, Credentials("u", "p")),
        ({"identity_token": "refresh"}, Credentials(identity_token="refresh")),
        ({"auth": base64.b64encode(b"u:p:q").decode()}, Credentials("u", "p:q")),
        ({"auth": "not base64!"}, None),
        ({"auth": base64.b64encode(b"no-colon").decode()}, None),
        ({"registry_token": "bearer"}, None),
        ({}, None),
    ],
)
def test_credentials_from_auth_follow_containerd(auth: dict[str, str], expected: Credentials | None) -> None:
    assert credentials_from_auth(cri.AuthConfig(**auth)) == expected


def test_server_address_must_name_the_images_registry() -> None:
    secrets = PullSecrets()
    other = cri.AuthConfig(username="u", password="p", server_address="https://elsewhere.example")
    assert secrets.remember(IMAGE, other) is None
    same = cri.AuthConfig(username="u", password="p", server_address=f"https://{REGISTRY}/v1/")
    assert secrets.remember(IMAGE, same) is not None
    schemeless = cri.AuthConfig(username="u", password="p", server_address=REGISTRY)
    assert secrets.remember(IMAGE, schemeless) is None  # containerd's url.Parse finds no host in it
    hub = cri.AuthConfig(username="h", password="p", server_address="https://index.docker.io/v1/")
    assert secrets.remember("nginx:1.25", hub) is not None
    assert secrets.lookup("registry-1.docker.io", "library/nginx") == Credentials("h", "p")


def test_lookup_prefers_the_exact_repository() -> None:
    secrets = PullSecrets()
    secrets.remember(f"{REGISTRY}/a/one:1", cri.AuthConfig(username="one", password="1"))
    secrets.remember(f"{REGISTRY}/b/two:1", cri.AuthConfig(username="two", password="2"))
    assert secrets.lookup(REGISTRY, "a/one") == Credentials("one", "1")
    assert secrets.lookup(REGISTRY, "b/two") == Credentials("two", "2")
    assert secrets.lookup(REGISTRY, "c/unknown") is None  # one tenant's secret is not another's


def test_host_fallback_is_opt_in() -> None:
    secrets = PullSecrets(host_fallback=True)
    secrets.remember(f"{REGISTRY}/a/one:1", cri.AuthConfig(username="one", password="1"))
    secrets.remember(f"{REGISTRY}/b/two:1", cri.AuthConfig(username="two", password="2"))
    assert secrets.lookup(REGISTRY, "a/one") == Credentials("one", "1")
    assert secrets.lookup(REGISTRY, "c/unknown") == Credentials("two", "2")  # newest for the host
    assert secrets.lookup("other.example:5000", "c/unknown") is None


def test_persisted_secrets_are_root_only_and_survive_a_restart(workdir: Path) -> None:
    path = workdir / "root" / "cri" / "credentials.json"
    secrets = PullSecrets(path)
    secrets.remember(IMAGE, cri.AuthConfig(username="alice", password=SECRET))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert PullSecrets(path).lookup(REGISTRY, "team/app") == Credentials("alice", SECRET)
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]  # no temp files left


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"version": 99}', '{"version": 1, "entries": [1, {}]}']
)
def test_unreadable_persisted_secrets_are_ignored(workdir: Path, content: str) -> None:
    path = workdir / "credentials.json"
    path.write_text(content)
    assert len(PullSecrets(path)) == 0


# --- the CredentialStore hook -----------------------------------------------------------------------


async def test_credential_store_asks_sources_first_and_uncached(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {REGISTRY: {"username": "docker", "password": "cfg"}}}))
    store = CredentialStore(config)
    assert await store.get(REGISTRY) == Credentials("docker", "cfg")
    assert await store.get("fresh.example") is None  # now cached as anonymous
    secrets = PullSecrets()
    store.add_source(secrets.lookup)
    assert await store.get(REGISTRY) == Credentials("docker", "cfg")  # the source has no opinion yet
    secrets.remember("fresh.example/x:1", cri.AuthConfig(username="k8s", password="s"))
    secrets.remember(f"{REGISTRY}/x:1", cri.AuthConfig(username="k8s", password="t"))
    assert await store.get("fresh.example", "x") == Credentials("k8s", "s")  # not hidden by the cache
    assert await store.get(REGISTRY, "x") == Credentials("k8s", "t")


# --- config -------------------------------------------------------------------------------------------


def test_cri_config_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[cri]\nenable = true\nlisten = "/run/x/cri.sock"\npersist_credentials = true\n')
    cfg = load(path)
    assert cfg.cri == CriConfig(enable=True, listen=Path("/run/x/cri.sock"), persist_credentials=True)
    assert load(None).cri.enable is False
    for text, message in [
        ('[cri]\nlisten = "relative.sock"\n', "cri.listen: 'relative.sock' must be an absolute path"),
        ('[cri]\ncontainerd_socket = "/' + "a" * 120 + '"\n', "cri.containerd_socket"),
        ("[cri]\nenable = 1\n", "cri.enable: expected true or false"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(path)


# --- the proto against containerd's own CRI descriptor -------------------------------------------------


def containerd_cri_descriptor() -> descriptor_pb2.FileDescriptorProto | None:
    """containerd's Go binary embeds the gzipped FileDescriptorProto of k8s.io/cri-api runtime.v1."""
    binary = shutil.which("containerd")
    if binary is None:
        return None
    data = Path(binary).read_bytes()
    for match in re.finditer(rb"\x1f\x8b\x08\x00\x00\x00\x00\x00", data):
        try:
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(
                data[match.start() : match.start() + (1 << 20)]
            )
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except Exception:  # not a descriptor
            continue
        if fd.package == "runtime.v1" and any(s.name == "ImageService" for s in fd.service):
            return fd
    return None


def test_proto_matches_the_cri_compiled_into_containerd() -> None:
    theirs = containerd_cri_descriptor()
    if theirs is None:
        missing_prerequisite("containerd binary (with its embedded CRI descriptor) not found")
    ours = descriptor_pb2.FileDescriptorProto()
    cri.DESCRIPTOR.CopyToProto(ours)
    assert ours.package == theirs.package == "runtime.v1"

    def shape(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in fd.message_type:
            out[m.name] = {f.number: (f.name, f.type, f.label, f.type_name) for f in m.field}
            for nested in m.nested_type:
                out[f"{m.name}.{nested.name}"] = {f.number: (f.name, f.type) for f in nested.field}
        for e in fd.enum_type:
            out[e.name] = {v.number: v.name for v in e.value}
        return out

    mine, upstream = shape(ours), shape(theirs)
    for name, fields in mine.items():
        assert name in upstream, f"{name} is not a runtime.v1 type"
        for number, spec in fields.items():
            assert upstream[name].get(number) == spec, (
                f"{name} field {number}: ours {spec}, CRI {upstream[name].get(number)}"
            )
    # Every field of the messages the image service exchanges, except PodSandboxConfig's platform parts.
    for name in [n for n in mine if n != "PodSandboxConfig"]:
        assert set(mine[name]) == set(upstream[name]), name
    assert set(upstream["PodSandboxConfig"]) - set(mine["PodSandboxConfig"]) == {8, 9}
    (svc,) = [s for s in ours.service]
    (their_svc,) = [s for s in theirs.service if s.name == "ImageService"]
    assert [(m.name, m.input_type, m.output_type) for m in svc.method] == [
        (m.name, m.input_type, m.output_type) for m in their_svc.method
    ]
