"""The metadata store: containerd's storage rules, and consistency after a crash at any instant."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from snapshotter.snapshots import Snapshotter
from snapshotter.store import Kind, Store, Usage


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "metadata.db")
    yield s  # type: ignore[misc]
    s.close()


def make(store: Store, kind: Kind, key: str, parent: str = "", labels: dict[str, str] | None = None) -> int:
    with store.create(kind, key, parent, labels or {}) as snap:
        return snap.id


def test_create_commit_and_chain(store: Store) -> None:
    a = make(store, Kind.ACTIVE, "a", labels={"l": "1"})
    info = store.commit("a", "A", {"c": "2"}, Usage(10, 3))
    assert (info.id, info.name, info.kind, info.labels, info.usage) == (
        a,
        "A",
        Kind.COMMITTED,
        {"c": "2"},
        Usage(10, 3),
    )
    with pytest.raises(NotFoundError):
        store.get_info("a")  # commit consumes the active key
    b = make(store, Kind.ACTIVE, "b", "A")
    store.commit("b", "B", {}, Usage())
    make(store, Kind.ACTIVE, "c", "B")
    snap = store.get_snapshot("c")
    assert snap.parent_ids == (b, a)  # nearest parent first
    assert store.get_info("c").parent == "B"


def test_containerd_error_kinds(store: Store) -> None:
    make(store, Kind.ACTIVE, "a")
    with pytest.raises(AlreadyExistsError):
        make(store, Kind.VIEW, "a")
    with pytest.raises(NotFoundError):
        make(store, Kind.ACTIVE, "x", "missing")
    with pytest.raises(InvalidArgumentError):
        make(store, Kind.ACTIVE, "x", "a")  # parent not committed
    with pytest.raises(InvalidArgumentError):
        make(store, Kind.COMMITTED, "x")
    store.commit("a", "A", {}, Usage())
    with pytest.raises(FailedPreconditionError):
        store.get_snapshot("A")  # mounts of a committed snapshot
    make(store, Kind.VIEW, "v", "A")
    with pytest.raises(FailedPreconditionError):
        store.commit("v", "V", {}, Usage())  # committing a view
    with pytest.raises(AlreadyExistsError):
        store.commit("v", "A", {}, Usage())
    with pytest.raises(NotFoundError):
        store.commit("nope", "N", {}, Usage())
    with pytest.raises(FailedPreconditionError):
        store.remove("A")  # has a child
    store.remove("v")
    store.remove("A")
    with pytest.raises(NotFoundError):
        store.remove("A")


def test_failed_create_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.create(Kind.ACTIVE, "a", "", {"x": "y"}):
        raise RuntimeError("directory could not be made")
    with pytest.raises(NotFoundError):
        store.get_info("a")
    make(store, Kind.ACTIVE, "a")


def test_update_labels_with_field_paths(store: Store) -> None:
    make(store, Kind.ACTIVE, "a", labels={"keep": "1", "drop": "2"})
    before = store.get_info("a")
    info = store.update("a", {"new": "3", "keep": "ignored"}, ["labels.new", "labels.drop"])
    assert info.labels == {"keep": "1", "new": "3"}  # drop: absent from the request, so removed
    assert info.updated_ns >= before.updated_ns and info.created_ns == before.created_ns
    assert store.update("a", {"only": "x"}, ["labels"]).labels == {"only": "x"}
    assert store.update("a", {"all": "y"}, []).labels == {"all": "y"}
    with pytest.raises(InvalidArgumentError):
        store.update("a", {}, ["name"])
    with pytest.raises(InvalidArgumentError):
        store.update("a", {"big": "x" * 5000}, ["labels.big"])
    with pytest.raises(NotFoundError):
        store.update("zz", {}, [])


def test_rebase_on_commit(store: Store) -> None:
    make(store, Kind.ACTIVE, "p1")
    store.commit("p1", "P1", {}, Usage())
    make(store, Kind.ACTIVE, "p2")
    store.commit("p2", "P2", {}, Usage())
    make(store, Kind.ACTIVE, "c", "P1")
    assert store.commit("c", "C", {}, Usage(), parent="P2").parent == "P2"
    make(store, Kind.ACTIVE, "d", "C")
    with pytest.raises(NotFoundError):
        store.commit("d", "D", {}, Usage(), parent="nope")


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "m.db").close()
    db = sqlite3.connect(tmp_path / "m.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this lazysnap"):
        Store(tmp_path / "m.db")


CHURN = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from snapshotter.snapshots import Snapshotter
    from snapshotter.errors import SnapshotError
    s = Snapshotter(Path(sys.argv[1]))
    rnd = random.Random(int(sys.argv[2]))
    n = 0
    print("ready", flush=True)
    while True:
        n += 1
        committed = [i.name for i in s.infos() if i.kind == 3]
        op = rnd.random()
        try:
            if op < 0.45:
                key = f"k{rnd.randrange(10**9)}"
                s.prepare(key, rnd.choice(committed + [""]), {"n": str(n)})
                (s.fs_path(s.stat(key).id) / "f").write_bytes(b"x" * rnd.randrange(10000))
                if rnd.random() < 0.8:
                    s.commit(f"c{n}", key, {"n": str(n)})
            elif op < 0.8 and committed:
                s.remove(rnd.choice(committed))
            else:
                active = [i.name for i in s.infos() if i.kind == 2]
                if active:
                    s.remove(rnd.choice(active))
        except SnapshotError:
            pass
    """
)


def check_consistent(root: Path) -> int:
    db = sqlite3.connect(root / "metadata.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()
    snap = Snapshotter(root)
    try:
        snap.cleanup()  # as the daemon does at start: directories of interrupted operations go
        infos = snap.infos()
        names = {i.name for i in infos}
        for info in infos:
            assert not info.parent or info.parent in names
            assert snap.fs_path(info.id).is_dir(), f"{info.name} lost its directory"
            if info.kind == Kind.ACTIVE:
                assert snap.work_path(info.id).is_dir()
        owned = {str(i.id) for i in infos}
        assert {p.name for p in snap.snapshots_dir.iterdir()} == owned
        return len(infos)
    finally:
        snap.close()


def test_kill_9_at_any_instant_leaves_a_consistent_store(tmp_path: Path) -> None:
    root = tmp_path / "root"
    seen = 0
    for round_ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHURN, str(root), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", proc.stderr
        time.sleep(0.2 + round_ * 0.07)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen = max(seen, check_consistent(root))
    assert seen > 0  # the churn really did create snapshots
