"""Progress of an image conversion: bars on a terminal, one line per event otherwise, or nothing.

Each layer goes through the phases fetch → convert → push; a reporter hears when a phase starts
(with the bytes it will handle), how far it is, and when the layer is done. ``summary_text``
formats the end result. Reporters are called from the event loop's thread only.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Never, TextIO

from tqdm import tqdm

from snapshotter.fetcher import PushOutcome, PushStats


class Phase(enum.Enum):
    FETCH = "fetch"
    CONVERT = "convert"
    PUSH = "push"


@dataclass(frozen=True)
class LayerResult:
    """One converted layer: where it came from and what it became."""

    index: int
    source_digest: str
    source_size: int
    source_media_type: str
    digest: str
    size: int
    media_type: str
    outcome: PushOutcome


@dataclass(frozen=True)
class Summary:
    """The outcome of a conversion, for the final report and for callers of ``convert``."""

    source: str
    target: str  # the destination, tag included
    reference: str  # how to name the result: HOST/REPO:TAG@DIGEST, or oci:DIR:TAG
    format: str
    layers: tuple[LayerResult, ...]
    source_size: int  # all source layers, compressed
    size: int  # all new layers
    manifest_digest: str
    stats: PushStats
    missing_prioritized: tuple[str, ...] = ()
    seconds: float = 0.0


def short(digest: str) -> str:
    """``sha256:0123456789ab`` - the first 12 hex digits, as docker and ctr show digests."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """The reporter interface; this base class reports nothing (``--quiet``)."""

    def start(self, layers: Sequence[tuple[str, int]]) -> None:
        """The conversion begins: each layer's (source digest, compressed size), bottom first."""

    def phase(self, index: int, phase: Phase, total: int) -> None:
        """Layer ``index`` enters ``phase``, which will handle ``total`` bytes."""

    def advance(self, index: int, done: int) -> None:
        """Layer ``index`` has handled ``done`` bytes of its current phase."""

    def layer_done(self, result: LayerResult) -> None:
        """Layer ``result.index`` is converted and stored at the destination."""

    def note(self, text: str) -> None:
        """An event that belongs to no layer (config, manifest)."""

    def close(self) -> None:
        """The conversion is over (also after a failure): release the terminal."""


class PlainProgress(Progress):
    """One line per event, for logs and pipes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._layers: list[tuple[str, int]] = []

    def _say(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def _label(self, index: int) -> str:
        return f"layer {index + 1}/{len(self._layers)} {short(self._layers[index][0])}"

    def start(self, layers: Sequence[tuple[str, int]]) -> None:
        self._layers = list(layers)

    def phase(self, index: int, phase: Phase, total: int) -> None:
        self._say(f"{self._label(index)} {phase.value} {human_size(total)}")

    def layer_done(self, result: LayerResult) -> None:
        self._say(
            f"{self._label(result.index)} done: {human_size(result.source_size)} -> "
            f"{human_size(result.size)} {short(result.digest)} ({result.outcome.value})"
        )

    def note(self, text: str) -> None:
        self._say(text)


class BarProgress(Progress):
    """A tqdm bar per layer showing its phase and bytes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bars: list[tqdm[Never]] = []

    def start(self, layers: Sequence[tuple[str, int]]) -> None:
        for i, (digest, size) in enumerate(layers):
            bar: tqdm[Never] = tqdm(
                total=size,
                desc=f"{i + 1}/{len(layers)} {short(digest)} waiting",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                position=i,
                leave=True,
                file=self._stream,
                dynamic_ncols=True,
                bar_format="{desc:<38} {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B{postfix}",
            )
            self._bars.append(bar)

    def phase(self, index: int, phase: Phase, total: int) -> None:
        bar = self._bars[index]
        bar.reset(total=total)
        bar.set_description_str(bar.desc.rsplit(" ", 1)[0] + f" {phase.value}", refresh=True)

    def advance(self, index: int, done: int) -> None:
        bar = self._bars[index]
        bar.update(done - bar.n)

    def layer_done(self, result: LayerResult) -> None:
        bar = self._bars[result.index]
        bar.reset(total=result.size)
        bar.update(result.size)
        bar.set_description_str(bar.desc.rsplit(" ", 1)[0] + " done", refresh=False)
        bar.set_postfix_str(f"{human_size(result.source_size)} -> {human_size(result.size)}", refresh=True)

    def note(self, text: str) -> None:
        tqdm.write(text, file=self._stream)

    def close(self) -> None:
        for bar in self._bars:
            bar.close()
        self._bars = []


def reporter(*, quiet: bool, stream: TextIO | None = None) -> Progress:
    """Bars when ``stream`` (default stdout) is a terminal, plain lines when not, nothing if quiet."""
    stream = stream or sys.stdout
    if quiet:
        return Progress()
    return BarProgress(stream) if stream.isatty() else PlainProgress(stream)


def summary_text(summary: Summary) -> str:
    """The report printed at the end: each layer's size before and after, totals, the new digest."""
    lines = [f"converted {summary.source} to {summary.format} in {summary.seconds:.1f}s:"]
    for layer in summary.layers:
        lines.append(
            f"  layer {layer.index + 1}: {short(layer.source_digest)} {human_size(layer.source_size):>10}"
            f" -> {short(layer.digest)} {human_size(layer.size):>10}"
        )
    before, after = summary.source_size, summary.size
    change = f" ({(after - before) / before:+.1%})" if before else ""
    lines.append(f"  total: {human_size(before)} -> {human_size(after)}{change}")
    s = summary.stats
    lines.append(
        f"  blobs: {s.uploaded} uploaded ({human_size(s.bytes_uploaded)}), {s.mounted} mounted, "
        f"{s.existed} already present"
    )
    lines.append(f"manifest {summary.manifest_digest}")
    lines.append(f"image {summary.reference}")
    return "\n".join(lines)
