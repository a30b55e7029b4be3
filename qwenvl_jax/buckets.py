"""Shape buckets: sizes rounded up to a few values per octave, so that new prompt lengths, image
sizes and cache lengths map onto shapes already compiled. A leaf module (no package imports), used
by the vision layout and the decode loop alike."""

from __future__ import annotations


def bucket(n: int, minimum: int = 16) -> int:
    """Rounds up to one of 4 sizes per power of two (<= 25% padding), at least `minimum`."""
    n = max(n, minimum)
    step = max(1 << max(n.bit_length() - 3, 0), 1)
    return -(-n // step) * step
