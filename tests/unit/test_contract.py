"""The contract between the snapshotter and the lazy side stays small: importing the daemon's half
loads no FUSE, registry client, reader or image builder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter.contract import (
    NotLazyError,
    Served,
    mount_request,
    neighbour_digests,
    parse_mount_request,
    served_from_answer,
)

LAZY_SIDE = (
    "mfusepy",
    "snapshotter.fetcher",
    "snapshotter.remote",
    "snapshotter.reader",
    "snapshotter.fuse.",
    "snapshotter.eager",
)
BUILDERS = ("snapshotter.fetcher.push", "snapshotter.formats.build", "snapshotter.formats.build_nydus")


def loaded_after_import(module: str) -> list[str]:
    code = (
        f"import sys, {module}\n"
        f"print('\\n'.join(m for m in sys.modules if m.startswith({LAZY_SIDE + BUILDERS!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_snapshotter_half_loads_nothing_of_the_lazy_side() -> None:
    for module in ("snapshotter.daemon", "snapshotter.snapshots", "snapshotter.fuseclient"):
        assert loaded_after_import(module) == [], module


def test_the_fuse_manager_does_not_need_the_daemon() -> None:
    code = "import sys, snapshotter.fusemanager; print('snapshotter.daemon' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_not_lazy_survives_the_wire() -> None:
    exc = NotLazyError("bad-toc", "layer sha256:x: digest mismatch", required=True)
    back = NotLazyError.from_wire(exc.to_wire(), required=False)
    assert (back.reason, back.detail, back.required) == ("bad-toc", exc.detail, True)
    assert NotLazyError.from_wire({}, required=True).required


def test_mount_requests_are_checked() -> None:
    labels, mountpoint, lowerdirs = parse_mount_request({"labels": {"a": "b"}, "mountpoint": "/x/fs"})
    assert labels == {"a": "b"} and str(mountpoint) == "/x/fs" and lowerdirs == []
    request = mount_request({"a": "b"}, Path("/x/fs"), [Path("/p/2/fs"), Path("/p/1/fs")])
    assert parse_mount_request(request) == ({"a": "b"}, Path("/x/fs"), [Path("/p/2/fs"), Path("/p/1/fs")])
    relative_lower = {"labels": {}, "mountpoint": "/x", "lowerdirs": ["rel"]}
    for bad in (
        None,
        [],
        {"labels": {}},
        {"labels": {}, "mountpoint": "relative"},
        {"mountpoint": "/x"},
        relative_lower,
    ):
        try:
            parse_mount_request(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_mount_answers_say_how_the_layer_was_served() -> None:
    assert served_from_answer({}) is Served.MOUNTED  # a manager of an earlier version
    assert served_from_answer({"served": "filled"}) is Served.FILLED
    with pytest.raises(ValueError):
        served_from_answer({"served": "teleported"})


def test_neighbour_digests_keep_only_digests_up_to_the_limit() -> None:
    good = ["sha256:" + c * 64 for c in "abc"]
    listed = ",".join([good[0], "../../x", good[1], " ", good[2]])
    assert neighbour_digests({"containerd.io/snapshot/cri.image-layers": listed}, 2) == good[:2]
