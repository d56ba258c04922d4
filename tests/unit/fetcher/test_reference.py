"""Image reference parsing and Docker Hub normalisation."""

from __future__ import annotations

import pytest

from snapshotter.fetcher import InvalidReferenceError, Reference, parse_reference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", Reference("docker.io", "library/alpine", "latest")),
        ("alpine:3.19", Reference("docker.io", "library/alpine", "3.19")),
        ("user/app", Reference("docker.io", "user/app", "latest")),
        ("docker.io/alpine", Reference("docker.io", "library/alpine", "latest")),
        ("index.docker.io/library/alpine:1", Reference("docker.io", "library/alpine", "1")),
        ("ghcr.io/org/team/app:v1", Reference("ghcr.io", "org/team/app", "v1")),
        ("localhost/app", Reference("localhost", "app", "latest")),
        ("127.0.0.1:5000/app:tag", Reference("127.0.0.1:5000", "app", "tag")),
        ("[::1]:5000/app", Reference("[::1]:5000", "app", "latest")),
        (f"registry:5000/a/b@{D}", Reference("registry:5000", "a/b", None, D)),
        (f"alpine:3@{D}", Reference("docker.io", "library/alpine", "3", D)),
        ("Example/app", Reference("Example", "app", "latest")),  # upper case: a host
    ],
)
def test_parse(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_object_scope_and_str() -> None:
    ref = parse_reference(f"127.0.0.1:5000/a/b:t@{D}")
    assert ref.object == D
    assert ref.scope == "repository:a/b:pull"
    assert str(ref) == f"127.0.0.1:5000/a/b:t@{D}"
    assert parse_reference("x.io/a:t").object == "t"


@pytest.mark.parametrize(
    "text", ["", " alpine", "UPPER", "a//b", "host.io/", "a@sha256:", "a:-bad", "x.io/a_"]
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_reference(text)
