"""The push client against a fake registry that follows the OCI distribution spec's upload rules.

The fake keeps one blob store per repository, upload sessions whose ``Location`` changes after
every request (a stale one is refused, so following ``Location`` is checked), ``Content-Range``
order checks (416), digest checks (``DIGEST_INVALID``) and Bearer tokens bound to their scopes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from snapshotter.fetcher import (
    AuthError,
    CredentialStore,
    DigestMismatchError,
    FetchError,
    Pusher,
    PushOutcome,
    UnreachableError,
    parse_reference,
)
from snapshotter.fetcher.manifest import OCI_MANIFEST

from .conftest import _serve, make_client


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Req:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body_size: int


def errors(code: str, status: int, message: str = "") -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message or code.lower()}]})
    return web.Response(status=status, text=body, content_type="application/json")


@dataclass
class UploadRegistry:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    requests: list[Req] = field(default_factory=list)
    uploads: dict[str, tuple[str, bytearray, int]] = field(default_factory=dict)  # id -> repo, data, state
    relative_locations: bool = True
    allow_mount: bool = True
    auth: str | None = None  # None, "bearer" or "basic"
    basic_user: tuple[str, str] = ("alice", "secret")
    readonly: bool = False  # the token server grants pull only
    token_scopes: list[list[str]] = field(default_factory=list)
    tokens: dict[str, set[str]] = field(default_factory=dict)  # token -> "repo:action" grants
    fail: list[tuple[str, int]] = field(default_factory=list)  # (method, status), consumed in order
    out_of_step_once: bool = False  # the next PATCH's bytes land, but the answer is a 500
    corrupt_uploads: bool = False
    deny_push: bool = False
    base_url: str = ""

    def add(self, repo: str, data: bytes) -> str:
        self.repos.setdefault(repo, {})[sha256(data)] = data
        return sha256(data)

    def seen(self, method: str) -> list[Req]:
        return [r for r in self.requests if r.method == method]

    # -- auth ------------------------------------------------------------------------------------

    def _needs(self, request: web.Request, repo: str) -> set[str]:
        need = {f"{repo}:pull"} if request.method in ("GET", "HEAD") else {f"{repo}:push"}
        if "from" in request.query:
            need.add(f"{request.query['from']}:pull")
        return need

    def _denied(self, request: web.Request, repo: str) -> web.Response | None:
        if self.auth is None:
            return None
        got = request.headers.get("Authorization", "")
        if self.auth == "basic":
            want = "Basic " + base64.b64encode(":".join(self.basic_user).encode()).decode()
            return (
                None
                if got == want
                else web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})
            )
        grants = self.tokens.get(got.removeprefix("Bearer "), set())
        if got.startswith("Bearer ") and self._needs(request, repo) <= grants:
            return None
        scope = f"repository:{repo}:pull,push"
        challenge = f'Bearer realm="{self.base_url}/token",service="fake",scope="{scope}"'
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})

    async def handle_token(self, request: web.Request) -> web.Response:
        scopes = request.query.getall("scope", [])
        self.token_scopes.append(list(scopes))
        grants: set[str] = set()
        for scope in scopes:
            _, repo, actions = scope.split(":")
            for action in actions.split(","):
                if action == "pull" or not self.readonly:
                    grants.add(f"{repo}:{action}")
        token = f"tok{len(self.tokens)}"
        self.tokens[token] = grants
        return web.json_response({"token": token, "expires_in": 300})

    # -- the API ---------------------------------------------------------------------------------

    def _location(self, repo: str, upload: str) -> str:
        _, _, state = self.uploads[upload]
        path = f"/v2/{repo}/blobs/uploads/{upload}?_state=s{state}"
        return path if self.relative_locations else self.base_url + path

    def _open(self, repo: str) -> web.Response:
        upload = f"u{len(self.uploads)}"
        self.uploads[upload] = (repo, bytearray(), 0)
        return web.Response(status=202, headers={"Location": self._location(repo, upload), "Range": "0-0"})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Req(request.method, request.path, dict(request.query), dict(request.headers), len(body))
        )
        if self.fail and self.fail[0][0] == request.method:
            return web.Response(status=self.fail.pop(0)[1], text="injected")
        m = re.fullmatch(r"/v2/(.+?)/(blobs/uploads|blobs|manifests)/?(.*)", request.path)
        if not m:
            return web.Response(status=404)
        repo, kind, rest = m.groups()
        denied = self._denied(request, repo)
        if denied is not None:
            return denied
        if self.deny_push and request.method != "HEAD":
            return errors("DENIED", 403, "requested access to the resource is denied")
        store = self.repos.setdefault(repo, {})
        if kind == "blobs":
            if request.method != "HEAD":
                return web.Response(status=405)
            data = store.get(rest)
            return (
                web.Response(status=404)
                if data is None
                else web.Response(headers={"Content-Length": str(len(data))})
            )
        if kind == "manifests":
            return self._manifest(request, repo, rest, body, store)
        if request.method == "POST" and not rest:
            mount, source = request.query.get("mount"), request.query.get("from", "")
            if mount and self.allow_mount and mount in self.repos.get(source, {}):
                store[mount] = self.repos[source][mount]
                return web.Response(status=201, headers={"Location": f"/v2/{repo}/blobs/{mount}"})
            return self._open(repo)
        return self._session(request, repo, rest, body, store)

    def _session(
        self, request: web.Request, repo: str, upload: str, body: bytes, store: dict[str, bytes]
    ) -> web.Response:
        if upload not in self.uploads:
            return errors("BLOB_UPLOAD_UNKNOWN", 404)
        owner, data, state = self.uploads[upload]
        if owner != repo or request.query.get("_state") != f"s{state}":
            return errors("BLOB_UPLOAD_INVALID", 400, "stale upload state: Location not followed")
        if request.method == "PATCH":
            start, _, end = request.headers.get("Content-Range", "").partition("-")
            if int(start) != len(data) or int(end) - int(start) + 1 != len(body):
                return web.Response(status=416)
            data += body
            self.uploads[upload] = (owner, data, state + 1)
            if self.out_of_step_once:
                self.out_of_step_once = False
                return web.Response(status=500)
            headers = {"Location": self._location(repo, upload), "Range": f"0-{len(data) - 1}"}
            return web.Response(status=202, headers=headers)
        if request.method == "PUT":
            data += body
            digest = request.query.get("digest", "")
            if self.corrupt_uploads:
                data += b"!"
            if sha256(bytes(data)) != digest:
                return errors("DIGEST_INVALID", 400, "provided digest did not match uploaded content")
            store[digest] = bytes(data)
            del self.uploads[upload]
            return web.Response(status=201, headers={"Docker-Content-Digest": digest})
        return web.Response(status=405)

    def _manifest(
        self, request: web.Request, repo: str, tag: str, body: bytes, store: dict[str, bytes]
    ) -> web.Response:
        if request.method != "PUT":
            return web.Response(status=405)
        doc = json.loads(body)
        for desc in [doc["config"], *doc["layers"]]:
            if desc["digest"] not in store:
                return errors("MANIFEST_BLOB_UNKNOWN", 400, f"blob unknown to registry: {desc['digest']}")
        self.manifests[(repo, tag)] = (request.headers["Content-Type"], body)
        return web.Response(status=201, headers={"Docker-Content-Digest": sha256(body)})


@pytest.fixture
async def reg() -> AsyncIterator[UploadRegistry]:
    registry = UploadRegistry()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("GET", "/token", registry.handle_token)
    app.router.add_route("*", "/{tail:.*}", registry.handle)
    async for host in _serve(app):
        registry.base_url = f"http://{host}"
        yield registry


def host_of(reg: UploadRegistry) -> str:
    return reg.base_url.removeprefix("http://")


DATA = bytes(range(256)) * 10  # 2560 bytes


async def test_small_blob_is_one_post_and_one_put(reg: UploadRegistry) -> None:
    ref = parse_reference(f"{host_of(reg)}/team/app:1")
    async with make_client() as client:
        pusher = Pusher(client, chunk_size=4096)
        assert await pusher.push_blob(ref, sha256(DATA), DATA) is PushOutcome.UPLOADED
    assert [r.method for r in reg.requests] == ["HEAD", "POST", "PUT"]
    put = reg.seen("PUT")[0]
    assert put.query == {"_state": "s0", "digest": sha256(DATA)} and put.body_size == len(DATA)
    assert put.headers["Content-Type"] == "application/octet-stream"
    assert reg.repos["team/app"][sha256(DATA)] == DATA
    assert (pusher.stats.uploaded, pusher.stats.bytes_uploaded) == (1, len(DATA))


@pytest.mark.parametrize("relative", [True, False], ids=["relative-location", "absolute-location"])
async def test_large_blob_is_patched_in_pieces_following_each_location(
    reg: UploadRegistry, relative: bool
) -> None:
    reg.relative_locations = relative
    ref = parse_reference(f"{host_of(reg)}/team/app:1")
    progress: list[int] = []
    async with make_client() as client:
        pusher = Pusher(client, chunk_size=1000)
        outcome = await pusher.push_blob(ref, sha256(DATA), DATA, progress=progress.append)
    assert outcome is PushOutcome.UPLOADED
    patches = reg.seen("PATCH")
    assert [p.headers["Content-Range"] for p in patches] == ["0-999", "1000-1999", "2000-2559"]
    assert [p.body_size for p in patches] == [1000, 1000, 560]
    # Each request used the state the previous answer's Location carried (the fake refuses stale ones).
    assert [p.query["_state"] for p in patches] == ["s0", "s1", "s2"]
    put = reg.seen("PUT")[0]
    assert put.query == {"_state": "s3", "digest": sha256(DATA)} and put.body_size == 0
    assert progress == [1000, 2000, 2560]
    assert reg.repos["team/app"][sha256(DATA)] == DATA


async def test_existing_blob_is_not_sent_again(reg: UploadRegistry) -> None:
    digest = reg.add("team/app", DATA)
    async with make_client() as client:
        pusher = Pusher(client)
        outcome = await pusher.push_blob(parse_reference(f"{host_of(reg)}/team/app"), digest, DATA)
    assert outcome is PushOutcome.EXISTED
    assert [r.method for r in reg.requests] == ["HEAD"]
    assert pusher.stats.existed == 1 and pusher.stats.bytes_uploaded == 0


async def test_cross_repository_mount(reg: UploadRegistry) -> None:
    digest = reg.add("team/source", DATA)
    async with make_client() as client:
        pusher = Pusher(client)
        ref = parse_reference(f"{host_of(reg)}/team/target:2")
        assert await pusher.push_blob(ref, digest, DATA, mount_from="team/source") is PushOutcome.MOUNTED
    post = reg.seen("POST")[0]
    assert post.query == {"mount": digest, "from": "team/source"} and post.body_size == 0
    assert reg.seen("PUT") == [] and reg.repos["team/target"][digest] == DATA
    assert pusher.stats.mounted == 1


async def test_refused_mount_falls_back_to_the_upload_session_it_opened(reg: UploadRegistry) -> None:
    reg.allow_mount = False
    digest = reg.add("team/source", DATA)
    async with make_client() as client:
        pusher = Pusher(client)
        ref = parse_reference(f"{host_of(reg)}/team/target:2")
        assert await pusher.push_blob(ref, digest, DATA, mount_from="team/source") is PushOutcome.UPLOADED
    assert [r.method for r in reg.requests] == ["HEAD", "POST", "PUT"]  # no second POST
    assert reg.repos["team/target"][digest] == DATA


async def test_put_manifest_under_its_tag(reg: UploadRegistry) -> None:
    config, layer = reg.add("team/app", b"{}"), reg.add("team/app", DATA)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "x", "digest": layer, "size": len(DATA)}],
        }
    ).encode()
    async with make_client() as client:
        pusher = Pusher(client)
        digest = await pusher.put_manifest(
            parse_reference(f"{host_of(reg)}/team/app:v1"), manifest, OCI_MANIFEST
        )
    assert digest == sha256(manifest)
    assert reg.manifests[("team/app", "v1")] == (OCI_MANIFEST, manifest)


async def test_bearer_tokens_ask_for_push_and_the_mount_source(reg: UploadRegistry) -> None:
    reg.auth = "bearer"
    digest = reg.add("team/source", DATA)
    other = b"another blob"
    async with make_client() as client:
        pusher = Pusher(client)
        ref = parse_reference(f"{host_of(reg)}/team/target:1")
        assert await pusher.push_blob(ref, digest, DATA, mount_from="team/source") is PushOutcome.MOUNTED
        assert await pusher.push_blob(ref, sha256(other), other) is PushOutcome.UPLOADED
    assert reg.token_scopes == [
        ["repository:team/target:pull,push"],  # HEAD, after the first 401
        ["repository:team/target:pull,push", "repository:team/source:pull"],  # the mount
    ]


async def test_pull_only_token_is_a_clear_auth_error(reg: UploadRegistry) -> None:
    reg.auth, reg.readonly = "bearer", True
    async with make_client() as client:
        ref = parse_reference(f"{host_of(reg)}/team/app:1")
        with pytest.raises(AuthError, match="push access") as info:
            await Pusher(client).push_blob(ref, sha256(DATA), DATA)
    assert info.value.repository == "team/app" and info.value.digest == sha256(DATA)


async def test_basic_auth_from_docker_config(reg: UploadRegistry, tmp_path: Path) -> None:
    reg.auth = "basic"
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"alice:secret").decode()
    config.write_text(json.dumps({"auths": {host_of(reg): {"auth": auth}}}))
    async with make_client(credentials=CredentialStore(config)) as client:
        ref = parse_reference(f"{host_of(reg)}/team/app:1")
        assert await Pusher(client).push_blob(ref, sha256(DATA), DATA) is PushOutcome.UPLOADED
    assert reg.repos["team/app"][sha256(DATA)] == DATA


async def test_denied_push_names_the_registry_error(reg: UploadRegistry) -> None:
    reg.deny_push = True
    async with make_client() as client:
        with pytest.raises(AuthError, match="DENIED: requested access") as info:
            await Pusher(client).push_blob(parse_reference(f"{host_of(reg)}/team/app"), sha256(DATA), DATA)
    assert info.value.host == host_of(reg) and "team/app" in str(info.value)


async def test_registry_digest_complaint_is_a_digest_mismatch(reg: UploadRegistry) -> None:
    reg.corrupt_uploads = True
    async with make_client() as client:
        with pytest.raises(DigestMismatchError, match="DIGEST_INVALID"):
            await Pusher(client).push_blob(parse_reference(f"{host_of(reg)}/team/app"), sha256(DATA), DATA)


async def test_data_that_does_not_match_its_digest_is_never_sent(reg: UploadRegistry) -> None:
    async with make_client() as client:
        with pytest.raises(DigestMismatchError, match="refusing to push"):
            await Pusher(client).push_blob(parse_reference(f"{host_of(reg)}/team/app"), sha256(b"x"), DATA)
    assert reg.requests == []


async def test_manifest_with_missing_blobs_names_them(reg: UploadRegistry) -> None:
    manifest = json.dumps(
        {
            "config": {"mediaType": "c", "digest": sha256(b"{}"), "size": 2},
            "layers": [],
        }
    ).encode()
    async with make_client() as client:
        with pytest.raises(FetchError, match="MANIFEST_BLOB_UNKNOWN: blob unknown") as info:
            await Pusher(client).put_manifest(
                parse_reference(f"{host_of(reg)}/team/app:v1"), manifest, OCI_MANIFEST
            )
    assert info.value.repository == "team/app" and "HTTP 400" in str(info.value)


async def test_server_errors_are_retried(reg: UploadRegistry) -> None:
    reg.fail = [("POST", 503), ("PUT", 500)]
    async with make_client() as client:
        ref = parse_reference(f"{host_of(reg)}/team/app")
        assert await Pusher(client).push_blob(ref, sha256(DATA), DATA) is PushOutcome.UPLOADED
    assert [r.method for r in reg.requests] == ["HEAD", "POST", "POST", "PUT", "PUT"]


async def test_a_patch_out_of_step_after_a_retry_restarts_the_upload(reg: UploadRegistry) -> None:
    # The registry stores the first piece but answers 500; the retried PATCH then carries a stale
    # state (distribution: BLOB_UPLOAD_INVALID, session cancelled), so the pusher starts anew.
    reg.out_of_step_once = True
    async with make_client() as client:
        ref = parse_reference(f"{host_of(reg)}/team/app")
        assert (
            await Pusher(client, chunk_size=1000).push_blob(ref, sha256(DATA), DATA) is PushOutcome.UPLOADED
        )
    assert len(reg.seen("POST")) == 2
    assert reg.repos["team/app"][sha256(DATA)] == DATA


async def test_unreachable_registry() -> None:
    from tests.support.services import free_port

    async with make_client(max_retries=1) as client:
        ref = parse_reference(f"127.0.0.1:{free_port()}/team/app")
        with pytest.raises(UnreachableError, match="cannot connect") as info:
            await Pusher(client).push_blob(ref, sha256(DATA), DATA)
    assert info.value.repository == "team/app"
