"""How many bytes one range request may ask for, per endpoint, learned from how the link behaves.

A link that cuts long responses (a flaky NAT, an overloaded mirror, a proxy that drops long
transfers) is best used with requests that usually complete; a healthy link with few large ones.
``RequestSizing`` keeps one size per endpoint (the server a request goes to: a registry, a mirror,
or the object store a registry redirects to). It starts at ``maximum``; each response cut
mid-body halves it (never below ``minimum``); each response that arrives complete doubles it
(never above ``maximum``), if it asked for at least half the current size: a small request says
nothing about whether a big one would survive. Halving per cut and doubling per completion settle
where about half the responses complete. On a link that cuts with chance p for every 64 KiB that
is the median length a response survives: about 860 KiB at p = 5%, 420 KiB at 10%, 200 KiB at 20%.

Nothing is lost by a cut whatever the size (the blob reader resumes it), so the size only trades
round trips against how much a cut leaves to resume. The blob reader asks ``piece_bytes`` before
it plans each request and reports ``cut`` and ``completed``; the fetch scheduler (issue 12) is
meant to own one of these per client and make the same calls.
"""

from __future__ import annotations

DEFAULT_MINIMUM = 128 << 10
DEFAULT_MAXIMUM = 16 << 20


class RequestSizing:
    """The request-size policy described in the module docstring. Not thread-safe: use it from the
    event loop that runs the requests."""

    def __init__(self, *, minimum: int = DEFAULT_MINIMUM, maximum: int = DEFAULT_MAXIMUM) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError(f"need 0 < minimum <= maximum, got {minimum} and {maximum}")
        self.minimum = minimum
        self.maximum = maximum
        self._sizes: dict[str, int] = {}

    def piece_bytes(self, endpoint: str) -> int:
        """The most bytes a request to ``endpoint`` (host[:port]) should ask for now."""
        return self._sizes.get(endpoint, self.maximum)

    def cut(self, endpoint: str) -> None:
        """A response from ``endpoint`` broke off mid-body (reset, closed early, stalled)."""
        self._sizes[endpoint] = max(self.minimum, self.piece_bytes(endpoint) // 2)

    def completed(self, endpoint: str, asked: int) -> None:
        """A response from ``endpoint`` to a request for ``asked`` bytes arrived whole."""
        size = self.piece_bytes(endpoint)
        if size < self.maximum and asked * 2 >= size:
            grown = min(self.maximum, size * 2)
            if grown == self.maximum:
                del self._sizes[endpoint]
            else:
                self._sizes[endpoint] = grown

    def sizes(self) -> dict[str, int]:
        """The endpoints whose size is below ``maximum`` now, for logs and stats."""
        return dict(self._sizes)
