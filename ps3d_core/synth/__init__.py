"""Synthetic micro-CT scans of particles in epoxy, with exact ground truth.

Used to train the default segmentation model (broadly randomised, SynthSeg
style: every sample draws its own particle sizes, shapes, minerals, touching
rate, scanner and artefacts), for tests and for benchmarks.

Modules: ``shapes`` (star-shaped SDF particles, spherical-harmonic basis),
``materials`` (attenuation table, ore systems per stream), ``phantom``
(placement, touching, phases, distractors, partial volume), ``ctsim``
(projection and image-domain CT models, 16-bit export), ``presets``,
``truth`` (labels, contacts), ``generator`` (end to end).

Output of :func:`write_synthetic_scan`::

    OUT/<sample_id>/scan.tif               uint16 z-y-x, the scan
    OUT/<sample_id>/scan.json              ScanMetadata (phases: grey ranges of the mineral roles)
    OUT/<sample_id>/_SCAN_COMPLETE
    OUT/_truth/<sample_id>_labels.tif      uint32 instances, 0 = background
    OUT/_truth/<sample_id>_phases.tif      uint8 phase ids, > 0 exactly where labels > 0
    OUT/_truth/<sample_id>_truth.json

``_truth.json`` keys: ``particle_count``, ``touching_count`` and
``touching_rate`` (particles sharing a voxel face with another label),
``requested_touching_rate``, ``piece_diameter`` and ``whole_particle_diameter``
(number mean and median of equivalent diameters in voxels and mm: of the
labelled pieces, and of the whole particles they belong to, which
``scan.json``'s ``particle_size_mm`` reports), ``phases`` (id, name,
material, role, mu relative to epoxy), ``mineralogy``, ``distractors``
(bubbles, sugar grains and sugar voids placed and visible), ``spectrum``,
``parameters`` (every drawn value), ``preset_ranges``, ``seed``,
``generator_version`` and ``particles``: one record per label with ``id``,
``source_particle``, ``voxel_count``, ``volume_mm3``,
``equivalent_diameter_voxels``/``_mm``, ``whole_particle_diameter_voxels``,
``shape_kind``, ``texture``, ``phase_voxels``, ``touches_border`` (volume
faces), ``cut_by_fov``, ``truncated`` and ``touching`` (neighbour ids).
A particle split by the border or field-of-view cut is several labels, one
per 6-connected piece.
"""

from ps3d_core.synth.generator import (
    GENERATOR_VERSION,
    SyntheticScan,
    synthesize,
    synthesize_samples,
    write_synthetic_scan,
)
from ps3d_core.synth.presets import PRESETS, SynthPreset
from ps3d_core.synth.truth import touching_count

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "SynthPreset",
    "SyntheticScan",
    "synthesize",
    "synthesize_samples",
    "touching_count",
    "write_synthetic_scan",
]
