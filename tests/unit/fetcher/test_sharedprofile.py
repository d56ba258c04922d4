"""Startup profiles shared through the registry: the profile blob (encode, decode, validation,
bounds), the referrer artifact, discovery pinned to the pulled manifest against the fake
registry, and the choice of an image's startup set (``StartupSets``: local, shared, none)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from snapshotter import sharedprofile
from snapshotter.fetcher import OCI_INDEX, OCI_MANIFEST
from snapshotter.fetcher.manifest import referrers_tag
from snapshotter.profile import StartupRecorder
from snapshotter.sharedprofile import (
    ARTIFACT_TYPE,
    MEDIA_TYPE,
    BadProfileError,
    decode_profile,
    encode_profile,
    find_profile,
    profile_artifact,
    push_profile,
)
from snapshotter.startupsets import LOCAL, SHARED, StartupSets
from tests.unit.fetcher.conftest import FakeRegistry, make_client, sha256

REPO = "lz/app"
MANIFEST = "sha256:" + "5" * 64
OTHER = "sha256:" + "6" * 64
FILES = ["/usr/bin/python3", "/usr/lib/libpython.so", "/app/main.py"]


def test_a_profile_round_trips_normalised_and_deduplicated() -> None:
    blob = encode_profile(MANIFEST, ["/usr//bin/./python3", "/usr/bin/python3", "/app/main.py"])
    assert json.loads(blob) == {
        "schemaVersion": 1,
        "manifest": MANIFEST,
        "files": ["/usr/bin/python3", "/app/main.py"],
    }
    assert decode_profile(blob, MANIFEST) == ("/usr/bin/python3", "/app/main.py")


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"schemaVersion": 2, "manifest": MANIFEST, "files": []}, "schemaVersion"),
        ({"schemaVersion": 1, "manifest": OTHER, "files": []}, "names manifest"),
        ({"schemaVersion": 1, "manifest": MANIFEST}, "no 'files' list"),
        ({"schemaVersion": 1, "manifest": MANIFEST, "files": ["relative/x"]}, "not an absolute path"),
        ({"schemaVersion": 1, "manifest": MANIFEST, "files": ["/a/../../etc/shadow"]}, "escapes"),
        ({"schemaVersion": 1, "manifest": MANIFEST, "files": ["/a\x00b"]}, "NUL"),
        ({"schemaVersion": 1, "manifest": MANIFEST, "files": ["/" + "a" * 5000]}, "longer than"),
        ({"schemaVersion": 1, "manifest": MANIFEST, "files": [7]}, "not an absolute path"),
        ({"schemaVersion": 1, "manifest": MANIFEST, "files": ["/"]}, "names the root"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_a_bad_profile_is_rejected_with_its_reason(doc: object, reason: str) -> None:
    with pytest.raises(BadProfileError, match=reason):
        decode_profile(json.dumps(doc).encode(), MANIFEST)


def test_profiles_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadProfileError, match="not JSON"):
        decode_profile(b"{", MANIFEST)
    with pytest.raises(BadProfileError, match="more than"):
        decode_profile(b" " * (sharedprofile.MAX_PROFILE_BYTES + 1), MANIFEST)
    monkeypatch.setattr(sharedprofile, "MAX_FILES", 2)
    with pytest.raises(BadProfileError, match="3 files, more than 2"):
        encode_profile(MANIFEST, FILES)
    with pytest.raises(BadProfileError, match="digest"):
        encode_profile("latest", FILES[:1])


def test_the_artifact_is_a_referrer_of_the_image_manifest() -> None:
    blob = encode_profile(MANIFEST, FILES)
    doc = json.loads(profile_artifact(blob, OCI_MANIFEST, MANIFEST, 1234))
    assert doc["artifactType"] == ARTIFACT_TYPE and doc["mediaType"] == OCI_MANIFEST
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "digest": MANIFEST, "size": 1234}
    assert doc["layers"] == [{"mediaType": MEDIA_TYPE, "digest": sha256(blob), "size": len(blob)}]
    assert doc["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"


def attach(
    reg: FakeRegistry, files: list[str], *, subject: str = MANIFEST, inner: str = MANIFEST, blob: bytes = b""
) -> dict[str, Any]:
    """Store a profile artifact (subject ``subject``, blob naming ``inner``) as a push would."""
    data = blob or encode_profile(inner, files)
    reg.add_blob(data)
    body = profile_artifact(data, OCI_MANIFEST, subject, 100)
    reg.manifests[(REPO, sha256(body))] = (OCI_MANIFEST, body)
    digest = sha256(body)
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "artifactType": ARTIFACT_TYPE}


def listed(reg: FakeRegistry, entries: list[dict[str, Any]]) -> None:
    """The referrers tag schema's list of MANIFEST (the fake registry has no referrers API)."""
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    reg.add_manifest(REPO, OCI_INDEX, doc, referrers_tag(MANIFEST))


