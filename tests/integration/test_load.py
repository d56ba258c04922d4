"""32 concurrent gRPC clients churning snapshots against one daemon: no deadlock, only documented
errors, and a consistent store and directory tree afterwards."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.support.daemon import LazysnapDaemon

CLIENTS = 32
SECONDS = float(os.environ.get("LZ_LOAD_SECONDS", "60"))
# What containerd's own snapshotters answer when clients race each other; anything else is a bug.
DOCUMENTED = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def client_loop(address: Path, seed: int, deadline: float, errors: Counter[str], calls: Counter[str]) -> None:
    rnd = random.Random(seed)
    channel = grpc.insecure_channel(f"unix:{address}")
    stub = pb_grpc.SnapshotsStub(channel)
    mine: list[str] = []
    try:
        while time.monotonic() < deadline:
            listed = stub.List(pb.ListSnapshotsRequest(filters=["kind==committed"]))
            committed = [i.name for batch in listed for i in batch.info]
            op = rnd.choice(["prepare", "view", "commit", "remove", "mounts", "usage", "list"])
            key = f"c{seed}-{rnd.randrange(50)}"
            parent = rnd.choice([*committed[-20:], ""])
            try:
                if op == "prepare":
                    stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels={"by": str(seed)}))
                    mine.append(key)
                elif op == "view":
                    stub.View(pb.ViewSnapshotRequest(key=key, parent=parent))
                elif op == "commit":
                    name = f"L{seed}-{rnd.randrange(10**6)}"
                    stub.Commit(pb.CommitSnapshotRequest(key=rnd.choice(mine or [key]), name=name))
                elif op == "remove":
                    victim = rnd.choice(committed or [key]) if rnd.random() < 0.5 else key
                    stub.Remove(pb.RemoveSnapshotRequest(key=victim))
                elif op == "mounts":
                    stub.Mounts(pb.MountsRequest(key=key))
                elif op == "usage":
                    stub.Usage(pb.UsageRequest(key=rnd.choice(committed or [key])))
                else:
                    list(stub.List(pb.ListSnapshotsRequest(filters=[f"labels.by=={seed}"])))
                calls[op] += 1
            except grpc.RpcError as exc:
                code = exc.code()
                calls[op] += 1
                if code not in DOCUMENTED:
                    errors[f"{op}: {code.name}: {exc.details()}"] += 1
    finally:
        channel.close()


def test_concurrent_clients_keep_the_store_consistent(daemon: LazysnapDaemon) -> None:
    errors: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    deadline = time.monotonic() + SECONDS
    args = (daemon.address, deadline, errors, calls)
    threads = [threading.Thread(target=client_loop, args=(args[0], i, *args[1:])) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a client is stuck: deadlock?"
    assert not errors, errors.most_common(5)
    assert sum(calls.values()) > CLIENTS * 10 and calls["commit"] > 0 and calls["remove"] > 0

    infos = [i for b in daemon.stub.List(pb.ListSnapshotsRequest()) for i in b.info]
    names = {i.name for i in infos}
    assert all(i.parent in names for i in infos if i.parent), "a snapshot lost its parent"
    daemon.stop()
    db = sqlite3.connect(daemon.root / "metadata.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    ids = {row[0] for row in db.execute("SELECT id FROM snapshots")}
    db.close()
    on_disk = {p.name for p in (daemon.root / "snapshots").iterdir()}
    assert on_disk == {str(i) for i in ids}, "directories and snapshots disagree"
