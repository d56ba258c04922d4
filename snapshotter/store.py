"""Snapshot metadata store: SQLite (WAL) under the daemon root.

Owns snapshot records (key/name, parent, kind, labels, times, usage, numeric id) and the rules of
containerd's snapshot storage (core/snapshots/storage/bolt.go): keys and names share one key space,
parents must be committed, a snapshot with children cannot go, only active snapshots commit. It
knows nothing of directories or mounts. Every mutation is one SQLite transaction, so a crash at any
instant leaves either the old or the new state.

Ids are SQLite rowids: small integers, so the directory paths built from them stay short.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

MAX_LABEL_BYTES = 4096  # containerd's limit on len(key) + len(value), pkg/labels

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL UNIQUE,
    parent_id  INTEGER REFERENCES snapshots(id),
    kind       INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    inodes     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key         TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, key)
);
"""


class Kind(IntEnum):
    """Snapshot kinds, numbered as containerd's snapshots.v1.Kind enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Info:
    """What containerd's snapshots.Info carries, plus our numeric id."""

    id: int
    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    usage: Usage = Usage()


@dataclass(frozen=True)
class Snapshot:
    """A snapshot with its ancestry: ``parent_ids`` from the nearest parent to the base layer."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...]


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgumentError(
                f"label key and value greater than maximum size ({MAX_LABEL_BYTES} bytes), key: {key[:64]}"
            )


class Store:
    """Transactional snapshot metadata. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"metadata store {path} has schema version {version}, newer than this lazysnap "
                f"understands ({SCHEMA_VERSION}); upgrade lazysnap or use another root"
            )
        self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("ROLLBACK")

    # --- queries -------------------------------------------------------------------------------

    @staticmethod
    def _row_id(db: sqlite3.Connection, name: str) -> tuple[int, Kind] | None:
        row = db.execute("SELECT id, kind FROM snapshots WHERE name = ?", (name,)).fetchone()
        return None if row is None else (row[0], Kind(row[1]))

    @staticmethod
    def _info(db: sqlite3.Connection, where: str, args: tuple[object, ...]) -> list[Info]:
        rows = db.execute(
            "SELECT s.id, s.name, COALESCE(p.name, ''), s.kind, s.created_ns, s.updated_ns, s.size, s.inodes "
            f"FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id {where}",
            args,
        ).fetchall()
        labels: dict[int, dict[str, str]] = {row[0]: {} for row in rows}
        query = "SELECT snapshot_id, key, value FROM labels"
        params: tuple[int, ...] = ()
        if len(rows) == 1:  # else all labels in one scan: no limit on the number of snapshots
            query, params = query + " WHERE snapshot_id = ?", (rows[0][0],)
        for sid, key, value in db.execute(query, params):
            if sid in labels:
                labels[sid][key] = value
        return [
            Info(
                id=r[0],
                name=r[1],
                parent=r[2],
                kind=Kind(r[3]),
                created_ns=r[4],
                updated_ns=r[5],
                labels=labels[r[0]],
                usage=Usage(r[6], r[7]),
            )
            for r in rows
        ]

    def get_info(self, key: str) -> Info:
        with self._read() as db:
            found = self._info(db, "WHERE s.name = ?", (key,))
        if not found:
            raise NotFoundError(f"snapshot {key} does not exist")
        return found[0]

    def list_infos(self) -> list[Info]:
        with self._read() as db:
            return self._info(db, "ORDER BY s.id", ())

    def ids(self) -> set[int]:
        with self._read() as db:
            return {row[0] for row in db.execute("SELECT id FROM snapshots")}

    def get_snapshot(self, key: str) -> Snapshot:
        """The snapshot for Mounts: must be active or a view (containerd: FailedPrecondition)."""
        with self._read() as db:
            found = self._row_id(db, key)
            if found is None:
                raise NotFoundError(f"snapshot {key} does not exist")
            sid, kind = found
            if kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPreconditionError(f"requested snapshot {key} not active or view")
            return Snapshot(sid, kind, self._ancestors(db, sid))

    def chain_ids(self, name: str) -> tuple[int, ...]:
        """Ids of snapshot ``name`` and its ancestors, nearest first; () if it does not exist."""
        with self._read() as db:
            found = self._row_id(db, name)
            return () if found is None else (found[0], *self._ancestors(db, found[0]))

    @staticmethod
    def _ancestors(db: sqlite3.Connection, sid: int) -> tuple[int, ...]:
        rows = db.execute(
            "WITH RECURSIVE chain(id, parent_id, depth) AS ("
            " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
            " UNION ALL SELECT s.id, s.parent_id, chain.depth + 1 FROM snapshots s"
            " JOIN chain ON s.id = chain.parent_id)"
            " SELECT id FROM chain WHERE depth > 0 ORDER BY depth",
            (sid,),
        ).fetchall()
        return tuple(r[0] for r in rows)

    # --- mutations ----------------------------------------------------------------------------

    @contextmanager
    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Iterator[Snapshot]:
        """Create an active snapshot or a view, inside a transaction held open while the caller
        moves the snapshot's directory into place; an exception in the caller rolls it back."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgumentError(
                f"snapshot type {kind.name} invalid; only snapshots of type Active or View can be created"
            )
        if not key:
            raise InvalidArgumentError("snapshot key must not be empty")
        validate_labels(labels)
        now = time.time_ns()
        with self._write() as db:
            parent_ids: tuple[int, ...] = ()
            parent_id: int | None = None
            if parent:
                found = self._row_id(db, parent)
                if found is None:
                    raise NotFoundError(f"missing parent {parent!r}: parent does not exist")
                if found[1] != Kind.COMMITTED:
                    raise InvalidArgumentError(f"parent {parent!r} is not committed snapshot")
                parent_id = found[0]
                parent_ids = (parent_id, *self._ancestors(db, parent_id))
            if self._row_id(db, key) is not None:
                raise AlreadyExistsError(f"snapshot {key} already exists")
            cur = db.execute(
                "INSERT INTO snapshots(name, parent_id, kind, created_ns, updated_ns) VALUES (?,?,?,?,?)",
                (key, parent_id, int(kind), now, now),
            )
            sid = cur.lastrowid
            assert sid is not None
            self._write_labels(db, sid, labels)
            yield Snapshot(sid, kind, parent_ids)

    def commit(
        self,
        key: str,
        name: str,
        labels: Mapping[str, str],
        usage: Usage,
        parent: str | None = None,
    ) -> Info:
        """Turn active ``key`` into committed ``name`` (same id, new labels, times reset).

        ``parent``, when given, re-parents the committed snapshot (containerd's rebase)."""
        validate_labels(labels)
        now = time.time_ns()
        with self._write() as db:
            if self._row_id(db, name) is not None:
                raise AlreadyExistsError(f"committed snapshot {name} already exists")
            found = self._row_id(db, key)
            if found is None:
                raise NotFoundError(f"failed to get active snapshot {key!r}: snapshot does not exist")
            sid, kind = found
            if kind != Kind.ACTIVE:
                raise FailedPreconditionError(f"snapshot {key!r} is not active")
            if parent:
                pfound = self._row_id(db, parent)
                if pfound is None:
                    raise NotFoundError(f"missing parent {parent!r} of snapshot {key!r}")
                if pfound[1] != Kind.COMMITTED:
                    raise FailedPreconditionError(f"parent {parent!r} of snapshot {key!r} is not committed")
                if pfound[0] == sid or sid in self._ancestors(db, pfound[0]):
                    raise InvalidArgumentError(f"parent {parent!r} would make a cycle")
                db.execute("UPDATE snapshots SET parent_id = ? WHERE id = ?", (pfound[0], sid))
            db.execute(
                "UPDATE snapshots SET name = ?, kind = ?, created_ns = ?, updated_ns = ?, size = ?, "
                "inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, sid),
            )
            db.execute("DELETE FROM labels WHERE snapshot_id = ?", (sid,))
            self._write_labels(db, sid, labels)
            return self._info(db, "WHERE s.id = ?", (sid,))[0]

    def remove(self, key: str) -> tuple[int, Kind]:
        with self._write() as db:
            found = self._row_id(db, key)
            if found is None:
                raise NotFoundError(f"snapshot {key} does not exist")
            sid, kind = found
            child = db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (sid,)).fetchone()
            if child is not None:
                raise FailedPreconditionError(f"cannot remove snapshot {key} with child")
            db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
            return sid, kind

    def update(self, key: str, labels: Mapping[str, str], fieldpaths: list[str]) -> Info:
        """Update mutable fields: all labels (no paths or "labels"), or single ``labels.KEY``.

        As in containerd, a label set to the empty string is removed."""
        with self._write() as db:
            found = self._info(db, "WHERE s.name = ?", (key,))
            if not found:
                raise NotFoundError(f"snapshot {key} does not exist")
            current = found[0]
            updated = dict(current.labels)
            if not fieldpaths:
                updated = dict(labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    updated[label] = labels.get(label, "")
                elif path == "labels":
                    updated = dict(labels)
                else:
                    raise InvalidArgumentError(f"cannot update {path!r} field on snapshot {key!r}")
            updated = {k: v for k, v in updated.items() if v != ""}
            validate_labels(updated)
            db.execute("DELETE FROM labels WHERE snapshot_id = ?", (current.id,))
            self._write_labels(db, current.id, updated)
            db.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (time.time_ns(), current.id))
            return self._info(db, "WHERE s.id = ?", (current.id,))[0]

    @staticmethod
    def _write_labels(db: sqlite3.Connection, sid: int, labels: Mapping[str, str]) -> None:
        db.executemany(
            "INSERT INTO labels(snapshot_id, key, value) VALUES (?,?,?)",
            [(sid, k, v) for k, v in labels.items() if v != ""],
        )
