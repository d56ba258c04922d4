"""Content digests as they arrive from untrusted places (labels, manifests) and become file names.

A digest is ``algorithm:hex`` (OCI image-spec "descriptor.md#digests"). lazysnap accepts the two
registered algorithms with their exact lengths, lower-case hex only, and nothing else: a digest is
used as a file name under the root (stored TOCs, metadata images, cached chunks), so a value such as
``sha256:../../etc`` or an absolute path must never get that far.
"""

from __future__ import annotations

import re

_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"(sha256|sha512):([0-9a-f]+)")


class InvalidDigestError(ValueError):
    """Not a digest lazysnap accepts; the message quotes (a bounded prefix of) the value."""


def validate_digest(value: str) -> str:
    """``value`` itself when it is ``sha256:<64 hex>`` or ``sha512:<128 hex>``, else InvalidDigestError."""
    match = _DIGEST.fullmatch(value)
    if match is None or len(match.group(2)) != _HEX_LENGTHS[match.group(1)]:
        raise InvalidDigestError(f"not a sha256/sha512 digest: {value[:160]!r}")
    return value


def is_digest(value: str) -> bool:
    try:
        validate_digest(value)
    except InvalidDigestError:
        return False
    return True


def file_stem(digest: str) -> str:
    """The file-name form of a validated digest, ``algorithm-hex`` (no ':' in file names)."""
    return validate_digest(digest).replace(":", "-", 1)


def from_file_stem(stem: str) -> str | None:
    """The digest a file stem written by ``file_stem`` names, or None for any other name."""
    digest = stem.replace("-", ":", 1)
    return digest if is_digest(digest) else None
