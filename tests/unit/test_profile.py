"""Startup profiles: first reads in order, per image, within the window, kept across restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from snapshotter.admin import AdminError, fetch_profile, start_admin
from snapshotter.formats.index import Compression, Entry, EntryType, LayerIndex
from snapshotter.fuse.layerfs import LayerFS
from snapshotter.fusemanager import LocalBackend
from snapshotter.layertree import LayerTree
from snapshotter.profile import ProfileNotFoundError, StartupRecorder
from tests.support.lazy import running_loop

IMAGE = "127.0.0.1:5000/app:v1"


class EchoReader:
    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        return b"x" * min(size, max(0, entry.size - offset))


def layer_fs(recorder: StartupRecorder, reference: str, names: list[str]) -> LayerFS:
    entries = {"": Entry("", EntryType.DIR, 0o755), "usr": Entry("usr", EntryType.DIR, 0o755)}
    entries.update({n: Entry(n, EntryType.REG, 0o644, size=10) for n in names})
    tree = LayerTree(LayerIndex("estargz", Compression.GZIP, entries))
    return LayerFS(tree, EchoReader(), layer="sha256:x", on_first_read=recorder.layer_mounted(reference))


def test_first_reads_are_recorded_once_in_order_across_layers(tmp_path: Path) -> None:
    recorder = StartupRecorder(tmp_path / "profiles", window_seconds=60)
    lower = layer_fs(recorder, IMAGE, ["usr/a", "usr/b"])
    upper = layer_fs(recorder, IMAGE, ["usr/c"])
    other = layer_fs(recorder, "127.0.0.1:5000/other:v1", ["usr/z"])
    for fs, path in [
        (lower, "/usr/b"),
        (upper, "/usr/c"),
        (lower, "/usr/b"),
        (other, "/usr/z"),
        (lower, "/usr/a"),
    ]:
        fs.read(path, 4096, 0, 0)
        time.sleep(0.002)  # first-read times order the files
    lower.read("/usr/a", 4096, 4, 0)
    assert recorder.export(IMAGE) == ["/usr/b", "/usr/c", "/usr/a"]
    assert recorder.export("127.0.0.1:5000/other:v1") == ["/usr/z"]
    with pytest.raises(ProfileNotFoundError):
        recorder.export("127.0.0.1:5000/never:v1")


def test_reads_after_the_window_are_not_recorded(tmp_path: Path) -> None:
    recorder = StartupRecorder(tmp_path / "profiles", window_seconds=0.2)
    fs = layer_fs(recorder, IMAGE, ["usr/early", "usr/late"])
    fs.read("/usr/early", 10, 0, 0)
    time.sleep(0.3)
    fs.read("/usr/late", 10, 0, 0)
    assert recorder.export(IMAGE) == ["/usr/early"]


def test_profiles_survive_a_restart_and_merge_with_new_reads(tmp_path: Path) -> None:
    first = StartupRecorder(tmp_path / "profiles", window_seconds=60)
    layer_fs(first, IMAGE, ["usr/a"]).read("/usr/a", 10, 0, 0)
    first.flush()
    second = StartupRecorder(tmp_path / "profiles", window_seconds=60)
    assert second.images() == [IMAGE]
    assert second.export(IMAGE) == ["/usr/a"]
    layer_fs(second, IMAGE, ["usr/a", "usr/b"]).read("/usr/b", 10, 0, 0)
    second.flush()
    assert StartupRecorder(tmp_path / "profiles", window_seconds=60).export(IMAGE) == ["/usr/a", "/usr/b"]


def test_a_tag_moved_to_another_manifest_starts_a_new_profile(tmp_path: Path) -> None:
    """The reads of the image a tag named before must not become the new image's profile, in
    this process or after a restart (the profile is pushed as the new manifest's)."""
    recorder = StartupRecorder(tmp_path / "profiles", window_seconds=60)
    recorder.layer_mounted(IMAGE, "sha256:" + "a" * 64)("usr/old")
    recorder.flush()
    restarted = StartupRecorder(tmp_path / "profiles", window_seconds=60)
    restarted.layer_mounted(IMAGE, "sha256:" + "b" * 64)("usr/new")
    assert restarted.export(IMAGE) == ["/usr/new"]
    assert restarted.manifest_of(IMAGE) == "sha256:" + "b" * 64
    restarted.layer_mounted(IMAGE, "sha256:" + "b" * 64)("usr/more")  # the same image: kept
    assert restarted.export(IMAGE) == ["/usr/new", "/usr/more"]


def test_a_corrupt_profile_file_is_ignored(tmp_path: Path) -> None:
    recorder = StartupRecorder(tmp_path / "profiles", window_seconds=60)
    layer_fs(recorder, IMAGE, ["usr/a"]).read("/usr/a", 10, 0, 0)
    recorder.flush()
    (path,) = (tmp_path / "profiles").glob("*.json")
    path.write_text("{not json")
    with pytest.raises(ProfileNotFoundError):
        StartupRecorder(tmp_path / "profiles", window_seconds=60).export(IMAGE)


def test_admin_endpoint_serves_profiles_and_explains_failures(tmp_path: Path) -> None:
    """The FUSE manager's backend behind the admin routes, as `lazysnap profile export` sees it."""
    recorder = StartupRecorder(tmp_path / "profiles", window_seconds=60)
    layer_fs(recorder, IMAGE, ["usr/a"]).read("/usr/a", 10, 0, 0)
    recording = LocalBackend(SimpleNamespace(recorder=recorder))  # type: ignore[arg-type]
    not_recording = LocalBackend(SimpleNamespace(recorder=None))  # type: ignore[arg-type]
    with running_loop() as loop:
        runners = [
            asyncio.run_coroutine_threadsafe(
                start_admin(tmp_path / f"{name}.sock", backend, None), loop
            ).result(5)
            for name, backend in (("on", recording), ("off", not_recording))
        ]
        try:
            assert fetch_profile(tmp_path / "on.sock", IMAGE) == ["/usr/a"]
            with pytest.raises(AdminError, match=r"no startup profile for '127.0.0.1:5000/x:y'") as missing:
                fetch_profile(tmp_path / "on.sock", "127.0.0.1:5000/x:y")
            assert missing.value.status == 404 and IMAGE in str(missing.value)  # it lists what it has
            with pytest.raises(AdminError, match=r"profile recording is off"):
                fetch_profile(tmp_path / "off.sock", IMAGE)
        finally:
            for runner in runners:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
