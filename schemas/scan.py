"""The scan-directory contract: what an instrument operator drops into the inbox.

A scan is a directory holding ``scan.json`` (validated by :class:`ScanMetadata`)
and the image (see ``ps3d_core.io`` for the accepted image layouts). Users of
the original ParticleSeg3D tool may instead point at its dataset layout
(``images/<name>.zarr`` + ``metadata.json``), read by :class:`LegacyImageMetadata`.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from ps3d_core.errors import ScanError

SCAN_JSON = "scan.json"
SCAN_COMPLETE_MARKER = "_SCAN_COMPLETE"

#: Letters, digits, ``.``, ``_`` and ``-``: the sample id becomes part of file
#: names and Parquet partition paths, so nothing that could form a path.
SampleId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,128}$"),
]
#: Phase names become column names (``phase_<name>_fraction``).
PhaseName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _check_spacing(value: Any) -> Any:
    """One clear message for a bad spacing instead of one per union member."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(values) != 3:
        raise ValueError(f"must be one number or [z, y, x], got {len(values)} values")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"must be a number in mm, got {item!r}")
        if not (math.isfinite(item) and item > 0):
            raise ValueError(f"must be a positive finite number of mm, got {item!r}")
    return value


#: Voxel size in mm: one number (isotropic) or [z, y, x].
Spacing = Annotated[
    PositiveFinite | tuple[PositiveFinite, PositiveFinite, PositiveFinite], BeforeValidator(_check_spacing)
]


class Stream(str, Enum):
    """Where in the circuit the sample was taken."""

    feed = "feed"
    concentrate = "concentrate"
    tailings = "tailings"
    other = "other"


def _spacing_zyx(spacing: float | tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(spacing, tuple):
        return spacing
    return (spacing, spacing, spacing)


class ScanMetadata(BaseModel):
    """``scan.json``: the metadata of one micro-CT scan.

    Units are millimetres; axis order is always z, y, x (slice, row, column).
    Unknown fields are rejected so that a typo (``spacing`` for ``spacing_mm``)
    is reported instead of silently ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    sample_id: SampleId = Field(description="Unique sample name; used in file names.")
    spacing_mm: Spacing = Field(
        description="Voxel size in mm: one number (isotropic) or [z, y, x]."
    )
    particle_size_mm: PositiveFinite | None = Field(
        default=None,
        description="Approximate mean particle diameter in mm; estimated from the image when absent.",
    )
    stream: Stream = Field(description="feed, concentrate, tailings or other.")
    campaign: str | None = Field(default=None, max_length=256)
    material: str | None = Field(default=None, max_length=256)
    mass_g: PositiveFinite | None = Field(default=None, description="Mass of the scanned sample in g.")
    acquired_at: datetime | None = None
    phases: dict[PhaseName, tuple[float, float]] | None = Field(
        default=None,
        description="Named intensity ranges [low, high) in the image's own grey values.",
    )
    notes: str | None = Field(default=None, max_length=10_000)

    @field_validator("sample_id")
    @classmethod
    def _not_only_dots(cls, value: str) -> str:
        if set(value) == {"."}:
            raise ValueError("must not consist of dots only")
        return value

    @field_validator("phases")
    @classmethod
    def _ranges_ordered(cls, value: dict[str, tuple[float, float]] | None):
        for name, (low, high) in (value or {}).items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"phase {name!r}: range [{low}, {high}] must be finite with low < high")
        return value

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm as (z, y, x)."""
        return _spacing_zyx(self.spacing_mm)


class LegacyImageMetadata(BaseModel):
    """One entry of the original ParticleSeg3D ``metadata.json`` (units: mm)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    spacing: Spacing
    particle_size: PositiveFinite | tuple[PositiveFinite, PositiveFinite, PositiveFinite] | None = None

    @model_validator(mode="after")
    def _isotropic_particle_size(self):
        size = self.particle_size
        if isinstance(size, tuple) and len(set(size)) != 1:
            raise ValueError(f"particle_size must be one diameter, got {list(size)}")
        return self

    def to_scan_metadata(self, sample_id: str) -> ScanMetadata:
        size = self.particle_size
        return ScanMetadata(
            sample_id=sample_id,
            spacing_mm=self.spacing,
            particle_size_mm=size[0] if isinstance(size, tuple) else size,
            stream=Stream.other,
        )


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the field and the offending value."""
    lines = []
    for item in error.errors():
        location = item["loc"]
        field = ".".join(str(part) for part in location) or "(document)"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown field {field!r} (value {item['input']!r})")
        elif item["type"] == "missing" and location and isinstance(location[-1], int):
            parent = ".".join(str(part) for part in location[:-1])
            lines.append(f"field {parent!r}: item {location[-1]} is missing (value {item['input']!r})")
        elif item["type"] == "missing":
            lines.append(f"missing field {field!r}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"field {field!r}: {message} (value {item['input']!r})")
    return "; ".join(lines)


def parse_scan_metadata(document: Any, source: str | Path) -> ScanMetadata:
    """Validate a decoded ``scan.json`` document; ``source`` names it in errors."""
    if not isinstance(document, dict):
        raise ScanError(source, f"must hold a JSON object, got {type(document).__name__}")
    try:
        return ScanMetadata.model_validate(document)
    except ValidationError as error:
        raise ScanError(source, describe_validation_error(error)) from None


def load_scan_metadata(path: str | Path) -> ScanMetadata:
    """Read and validate ``scan.json`` (a file, or a scan directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SCAN_JSON
    if not path.is_file():
        raise ScanError(path, "missing: every scan directory needs a scan.json")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ScanError(path, "is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ScanError(path, f"is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    return parse_scan_metadata(document, path)
