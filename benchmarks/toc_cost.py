"""What parsing one layer's index costs: wall time and peak RSS growth of ``parse_toc`` (eStargz)
and ``parse_bootstrap`` (Nydus-like), each in a fresh subprocess (``tests.support.memory``).

Inputs are generated, not downloaded:

* ``realistic-N``: a TOC as ctr-remote writes it (Go's tab-indented JSON) for N small files in
  directories of 50, each one chunk with its own digest, as a Python or node_modules tree;
* ``dirs-MiB``: the cheapest JSON per entry (directories with short names) up to M MiB: the most
  entries, hence the most memory, a TOC of that size can cost;
* ``nydus-N``: our Nydus-like bootstrap for the same N files.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.toc_cost --out /tmp/toc_cost.json

Times are CPU seconds of the parsing process (steadier than wall time on a shared machine).
Numbers depend on the machine; compare before and after a change on the same one.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from snapshotter.formats.build import estargz_toc_and_footer, toc_json
from tests.support.memory import peak_growth

_SETUP_TOC = """
import json
from pathlib import Path
from snapshotter.formats import locate_toc, parse_toc
blob = Path({path!r}).read_bytes()
meta = json.loads(Path({meta!r}).read_text())
"""
_PARSE_TOC = """
import time
started = time.process_time()
location = locate_toc(blob[-64:], meta["blob_size"])
start = location.offset - (meta["blob_size"] - len(blob))  # only the blob's tail is stored
raw = blob[start : start + location.length]
index = parse_toc(raw, location, blob_size=meta["blob_size"], expected_digest=meta["digest"],
                  max_toc_bytes=1 << 30)
result = [time.process_time() - started, len(index.entries)]
"""
# The same parse under tracemalloc, inputs dropped after: what the index keeps (its own run,
# as tracing inflates time and RSS).
_RETAINED = """
import gc, tracemalloc
tracemalloc.start()
{parse}
del blob, raw
gc.collect()
result = tracemalloc.get_traced_memory()[0]
"""
_SETUP_NYDUS = """
from pathlib import Path
from snapshotter.formats.nydus import locate_bootstrap, parse_bootstrap
blob = Path({path!r}).read_bytes()
digest = {digest!r}
"""
_PARSE_NYDUS = """
import time
started = time.process_time()
location = locate_bootstrap(blob[-64:], len(blob))
raw = blob[location.offset : location.offset + location.length]
index = parse_bootstrap(raw, location, blob_size=len(blob), expected_digest=digest)
result = [time.process_time() - started, len(index.entries)]
"""
_FAKE_DATA_REGION = 1 << 40  # chunk offsets lie below it; no data bytes are stored


def realistic_entries(files: int) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    offset = 0
    for i in range(files):
        if i % 50 == 0:
            entries.append(
                {"name": f"usr/lib/python3/dist-packages/pkg{i // 50:05d}/", "type": "dir", "mode": 0o755}
            )
        size = 200 + (i * 7919) % 20000
        digest = "sha256:" + hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
        entries.append(
            {
                "name": f"usr/lib/python3/dist-packages/pkg{i // 50:05d}/module_{i:06d}.py",
                "type": "reg",
                "size": size,
                "modtime": "2024-05-01T12:00:00Z",
                "mode": 0o644,
                "offset": offset,
                "digest": digest,
                "chunkDigest": digest,
            }
        )
        offset += size // 3 + 60
    return entries


def dir_entries(json_bytes: int) -> list[dict[str, object]]:
    count = json_bytes // 48  # what one {"name": "d...", "type": "dir"} costs in Go's layout
    return [{"name": f"d{i:x}", "type": "dir"} for i in range(count)]


def write_estargz_toc(entries: list[dict[str, object]], path: Path) -> dict[str, Any]:
    """The TOC member + footer of a blob whose data region is ``_FAKE_DATA_REGION`` bytes; only
    that tail is stored, with the blob size beside it."""
    toc = toc_json(entries)
    _, tail = estargz_toc_and_footer(toc, _FAKE_DATA_REGION)
    path.write_bytes(tail)
    meta = {
        "blob_size": _FAKE_DATA_REGION + len(tail),
        "digest": "sha256:" + hashlib.sha256(toc).hexdigest(),
        "json_bytes": len(toc),
        "compressed_bytes": len(tail) - 51,
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    return meta


def write_nydus(files: int, path: Path) -> dict[str, Any]:
    from snapshotter.formats.build_nydus import build_nydus

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for e in realistic_entries(files):
            name = str(e["name"])
            info = tarfile.TarInfo(name.rstrip("/"))
            if e["type"] == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                data = name.encode()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    built = build_nydus(buf.getvalue())
    path.write_bytes(built.blob)
    return {
        "digest": built.toc_digest,
        "json_bytes": len(built.toc_json),
        "compressed_bytes": len(built.blob) - built.toc_offset - 64,
    }


def measure(cases: list[str], workdir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for case in cases:
        kind, _, arg = case.partition("-")
        path = workdir / f"{case}.bin"
        if kind == "nydus":
            meta = write_nydus(int(arg), path)
            setup, parse = _SETUP_NYDUS.format(path=str(path), digest=meta["digest"]), _PARSE_NYDUS
        else:
            entries = realistic_entries(int(arg)) if kind == "realistic" else dir_entries(int(arg) << 20)
            meta = write_estargz_toc(entries, path)
            del entries
            setup = _SETUP_TOC.format(path=str(path), meta=str(path.with_suffix(".json")))
            parse = _PARSE_TOC
        m = peak_growth(setup, parse)
        kept = peak_growth(setup, _RETAINED.format(parse=parse))
        if m.error is not None or not isinstance(m.result, list) or not isinstance(kept.result, int):
            raise RuntimeError(f"{case}: {m.error or kept.error}")
        seconds, entry_count = m.result
        rows.append(
            {
                "case": case,
                "entries": entry_count,
                "json_mib": round(meta["json_bytes"] / (1 << 20), 2),
                "compressed_mib": round(meta["compressed_bytes"] / (1 << 20), 2),
                "cpu_seconds": round(seconds, 2),
                "peak_growth_mib": round(m.growth_mib, 1),
                "peak_bytes_per_entry": round(m.growth / entry_count),
                "retained_mib": round(kept.result / (1 << 20), 1),
                "retained_bytes_per_entry": round(kept.result / entry_count),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["realistic-20000", "realistic-100000", "dirs-8", "dirs-64", "nydus-100000"],
        help="realistic-<files>, dirs-<JSON MiB>, nydus-<files>",
    )
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.cases, Path(tmp))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
