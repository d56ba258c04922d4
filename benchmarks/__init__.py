"""Benchmarks: cold-start runs over shaped links (``make bench``), the demo and micro-benchmarks."""

import os

# gRPC's C core logs an INFO line whenever the harness forks (ctr, runc...) while a channel is
# open; keep the progress output readable. Only a default: GRPC_VERBOSITY set by the user wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
