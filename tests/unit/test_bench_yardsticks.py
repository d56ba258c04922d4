"""The benchmark's yardsticks without containerd or a registry: the stargz peer's modes, build
guard and stop signal, profiled image tags, the side-by-side table and the small-file walk's
image and report."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from benchmarks import harness, profiled, report, run, stargz_peer, walk
from benchmarks import layout as oci_layout
from benchmarks.harness import PeerSnapshotter, RunResult, Workload
from benchmarks.images import ModelImage


def test_stargz_modes_use_the_built_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "peer-bin"
    built: list[Path] = []

    def fake_build(cache: Path, install: bool = True) -> Path:
        built.append(cache)
        return binary

    monkeypatch.setattr(stargz_peer, "build", fake_build)
    args = run.parse_args(
        [
            "--modes",
            "overlayfs,stargz,stargz-profiled,lazysnap-estargz,lazysnap-eager,lazysnap-estargz-shared",
            "--fs-backend",
            "fuse",
        ]
    )
    notes: list[str] = []
    modes = {m.name: m for m in run.build_modes(args, notes)}
    assert notes == [] and built == [args.cache]  # built once for both modes
    assert [(m.variant, m.kind, m.stop_signal) for m in (modes["stargz"], modes["stargz-profiled"])] == [
        ("estargz", "peer", "SIGINT"),
        (harness.OPTIMIZED, "peer", "SIGINT"),
    ]
    peer = PeerSnapshotter("stargz", modes["stargz"].command, "", tmp_path / "w")
    assert peer.command() == [
        str(binary), "-address", str(peer.address), "-root", str(peer.root), "-config", str(peer.config),
        "-log-level", "info",
    ]  # fmt: skip
    assert modes["lazysnap-estargz"].lazysnap_overrides == {"fs": {"backend": "fuse"}}
    assert modes["lazysnap-eager"].lazysnap_overrides == {
        "fs": {"backend": "fuse"},
        "fallback": {"mode": "eager"},
        "remote": {"gzip_index": False},  # the gzip-index mode attaches indexes to the same manifest
    }
    assert modes["lazysnap-estargz-shared"].lazysnap_overrides == {"fs": {"backend": "fuse"}}
    unset = run.build_modes(run.parse_args(["--modes", "lazysnap-estargz"]), [])
    assert unset[0].lazysnap_overrides == {}


def test_peer_build_refuses_without_its_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert stargz_peer.missing_packages(["lazysnap-no-such-package"]) == ["lazysnap-no-such-package"]
    monkeypatch.setattr(stargz_peer, "missing_packages", lambda packages=(): ["golang-go"])
    with pytest.raises(stargz_peer.PeerUnavailableError, match="golang-go not installed"):
        stargz_peer.build(tmp_path, install=False)
    assert not (tmp_path / "stargz-peer").exists()


def test_generated_go_sources_stand_in_for_the_cri_auth_config() -> None:
    standin = stargz_peer.SOURCES["src/k8s.io/cri-api/pkg/apis/runtime/v1alpha2/auth.go"]
    fields = ("Username", "Password", "Auth", "ServerAddress", "IdentityToken", "RegistryToken")
    assert all(f"\t{name} " in standin for name in fields)
    main = stargz_peer.SOURCES[f"src/{stargz_peer.MAIN_PACKAGE}/main.go"]
    assert "service.NewStargzSnapshotterService" in main and "sn.Close()" in main


SIGNAL_REPORTER = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *a: sys.exit(7))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(9))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize(("stop_signal", "code"), [("SIGINT", 7), ("SIGTERM", 9)])
def test_peer_is_stopped_with_its_signal(tmp_path: Path, stop_signal: str, code: int) -> None:
    peer = PeerSnapshotter("p", "unused", "", tmp_path / "w", stop_signal=stop_signal)
    peer.root.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_REPORTER], stdout=subprocess.PIPE)
    peer.proc = proc
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # handlers installed
        assert peer.stop() == code
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _workload(name: str) -> Workload:
    return Workload(name, ModelImage(1, 1), ("/bin/true",))


def test_profiled_variants_are_tagged_per_workload(tmp_path: Path) -> None:
    model, full = _workload("model"), _workload("model-full")
    assert harness.image_tag("estargz", model) == "estargz"
    assert harness.image_tag(harness.PROFILED, model) == "estargz-profiled.model"
    assert harness.image_tag(harness.OPTIMIZED, full) == "estargz-optimized.model-full"
    modes = [harness.OVERLAYFS, harness.lazysnap_mode(harness.PROFILED)]
    # Recording lazysnap's profile pulls the eStargz image, so it is built too.
    assert run.base_variants(model, modes) == ["estargz", "gzip"]
    sizes = {"gzip": 1, "estargz-profiled.model": 2, "estargz-profiled.x": 3}
    images: Any = type("Sizes", (), {"sizes": sizes})
    assert run.image_sizes(images, model) == {"gzip": 1, "estargz-profiled": 2}
    big = Workload("model-8g", ModelImage(1, 1), ("/bin/true",), big=True)
    assert run.modes_for(big, modes) == [harness.OVERLAYFS]
    shared = [harness.OVERLAYFS, harness.shared_profile_mode()]
    # The shared-profile mode pulls the plain eStargz image, under no tag of the workload's own;
    # the 8 GiB image has no profile to share either.
    assert run.base_variants(model, shared) == ["estargz", "gzip"]
    assert harness.image_tag(shared[1].variant, model) == "estargz"
    assert run.wants_shared_profile(model, shared) and not run.wants_shared_profile(model, modes)
    assert run.modes_for(big, shared) == [harness.OVERLAYFS] and not run.wants_shared_profile(big, shared)
    # model and model-full keep their recorded lists apart.
    layout = tmp_path / "layout"
    assert profiled.recorded_profile(layout, model) != profiled.recorded_profile(layout, full)


def test_shared_profile_mode_checks_the_daemon_used_the_profile() -> None:
    used = {"profiles": {"shared": True, "shared_found": 1, "layers_by_source": {"shared": 3, "layer": 1}}}
    assert harness.shared_profile_used(used) is None
    looked_up_not_found = {
        "profiles": {"shared": True, "shared_found": 0, "shared_errors": 2, "layers_by_source": {"layer": 4}}
    }
    problem = harness.shared_profile_used(looked_up_not_found)
    assert problem is not None and "shared_found 0" in problem and "look-up errors 2" in problem
    found_too_late = {"profiles": {"shared_found": 1, "layers_by_source": {"layer": 4}}}
    assert harness.shared_profile_used(found_too_late) is not None
    assert harness.shared_profile_used({}) == "the daemon's statistics have no 'profiles' section"
    summary = harness._lazy_summary({"lazy_mounts": 1, **used})
    assert summary["profiles"] == used["profiles"]  # kept with the run


def test_missing_shared_profile_fails_the_run_clearly(tmp_path: Path) -> None:
    """No recorded profile: the shared-profile mode's run raises (recorded as that run's failure
    by benchmarks.run) before anything is pushed or pulled."""
    images: Any = type("Images", (), {"layout": tmp_path / "layout"})()
    model = _workload("model")
    mode = harness.shared_profile_mode()
    with pytest.raises(RuntimeError, match=r"model: no recorded startup profile to attach \("):
        run.measured_run(images, model, None, mode, rep=0, profile="cloud")  # type: ignore[arg-type]
    listing = profiled.recorded_profile(images.layout, model)
    listing.parent.mkdir(parents=True)
    listing.write_text("# only comments\n\n")
    with pytest.raises(RuntimeError, match="missing or empty"):
        run.measured_run(images, model, None, mode, rep=0, profile="cloud")  # type: ignore[arg-type]


def _row(image: str, mode: str, total: float) -> RunResult:
    return RunResult(image, mode, total / 2, total / 2, total, 1, 1, profile="cloud")


def test_side_by_side_table_compares_lazysnap_with_stargz() -> None:
    results = [
        _row("py", "overlayfs", 4.0),
        _row("py", "lazysnap-estargz", 2.0),
        _row("py", "lazysnap-estargz-profiled", 1.5),
        _row("py", "stargz", 2.5),
        _row("py", "stargz-profiled", 1.0),
        _row("py", "mypeer", 9.0),
    ]
    text = report.markdown(report.summarize(results, "cloud"), "cloud", 1)
    head = (
        "| image | overlayfs | lazysnap-estargz | lazysnap-estargz-profiled | stargz | stargz-profiled "
        "| lazysnap-estargz / stargz | lazysnap-estargz-profiled / stargz-profiled |"
    )
    assert head in text
    assert "| py | 4.0 | 2.0 | 1.5 | 2.5 | 1.0 | 0.80 | 1.50 |" in text
    assert [report.family(m) for m in ("overlayfs", "lazysnap-nydus", "stargz-profiled", "mypeer")] == [
        "overlayfs", "lazysnap", "stargz", "peer",
    ]  # fmt: skip
    only_lazy = report.markdown(report.summarize([_row("py", "lazysnap-estargz", 1.0)], "cloud"), "cloud", 1)
    assert "Side by side" not in only_lazy


def test_walk_section_of_the_micro_report() -> None:
    data = {
        "walk": {
            "files": 5000, "dirs": 50, "file_bytes": [200, 4096], "command": walk.WALK, "reps": 3,
            "backend": "erofs", "walk_s": {"overlayfs": 0.7, "lazysnap": 2.8},
            "ratio_to_overlayfs": {"overlayfs": 1.0, "lazysnap": 4.0},
            "runs": {"overlayfs": {"ops_per_s": {"stat": 100, "open+close": 90}}, "lazysnap": {}},
        }
    }  # fmt: skip
    text = report.micro_markdown(data)
    assert "`[fs] backend = erofs`" in text and "5000 files of 200-4096 bytes in 50 directories" in text
    assert "| overlayfs | 0.7 | 1.0 | 100 | 90 |" in text and "| lazysnap | 2.8 | 4.0 | - | - |" in text


def test_small_files_image(tmp_path: Path) -> None:
    source = walk.SmallFilesImage(files=30, dirs=4)
    names = source.names()
    assert len(names) == len(set(names)) == 30 and len({Path(n).parent for n in names}) == 4
    source.build(tmp_path / "layout", tmp_path, tmp_path)
    _base, data, _big = list(oci_layout.layer_tars(tmp_path / "layout", "gzip"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {m.name: m.size for m in tar.getmembers() if m.isfile()}
        dirs = [m.name for m in tar.getmembers() if m.isdir()]
    assert sorted(files) == sorted(names) and len(dirs) == 5  # data/ and its 4 directories
    assert all(walk.MIN_BYTES <= size <= walk.MAX_BYTES for size in files.values())
    assert len(set(files.values())) > 20  # sizes spread over the range


class _FakeContainerd:
    def __init__(self, listing: str) -> None:
        self.listing = listing

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert args == ("snapshots", "--snapshotter", "s", "ls")
        return subprocess.CompletedProcess(list(args), 0, self.listing, "")


def test_top_snapshot_is_the_committed_leaf() -> None:
    listing = (
        "KEY        PARENT     KIND\n"
        "sha256:b   sha256:a   Committed\n"
        "sha256:a              Committed\n"
        "work       sha256:b   Active\n"
    )
    assert walk.top_snapshot(_FakeContainerd(listing), "s") == "sha256:b"  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="expected one top snapshot"):
        walk.top_snapshot(_FakeContainerd("KEY PARENT KIND\n"), "s")  # type: ignore[arg-type]
