"""The fetcher's error hierarchy: one exception type per registry failure a caller handles.

Every ``FetchError`` names the registry host, the repository and (when known) the digest involved,
and never a credential, a token or a presigned URL (its query string is a credential too).
"""

from __future__ import annotations


class FetchError(Exception):
    """Base class of every failure talking to a registry or mirror."""

    def __init__(self, message: str, *, host: str = "", repository: str = "", digest: str = "") -> None:
        self.reason = message
        self.host = host
        self.repository = repository
        self.digest = digest
        where = ", ".join(
            f"{name}={value}"
            for name, value in (("host", host), ("repository", repository), ("digest", digest))
            if value
        )
        super().__init__(f"{message} ({where})" if where else message)


class AuthError(FetchError):
    """The registry refused our credentials, or wants some and we have none (401/403)."""


class ManifestNotFoundError(FetchError):
    """The registry has no such manifest (404)."""


class BlobNotFoundError(FetchError):
    """The registry has no such blob (404)."""


class RangeNotSatisfiableError(FetchError):
    """A requested byte range lies outside the blob (416, or a range past the known size)."""


class UnreachableError(FetchError):
    """No endpoint answered usefully: connection errors, timeouts or 5xx after every retry."""


class DigestMismatchError(FetchError):
    """Content does not hash to the digest that names it; it was not used."""


class InvalidResponseError(FetchError):
    """The server's answer is malformed: wrong Content-Range, short body, bad multipart or JSON."""


class UnsafeTargetError(FetchError):
    """The registry sent us where we must not go: a redirect or token realm on plain http from an
    https registry, or on a loopback or link-local address when the registry is not on one."""


class InvalidReferenceError(ValueError):
    """An image reference string cannot be parsed."""


class HostsConfigError(ValueError):
    """A hosts.toml (or certs.d directory) is invalid; the message names the file and the key."""


class CredentialsConfigError(ValueError):
    """A docker config.json is invalid; the message names the file and the entry, never a secret."""
