"""The eager fallback: images nobody converted are fetched in parallel and unpacked by lazysnap.

``fills.EagerFills`` (in the FUSE manager) claims layers that cannot be lazy through the
remote-snapshot handshake; ``download`` fetches a blob through its registry's fetch scheduler;
``decompress`` turns it into its verified uncompressed stream; ``tarreader`` and ``apply`` unpack
that stream exactly as containerd's applier does.
"""

from snapshotter.eager.fills import EagerConfig, EagerFills, chain_ids, fillable

__all__ = ["EagerConfig", "EagerFills", "chain_ids", "fillable"]
