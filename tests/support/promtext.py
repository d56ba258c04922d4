"""Reading Prometheus text expositions in tests."""

from __future__ import annotations


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (KeyError when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and got == want:
            return float(value)
    raise KeyError(f"{name}{{{want}}} not in metrics")
