"""Where a registry may send us: no plain-http redirect or token realm from an https registry, no
loopback or link-local target unless the registry is on such an address itself; errors name the
host, never the path, query or a credential."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from snapshotter.fetcher import CredentialStore, HostsConfig, RegistryHost, UnsafeTargetError
from snapshotter.fetcher.redirects import (
    LINK_LOCAL,
    LOOPBACK,
    GuardedResolver,
    LocalAddressError,
    address_kind,
    refusal,
    resolved_kind,
)
from snapshotter.fetcher.transport import Where

from .conftest import FakeRegistry, ObjectStore, make_client

DATA = bytes(range(256)) * 40


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", LOOPBACK),
        ("127.8.9.10", LOOPBACK),
        ("[::1]", LOOPBACK),
        ("0.0.0.0", LOOPBACK),
        ("[::]", LOOPBACK),
        ("[::ffff:127.0.0.1]", LOOPBACK),
        ("localhost", LOOPBACK),
        ("Registry.LOCALHOST.", LOOPBACK),
        ("169.254.169.254", LINK_LOCAL),
        ("[fe80::1%eth0]", LINK_LOCAL),
        ("[::ffff:169.254.1.1]", LINK_LOCAL),
        ("192.0.2.7", None),
        ("10.1.2.3", None),
        ("registry.example", None),
        ("localhost.example", None),
    ],
)
def test_address_kinds(host: str, kind: str | None) -> None:
    assert address_kind(host) == kind


@pytest.mark.parametrize(
    ("scheme", "origin_kind", "target", "refused"),
    [
        ("https", None, "https://cdn.example/blob?sig=SECRET", None),
        ("https", None, "http://cdn.example/blob?sig=SECRET", "plain http while the registry uses https"),
        ("http", None, "http://cdn.example/blob", None),
        ("https", None, "https://127.0.0.1:9000/blob?sig=SECRET", "on a loopback address"),
        ("https", None, "https://localhost/blob", "on a loopback address"),
        ("https", None, "https://169.254.169.254/latest/meta-data/", "on a link-local address"),
        ("https", None, "https://[fe80::1]/x", "on a link-local address"),
        ("http", LOOPBACK, "http://127.0.0.1:9000/blob", None),
        ("http", LOOPBACK, "http://169.254.169.254/latest/", "on a link-local address"),
        ("http", LINK_LOCAL, "http://169.254.1.2/blob", None),
        ("https", None, "file:///etc/passwd", "not an http(s) URL"),
        ("https", None, "https:///nohost", "not an http(s) URL"),
    ],
)
def test_refusal(scheme: str, origin_kind: str | None, target: str, refused: str | None) -> None:
    reason = refusal(scheme, origin_kind, target, "blob redirect")
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason
        assert "SECRET" not in reason and "/blob" not in reason and "meta-data" not in reason


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1:5000", LOOPBACK),
        ("localhost:5000", LOOPBACK),
        ("[::1]:443", LOOPBACK),
        ("registry.invalid", None),
    ],
)
async def test_registry_kinds_resolve_names(host: str, kind: str | None) -> None:
    assert await resolved_kind(host) == kind


async def test_guarded_resolver_refuses_local_names_except_allowed_ones() -> None:
    resolver = GuardedResolver()
    try:
        with pytest.raises(LocalAddressError, match="localhost resolves to a loopback address"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    allowed = GuardedResolver(frozenset({"localhost"}))  # e.g. a configured HTTP proxy
    try:
        assert await allowed.resolve("localhost", 80)
    finally:
        await allowed.close()


async def test_a_public_registry_may_not_send_us_to_a_local_name() -> None:
    async with make_client() as client:
        origin = RegistryHost("https", "registry.invalid")  # resolves to nothing: not local
        with pytest.raises(UnsafeTargetError, match=r"localhost:8080 is on a loopback address"):
            await client.transport.foreign_session(
                origin, "https://localhost:8080/x?sig=1", "blob redirect", Where("registry.invalid", "app")
            )


async def test_loopback_registry_may_not_redirect_to_link_local(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    registry.redirect_base = "http://169.254.169.254/latest"
    async with make_client() as client:
        with pytest.raises(UnsafeTargetError) as info:
            await client.blob(f"{registry.host}/app", digest, len(DATA)).read_ranges([(0, 10)])
    message = str(info.value)
    assert "blob redirect to 169.254.169.254 is on a link-local address" in message
    assert registry.host in message and "sig=" not in message and "/latest" not in message


async def test_loopback_registry_may_redirect_to_loopback(
    registry: FakeRegistry, object_store: tuple[ObjectStore, str]
) -> None:
    store, store_url = object_store
    digest = registry.add_blob(DATA)
    store.blobs[digest] = DATA
    registry.redirect_base = store_url
    async with make_client() as client:
        assert await client.blob(f"{registry.host}/app", digest, len(DATA)).read_ranges([(0, 10)]) == [
            DATA[:10]
        ]


async def test_manifest_redirects_and_token_realms_are_checked_too(registry: FakeRegistry) -> None:
    async def unsafe(request: web.Request) -> web.StreamResponse | None:
        if "/manifests/" in request.path:
            return web.Response(status=307, headers={"Location": "http://169.254.169.254/m?sig=SECRET"})
        if "/blobs/" in request.path:
            challenge = 'Bearer realm="http://169.254.169.254/token",service="x"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        return None

    registry.intercept = unsafe
    async with make_client() as client:
        with pytest.raises(
            UnsafeTargetError, match=r"manifest redirect to 169\.254\.169\.254 is on a link-local"
        ):
            await client.resolve(f"{registry.host}/app:1")
        with pytest.raises(UnsafeTargetError, match=r"token realm to 169\.254\.169\.254 is on a link-local"):
            await client.blob(f"{registry.host}/app", "sha256:" + "0" * 64).read_ranges([(0, 1)])


# -- an https registry ---------------------------------------------------------------------------


def tls_host(reg: FakeRegistry) -> str:
    return reg.base_url.removeprefix("https://")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl tool)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
async def tls_registry(
    certificate: tuple[Path, Path], tmp_path: Path
) -> AsyncIterator[tuple[FakeRegistry, HostsConfig]]:
    """The fake registry served over https, and a hosts.toml that trusts its certificate."""
    cert, key = certificate
    reg = FakeRegistry()
    app = web.Application()
    app.router.add_route("GET", "/token", reg.handle_token)
    app.router.add_route("*", "/{tail:.*}", reg.handle)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    host = f"127.0.0.1:{runner.addresses[0][1]}"
    reg.base_url = f"https://{host}"
    host_dir = tmp_path / "certs.d" / f"{host}"
    host_dir.mkdir(parents=True)
    (host_dir / "hosts.toml").write_text(f'server = "https://{host}"\nca = "{cert}"\n')
    try:
        yield reg, HostsConfig(tmp_path / "certs.d")
    finally:
        await runner.cleanup()


async def test_https_registry_reads_blobs(tls_registry: tuple[FakeRegistry, HostsConfig]) -> None:
    reg, hosts = tls_registry
    digest = reg.add_blob(DATA)
    async with make_client(hosts) as client:
        blob = client.blob(f"{tls_host(reg)}/app", digest, len(DATA))
        assert await blob.read_ranges([(5, 9)]) == [DATA[5:9]]


async def test_https_registry_may_not_redirect_to_http(
    tls_registry: tuple[FakeRegistry, HostsConfig], object_store: tuple[ObjectStore, str]
) -> None:
    reg, hosts = tls_registry
    store, store_url = object_store
    digest = reg.add_blob(DATA)
    store.blobs[digest] = DATA
    reg.redirect_base = store_url  # http://127.0.0.1:PORT: loopback like the registry, but plain http
    async with make_client(hosts) as client:
        with pytest.raises(UnsafeTargetError, match="plain http while the registry uses https") as info:
            await client.blob(f"{tls_host(reg)}/app", digest, len(DATA)).read_ranges([(0, 10)])
    assert "sig=" not in str(info.value)
    assert not store.requests  # refused before anything was sent there


async def test_https_registry_may_not_send_credentials_to_an_http_realm(
    tls_registry: tuple[FakeRegistry, HostsConfig], registry: FakeRegistry, tmp_path: Path
) -> None:
    reg, hosts = tls_registry
    reg.auth = "bearer"
    reg.basic_user = ("alice", "s3cret")
    digest = reg.add_blob(DATA)

    async def http_realm(request: web.Request) -> web.StreamResponse | None:
        if "Authorization" in request.headers or "/blobs/" not in request.path:
            return None
        challenge = f'Bearer realm="{registry.base_url}/token",service="fake",scope="repository:app:pull"'
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})

    reg.intercept = http_realm
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {tls_host(reg): {"username": "alice", "password": "s3cret"}}}))
    async with make_client(hosts, CredentialStore(config)) as client:
        with pytest.raises(UnsafeTargetError) as info:
            await client.blob(f"{tls_host(reg)}/app", digest, len(DATA)).read_ranges([(0, 10)])
    message = str(info.value)
    assert f"token realm to {registry.host} is plain http while the registry uses https" in message
    assert "s3cret" not in message and "alice" not in message
    assert not registry.token_requests  # the credentials never went there
