"""Peak memory of a piece of code, measured in a fresh interpreter.

A test that checks "this hostile input costs bounded memory" must not see the allocations of
other tests (or pytest's own), so the code runs in a subprocess: ``setup`` builds the input,
the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), then ``measured`` runs and the
new peak is read from ``/proc/self/status``. Only Linux is supported (as by lazysnap itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_DRIVER = r"""
import gc, json, sys

def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

ns = {"__name__": "__measured__"}
exec(compile(sys.argv[1], "<setup>", "exec"), ns)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (the peak) to the current RSS
before = _status("VmRSS")
error = None
try:
    exec(compile(sys.argv[2], "<measured>", "exec"), ns)
except Exception as exc:
    error = [type(exc).__name__, str(exc)]
peak = _status("VmHWM")
result = ns.get("result")
print(json.dumps({"growth": max(0, peak - before), "error": error, "result": result}))
"""


@dataclass(frozen=True)
class Measured:
    growth: int  # bytes the peak RSS rose above the RSS at the start of ``measured``
    error: tuple[str, str] | None  # (exception type name, message) raised by ``measured``
    result: object  # the JSON-serializable value ``measured`` left in the variable ``result``

    @property
    def growth_mib(self) -> float:
        return self.growth / (1 << 20)


def peak_growth(setup: str, measured: str, *, timeout: float = 300.0) -> Measured:
    """Run ``setup`` then ``measured`` (Python source, sharing globals) in a new interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, setup, measured],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        cwd=Path(__file__).resolve().parents[2],  # the repository: its code, whatever the cwd
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"measurement subprocess failed ({proc.returncode}):\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    error = tuple(out["error"]) if out["error"] else None
    return Measured(out["growth"], error, out["result"])
