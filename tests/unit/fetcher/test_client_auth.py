"""The 401 → token (or Basic) flow against the fake registry, with credentials from config.json."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from snapshotter.fetcher import AuthError, CredentialStore

from .conftest import FakeRegistry, make_client

DATA = b"0123456789" * 100


def docker_config(tmp_path: Path, host: str, entry: dict[str, str]) -> CredentialStore:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {host: entry}}))
    return CredentialStore(path)


def statuses_401(reg: FakeRegistry) -> int:
    return sum(1 for r in reg.requests if "Authorization" not in r.headers and r.path != "/token")


async def test_bearer_token_flow_with_scope(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/team/app", digest, len(DATA))
        assert await blob.read_ranges([(0, 3), (10, 13)]) == [DATA[0:3], DATA[10:13]]
        assert await blob.read_ranges([(5, 6)]) == [DATA[5:6]]
        # Another repository on the same host: the token is fetched up front, no second 401.
        other = client.blob(f"{registry.host}/team/other", digest, len(DATA))
        assert await other.read_ranges([(1, 2)]) == [DATA[1:2]]
    assert [r.query for r in registry.token_requests] == [
        {"service": "fake-registry", "scope": "repository:team/app:pull"},
        {"service": "fake-registry", "scope": "repository:team/other:pull"},
    ]
    assert all("Authorization" not in r.headers for r in registry.token_requests)  # anonymous token
    assert statuses_401(registry) == 1


async def test_token_expiry_and_revocation_refresh(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    registry.token_lifetime = 1
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        await blob.read_ranges([(0, 1)])
        assert len(registry.tokens_issued) == 1
        await asyncio.sleep(1.0)  # past expires_in (renewed a little early)
        await blob.read_ranges([(1, 2)])
        assert len(registry.tokens_issued) == 2
        assert statuses_401(registry) == 1  # renewed before sending, not after a 401
        registry.token_lifetime = 300
        registry.token_expired.add(registry.tokens_issued[-1])  # revoked server-side
        assert await blob.read_ranges([(2, 3)]) == [DATA[2:3]]
        assert len(registry.tokens_issued) == 3


async def test_concurrent_401s_fetch_one_token(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        await blob.read_ranges([(0, 1)])
        registry.token_expired.add(registry.tokens_issued[0])
        readers = [client.blob(f"{registry.host}/app", digest, len(DATA)) for _ in range(8)]
        results = await asyncio.gather(*(r.read_ranges([(i, i + 1)]) for i, r in enumerate(readers)))
    assert results == [[DATA[i : i + 1]] for i in range(8)]
    assert len(registry.tokens_issued) == 2


async def test_bearer_realm_gets_basic_credentials(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.auth = "bearer"
    registry.basic_user = ("alice", "pa:ss")
    digest = registry.add_blob(DATA)
    encoded = base64.b64encode(b"alice:pa:ss").decode()
    async with make_client(credentials=docker_config(tmp_path, registry.host, {"auth": encoded})) as client:
        assert await client.blob(f"{registry.host}/app", digest, len(DATA)).read_ranges([(0, 2)]) == [
            DATA[0:2]
        ]
    assert registry.token_requests[0].headers["Authorization"].startswith("Basic ")
    wrong = docker_config(tmp_path, registry.host, {"username": "alice", "password": "nope"})
    async with make_client(credentials=wrong) as client:
        with pytest.raises(AuthError) as info:
            await client.blob(f"{registry.host}/app", digest).read_ranges([(0, 2)])
    assert "refused the token request (HTTP 401)" in str(info.value)
    assert "nope" not in str(info.value) and "repository=app" in str(info.value)


async def test_identity_token_is_exchanged_by_oauth_post(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.auth = "bearer"
    digest = registry.add_blob(DATA)

    creds = docker_config(tmp_path, registry.host, {"identitytoken": "refresh-xyz"})
    async with make_client(credentials=creds) as client:
        assert await client.blob(f"{registry.host}/app", digest, len(DATA)).read_ranges([(0, 2)]) == [
            DATA[0:2]
        ]
    assert registry.token_requests[0].method == "POST"


async def test_basic_auth_from_config_json(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.auth = "basic"
    registry.basic_user = ("bob", "hunter2")
    digest = registry.add_blob(DATA)
    creds = docker_config(tmp_path, f"http://{registry.host}/v2/", {"username": "bob", "password": "hunter2"})
    async with make_client(credentials=creds) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(0, 2)]) == [DATA[0:2]]
        assert await blob.read_ranges([(3, 5)]) == [DATA[3:5]]
    assert statuses_401(registry) == 1
    async with make_client() as client:
        with pytest.raises(AuthError, match="requires credentials and we have none"):
            await client.blob(f"{registry.host}/app", digest).read_ranges([(0, 2)])
    wrong = docker_config(tmp_path, registry.host, {"username": "bob", "password": "wrong"})
    async with make_client(credentials=wrong) as client:
        with pytest.raises(AuthError, match=r"(refused|rejected) our credentials") as info:
            await client.blob(f"{registry.host}/app", digest).read_ranges([(0, 2)])
    assert "wrong" not in str(info.value)


async def test_credential_helper_end_to_end(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.auth = "bearer"
    registry.basic_user = ("helper-user", "helper-secret")
    digest = registry.add_blob(DATA)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "docker-credential-test"
    script.write_text(
        '#!/bin/sh\nread host\necho "{\\"ServerURL\\":\\"$host\\",\\"Username\\":\\"helper-user\\",'
        '\\"Secret\\":\\"helper-secret\\"}"\n'
    )
    script.chmod(0o755)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {registry.host: "test"}}))
    creds = CredentialStore(config, helper_search_path=str(bindir))
    async with make_client(credentials=creds) as client:
        assert await client.blob(f"{registry.host}/app", digest, len(DATA)).read_ranges([(0, 2)]) == [
            DATA[0:2]
        ]