async def test_discovery_uses_only_a_profile_pinned_to_the_pulled_manifest(registry: FakeRegistry) -> None:
    good = attach(registry, FILES)
    # Listed for MANIFEST, but its subject is another manifest: never used, even though newer.
    elsewhere = attach(registry, ["/other"], subject=OTHER, inner=OTHER)
    listed(registry, [good, elsewhere])
    async with make_client() as client:
        found, skipped = await find_profile(client, f"{registry.host}/{REPO}:1", MANIFEST)
    assert found is not None and found.files == tuple(FILES) and found.referrer == good["digest"]
    assert len(skipped) == 1 and elsewhere["digest"] in skipped[0] and "subject" in skipped[0]


async def test_the_newest_valid_profile_wins_and_bad_ones_are_skipped(registry: FakeRegistry) -> None:
    older = attach(registry, FILES[:1])
    newer = attach(registry, FILES[1:])
    names_other = attach(registry, ["/x"], inner=OTHER)  # the blob names another manifest
    listed(registry, [older, newer, names_other])
    async with make_client() as client:
        found, skipped = await find_profile(client, f"{registry.host}/{REPO}:1", MANIFEST)
    assert found is not None and found.files == tuple(FILES[1:])
    assert len(skipped) == 1 and "names manifest" in skipped[0]


async def test_a_blob_that_does_not_match_its_digest_is_skipped(registry: FakeRegistry) -> None:
    entry = attach(registry, FILES)
    blob = encode_profile(MANIFEST, FILES)
    registry.blobs[sha256(blob)] = blob.replace(b"python3", b"python4")  # same size, other bytes
    listed(registry, [entry])
    async with make_client() as client:
        found, skipped = await find_profile(client, f"{registry.host}/{REPO}:1", MANIFEST)
    assert found is None and len(skipped) == 1 and "digest" in skipped[0]


async def test_an_oversized_profile_is_refused_before_it_is_fetched(
    registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = attach(registry, FILES)
    listed(registry, [entry])
    monkeypatch.setattr(sharedprofile, "MAX_PROFILE_BYTES", 16)
    async with make_client() as client:
        found, skipped = await find_profile(client, f"{registry.host}/{REPO}:1", MANIFEST)
    assert found is None and "more than 16" in skipped[0]
    assert registry.blob_requests() == []


async def test_push_refuses_a_malformed_manifest_digest_before_asking_the_registry(
    registry: FakeRegistry,
) -> None:
    async with make_client() as client:
        with pytest.raises(BadProfileError, match="manifest digest"):
            await push_profile(client, f"{registry.host}/{REPO}:1", FILES, manifest_digest="sha256:../x")
    assert registry.requests == []


async def test_no_referrers_means_no_profile(registry: FakeRegistry) -> None:
    async with make_client() as client:
        assert await find_profile(client, f"{registry.host}/{REPO}:1", MANIFEST) == (None, [])


async def _pick(sets: StartupSets, reference: str, manifest: str) -> Any:
    async def digest() -> str:
        return manifest

    async def ready() -> str:
        return "index"

    got, startup = await sets.for_image(reference, digest, ready())
    assert got == "index"
    return startup


async def test_startup_sets_prefer_a_local_profile_then_a_shared_one(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    listed(registry, [attach(registry, FILES)])
    image = f"{registry.host}/{REPO}:1"
    recorder = StartupRecorder(tmp_path / "profiles", window_seconds=60)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(2) as pool:
        async with make_client() as client:
            sets = StartupSets(client, loop, pool, recorder=recorder, wait_seconds=60)
            shared = await _pick(sets, image, MANIFEST)
            assert shared.source == SHARED and shared.files == tuple(FILES)
            assert shared.in_layer({"app/main.py", "usr/bin/python3"}.__contains__) == [
                "usr/bin/python3",
                "app/main.py",
            ]
            # Recorded here with this manifest: the local profile wins.
            recorder.layer_mounted(image, MANIFEST)("/etc/hosts")
            local = await _pick(sets, image, MANIFEST)
            assert local.source == LOCAL and local.files == ("/etc/hosts",)
            # Recorded with an older manifest of the tag: the shared one of the pulled manifest.
            recorder.layer_mounted(image, OTHER)
            assert (await _pick(sets, image, MANIFEST)).source == SHARED
            off = StartupSets(client, loop, pool, recorder=None, shared=False, wait_seconds=60)
            assert await _pick(off, image, MANIFEST) is None
            assert sets.stats()["shared_found"] == 1  # looked up once per manifest


async def test_a_registry_error_means_no_profile_and_is_counted(registry: FakeRegistry) -> None:
    registry.fail_statuses = [500] * 50
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        async with make_client(max_retries=0) as client:
            sets = StartupSets(client, loop, pool, wait_seconds=60)  # never by chance too slow
            assert await _pick(sets, f"{registry.host}/{REPO}:1", MANIFEST) is None
    assert sets.stats()["shared_errors"] == 1


async def test_a_slow_look_up_does_not_hold_the_mount(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def digest() -> str:
        await never.wait()
        return MANIFEST

    async def ready() -> int:
        return 7

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        async with make_client() as client:
            sets = StartupSets(client, loop, pool, wait_seconds=0.01)
            assert await sets.for_image("127.0.0.1:1/x:1", digest, ready()) == (7, None)
