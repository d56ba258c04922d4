"""FUSE layer filesystems (named so that it never shadows fusepy's own ``fuse`` module)."""
