"""Length units found in image files, converted to millimetres."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Spellings used by OME-NGFF (UDUNITS names), ImageJ and NIfTI (``xyzt_units``).
_MM_PER_UNIT = {
    "meter": 1e3,
    "m": 1e3,
    "centimeter": 10.0,
    "cm": 10.0,
    "millimeter": 1.0,
    "mm": 1.0,
    "micrometer": 1e-3,
    "micron": 1e-3,
    "um": 1e-3,
    "\N{MICRO SIGN}m": 1e-3,
    "\N{GREEK SMALL LETTER MU}m": 1e-3,
    "nanometer": 1e-6,
    "nm": 1e-6,
}


def spacing_in_mm(spacing: Sequence[float], unit: str | None) -> tuple[float, float, float] | None:
    """Convert a (z, y, x) voxel size to mm.

    Parameters
    ----------
    spacing : sequence of 3 floats
        Voxel size (z, y, x) in ``unit``.
    unit : str or None
        Length unit as the file spells it ("micrometer", "micron", "mm", ...).

    Returns
    -------
    (float, float, float) or None
        Voxel size in mm; None when the unit is missing or not a length
        (ImageJ's "pixel", NIfTI's "unknown") or a value is not positive:
        the numbers then mean nothing.
    """
    factor = _MM_PER_UNIT.get((unit or "").strip().lower())
    values = [float(value) for value in spacing]
    if factor is None or not all(math.isfinite(value) and value > 0 for value in values):
        return None
    dz, dy, dx = (value * factor for value in values)
    return (dz, dy, dx)
