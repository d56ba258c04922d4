"""The benchmark's summaries, Markdown, chart and command line, on made-up runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from benchmarks import harness, report, run, stargz_peer
from benchmarks.harness import Mode, PeerSnapshotter, RunResult, WarmResult


def _run(image: str, mode: str, total: float, fetched: int, **kw: object) -> RunResult:
    return RunResult(
        image=image, mode=mode, pull_s=total / 2, run_s=total / 2, total_s=total,
        bytes_fetched=fetched, bytes_fetched_ready=fetched - 1, profile="cloud", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


RESULTS = [
    _run("py", "overlayfs", 2.0, 20_000_000),
    _run("py", "overlayfs", 4.0, 20_000_000),
    _run(
        "py",
        "lazysnap-estargz",
        1.0,
        5_000_000,
        cpu_s=0.5,
        lazy_stats={"fetched_by_reason": {"on_demand": 1_000_000}},
    ),
    _run(
        "py",
        "lazysnap-estargz",
        1.5,
        6_000_000,
        cpu_s=0.7,
        lazy_stats={"fetched_by_reason": {"on_demand": 3_000_000}},
    ),
    _run("gcc", "lazysnap-estargz", 3.0, 7_000_000),
]
WARM = {"py": WarmResult("py", [0.2, 0.3, 0.4], [10_000_000, 11_000_000, 12_000_000], exact=True)}


def test_summarize_medians_ratios_and_ideal() -> None:
    rows = report.summarize(RESULTS, "cloud", WARM)
    assert [(r["image"], r["mode"]) for r in rows] == [
        ("py", "overlayfs"), ("py", "lazysnap-estargz"), ("gcc", "lazysnap-estargz"),
    ]  # fmt: skip
    base, lazy, gcc = rows
    assert base["total_s"] == 3.0 and base["total_spread_s"] == 2.0 and base["runs"] == 2
    assert base["warm_s"] == 0.3 and base["read_mb"] == 11.0 and base["read_exact"] is True
    # T_ideal = warm 0.3 s + 11 MB at 1 Gbit/s (0.088 s) + 2 x 10 ms
    assert base["ideal_s"] == pytest.approx(0.408)
    assert lazy["total_s"] == 1.25 and lazy["vs_overlayfs"] == pytest.approx(1.25 / 3, abs=0.01)
    assert lazy["speedup_vs_overlayfs"] == 2.4
    assert lazy["vs_ideal"] == pytest.approx(1.25 / 0.408, abs=0.01)
    assert lazy["fetched_mb"] == 5.5 and lazy["fetched_ready_mb"] == 5.5
    assert lazy["on_demand_mb"] == 2.0 and lazy["cpu_s"] == 0.6
    assert base["on_demand_mb"] is None and base["cpu_s"] is None
    assert gcc["vs_overlayfs"] is None and gcc["ideal_s"] is None and gcc["warm_s"] is None


def test_markdown_table() -> None:
    rows = report.summarize(RESULTS, "cloud", WARM)
    info = {"py": {"description": "python", "sizes_mb": {"gzip": 20.0, "estargz": 22.0}}}
    text = report.markdown(rows, "cloud", 2, images=info, notes=["a note"])
    assert "Profile `cloud` (10 ms RTT, 1000 Mbit/s), median of 2" in text
    assert (
        "| py | lazysnap-estargz | 0.625 | 0.625 | 1.25 | 0.5 | 0.3 | 5.5 | 5.5 | 2.0 | 11.0 | 0.6 "
        "| 0.42 | 3.06 |" in text
    )
    assert "| gcc | lazysnap-estargz |" in text and "| - | - |" in text
    assert "| py | python | 20.0 MB | 22.0 MB |" in text
    assert text.rstrip().endswith("a note")


def test_chart_png(tmp_path: Path) -> None:
    path = report.chart(report.summarize(RESULTS, "cloud", WARM), "cloud", 2, tmp_path / "c.png")
    assert path is not None and path.read_bytes().startswith(b"\x89PNG")


def test_micro_markdown() -> None:
    micro = {
        "metadata": {
            "files": 10, "dirs": 2, "file_bytes": 5, "ops": ["stat"],
            "ops_per_s": {"native": {"stat": 100}, "lazysnap FUSE": {"stat": 25}},
        },
        "throughput": {"size_bytes": 1 << 20, "MB_per_s": {"local": 10.0}, "ratio_to_local": {"local": 1.0}},
    }  # fmt: skip
    text = report.micro_markdown(micro)
    assert "| lazysnap FUSE | 25 |" in text and "| local | 10.0 | 1.0 |" in text


def test_cli_modes_and_peers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "nydus_builder", lambda: None)

    def no_peer(cache: Path, install: bool = True) -> Path:
        raise stargz_peer.PeerUnavailableError("golang-go not installed")

    monkeypatch.setattr(stargz_peer, "build", no_peer)
    config = tmp_path / "peer.toml"
    config.write_text("root = '{root}'\n")
    args = run.parse_args(
        [
            "--images", "python,gcc", "--peer", "a=serve --address {address}", "--peer", "b=other {config}",
            "--peer-format", "b=zstdchunked", "--peer-config", f"b={config}",
        ]
    )  # fmt: skip
    notes: list[str] = []
    modes = run.build_modes(args, notes)
    assert [(m.name, m.variant, m.kind) for m in modes] == [
        ("overlayfs", "gzip", "overlayfs"),
        ("lazysnap-estargz", "estargz", "lazysnap"),
        ("lazysnap-zstdchunked", "zstdchunked", "lazysnap"),
        ("lazysnap-gzip-index", "gzip-index", "lazysnap"),
        ("lazysnap-estargz-profiled", "estargz-profiled", "lazysnap"),
        ("lazysnap-estargz-shared", "estargz", "lazysnap"),
        ("lazysnap-eager", "gzip", "lazysnap"),
        ("a", "estargz", "peer"),
        ("b", "zstdchunked", "peer"),
    ]
    assert modes[8].config == "root = '{root}'\n" and modes[8].snapshotter == "b"
    assert modes[6].lazysnap_overrides == {"fallback": {"mode": "eager"}, "remote": {"gzip_index": False}}
    # The plain eStargz image with the daemon's default config: only this mode wants the profile
    # attached in the registry.
    assert [m.name for m in modes if m.shared_profile] == ["lazysnap-estargz-shared"]
    assert modes[5].lazysnap_overrides == {}
    assert "lazysnap-nydus skipped" in notes[0]
    # The built-in peer could not be built: said once, for both of its modes.
    assert notes[1:] == ["stargz peer skipped: golang-go not installed"]
    assert args.profile_list == ["cloud"] and args.image_list == ["python", "gcc"] and args.reps == 3
    assert run.parse_args(["--profiles", "all"]).profile_list == ["cloud", "slow", "far"]
    for bad in (["--peer", "overlayfs=x"], ["--peer", "a b=x"], ["--peer-format", "zz=gzip"]):
        with pytest.raises(SystemExit):
            run.build_modes(run.parse_args(bad), [])
    with pytest.raises(SystemExit):
        run.parse_args(["--images", "nope"])


def test_workloads_share_the_model_image() -> None:
    chosen = run.workloads(list(run.IMAGES), 64, 4, big=True)
    by_name = {w.name: w for w in chosen}
    assert by_name["model"].source == by_name["model-full"].source
    assert "count=3 " in by_name["model"].command[2] and "count=64 " in by_name["model-full"].command[2]
    assert by_name["model-8g"].big and "count=3 " in by_name["model-8g"].command[2]
    assert by_name["model-8g"].source.approx_bytes() == 8 << 30
    assert by_name["redis"].long_running and not by_name["python"].long_running
    assert by_name["sympy"].source.slug == "debian-sympy"


def test_peer_command_template(tmp_path: Path) -> None:
    peer = PeerSnapshotter(
        "p", "prog --sock {address} --state={root} -c '{config}'", "a = '{root}'\n", tmp_path / "w"
    )
    assert peer.command() == [
        "prog", "--sock", str(tmp_path / "w" / "peer.sock"), f"--state={tmp_path / 'w' / 'root'}",
        "-c", str(tmp_path / "w" / "peer.conf"),
    ]  # fmt: skip
    assert peer._fill(peer.config_text) == f"a = '{tmp_path / 'w' / 'root'}'\n"
    assert peer.stats() == {}  # not a lazysnap: no admin socket


def test_peer_that_exits_is_reported(tmp_path: Path) -> None:
    peer = PeerSnapshotter("p", f"{sys.executable} -c 'import sys; sys.exit(3)'", "", tmp_path / "w")
    with pytest.raises(RuntimeError, match="exited with 3"):
        peer.start(timeout=10)
    assert peer.stop() == 3


def test_mode_snapshotter_names() -> None:
    assert harness.OVERLAYFS.snapshotter is None
    assert harness.lazysnap_mode("zstdchunked").snapshotter == harness.SNAPSHOTTER
    assert Mode("peer1", "estargz", "peer").snapshotter == "peer1"


def test_resident_bytes_counts_cached_pages(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(os.urandom(64 << 10))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "link").symlink_to("d/f")
    assert harness.resident_bytes(tmp_path) == 64 << 10  # just written: in the page cache


def test_disk_shortfall(tmp_path: Path) -> None:
    assert harness.disk_shortfall([tmp_path / "not" / "yet"], 1) is None
    short = harness.disk_shortfall([tmp_path], 1 << 60)
    assert short is not None and "need" in short


def test_fresh_stem_keeps_earlier_results(tmp_path: Path) -> None:
    assert run.fresh_stem(tmp_path, "d-cloud") == tmp_path / "d-cloud"
    (tmp_path / "d-cloud.md").write_text("earlier")
    assert run.fresh_stem(tmp_path, "d-cloud") == tmp_path / "d-cloud-2"
    (tmp_path / "d-cloud-2.json").write_text("{}")
    assert run.fresh_stem(tmp_path, "d-cloud") == tmp_path / "d-cloud-3"
