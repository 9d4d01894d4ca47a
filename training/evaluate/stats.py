"""95 % intervals for the rates the evaluation commands report (one source for every table)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate successes / n (Wilson, 1927): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 % or 100 %, where toy models live."""
    if n < 1:
        raise ValueError(f"n must be >= 1 for an interval, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and n the bound is exactly 0 (or 1); computed, it can miss by a rounding error.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def rate_with_interval(successes: int, n: int) -> dict:
    """{"rate", "successes", "n", "ci95": [lo, hi]}: how every table stores a rate."""
    lo, hi = wilson_interval(successes, n)
    return {"rate": successes / n, "successes": int(successes), "n": int(n), "ci95": [lo, hi]}


def format_rate(entry: dict | None) -> str:
    """'72.4 % [68.3, 76.1]' for a `rate_with_interval` entry ('-' for none)."""
    if entry is None:
        return "-"
    lo, hi = entry["ci95"]
    return f"{100 * entry['rate']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def differ(a: dict, b: dict) -> bool:
    """Whether two `rate_with_interval` entries differ beyond noise: their 95 % intervals do not
    overlap (conservative)."""
    return a["ci95"][0] > b["ci95"][1] or b["ci95"][0] > a["ci95"][1]


def compare(name_a: str, a: dict, name_b: str, b: dict) -> str:
    """One sentence comparing two `rate_with_interval` entries: a difference is claimed only when
    they `differ`; otherwise 'no difference within noise'."""
    diff = 100 * (a["rate"] - b["rate"])
    if differ(a, b):
        better, worse = (name_a, name_b) if diff > 0 else (name_b, name_a)
        return f"{better} beats {worse} by {abs(diff):.1f} points (95 % intervals do not overlap)"
    return f"{name_a} vs {name_b}: {diff:+.1f} points, no difference within noise (95 % intervals overlap)"
