"""Property-based fuzzing of what an operator drops in: ``scan.json`` and the image readers.

Whatever the bytes, the answer is either a valid result or a
:class:`~ps3d_core.errors.ScanError` naming the file, never another
exception (a traceback from inside json, pydantic, tifffile, nibabel or
zarr). Examples are derandomised (the same on every run and machine, no
example database) and bounded so that the file runs in well under a minute.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps3d_core.errors import ScanError
from ps3d_core.io import open_volume
from schemas.catalog import SAFE_ID_PATTERN
from schemas.scan import SPACING_RANGE_MM, ScanMetadata, load_scan_metadata

settings.register_profile(
    "ps3d-fuzz",
    derandomize=True,  # reproducible: the examples depend on the test alone
    database=None,
    deadline=None,  # two busy cores: timing says nothing
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ = settings.get_profile("ps3d-fuzz")

VALID = {
    "sample_id": "Ore1-feed",
    "spacing_mm": [0.012, 0.01, 0.01],
    "stream": "feed",
    "particle_size_mm": 0.35,
    "campaign": "2026-Q4 flotation",
    "mass_g": 12.5,
    "acquired_at": "2026-11-02T09:30:00+00:00",
    "phases": {"quartz": [9000, 21000], "sulphide": [21000, 65536]},
    "notes": "split 3 of 4",
}
FIELDS = sorted(ScanMetadata.model_fields)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_scan_json(path: Path) -> None:
    """load_scan_metadata gives valid metadata or a ScanError naming ``path``; nothing else."""
    try:
        metadata = load_scan_metadata(path)
    except ScanError as error:
        assert error.path == str(path)
        assert str(error).startswith(f"{path}: ") and error.problem
        return
    assert re.fullmatch(SAFE_ID_PATTERN, metadata.sample_id) and set(metadata.sample_id) != {"."}
    low, high = SPACING_RANGE_MM
    assert all(low <= s <= high for s in metadata.spacing_zyx_mm)
    for value in (metadata.particle_size_mm, metadata.mass_g):
        assert value is None or (math.isfinite(value) and value > 0)


# --------------------------------------------------------------------------
# scan.json
# --------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
#: Documents near the contract: its field names (and some others) with any JSON value.
documents = st.dictionaries(st.sampled_from([*FIELDS, "spacing", "sampleId", ""]) | st.text(max_size=12),
                            json_values, max_size=len(FIELDS) + 2)  # fmt: skip
#: Valid values of each field, mixed with any JSON value.
field_values = {
    "sample_id": st.from_regex(r"[A-Za-z0-9._-]{1,130}", fullmatch=True) | st.text(max_size=140),
    "spacing_mm": st.floats(1e-8, 100) | st.lists(st.floats(1e-8, 100), min_size=2, max_size=4),
    "stream": st.sampled_from(["feed", "concentrate", "tailings", "other", "Feed", "middlings"]),
    "particle_size_mm": st.floats(1e-6, 1e6),
    "mass_g": st.floats(-10, 1e6) | st.text(max_size=6),
    "phases": st.dictionaries(st.text(max_size=10), st.lists(st.floats(-1e6, 1e6), max_size=3), max_size=3),
}
near_valid = st.fixed_dictionaries({}, optional={k: v | json_values for k, v in field_values.items()})


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))  # NaN and Infinity as Python writes them
    return path


@settings(FUZZ, max_examples=400)
@given(document=json_values | documents)
def test_any_json_document(workdir, document):
    check_scan_json(write_json(workdir / "any.json", document))


@settings(FUZZ, max_examples=400)
@given(document=near_valid)
def test_documents_near_the_contract(workdir, document):
    check_scan_json(write_json(workdir / "near.json", document))


@settings(FUZZ, max_examples=300)
@given(data=st.binary(max_size=300))
def test_any_bytes(workdir, data):
    (workdir / "bytes.json").write_bytes(data)
    check_scan_json(workdir / "bytes.json")


def mutations(original: bytes) -> st.SearchStrategy[bytes]:
    """``original`` truncated, or with a few bytes replaced, inserted or deleted."""

    def apply(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
        buffer = bytearray(data)
        for kind, at, chunk in edits:
            at %= max(len(buffer), 1)
            if kind == "replace":
                buffer[at : at + len(chunk)] = chunk
            elif kind == "insert":
                buffer[at:at] = chunk
            else:
                del buffer[at : at + len(chunk)]
        return bytes(buffer)

    edit = st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0, 10**9),
                     st.binary(min_size=1, max_size=8))  # fmt: skip
    truncated = st.integers(0, len(original)).map(lambda n: original[:n])
    return truncated | st.lists(edit, min_size=1, max_size=4).map(lambda edits: apply(original, edits))


@settings(FUZZ, max_examples=400)
@given(data=mutations(json.dumps(VALID, indent=1).encode()))
def test_mutations_of_a_valid_scan_json(workdir, data):
    (workdir / "mutated.json").write_bytes(data)
    check_scan_json(workdir / "mutated.json")


def test_the_valid_document_is_valid(workdir):
    assert load_scan_metadata(write_json(workdir / "valid.json", VALID)).sample_id == "Ore1-feed"


# --------------------------------------------------------------------------
# image readers
# --------------------------------------------------------------------------

VOLUME = (np.arange(4 * 6 * 7).reshape(4, 6, 7) * 97 % 65521).astype(np.uint16)


def check_image(path: Path) -> None:
    """open_volume + reading all slices: an array of the declared shape and dtype, or a ScanError naming ``path``."""
    try:
        with open_volume(path) as volume:
            slab = volume.read(0, volume.shape[0])
    except ScanError as error:
        assert error.path == str(path) or error.path.startswith(f"{path}/"), (error.path, path)
        assert error.problem
        return
    assert slab.shape == volume.shape and slab.dtype == volume.dtype
    assert len(volume.shape) == 3 and volume.dtype.kind in "iuf"


def tiff_bytes(compression: str | None) -> bytes:
    import io

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, VOLUME, photometric="minisblack", compression=compression)
    return buffer.getvalue()


def nifti_bytes() -> bytes:
    image = nibabel.Nifti1Image(VOLUME.transpose(2, 1, 0), np.eye(4))
    return image.to_bytes()


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_the_valid_images_read_back(workdir, compression):
    (workdir / f"valid-{compression}.tif").write_bytes(tiff_bytes(compression))
    np.testing.assert_array_equal(open_volume(workdir / f"valid-{compression}.tif").read(0, 4), VOLUME)
    (workdir / "valid.nii").write_bytes(nifti_bytes())
    np.testing.assert_array_equal(open_volume(workdir / "valid.nii").read(0, 4), VOLUME)


@settings(FUZZ, max_examples=300)
@given(data=mutations(tiff_bytes(None)))
def test_mutated_tiff(workdir, data):
    (workdir / "mutated.tif").write_bytes(data)
    check_image(workdir / "mutated.tif")


@settings(FUZZ, max_examples=200)
@given(data=mutations(tiff_bytes("zlib")))
def test_mutated_compressed_tiff(workdir, data):
    (workdir / "mutated-zlib.tif").write_bytes(data)
    check_image(workdir / "mutated-zlib.tif")


@settings(FUZZ, max_examples=200)
@given(data=mutations(nifti_bytes()))
def test_mutated_nifti(workdir, data):
    (workdir / "mutated.nii").write_bytes(data)
    check_image(workdir / "mutated.nii")


@settings(FUZZ, max_examples=150)
@given(data=mutations(tiff_bytes(None)), name=st.sampled_from(["s_1.tif", "s_2.tif", "s_3.tif"]))
def test_a_mutated_slice_among_good_ones(workdir, data, name):
    folder = workdir / "slices"
    folder.mkdir(exist_ok=True)
    for z in range(3):
        tifffile.imwrite(folder / f"s_{z + 1}.tif", VOLUME[z], photometric="minisblack")
    (folder / name).write_bytes(data)
    check_image(folder)


@pytest.fixture(scope="module")
def zarr_metadata(workdir) -> bytes:
    zarr.create_array(workdir / "template.zarr", data=VOLUME, chunks=(2, 6, 7))
    return (workdir / "template.zarr" / "zarr.json").read_bytes()


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_mutated_zarr_metadata_and_chunk(workdir, zarr_metadata, data):
    path = workdir / "mutated.zarr"
    if not path.exists():
        zarr.create_array(path, data=VOLUME, chunks=(2, 6, 7))
    chunk = workdir / "template.zarr" / "c" / "1" / "0" / "0"
    (path / "zarr.json").write_bytes(data.draw(mutations(zarr_metadata), label="zarr.json"))
    (path / "c" / "1" / "0" / "0").write_bytes(data.draw(mutations(chunk.read_bytes()), label="chunk"))
    check_image(path)
