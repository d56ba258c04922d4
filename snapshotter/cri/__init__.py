"""Kubernetes (CRI) integration: an image-service proxy that captures the kubelet's pull secrets
for lazysnap's registry client. See ``proxy.py``."""

from snapshotter.cri.proxy import SERVICES, ImageServiceProxy
from snapshotter.cri.secrets import PullSecrets, credentials_from_auth

__all__ = ["SERVICES", "ImageServiceProxy", "PullSecrets", "credentials_from_auth"]
