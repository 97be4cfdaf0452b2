"""The scan-directory contract: what an instrument operator drops into the inbox.

A scan is a directory holding ``scan.json`` (validated by :class:`ScanMetadata`)
and the image (see ``ps3d_core.io`` for the accepted image layouts). Users of
the original ParticleSeg3D tool may instead point at its dataset layout
(``images/<name>.zarr`` + ``metadata.json``), read by :class:`LegacyImageMetadata`.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from ps3d_core.errors import ScanError
from schemas.catalog import SAFE_ID_PATTERN

SCAN_JSON = "scan.json"
SCAN_COMPLETE_MARKER = "_SCAN_COMPLETE"

#: Largest ``scan.json`` read, in bytes: the document is a few hundred bytes
#: plus at most 10,000 characters of notes; a bigger file is not a scan.json
#: (an image saved under the wrong name) and is not read into memory.
MAX_SCAN_JSON_BYTES = 1 << 20
#: Plausible voxel sizes in mm, from 1 nm (nano-CT) to 10 mm. A value outside
#: is a unit mistake (micrometres written as millimetres) or a damaged number;
#: accepted, it would overflow volumes in mm³ or blow up the resampled grid.
SPACING_RANGE_MM = (1e-6, 10.0)


def _check_sample_id(value: str) -> str:
    """One message a user acts on instead of the bare regular expression."""
    if not re.fullmatch(SAFE_ID_PATTERN, value):
        raise ValueError(
            "must be 1 to 128 ASCII letters, digits, '.', '_' or '-' "
            "(no spaces, slashes or other characters: it becomes part of file names)"
        )
    if set(value) == {"."}:
        raise ValueError("must not consist of dots only")
    return value


#: Letters, digits, ``.``, ``_`` and ``-``: the sample id becomes part of file
#: names and Parquet partition paths, so nothing that could form a path.
SampleId = Annotated[str, Strict(), AfterValidator(_check_sample_id)]
#: Phase names become column names (``phase_<name>_fraction``).
PhaseName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
#: A JSON number: strict, so that ``"12"`` or ``true`` is reported rather than
#: read as 12 or 1 (a quoted number is often a locale's "12,5" in disguise).
Number = Annotated[float, Strict()]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False), Strict()]


def _check_spacing(value: Any) -> Any:
    """One clear message for a bad spacing instead of one per union member."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(values) != 3:
        raise ValueError(f"must be one number or [z, y, x], got {len(values)} values")
    low, high = SPACING_RANGE_MM
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"must be a number in mm, got {item!r}")  # noqa: TRY004 - pydantic reports ValueError
        if not (math.isfinite(item) and item > 0):
            raise ValueError(f"must be a positive finite number of mm, got {item!r}")
        if not low <= item <= high:
            raise ValueError(
                f"must be a voxel size between {low:g} and {high:g} mm, got {item!r} "
                "(units are mm: 12 µm is 0.012)"
            )
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
    phases: dict[PhaseName, tuple[Number, Number]] | None = Field(
        default=None,
        description="Named intensity ranges [low, high) in the image's own grey values.",
    )
    notes: str | None = Field(default=None, max_length=10_000)

    @field_validator("phases")
    @classmethod
    def _ranges_ordered(cls, value: dict[str, tuple[float, float]] | None):
        for name, (low, high) in (value or {}).items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"phase {name!r}: range [{low}, {high}] must be finite with low < high")
        return value

    @model_validator(mode="after")
    def _particles_span_voxels(self):
        # a particle smaller than a voxel cannot be seen, let alone segmented:
        # such a size is a unit mistake, and would resample the scan to a grid
        # thousands of times larger
        finest = min(self.spacing_zyx_mm)
        if self.particle_size_mm is not None and self.particle_size_mm < finest:
            raise ValueError(
                f"particle_size_mm {self.particle_size_mm!r} is smaller than one voxel ({finest!r} mm); "
                "both are in mm"
            )
        return self

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


#: Longest rendering of an offending value in a message (characters).
_VALUE_CHARS = 200


def _shown(value: Any) -> str:
    """``repr`` of a value, cut short: a 10,000-character note must not flood the message."""
    text = repr(value)
    return text if len(text) <= _VALUE_CHARS else f"{text[: _VALUE_CHARS - 3]}..."


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the field and the offending value."""
    lines = []
    for item in error.errors():
        location = item["loc"]
        field = ".".join(str(part) for part in location) or "(document)"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown field {field!r} (value {_shown(item['input'])})")
        elif item["type"] == "missing" and location and isinstance(location[-1], int):
            parent = ".".join(str(part) for part in location[:-1])
            lines.append(f"field {parent!r}: item {location[-1]} is missing (value {_shown(item['input'])})")
        elif item["type"] == "missing":
            lines.append(f"missing field {field!r}")
        elif not location:  # a model validator: the message names the fields
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"field {field!r}: {message} (value {_shown(item['input'])})")
    return "; ".join(lines)


def parse_scan_metadata(document: Any, source: str | Path) -> ScanMetadata:
    """Validate a decoded ``scan.json`` document; ``source`` names it in errors."""
    if not isinstance(document, dict):
        raise ScanError(source, f"must hold a JSON object, got {type(document).__name__}")
    try:
        return ScanMetadata.model_validate(document)
    except ValidationError as error:
        raise ScanError(source, describe_validation_error(error)) from None


class _DuplicateKey(ValueError):
    """A JSON object names a key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; which sample_id did the operator mean?
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise _DuplicateKey(key)
        document[key] = value
    return document


def _decode(path: Path, data: bytes) -> Any:
    """The JSON document of ``scan.json``'s bytes; ScanError naming ``path`` for anything unreadable."""
    try:
        # utf-8-sig: Windows editors (Notepad, PowerShell 5) start UTF-8 files with a byte-order mark
        return json.loads(data.decode("utf-8-sig"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ScanError(path, "is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ScanError(path, f"is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except _DuplicateKey as error:
        raise ScanError(path, f"names the field {error.args[0]!r} twice; keep one") from None
    except ValueError:  # Python refuses to convert an integer of more than 4,300 digits
        raise ScanError(path, "is not valid JSON: a number has more than 4,300 digits") from None
    except RecursionError:
        raise ScanError(path, "is not valid JSON: arrays or objects nested too deeply") from None


def load_scan_metadata(path: str | Path) -> ScanMetadata:
    """Read and validate ``scan.json`` (a file, or a scan directory holding one).

    Raises
    ------
    ScanError
        Naming the file: missing, larger than :data:`MAX_SCAN_JSON_BYTES`,
        not UTF-8 JSON (a byte-order mark is allowed), a key given twice, or
        an invalid document (each field with its problem and value).
    """
    path = Path(path)
    if path.is_dir():
        path = path / SCAN_JSON
    if not path.is_file():
        raise ScanError(path, "missing: every scan directory needs a scan.json")
    size = path.stat().st_size
    if size > MAX_SCAN_JSON_BYTES:
        raise ScanError(path, f"is {size:,} bytes; a scan.json holds a few hundred (at most {MAX_SCAN_JSON_BYTES:,})")
    return parse_scan_metadata(_decode(path, path.read_bytes()), path)
