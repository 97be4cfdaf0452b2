"""The scan.json contract: valid documents pass, each kind of invalid one is named."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from ps3d_core.errors import ScanError
from schemas.scan import LegacyImageMetadata, ScanMetadata, Stream, load_scan_metadata, parse_scan_metadata

VALID = {"sample_id": "Ore1_zone-3.feed", "spacing_mm": 0.01, "stream": "feed"}


def parse(**changes):
    document = {**VALID, **changes}
    return parse_scan_metadata({k: v for k, v in document.items() if v is not ...}, "scan.json")


def test_minimal_document_with_isotropic_spacing():
    metadata = parse()
    assert metadata.sample_id == "Ore1_zone-3.feed"
    assert metadata.spacing_zyx_mm == (0.01, 0.01, 0.01)
    assert metadata.stream is Stream.feed
    assert metadata.particle_size_mm is None


def test_full_document():
    metadata = parse(
        spacing_mm=[0.02, 0.01, 0.01],
        particle_size_mm=0.35,
        stream="tailings",
        campaign="2026-Q4 flotation",
        material="Cu-Zn sulphide ore",
        mass_g=12.5,
        acquired_at="2026-11-02T09:30:00+00:00",
        phases={"quartz": [9000, 21000], "sulphide": [21000, 65536]},
        notes="split 3 of 4",
    )
    assert metadata.spacing_zyx_mm == (0.02, 0.01, 0.01)
    assert metadata.acquired_at == datetime(2026, 11, 2, 9, 30, tzinfo=timezone.utc)
    assert metadata.phases == {"quartz": (9000, 21000), "sulphide": (21000, 65536)}
    assert metadata.mass_g == 12.5


def test_sample_id_at_the_length_limit_is_accepted():
    assert parse(sample_id="a" * 128).sample_id == "a" * 128


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"sample_id": "a/b"}, "sample_id", "a/b"),
        ({"sample_id": "../up"}, "sample_id", "../up"),
        ({"sample_id": ".."}, "sample_id", ".."),
        ({"sample_id": "with space"}, "sample_id", "with space"),
        ({"sample_id": "a" * 129}, "sample_id", "a" * 129),
        ({"sample_id": ""}, "sample_id", ""),
        ({"sample_id": "é"}, "sample_id", "é"),
        ({"spacing_mm": 0}, "spacing_mm", "0"),
        ({"spacing_mm": -0.01}, "spacing_mm", "-0.01"),
        ({"spacing_mm": float("nan")}, "spacing_mm", "nan"),
        ({"spacing_mm": [0.01, 0.01]}, "spacing_mm", "[0.01, 0.01]"),
        ({"spacing_mm": [0.01, 0, 0.01]}, "spacing_mm", "0"),
        ({"spacing_mm": "fine"}, "spacing_mm", "fine"),
        ({"particle_size_mm": -1}, "particle_size_mm", "-1"),
        ({"stream": "middlings"}, "stream", "middlings"),
        ({"mass_g": 0}, "mass_g", "0"),
        ({"acquired_at": "yesterday"}, "acquired_at", "yesterday"),
        ({"phases": {"quartz": [5, 2]}}, "phases", "[5, 2]"),
        ({"phases": {"bad name": [1, 2]}}, "phases.bad name", "bad name"),
        ({"phases": {"quartz": [1]}}, "phases.quartz", "[1]"),
    ],
)
def test_invalid_field_is_named_with_its_value(changes, field, value):
    with pytest.raises(ScanError) as caught:
        parse(**changes)
    message = str(caught.value)
    assert message.startswith("scan.json: ")
    assert repr(field) in message or f"'{field}" in message
    assert value in message


def test_unknown_field_is_rejected_by_name():
    with pytest.raises(ScanError, match=r"unknown field 'spacing' \(value 0\.01\)"):
        parse(spacing=0.01)


@pytest.mark.parametrize("missing", ["sample_id", "spacing_mm", "stream"])
def test_missing_required_field_is_named(missing):
    with pytest.raises(ScanError, match=f"missing field '{missing}'"):
        parse(**{missing: ...})


def test_document_must_be_an_object():
    with pytest.raises(ScanError, match="must hold a JSON object, got list"):
        parse_scan_metadata([VALID], "scan.json")


def test_load_from_directory_and_file(tmp_path):
    (tmp_path / "scan.json").write_text(json.dumps(VALID))
    assert load_scan_metadata(tmp_path) == load_scan_metadata(tmp_path / "scan.json") == ScanMetadata(**VALID)


def test_load_reports_missing_file(tmp_path):
    with pytest.raises(ScanError, match=r"scan\.json: missing"):
        load_scan_metadata(tmp_path)


def test_load_reports_invalid_json_with_position(tmp_path):
    (tmp_path / "scan.json").write_text('{"sample_id": "a",\n "spacing_mm": }')
    with pytest.raises(ScanError, match=r"scan\.json: is not valid JSON: .* line 2 column"):
        load_scan_metadata(tmp_path)


def test_load_reports_binary_garbage(tmp_path):
    (tmp_path / "scan.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ScanError, match="is not UTF-8 text"):
        load_scan_metadata(tmp_path)


@pytest.mark.parametrize(
    ("entry", "spacing", "size"),
    [
        ({"spacing": 0.02, "particle_size": 0.4}, (0.02, 0.02, 0.02), 0.4),
        ({"spacing": [0.03, 0.02, 0.02], "particle_size": [0.5, 0.5, 0.5]}, (0.03, 0.02, 0.02), 0.5),
        ({"spacing": 0.02}, (0.02, 0.02, 0.02), None),
    ],
)
def test_legacy_metadata_entry(entry, spacing, size):
    metadata = LegacyImageMetadata.model_validate(entry).to_scan_metadata("Ore1")
    assert metadata.spacing_zyx_mm == spacing
    assert metadata.particle_size_mm == size
    assert metadata.stream is Stream.other


def test_legacy_metadata_refuses_anisotropic_particle_size():
    with pytest.raises(ValueError, match="particle_size must be one diameter"):
        LegacyImageMetadata.model_validate({"spacing": 0.02, "particle_size": [0.5, 0.4, 0.5]})
