"""lazysnap: a containerd remote snapshotter that starts containers before their image is pulled."""

__version__ = "0.1.0"
