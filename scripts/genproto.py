"""Generate the Python gRPC modules for proto/ into snapshotter/api/.

protoc writes imports relative to the proto root (``from containerd.types import ...``); we rewrite
them to live under ``snapshotter.api`` so the generated code never claims a top-level ``containerd``
(or, for the CRI subset in ``proto/runtime``, ``runtime``) package. ``--check`` regenerates into a
temporary directory and fails if the committed code differs.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = "snapshotter.api"
OUT_DIR = ROOT / "snapshotter" / "api"
# Top-level packages under proto/: containerd's Snapshots API and the CRI image service (runtime.v1).
PROTO_PACKAGES = ("containerd", "runtime")
IMPORT_RE = re.compile(rf"^(from|import) ({'|'.join(PROTO_PACKAGES)})\.", re.MULTILINE)


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    grpc_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{grpc_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out_dir.rglob("*.py*"):
        text = IMPORT_RE.sub(rf"\1 {OUT_PACKAGE}.\2.", path.read_text())
        path.write_text(text)
    for directory in [out_dir, *(d for d in out_dir.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()


def differences(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    diff = sorted(str(p) for p in files_a ^ files_b)
    diff += sorted(str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False))
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if snapshotter/api is stale")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if opts.check:
            stale = differences(fresh, OUT_DIR)
            if stale:
                print("generated code in snapshotter/api is stale; run `make proto`:", *stale, sep="\n  ")
                return 1
            return 0
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        shutil.copytree(fresh, OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
