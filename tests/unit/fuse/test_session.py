"""The session state file a successor resumes from: round trip, atomic replacement, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshotter.fuse.session import FileRecord, Negotiated, SessionState, StateError, valid_name

A = "sha256-" + "a" * 64
B = "sha256-" + "b" * 64


def state() -> SessionState:
    negotiated = Negotiated(40, (1 << 39) | 1, 1, 1 << 20, 1 << 20)
    return SessionState("/run/blobs", "0:52", negotiated, 4, {A: FileRecord(2, 10), B: FileRecord(3, 0)})


def test_state_survives_a_round_trip_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state().save(path)
    loaded = SessionState.load(path)
    assert loaded == state()
    assert loaded.negotiated.can_resend
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_saving_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state().save(path)
    changed = state()
    del changed.files[B]
    changed.save(path)
    assert set(SessionState.load(path).files) == {A}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=99), "format"),
        (lambda d: d["files"].update({"../etc": [5, 1]}), "bad blob name"),
        (lambda d: d["files"].update({B: [2, 1]}), "duplicate"),
        (lambda d: d["files"].update({B: [4, 1]}), "out of range"),
        (lambda d: d["files"].update({B: [1, 1]}), "out of range"),
        (lambda d: d["files"].update({B: [3, -1]}), "malformed"),
        (lambda d: d["negotiated"].pop("max_read"), "malformed"),
        (lambda d: d.update(next_nodeid="4"), "malformed"),
    ],
)
def test_a_state_that_does_not_describe_a_usable_session_is_refused(
    tmp_path: Path, change: object, message: str
) -> None:
    doc = state().to_json()
    change(doc)  # type: ignore[operator]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(StateError, match=message):
        SessionState.load(path)


def test_a_missing_or_garbled_file_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot read"):
        SessionState.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_bytes(b"\x00{not json")
    with pytest.raises(StateError, match="not JSON"):
        SessionState.load(tmp_path / "junk.json")


@pytest.mark.parametrize(
    ("name", "ok"),
    [(A, True), ("sha512-" + "c" * 128, True), ("sha256-" + "A" * 64, False), ("sha256-abc", False),
     ("sha256:" + "a" * 64, False), (A + "/x", False), ("", False)],
)  # fmt: skip
def test_blob_names_are_digests(name: str, ok: bool) -> None:
    assert valid_name(name) is ok
