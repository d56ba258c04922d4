"""Digests from labels and manifests are validated before they name a file."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter.digest import InvalidDigestError, file_stem, from_file_stem, is_digest, validate_digest

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "f" * 128


def test_accepted_digests_and_their_file_names() -> None:
    for digest in (SHA256, SHA512):
        assert validate_digest(digest) == digest
        assert from_file_stem(file_stem(digest)) == digest
    assert file_stem(SHA256) == SHA256.replace(":", "-")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha256:",
        SHA256.upper(),
        SHA256 + "0",
        SHA256[:-1],
        "sha384:" + "a" * 96,
        "sha256:../" + "a" * 61,
        "/" + SHA256,
        SHA256 + "\n",
        "sha256-" + "a" * 64,
    ],
)
def test_refused(value: str) -> None:
    assert not is_digest(value)
    with pytest.raises(InvalidDigestError):
        file_stem(value)


@given(st.text(max_size=200))
def test_a_file_name_made_from_any_text_stays_in_its_directory(value: str) -> None:
    try:
        stem = file_stem(value)
    except InvalidDigestError:
        return
    assert "/" not in stem and stem not in (".", "..") and "\0" not in stem
