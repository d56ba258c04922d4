"""hosts.toml / certs.d parsing, defaults, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.fetcher import HostsConfig, HostsConfigError, RegistryHost


def write(root: Path, host_dir: str, text: str) -> Path:
    d = root / host_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d


def test_defaults_without_directory(tmp_path: Path) -> None:
    hosts = HostsConfig(tmp_path / "missing", plain_http_hosts=["plain.example:5000", "bare.example"])
    assert hosts.endpoints("docker.io") == (RegistryHost("https", "registry-1.docker.io"),)
    assert hosts.endpoints("ghcr.io")[0].base_url == "https://ghcr.io/v2"
    for loopback in ("localhost:5000", "127.0.0.1:80", "[::1]:5000", "::1"):
        assert hosts.endpoints(loopback)[0].scheme == "http"
    assert hosts.endpoints("plain.example:5000")[0].scheme == "http"
    assert hosts.endpoints("bare.example:1234")[0].scheme == "http"
    assert hosts.endpoints("plain.example:6000")[0].scheme == "https"
    assert HostsConfig(None).endpoints("quay.io")[0].base_url == "https://quay.io/v2"


def test_mirrors_in_file_order_then_server(tmp_path: Path) -> None:
    d = write(
        tmp_path,
        "docker.io",
        """
server = "https://registry-1.docker.io"

[host."https://mirror-b.example"]
  capabilities = ["pull", "resolve"]
  ca = "b.crt"
  header = { X-One = "1", X-Many = ["a", "b"] }

[host."http://mirror-a.example:5000/prefix/"]
  capabilities = ["pull"]
  skip_verify = true
  client = [["c.cert", "c.key"], "both.pem"]

[host."https://mirror-c.example/custom/api"]
  override_path = true
  ca = ["/abs/ca.pem", "rel.pem"]
""",
    )
    eps = HostsConfig(tmp_path).endpoints("docker.io")
    assert [e.base_url for e in eps] == [
        "https://mirror-b.example/v2",
        "http://mirror-a.example:5000/prefix/v2",
        "https://mirror-c.example/custom/api",
        "https://registry-1.docker.io/v2",
    ]
    b, a, c, origin = eps
    assert b.capabilities == {"pull", "resolve"} and b.mirror and not origin.mirror
    assert b.ca == (str(d / "b.crt"),)
    assert b.header == (("X-One", "1"), ("X-Many", "a"), ("X-Many", "b"))
    assert a.capabilities == {"pull"} and a.skip_verify
    assert a.client == ((str(d / "c.cert"), str(d / "c.key")), (str(d / "both.pem"), ""))
    assert c.ca == ("/abs/ca.pem", str(d / "rel.pem"))
    assert origin.capabilities == {"pull", "resolve", "push"}


def test_host_port_directory_and_default_directory(tmp_path: Path) -> None:
    write(tmp_path, "reg.example_5000_", 'server = "https://one.example"')
    write(tmp_path, "_default", '[host."https://fallback.example"]\n')
    hosts = HostsConfig(tmp_path)
    assert [e.host for e in hosts.endpoints("reg.example:5000")] == ["one.example"]
    # _default applies to any other registry; its server defaults to the registry itself.
    assert [e.base_url for e in hosts.endpoints("other.example")] == [
        "https://fallback.example/v2",
        "https://other.example/v2",
    ]


def test_schemeless_urls_follow_plain_http_rule(tmp_path: Path) -> None:
    write(tmp_path, "r.example", 'server = "127.0.0.1:5000"\n[host."mirror.example"]\n')
    eps = HostsConfig(tmp_path).endpoints("r.example")
    assert [e.base_url for e in eps] == ["https://mirror.example/v2", "http://127.0.0.1:5000/v2"]


def test_docker_cert_files_without_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "secure.example"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lonely.cert", "ignored.txt"):
        (d / name).write_text("x")
    (origin,) = HostsConfig(tmp_path).endpoints("secure.example")
    assert origin.ca == (str(d / "ca.crt"),)
    assert origin.client == ((str(d / "client.cert"), str(d / "client.key")), (str(d / "lonely.cert"), ""))


def test_ssl_context_errors_name_the_file(tmp_path: Path) -> None:
    host = RegistryHost("https", "x.example", ca=(str(tmp_path / "nope.crt"),))
    with pytest.raises(HostsConfigError, match=r"nope\.crt"):
        host.ssl_context()
    assert RegistryHost("https", "x.example").ssl_context() is None
    insecure = RegistryHost("https", "x.example", skip_verify=True).ssl_context()
    assert insecure is not None and not insecure.check_hostname


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = [", "cannot parse TOML"),
        ("sever = 'x'", "unknown key 'sever'"),
        ("server = 5", "key 'server' must be a non-empty string"),
        ("server = 'ftp://x'", "key 'server'"),
        ('[host."https://m"]\ncapabilites = ["pull"]', "unknown key 'host.\"https://m\".capabilites'"),
        ('[host."https://m"]\ncapabilities = ["pull", "fly"]', "unknown capability 'fly'"),
        ('[host."https://m"]\ncapabilities = "pull"', "capabilities' must be a list"),
        ('[host."https://m"]\nskip_verify = "yes"', "skip_verify' must be a boolean"),
        ('[host."https://m"]\nca = 3', "ca' must be a string or a list"),
        ('[host."https://m"]\nclient = [["a"]]', "client'"),
        ('[host."https://m"]\nheader = { X = 1 }', "header.X' must be a string"),
        ('[host."https://m"]\noverride_path = 1', "override_path' must be a boolean"),
        ("host = 3", "key 'host' must be a table"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path, "r.example", text)
    with pytest.raises(HostsConfigError) as info:
        HostsConfig(tmp_path).endpoints("r.example")
    assert str(tmp_path / "r.example" / "hosts.toml") in str(info.value)
    assert message in str(info.value)


def test_insecure_hosts_are_listed_for_the_start_up_warning(tmp_path: Path) -> None:
    write(
        tmp_path,
        "registry.example",
        """server = "https://registry.example"
[host."https://mirror.example"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
""",
    )
    write(tmp_path, "secure.example", 'server = "https://secure.example"\n')
    write(tmp_path, "broken.example", "server = [")  # its own error comes when a pull needs it
    assert HostsConfig(tmp_path).insecure_hosts() == ["registry.example: https://mirror.example/v2"]
    assert HostsConfig(tmp_path / "missing").insecure_hosts() == []
