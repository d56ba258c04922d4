"""docker config.json credentials and credential helpers (tiny scripts written by the tests)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from snapshotter.fetcher import AuthError, Credentials, CredentialsConfigError, CredentialStore


def config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def helper(tmp_path: Path, name: str, body: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / f"docker-credential-{name}"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(bindir)


async def test_auths_entries(tmp_path: Path) -> None:
    encoded = base64.b64encode(b"alice:s3cr:et").decode()
    path = config(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": encoded},
                "reg.example:5000": {"username": "bob", "password": "pw"},
                "https://tok.example/v2/": {"identitytoken": "refresh-me"},
                "empty.example": {},
            }
        },
    )
    store = CredentialStore(path)
    assert await store.get("registry-1.docker.io") == Credentials("alice", "s3cr:et")
    assert await store.get("reg.example:5000") == Credentials("bob", "pw")
    assert await store.get("tok.example") == Credentials(identity_token="refresh-me")
    assert await store.get("empty.example") is None
    assert await store.get("unknown.example") is None
    assert "s3cr" not in repr(await store.get("docker.io"))


async def test_missing_file_is_anonymous(tmp_path: Path) -> None:
    assert await CredentialStore(tmp_path / "nope.json").get("x") is None
    assert await CredentialStore().get("x") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not json", "not valid JSON"),
        ([], "top level"),
        ({"auths": {"h": {"auth": "!!!"}}}, "auths['h'].auth"),
        ({"auths": {"h": "str"}}, "auths['h'] must be an object"),
        ({"credHelpers": {"h": 1}}, "credHelpers['h']"),
    ],
)
def test_bad_config(tmp_path: Path, data: object, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(CredentialsConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CredentialStore(path)


async def test_cred_helper_gets_host_on_stdin_and_is_cached(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    bindir = helper(
        tmp_path,
        "fake",
        f'read host\necho "$1 $host" >> {log}\n'
        'if [ "$host" = "tok.example" ]; then echo \'{"Username":"<token>","Secret":"idtok"}\'; exit 0; fi\n'
        'if [ "$host" = "none.example" ]; then echo "credentials not found in native keychain"; exit 1; fi\n'
        'if [ "$host" = "broken.example" ]; then echo "secret-ish output"; exit 3; fi\n'
        'echo "{\\"ServerURL\\":\\"$host\\",\\"Username\\":\\"u\\",\\"Secret\\":\\"p-$host\\"}"\n',
    )
    path = config(
        tmp_path, {"credHelpers": {"reg.example": "fake", "tok.example": "fake"}, "credsStore": "fake"}
    )
    store = CredentialStore(path, helper_search_path=bindir)
    assert await store.get("reg.example") == Credentials("u", "p-reg.example")
    assert await store.get("reg.example") == Credentials("u", "p-reg.example")  # cached
    assert await store.get("tok.example") == Credentials(identity_token="idtok")
    assert await store.get("docker.io") == Credentials("u", "p-https://index.docker.io/v1/")  # via credsStore
    assert await store.get("none.example") is None
    with pytest.raises(AuthError) as info:
        await store.get("broken.example")
    assert "exit status 3" in str(info.value) and "secret-ish" not in str(info.value)
    calls = log.read_text().splitlines()
    assert calls.count("get reg.example") == 1


async def test_cred_helper_timeout_and_missing(tmp_path: Path) -> None:
    bindir = helper(tmp_path, "slow", "sleep 120\n")
    store = CredentialStore(
        config(tmp_path, {"credsStore": "slow"}), helper_search_path=bindir, helper_timeout=0.2
    )
    started = time.monotonic()
    with pytest.raises(AuthError, match="timed out"):
        await store.get("x.example")
    assert time.monotonic() - started < 60  # killed at its timeout, not waited for
    missing = CredentialStore(config(tmp_path, {"credsStore": "absent"}), helper_search_path=bindir)
    with pytest.raises(AuthError, match="docker-credential-absent not found"):
        await missing.get("x.example")
