"""Two-product mass balance, recovery, partition (Tromp) curve: arithmetic on the per-class
aggregates that :mod:`dashboards.queries` returns (a few dozen numbers, no particle rows).

Notation (``particle-analysis.md`` section 2): feed F, concentrate C, tailings
T; grades f, c, t of the valuable phase.

- Two-product formula: C/F = (f - t) / (c - t); T/F = 1 - C/F.
- Recovery of the phase to the concentrate: R = C c / (F f) = c (f - t) / [f (c - t)].
- Per class i (size or liberation), with the mass split C/F, the class shares
  c_i, t_i of each product's mass and the class grades: recovery of the phase in
  class i R_i = C c_i g_ci / (C c_i g_ci + T t_i g_ti), and the partition number
  P_i = C c_i / (C c_i + T t_i) (the share of the feed's class i that reports to
  the concentrate; the feed is reconstituted from the products).
- d50: size at which P = 50 %, log-linear interpolation between class centres;
  Ep = (d75 - d25) / 2 (Ecart probable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    """Mass split of a two-product separation: concentrate and tailings shares of the feed (0-1)."""

    concentrate: float
    tailings: float
    source: str  # how it was obtained, in words


def two_product_split(f: float, c: float, t: float) -> float | None:
    """C/F = (f - t) / (c - t); None when undefined (c = t) or outside [0, 1] (inconsistent grades)."""
    if not all(math.isfinite(x) for x in (f, c, t)) or abs(c - t) < 1e-12:
        return None
    value = (f - t) / (c - t)
    return value if 0.0 <= value <= 1.0 else None


def recovery(f: float, c: float, t: float) -> float | None:
    """R = c (f - t) / [f (c - t)] (0-1); None when undefined."""
    split = two_product_split(f, c, t)
    if split is None or f <= 0:
        return None
    return split * c / f


def split_from_masses(mass_concentrate_g: float | None, mass_tailings_g: float | None) -> float | None:
    """C/F = m_C / (m_C + m_T) from the products' masses; None when a mass is missing."""
    if mass_concentrate_g is None or mass_tailings_g is None:
        return None
    if not (math.isfinite(mass_concentrate_g) and math.isfinite(mass_tailings_g)):
        return None
    total = mass_concentrate_g + mass_tailings_g
    return mass_concentrate_g / total if total > 0 else None


def class_recovery(
    split: float, c_share: Sequence[float], t_share: Sequence[float], c_grade: Sequence[float], t_grade: Sequence[float]
) -> list[float | None]:
    """Recovery of the phase per class: C c_i g_ci / (C c_i g_ci + T t_i g_ti); shares and grades as fractions."""
    out = []
    for ci, ti, gc, gt in zip(c_share, t_share, c_grade, t_grade):
        num = split * ci * gc
        den = num + (1 - split) * ti * gt
        out.append(num / den if den > 0 else None)
    return out


def partition_numbers(split: float, c_share: Sequence[float], t_share: Sequence[float]) -> list[float | None]:
    """Partition number per class: C c_i / (C c_i + T t_i) (0-1)."""
    out = []
    for ci, ti in zip(c_share, t_share):
        den = split * ci + (1 - split) * ti
        out.append(split * ci / den if den > 0 else None)
    return out


def crossing(sizes: Sequence[float], partition: Sequence[float | None], level: float) -> float | None:
    """Size where the partition curve first crosses ``level`` (0-1), log-linear between points; None if never."""
    points = [(s, p) for s, p in zip(sizes, partition) if p is not None and s > 0]
    for (s0, p0), (s1, p1) in zip(points, points[1:]):
        if p0 == level:
            return s0
        if (p0 - level) * (p1 - level) < 0 or p1 == level:
            w = (level - p0) / (p1 - p0)
            return math.exp(math.log(s0) + w * (math.log(s1) - math.log(s0)))
    return None


def d50_ep(sizes: Sequence[float], partition: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(d50, Ep = |d75 - d25| / 2) of a partition curve; None where a level is not crossed."""
    d25, d50, d75 = (crossing(sizes, partition, level) for level in (0.25, 0.5, 0.75))
    ep = abs(d75 - d25) / 2 if d25 is not None and d75 is not None else None
    return d50, ep
