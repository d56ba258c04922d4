"""The registry client ("fetcher"): references, hosts.toml, auth, manifests and ranged blob reads.

It knows registries, not layers. Import what you need from here; the submodules are internal.
"""

from snapshotter.fetcher.blob import BlobReader
from snapshotter.fetcher.client import RegistryClient
from snapshotter.fetcher.credentials import Credentials, CredentialStore, default_docker_config
from snapshotter.fetcher.errors import (
    AuthError,
    BlobNotFoundError,
    CredentialsConfigError,
    DigestMismatchError,
    FetchError,
    HostsConfigError,
    InvalidReferenceError,
    InvalidResponseError,
    ManifestNotFoundError,
    RangeNotSatisfiableError,
    UnreachableError,
)
from snapshotter.fetcher.hosts import DEFAULT_CONFIG_DIR, HostsConfig, RegistryHost
from snapshotter.fetcher.manifest import Descriptor, Platform, ResolvedImage
from snapshotter.fetcher.reference import Reference, parse_reference

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "AuthError",
    "BlobNotFoundError",
    "BlobReader",
    "CredentialStore",
    "Credentials",
    "CredentialsConfigError",
    "Descriptor",
    "DigestMismatchError",
    "FetchError",
    "HostsConfig",
    "HostsConfigError",
    "InvalidReferenceError",
    "InvalidResponseError",
    "ManifestNotFoundError",
    "Platform",
    "RangeNotSatisfiableError",
    "Reference",
    "RegistryClient",
    "RegistryHost",
    "ResolvedImage",
    "UnreachableError",
    "default_docker_config",
    "parse_reference",
]
