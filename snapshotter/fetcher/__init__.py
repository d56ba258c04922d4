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
    UnsafeTargetError,
)
from snapshotter.fetcher.hosts import DEFAULT_CONFIG_DIR, HostsConfig, RegistryHost
from snapshotter.fetcher.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    Platform,
    ResolvedImage,
    load_document,
    parse_descriptor,
    parse_image_manifest,
    select_platform,
)
from snapshotter.fetcher.push import Pusher, PushOutcome, PushStats
from snapshotter.fetcher.reference import Reference, parse_reference
from snapshotter.fetcher.sizing import RequestSizing

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
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
    "ManifestError",
    "ManifestNotFoundError",
    "Platform",
    "PushOutcome",
    "PushStats",
    "Pusher",
    "RangeNotSatisfiableError",
    "Reference",
    "RegistryClient",
    "RegistryHost",
    "RequestSizing",
    "ResolvedImage",
    "UnreachableError",
    "UnsafeTargetError",
    "default_docker_config",
    "load_document",
    "parse_descriptor",
    "parse_image_manifest",
    "parse_reference",
    "select_platform",
]
