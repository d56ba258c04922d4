"""``python -m snapshotter`` runs the ``lazysnap`` command line."""

from snapshotter.cli import main

raise SystemExit(main())
