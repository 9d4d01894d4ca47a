"""95 % intervals for the rates the evaluation commands report (one source for every table)."""

from __future__ import annotations

import math
from typing import Sequence

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


def paired_difference(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """The difference of two rates measured on the same items (SAD against K = 1 on the same
    prompts: K = 1's image is SAD's first candidate), with Newcombe's (1998) hybrid score interval
    for paired proportions (his method 10: the two Wilson intervals combined with the correlation
    of the pairs, whose numerator ad - bc is continuity-adjusted as he does). Pairing is what makes
    a gain of a few points on 500 prompts measurable: only the prompts whose verdicts differ count.
    Returns {"difference", "ci95": [lo, hi], "n", "first_only", "second_only"}."""
    if len(first) != len(second):
        raise ValueError(f"paired verdicts must have the same length, got {len(first)} and {len(second)}")
    n = len(first)
    if n < 1:
        raise ValueError("paired_difference needs at least one pair")
    a = sum(1 for x, y in zip(first, second) if x and y)
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n)
    l2, u2 = wilson_interval(a + c, n)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    adjusted = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = adjusted / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return {"difference": diff, "ci95": [max(-1.0, lo), min(1.0, hi)], "n": n, "first_only": b, "second_only": c}


def format_difference(entry: dict | None) -> str:
    """'+10.4 pts [+6.9, +13.9]' for a `paired_difference` entry ('-' for none)."""
    if entry is None:
        return "-"
    lo, hi = entry["ci95"]
    return f"{100 * entry['difference']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def compare_paired(name_a: str, name_b: str, entry: dict) -> str:
    """One sentence on a `paired_difference(a, b)` entry: a difference is claimed only when its
    paired 95 % interval excludes 0."""
    lo, hi = entry["ci95"]
    if lo > 0 or hi < 0:
        better, worse = (name_a, name_b) if lo > 0 else (name_b, name_a)
        return (f"{better} beats {worse} by {abs(100 * entry['difference']):.1f} points "
                f"(paired 95 % interval {format_difference(entry)} excludes 0)")
    return f"{name_a} vs {name_b}: {format_difference(entry)}, no difference within noise (the paired interval holds 0)"
