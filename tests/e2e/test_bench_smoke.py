"""Smoke run of the cold-start harness (one small image, one repetition): what `make bench` and
`make demo` drive keeps working."""

from __future__ import annotations

from benchmarks.harness import (
    ImageSet,
    cold_run,
    make_workdir,
    model_workload,
    registry_and_proxy,
    remove_workdir,
)
from benchmarks.run import markdown, summarize
from tests.support.services import require_privileges


def test_cold_start_harness_smoke() -> None:
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    # Shards several eStargz chunks (4 MiB) long, of which the workload reads 1 MiB each.
    workload = model_workload("smoke", shard_mib=16, shards=2, read_fraction=1 / 16)
    workdir = make_workdir("lzsmoke")
    try:
        with registry_and_proxy("none") as (registry, proxy):
            images = ImageSet(workload, registry, workdir).build(formats=("estargz",))
            full = cold_run(images, proxy, "overlayfs")
            lazy = cold_run(
                images,
                proxy,
                "estargz",
                lazysnap_overrides={"prefetch": {"background": False, "fetch_whole_below_bytes": 0}},
            )
    finally:
        remove_workdir(workdir)
    assert full.bytes_fetched >= images.sizes["gzip"]  # a full pull downloads every layer
    assert lazy.lazy_stats["lazy_mounts"] == len(workload.layers)
    assert lazy.bytes_fetched < full.bytes_fetched
    table = markdown(summarize([full, lazy], "none"), "none", 1)
    assert "| smoke | estargz |" in table
