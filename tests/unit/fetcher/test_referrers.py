"""Listing a manifest's OCI 1.1 referrers (the API, else the referrers tag schema), fetching
manifests by digest, and finding gzip indexes among the referrers (``snapshotter.gzdiscovery``),
against the fake registry. What the indexer pushes (the artifact, the tag schema's list) is
checked here too."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web

from snapshotter.fetcher import OCI_INDEX, OCI_MANIFEST, DigestMismatchError, InvalidResponseError
from snapshotter.fetcher.manifest import MAX_REFERRERS, referrers_tag
from snapshotter.formats import gzindex
from snapshotter.gzdiscovery import find_indexes
from snapshotter.image import SourceImage
from snapshotter.indexer import LayerOutcome, artifact_manifest
from snapshotter.referrers import with_referrer
from tests.unit.fetcher.conftest import FakeRegistry, make_client, sha256

REPO = "lz/app"
SUBJECT = "sha256:" + "5" * 64
LAYER = "sha256:" + "1" * 64


def image() -> SourceImage:
    from snapshotter.fetcher import Descriptor

    config = Descriptor("application/vnd.oci.image.config.v1+json", "sha256:" + "c" * 64, 10)
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", LAYER, 1000)
    return SourceImage(SUBJECT, OCI_MANIFEST, config, (layer,), {}, 321)


def artifact(subject: str = SUBJECT, index_digest: str = "sha256:" + "9" * 64) -> bytes:
    outcome = LayerOutcome(
        0,
        LAYER,
        1000,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        index_digest=index_digest,
        index_size=77,
    )
    body = artifact_manifest(image(), [(outcome, b"")])
    if subject != SUBJECT:
        doc = json.loads(body)
        doc["subject"]["digest"] = subject
        body = json.dumps(doc).encode()
    return body


def push_artifact(reg: FakeRegistry, body: bytes) -> dict[str, Any]:
    digest = sha256(body)
    reg.manifests[(REPO, digest)] = (OCI_MANIFEST, body)
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(body),
        "artifactType": gzindex.ARTIFACT_TYPE,
    }


def tag_list(reg: FakeRegistry, entries: list[dict[str, Any]]) -> None:
    reg.add_manifest(
        REPO,
        OCI_INDEX,
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
        referrers_tag(SUBJECT),
    )


def test_the_referrers_tag_follows_the_spec() -> None:
    assert referrers_tag("sha256:" + "a" * 64) == "sha256-" + "a" * 64
    assert referrers_tag("sha512:" + "b" * 128) == "sha512-" + "b" * 64
    assert referrers_tag("x+y:ab=cd") == "x-y-ab-cd"


async def test_without_the_api_the_tag_schema_lists_the_referrers(registry: FakeRegistry) -> None:
    entry = push_artifact(registry, artifact())
    tag_list(registry, [entry])
    async with make_client() as client:
        listed = await client.referrers(f"{registry.host}/{REPO}:1", SUBJECT)
    assert [(d.digest, d.artifact_type) for d in listed] == [(entry["digest"], gzindex.ARTIFACT_TYPE)]
    paths = [r.path for r in registry.requests]
    assert f"/v2/{REPO}/referrers/{SUBJECT}" in paths  # the API first (404 here)
    assert f"/v2/{REPO}/manifests/{referrers_tag(SUBJECT)}" in paths


async def test_no_api_and_no_tag_means_no_referrers(registry: FakeRegistry) -> None:
    async with make_client() as client:
        assert await client.referrers(f"{registry.host}/{REPO}:1", SUBJECT) == []


async def test_a_tag_that_is_no_image_index_means_no_referrers(registry: FakeRegistry) -> None:
    registry.add_manifest(
        REPO, OCI_MANIFEST, {"schemaVersion": 2, "config": {}, "layers": []}, referrers_tag(SUBJECT)
    )
    async with make_client() as client:
        assert await client.referrers(f"{registry.host}/{REPO}:1", SUBJECT) == []


async def test_the_api_is_used_with_its_pages(registry: FakeRegistry) -> None:
    first = push_artifact(registry, artifact())
    second = push_artifact(registry, artifact(index_digest="sha256:" + "8" * 64))

    async def api(request: web.Request) -> web.Response | None:
        if "/referrers/" not in request.path:
            return None
        page = request.query.get("page")
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [second if page else first]}
        headers = {} if page else {"Link": f'<{request.path}?page=2>; rel="next"'}
        return web.json_response(doc, headers=headers, content_type=OCI_INDEX)

    registry.intercept = api
    async with make_client() as client:
        listed = await client.referrers(f"{registry.host}/{REPO}:1", SUBJECT)
    assert [d.digest for d in listed] == [first["digest"], second["digest"]]
    assert not any(r.path.endswith(referrers_tag(SUBJECT)) for r in registry.requests)


async def test_a_referrers_list_is_bounded(registry: FakeRegistry) -> None:
    entry = push_artifact(registry, artifact())
    tag_list(registry, [entry] * (MAX_REFERRERS + 1))
    async with make_client() as client:
        with pytest.raises(InvalidResponseError):
            await client.referrers(f"{registry.host}/{REPO}:1", SUBJECT)


async def test_a_manifest_by_digest_is_verified(registry: FakeRegistry) -> None:
    body = artifact()
    registry.manifests[(REPO, sha256(body))] = (OCI_MANIFEST, body + b" ")
    async with make_client() as client:
        with pytest.raises(DigestMismatchError):
            await client.manifest(f"{registry.host}/{REPO}:1", sha256(body))
        registry.manifests[(REPO, sha256(body))] = (OCI_MANIFEST, body)
        kind, doc, raw = await client.manifest(f"{registry.host}/{REPO}:1", sha256(body))
    assert kind == OCI_MANIFEST and raw == body and doc["artifactType"] == gzindex.ARTIFACT_TYPE


async def test_discovery_pins_indexes_through_artifacts_of_the_pulled_manifest(
    registry: FakeRegistry,
) -> None:
    good = push_artifact(registry, artifact())
    other_subject = push_artifact(
        registry, artifact(subject="sha256:" + "6" * 64, index_digest="sha256:" + "7" * 64)
    )
    unrelated = {**push_artifact(registry, artifact()), "artifactType": "application/vnd.example.sbom"}
    tag_list(registry, [good, unrelated, other_subject])
    async with make_client() as client:
        found, skipped = await find_indexes(client, f"{registry.host}/{REPO}:1", SUBJECT)
    assert list(found) == [LAYER]
    assert found[LAYER].digest == "sha256:" + "9" * 64 and found[LAYER].size == 77
    assert found[LAYER].referrer == good["digest"]
    assert len(skipped) == 1 and "subject" in skipped[0]
    annotations = found[LAYER].annotations()
    assert gzindex.locate(annotations, 1 << 20).index == found[LAYER].digest


def test_the_tag_schema_list_gets_each_artifact_once() -> None:
    body = artifact()
    listed = with_referrer(None, body)
    assert listed is not None
    doc = json.loads(listed)
    assert doc["mediaType"] == OCI_INDEX
    assert doc["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sha256(body),
            "size": len(body),
            "artifactType": gzindex.ARTIFACT_TYPE,
        }
    ]
    assert with_referrer(doc, body) is None  # no duplicate
    other = artifact(index_digest="sha256:" + "8" * 64)
    again = with_referrer(doc, other)
    assert again is not None and len(json.loads(again)["manifests"]) == 2


def test_the_artifact_is_an_oci_1_1_referrer() -> None:
    doc = json.loads(artifact())
    assert doc["artifactType"] == gzindex.ARTIFACT_TYPE and doc["mediaType"] == OCI_MANIFEST
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "digest": SUBJECT, "size": 321}
    assert doc["config"]["mediaType"] == "application/vnd.oci.empty.v1+json" and doc["config"]["size"] == 2
    (layer,) = doc["layers"]
    assert layer["mediaType"] == gzindex.INDEX_MEDIA_TYPE
    assert layer["annotations"] == {gzindex.LAYER_ANNOTATION: LAYER}
