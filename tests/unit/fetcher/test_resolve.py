"""Resolving references to manifests: platform choice, digest checks, capabilities, mirrors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from snapshotter.fetcher import (
    DigestMismatchError,
    HostsConfig,
    InvalidResponseError,
    ManifestNotFoundError,
    Platform,
)
from snapshotter.fetcher.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

from .conftest import FakeRegistry, make_client, sha256


def image(layer_note: str) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(b"cfg"),
            "size": 3,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(layer_note.encode()),
                "size": 1234,
                "annotations": {"containerd.io/snapshot/stargz/toc.digest": sha256(b"toc")},
            },
            {
                "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                "digest": sha256(b"foreign"),
                "size": 99,
                "urls": ["https://foreign.example/layer"],
            },
        ],
        "annotations": {"org.opencontainers.image.title": layer_note},
    }


def index_of(reg: FakeRegistry, repo: str, media_type: str = OCI_INDEX) -> tuple[str, str, str]:
    amd = reg.add_manifest(repo, OCI_MANIFEST, image("amd64"))
    arm = reg.add_manifest(repo, OCI_MANIFEST, image("arm64"))
    manifest_type = OCI_MANIFEST if media_type == OCI_INDEX else DOCKER_MANIFEST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": manifest_type,
                "digest": arm,
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm64"},
            },
            {
                "mediaType": manifest_type,
                "digest": sha256(b"attestation"),
                "size": 1,
                "platform": {"os": "unknown", "architecture": "unknown"},
            },
            {
                "mediaType": manifest_type,
                "digest": amd,
                "size": 1,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }
    return reg.add_manifest(repo, media_type, doc, tag="multi"), amd, arm


async def test_single_manifest_by_tag(registry: FakeRegistry) -> None:
    digest = registry.add_manifest("app", OCI_MANIFEST, image("x"), tag="v1")
    async with make_client() as client:
        img = await client.resolve(f"{registry.host}/app:v1")
    assert img.manifest_digest == digest and img.index_digest is None
    assert img.media_type == OCI_MANIFEST
    assert img.config.digest == sha256(b"cfg") and img.config.size == 3
    assert [layer.size for layer in img.layers] == [1234, 99]
    assert img.layers[0].annotations == {"containerd.io/snapshot/stargz/toc.digest": sha256(b"toc")}
    assert img.layers[1].urls == ("https://foreign.example/layer",)
    assert img.annotations == {"org.opencontainers.image.title": "x"}
    accept = registry.requests[0].headers["Accept"]
    for media_type in (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST):
        assert media_type in accept


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
async def test_index_picks_linux_amd64(registry: FakeRegistry, media_type: str) -> None:
    index, amd, arm = index_of(registry, "app", media_type)
    async with make_client() as client:
        img = await client.resolve(f"{registry.host}/app:multi")
        assert (img.index_digest, img.manifest_digest) == (index, amd)
        assert img.annotations["org.opencontainers.image.title"] == "amd64"
        pinned = await client.resolve(f"{registry.host}/app@{index}")
        assert pinned.manifest_digest == amd
    async with make_client(platform=Platform("linux", "aarch64", "v8")) as client:
        assert (await client.resolve(f"{registry.host}/app:multi")).manifest_digest == arm
    async with make_client(platform=Platform("linux", "s390x")) as client:
        with pytest.raises(ManifestNotFoundError, match="no manifest for platform linux/s390x"):
            await client.resolve(f"{registry.host}/app:multi")


async def test_pinned_digest_mismatch_is_refused(registry: FakeRegistry) -> None:
    real = registry.add_manifest("app", OCI_MANIFEST, image("real"))
    fake_body = json.dumps(image("tampered")).encode()
    registry.manifests[("app", real)] = (OCI_MANIFEST, fake_body)
    async with make_client() as client:
        with pytest.raises(DigestMismatchError) as info:
            await client.resolve(f"{registry.host}/app@{real}")
    assert real in str(info.value) and "repository=app" in str(info.value)


async def test_index_child_mismatch_and_header_mismatch(registry: FakeRegistry) -> None:
    _, amd, _ = index_of(registry, "app")
    registry.manifests[("app", amd)] = (OCI_MANIFEST, json.dumps(image("evil")).encode())
    async with make_client() as client:
        with pytest.raises(DigestMismatchError):
            await client.resolve(f"{registry.host}/app:multi")

    async def lying_header(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/manifests/lie"):
            body = json.dumps(image("x")).encode()
            return web.Response(
                body=body, headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256(b"other")}
            )
        return None

    registry.intercept = lying_header
    async with make_client() as client:
        with pytest.raises(DigestMismatchError, match="Docker-Content-Digest"):
            await client.resolve(f"{registry.host}/app:lie")


async def test_not_found_and_garbage(registry: FakeRegistry) -> None:
    registry.manifests[("app", "junk")] = ("application/json", b"not json")
    registry.manifests[("app", "v1schema")] = (
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        b"{}",
    )
    async with make_client() as client:
        with pytest.raises(ManifestNotFoundError):
            await client.resolve(f"{registry.host}/app:missing")
        with pytest.raises(InvalidResponseError, match="not valid JSON"):
            await client.resolve(f"{registry.host}/app:junk")
        with pytest.raises(InvalidResponseError, match="schema 1"):
            await client.resolve(f"{registry.host}/app:v1schema")


async def test_mirror_without_resolve_capability_is_used_for_digests_only(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    """A pull-only mirror is skipped for tags (containerd's rule) and preferred for digests."""
    digest = registry.add_manifest("app", OCI_MANIFEST, image("x"), tag="v1")
    mirror = FakeRegistry(manifests=dict(registry.manifests))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", mirror.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    mirror_host = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        d = tmp_path / "_default"
        d.mkdir()
        (d / "hosts.toml").write_text(f'[host."http://{mirror_host}"]\n  capabilities = ["pull"]\n')
        async with make_client(HostsConfig(tmp_path)) as client:
            assert (await client.resolve(f"{registry.host}/app:v1")).manifest_digest == digest
            assert not mirror.requests
            assert (await client.resolve(f"{registry.host}/app@{digest}")).manifest_digest == digest
            assert len(mirror.requests) == 1
            assert mirror.requests[0].query == {"ns": registry.host}  # containerd's proxy hint
            assert "ns" not in registry.requests[-1].query
    finally:
        await runner.cleanup()


async def test_mirror_down_then_origin(registry: FakeRegistry, tmp_path: Path) -> None:
    digest = registry.add_manifest("app", OCI_MANIFEST, image("x"), tag="v1")
    d = tmp_path / "_default"
    d.mkdir()
    (d / "hosts.toml").write_text('[host."http://127.0.0.1:1"]\n')
    async with make_client(HostsConfig(tmp_path), max_retries=0) as client:
        assert (await client.resolve(f"{registry.host}/app:v1")).manifest_digest == digest
