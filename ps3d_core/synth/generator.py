"""Synthetic scans end to end: draw parameters, build the phantom, image it, export.

Seeding: one ``SeedSequence(seed)`` per sample, spawned into independent
streams for parameters, phantom, physics and export, so the same seed gives
the same bytes whatever the number of workers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from ps3d_core.io.atomic import atomic_output
from ps3d_core.io.tiff import write_tiff
from ps3d_core.synth import ctsim, materials, truth
from ps3d_core.synth.phantom import Phantom, PhantomSpec, build_phantom
from ps3d_core.synth.presets import PRESETS, SynthPreset
from schemas.scan import SCAN_COMPLETE_MARKER, SCAN_JSON, ScanMetadata, Stream

GENERATOR_VERSION = "1.0.0"
TRUTH_DIR = "_truth"
#: Streams cycled through by :func:`synthesize_samples` when none is given.
STREAM_CYCLE = ("feed", "concentrate", "tailings", "other")
_SAMPLE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class SyntheticScan:
    """One synthetic scan and its exact ground truth.

    Attributes
    ----------
    image : ndarray, shape (Z, Y, X), uint16
        The reconstructed scan as a vendor would export it.
    labels : ndarray, shape (Z, Y, X), uint32
        Particle instances, 0 = background (epoxy, air, distractors); each
        label is one 6-connected component.
    phases : ndarray, shape (Z, Y, X), uint8
        Mineral phase id on particle voxels (``phases > 0`` exactly where ``labels > 0``).
    metadata : ScanMetadata
        Contents of ``scan.json``.
    truth : dict
        JSON-serialisable ground truth and every drawn parameter.
    """

    image: np.ndarray
    labels: np.ndarray
    phases: np.ndarray
    metadata: ScanMetadata
    truth: dict


@dataclass(frozen=True)
class _Sample:
    """What a sample drew before imaging: its identity, parameters and materials.

    ``effective_mu`` holds the spectrum-weighted mu (1/cm) of the matrix, air,
    sucrose and then every phase, in phase-id order.
    """

    preset: SynthPreset
    seed: int
    stream: str
    sample_id: str
    params: dict
    mineralogy: materials.Mineralogy
    spectrum: materials.Spectrum
    effective_mu: np.ndarray


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _resolve_preset(preset: str | SynthPreset) -> SynthPreset:
    if isinstance(preset, SynthPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def draw_parameters(preset: SynthPreset, rng: np.random.Generator, stream: str, touching_rate: float | None) -> dict:
    """Every random choice of one sample, as plain JSON values.

    Lengths are voxels unless the key ends in ``_mm``/``_cm``.
    """
    u = rng.random() ** materials.SIZE_BIAS_BY_STREAM[stream]
    lo, hi = np.log(preset.median_diameter)
    diameter = float(np.exp(lo + u * (hi - lo)))
    # Physical particle sizes of 40-1000 um, as in the paper's samples.
    spacing_lo = max(preset.spacing_mm[0], 0.04 / diameter)
    spacing_hi = max(min(preset.spacing_mm[1], 1.0 / diameter), spacing_lo * 1.01)
    n = preset.shape[1]
    fov_radius = round(rng.uniform(*preset.fov_scale) * n / 2.0)
    t = materials.load_tables()
    kvp = float(t.kvp[np.argmin(np.abs(t.kvp - rng.uniform(*preset.kvp)))])
    rows = np.flatnonzero(t.kvp == kvp)
    p = {
        "median_diameter": diameter,
        "sigma_ln": rng.uniform(*preset.sigma_ln),
        "solids_fraction": rng.uniform(*preset.solids_fraction),
        "touching_rate": float(touching_rate) if touching_rate is not None else rng.uniform(*preset.touching_rate),
        "spacing_mm": _log_uniform(rng, spacing_lo, spacing_hi),
        "fov_radius": float(fov_radius),
        "mount_radius": fov_radius * rng.uniform(*preset.mount_scale),
        "spacer_fraction": rng.uniform(*preset.spacer_fraction),
        "spacer_void_share": rng.uniform(*preset.spacer_void_share),
        "spacer_size_ratio": rng.uniform(*preset.spacer_size_ratio),
        "bubble_fraction": rng.uniform(*preset.bubble_fraction),
        "bubble_size_ratio": rng.uniform(*preset.bubble_size_ratio),
        "low_contrast_share": rng.uniform(*preset.low_contrast_share),
        "heavy_accessory": bool(rng.random() < preset.heavy_accessory_probability),
        "accessory_rate": rng.uniform(*preset.accessory_rate),
        "spectrum_index": int(rows[rng.integers(len(rows))]),
        "blur_sigma": rng.uniform(*preset.blur_sigma),
        "noise": rng.uniform(*preset.noise),
        "edge_enhancement": rng.uniform(*preset.edge_enhancement) if rng.random() < 0.5 else 0.0,
        "window": ctsim.WINDOWS[int(rng.integers(len(ctsim.WINDOWS)))],
    }
    if preset.physics == "image":
        p |= {
            "z_blur": p["blur_sigma"] * rng.uniform(0.8, 1.2),
            "noise_centre_boost": rng.uniform(0.0, 0.5),
            "cupping": rng.uniform(*preset.cupping),
            "streaks": rng.uniform(*preset.streaks),
            "ring_strength": rng.uniform(*preset.ring_strength),
            "ring_count": int(rng.integers(0, 13)),
        }
    else:
        p |= {
            "z_blur": rng.uniform(*preset.z_blur),
            "n_angles": int(round(rng.uniform(*preset.angles_per_bin) * 2 * fov_radius)),
            "path_scale": rng.uniform(*preset.path_scale),
            "scatter": rng.uniform(*preset.scatter),
            "bh_correction": rng.uniform(*preset.bh_correction),
            "cor_shift": rng.uniform(*preset.cor_shift) * rng.choice([-1.0, 1.0]),
            "gain_error": rng.uniform(*preset.gain_error),
            "defect_share": rng.uniform(0.005, 0.04),
        }
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in p.items()}


def _phantom_spec(preset: SynthPreset, p: dict, m: int) -> PhantomSpec:
    return PhantomSpec(
        shape=(preset.shape[0], m, m),
        mount_radius=p["mount_radius"],
        median_diameter=p["median_diameter"],
        sigma_ln=p["sigma_ln"],
        solids_fraction=p["solids_fraction"],
        kind_weights=preset.kind_weights,
        touching_rate=p["touching_rate"],
        spacer_fraction=p["spacer_fraction"],
        spacer_void_share=p["spacer_void_share"],
        spacer_size_ratio=p["spacer_size_ratio"],
        bubble_fraction=p["bubble_fraction"],
        bubble_size_ratio=p["bubble_size_ratio"],
    )


def _work_size(preset: SynthPreset, p: dict) -> int:
    """Side of the simulated y-x grid: the output, or for the projection model the whole mount."""
    n = preset.shape[1]
    if preset.physics == "image":
        return n
    reach = max(p["fov_radius"], p["mount_radius"]) + 1.0
    return n + 2 * max(0, int(np.ceil(reach - n / 2.0)))


def _image(
    preset: SynthPreset,
    p: dict,
    phantom: Phantom,
    spec: materials.Spectrum,
    matrix_mu: float,
    seed: np.random.SeedSequence,
    workers: int | None,
) -> np.ndarray:
    """Reconstructed attenuation (nz, m, m), 1/cm, 0 outside the field of view.

    For the projection model the photon count derived from the drawn noise
    level is recorded in ``p["photons"]``.
    """
    rng = np.random.default_rng(seed.spawn(1)[0])
    m = phantom.owner.shape[1]
    if preset.physics == "image":
        physics = ctsim.ImagePhysics(
            blur_sigma=(p["z_blur"], p["blur_sigma"]),
            noise=p["noise"],
            noise_centre_boost=p["noise_centre_boost"],
            cupping=p["cupping"],
            streaks=p["streaks"],
            ring_amplitude=p["ring_strength"],
            ring_count=p["ring_count"],
            edge_enhancement=p["edge_enhancement"],
            window=p["window"],
        )
        image = ctsim.image_domain(phantom.channels[0], matrix_mu, p["mount_radius"], physics, rng)
        image[:, ~ctsim.fov_mask(m, p["fov_radius"])] = 0.0
        return image
    n_det = int(2 * p["fov_radius"])
    proj = ctsim.projector(m, n_det, p["n_angles"], min(p["mount_radius"], m / 2.0))
    pixel_cm = p["spacing_mm"] / 10.0 * p["path_scale"]
    physics = ctsim.ProjectionPhysics(
        pixel_cm=pixel_cm,
        basis_mu=materials.mu_at(p["bases"], spec.energies_kev).T,
        weights=spec.weights,
        detector_blur=p["blur_sigma"],
        scatter=p["scatter"],
        # The vendor calibrates on the matrix: relative correction c at its longest path.
        bh_correction=p["bh_correction"] / max(matrix_mu * 2.0 * p["mount_radius"] * pixel_cm, 1e-6),
        cor_shift=p["cor_shift"],
        window=p["window"],
    )
    # Photons per bin that give the drawn noise level on the matrix at the axis.
    central = np.exp(-matrix_mu * 2.0 * p["mount_radius"] * pixel_cm)
    gain = ctsim.noise_gain(proj, p["window"], p["blur_sigma"])
    photons = float(np.clip((gain / (pixel_cm * p["noise"] * matrix_mu)) ** 2 / central, 20.0, 1e9))
    p["photons"] = photons
    physics = replace(physics, photons=photons)
    gains = ctsim.detector_gains(rng, phantom.owner.shape[0], n_det, p["gain_error"], p["defect_share"])
    image = ctsim.project_volume(proj, phantom.channels, physics, gains, seed.spawn(1)[0], workers)
    image = ndimage.gaussian_filter1d(image, p["z_blur"], axis=0)
    return ctsim.edge_enhance(image, p["edge_enhancement"])


def synthesize(
    preset: str | SynthPreset,
    seed: int,
    *,
    stream: str = "feed",
    sample_id: str | None = None,
    touching_rate: float | None = None,
    workers: int | None = None,
) -> SyntheticScan:
    """Generate one synthetic micro-CT scan of particles in epoxy with exact ground truth.

    Parameters
    ----------
    preset : str or SynthPreset
        ``"tiny"``, ``"small"``, ``"typical"``, ``"hard"`` or a custom preset.
    seed : int
        Non-negative; the same seed gives the same arrays, whatever ``workers``.
    stream : str
        ``feed``, ``concentrate``, ``tailings`` or ``other``: sets the grade
        (share of particles carrying the valuable dense phase) and biases the
        size distribution (concentrates finer, tailings coarser).
    sample_id : str, optional
        Defaults to ``synth-<preset>-s<seed>-000``.
    touching_rate : float, optional
        Share of particles that touch another (0 to 0.5); drawn from the preset when None.
    workers : int, optional
        Processes for the projection model (default: all cores).
    """
    preset = _resolve_preset(preset)
    if stream not in STREAM_CYCLE:
        raise ValueError(f"stream must be one of {', '.join(STREAM_CYCLE)}, got {stream!r}")
    if touching_rate is not None and not 0.0 <= touching_rate <= 0.5:
        raise ValueError(f"touching_rate must be between 0 and 0.5, got {touching_rate}")
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    seed = int(seed)
    sample_id = sample_id or f"synth-{preset.name}-s{seed}-000"
    if not _SAMPLE_ID.match(sample_id) or set(sample_id) == {"."}:
        raise ValueError(f"sample_id {sample_id!r} may hold only letters, digits, '.', '_' and '-'")

    ss_params, ss_phantom, ss_physics, ss_export = np.random.SeedSequence(seed).spawn(4)
    rng = np.random.default_rng(ss_params)
    p = draw_parameters(preset, rng, stream, touching_rate)
    mineralogy = materials.draw_mineralogy(
        rng,
        stream,
        low_contrast_share=p["low_contrast_share"],
        heavy_accessory=p["heavy_accessory"],
        accessory_rate=p["accessory_rate"],
    )
    spec = materials.spectrum(p["spectrum_index"])
    names = [materials.MATRIX, "air", "sucrose", *mineralogy.materials]
    effective = materials.effective_mu(names, spec)
    if preset.physics == "image":
        rows = effective[:, None]
    else:
        bases, rows = materials.choose_bases(names, spec)
        p["bases"] = list(bases)
    table = {"matrix": rows[0], "air": rows[1], "sucrose": rows[2]} | dict(zip(mineralogy.materials, rows[3:]))

    m = _work_size(preset, p)
    phantom = build_phantom(_phantom_spec(preset, p, m), mineralogy, table, ss_phantom)
    image = _image(preset, p, phantom, spec, float(effective[0]), ss_physics, workers)

    n = preset.shape[1]
    crop = (slice(None), slice((m - n) // 2, (m - n) // 2 + n), slice((m - n) // 2, (m - n) // 2 + n))
    outside = ~ctsim.fov_mask(n, p["fov_radius"])
    owner = phantom.owner[crop].copy()
    cut_by_fov = np.unique(owner[:, outside])
    owner[:, outside] = 0
    labels, source = truth.split_pieces(np.maximum(owner, 0))
    phases = np.where(labels > 0, phantom.phase[crop], 0).astype(np.uint8)

    phase_mu = effective[3:]
    gangue = [i for i, ph in enumerate(mineralogy.phases) if ph.role in ("gangue", "low_contrast")]
    mapping = ctsim.draw_grey_mapping(
        np.random.default_rng(ss_export), float(effective[0]), float(phase_mu[gangue].max()), float(phase_mu.max())
    )
    p["grey_gain"], p["grey_offset"] = mapping.gain, mapping.offset
    grey = mapping.apply(image[crop])

    sample = _Sample(preset, seed, stream, sample_id, p, mineralogy, spec, effective)
    # Through JSON once, so the in-memory truth equals what _truth.json holds (lists, not tuples).
    record = json.loads(json.dumps(_truth(sample, phantom, owner, labels, source, phases, cut_by_fov)))
    metadata = ScanMetadata(
        sample_id=sample_id,
        spacing_mm=p["spacing_mm"],
        particle_size_mm=record["whole_particle_diameter"]["mean_mm"] or None,
        stream=Stream(stream),
        campaign=f"synthetic-{preset.name}",
        material=mineralogy.describe()[:256],
        phases=_phase_ranges(grey, phases, mineralogy) or None,
        notes=(
            f"Synthetic scan, not a measurement: ps3d_core.synth {GENERATOR_VERSION}, preset {preset.name}, "
            f"seed {seed}, stream {stream}, {preset.physics}-domain CT model. Ground truth: "
            f"{TRUTH_DIR}/{sample_id}_labels.tif, _phases.tif, _truth.json next to the scan directory."
        ),
    )
    return SyntheticScan(grey, labels, phases, metadata, record)


def _phase_ranges(
    grey: np.ndarray, phases: np.ndarray, mineralogy: materials.Mineralogy
) -> dict[str, tuple[float, float]]:
    """Named grey-value ranges an operator would threshold particles with.

    Minerals of one role (gangue, valuable, accessory, low-contrast) share a
    name, since grey value alone cannot tell them apart. The ranges partition
    the uint16 axis, split midway between consecutive role medians; roles
    whose medians lie closer than 1 % of the axis are merged
    (``gangue_valuable``), as no threshold could separate them.
    """
    medians: dict[str, list[float]] = {}
    for role in dict.fromkeys(phase.role for phase in mineralogy.phases):
        ids = [phase.id for phase in mineralogy.phases if phase.role == role]
        values = grey[np.isin(phases, ids)]
        if len(values):
            medians[role] = [float(np.median(values))]
    groups: list[tuple[str, float]] = []
    for role, (median,) in sorted(medians.items(), key=lambda item: item[1]):
        if groups and median - groups[-1][1] < 0.01 * 65535:
            groups[-1] = (f"{groups[-1][0]}_{role}", groups[-1][1])
        else:
            groups.append((role, median))
    cuts = [0.0, *((a[1] + b[1]) / 2 for a, b in zip(groups, groups[1:])), 65536.0]
    return {name: (cuts[i], cuts[i + 1]) for i, (name, _) in enumerate(groups)}


def _truth(
    sample: _Sample,
    phantom: Phantom,
    owner: np.ndarray,
    labels: np.ndarray,
    source: np.ndarray,
    phases: np.ndarray,
    cut_by_fov: np.ndarray,
) -> dict:
    """The ground-truth document (its keys are listed in the ``ps3d_core.synth`` docs).

    ``owner`` is the cropped phantom owner volume after the field-of-view cut,
    ``source[label]`` the particle each label piece came from, ``cut_by_fov``
    the owner values that had voxels outside the field of view.
    """
    preset, seed, stream, sample_id, p = sample.preset, sample.seed, sample.stream, sample.sample_id, sample.params
    mineralogy, spec, effective = sample.mineralogy, sample.spectrum, sample.effective_mu
    spacing = p["spacing_mm"]
    n_labels = int(labels.max())
    counts = np.bincount(labels.ravel(), minlength=n_labels + 1)
    n_phase = len(mineralogy.phases) + 1
    per_phase = np.bincount(
        labels.ravel().astype(np.int64) * n_phase + phases.ravel(), minlength=(n_labels + 1) * n_phase
    )
    per_phase = per_phase.reshape(n_labels + 1, n_phase)
    on_faces = set(truth.labels_on_faces(labels).tolist())
    by_fov = set(cut_by_fov[cut_by_fov > 0].tolist())
    touching = truth.neighbours(labels)
    pieces = np.bincount(source, minlength=len(phantom.particles) + 1)
    diameters = truth.equivalent_diameter(counts[1:])
    particles = []
    for label in range(1, n_labels + 1):
        rec = phantom.particles[source[label] - 1]
        particles.append(
            {
                "id": label,
                "source_particle": rec.index + 1,
                "voxel_count": int(counts[label]),
                "volume_voxels": int(counts[label]),
                "volume_mm3": float(counts[label] * spacing**3),
                "equivalent_diameter_voxels": float(diameters[label - 1]),
                "equivalent_diameter_mm": float(diameters[label - 1] * spacing),
                "whole_particle_diameter_voxels": rec.target_diameter,
                "shape_kind": rec.kind,
                "texture": rec.texture,
                "phase_voxels": {
                    ph.name: int(per_phase[label, ph.id]) for ph in mineralogy.phases if per_phase[label, ph.id]
                },
                "touches_border": label in on_faces,
                "cut_by_fov": int(source[label]) in by_fov,
                "truncated": bool(counts[label] < rec.voxels or pieces[source[label]] > 1),
                "touching": touching.get(label, []),
            }
        )
    visible = np.unique(owner[owner < 0])
    kinds = [phantom.distractors[-v - 1] for v in visible]
    placed_sources = np.unique(source[1:])
    whole = np.array([phantom.particles[s - 1].target_diameter for s in placed_sources])
    touching_count = len(touching)
    return {
        "generator": "ps3d_core.synth",
        "generator_version": GENERATOR_VERSION,
        "preset": preset.name,
        "preset_ranges": asdict(preset),
        "seed": seed,
        "sample_id": sample_id,
        "stream": stream,
        "shape_zyx": list(labels.shape),
        "spacing_mm": spacing,
        "particle_count": n_labels,
        "touching_count": touching_count,
        "touching_rate": touching_count / n_labels if n_labels else 0.0,
        "requested_touching_rate": p["touching_rate"],
        "piece_diameter": truth.diameter_stats(diameters, spacing),
        "whole_particle_diameter": truth.diameter_stats(whole, spacing),
        "particles_placed": len(phantom.particles),
        "phases": [
            {
                "id": ph.id,
                "name": ph.name,
                "material": ph.material,
                "role": ph.role,
                "mu_relative_to_epoxy": float(effective[3 + i] / effective[0]),
                "mu_per_cm": float(effective[3 + i]),
            }
            for i, ph in enumerate(mineralogy.phases)
        ],
        "mineralogy": {
            "system": mineralogy.system,
            "grade": mineralogy.grade,
            "liberation": mineralogy.liberation,
            "accessory_rate": mineralogy.accessory_rate,
            "low_contrast_share": mineralogy.low_contrast_share,
        },
        "distractors": {
            "placed": {k: phantom.distractors.count(k) for k in ("bubble", "sugar_grain", "sugar_void")},
            "in_image": {k: kinds.count(k) for k in ("bubble", "sugar_grain", "sugar_void")},
            "voxels_in_image": int((owner < 0).sum()),
            "mu_relative_to_epoxy": {
                "air": float(effective[1] / effective[0]),
                "sucrose": float(effective[2] / effective[0]),
            },
        },
        "spectrum": {
            "kvp": spec.kvp,
            "filter": spec.filter,
            "mean_energy_kev": float(spec.energies_kev @ spec.weights),
        },
        "matrix": {"material": materials.MATRIX, "mu_per_cm": float(effective[0])},
        "xray_tables": materials.load_tables().source,
        "parameters": p,
        "particles": particles,
    }


def write_synthetic_scan(scan: SyntheticScan, out_dir: Path) -> Path:
    """Write the scan directory and its ground truth; returns the scan directory.

    Layout::

        out_dir/<sample_id>/scan.tif          uint16 z-y-x, voxel size in the tags
        out_dir/<sample_id>/scan.json         ScanMetadata
        out_dir/<sample_id>/_SCAN_COMPLETE    written last
        out_dir/_truth/<sample_id>_labels.tif uint32 instances
        out_dir/_truth/<sample_id>_phases.tif uint8 phase ids
        out_dir/_truth/<sample_id>_truth.json

    The truth is written first, so a watcher that picks up the complete scan
    directory always finds its truth. Every file is written atomically.
    """
    out_dir = Path(out_dir)
    sample_id = scan.metadata.sample_id
    spacing = scan.metadata.spacing_zyx_mm
    truth_dir = out_dir / TRUTH_DIR
    write_tiff(truth_dir / f"{sample_id}_labels.tif", scan.labels, spacing)
    write_tiff(truth_dir / f"{sample_id}_phases.tif", scan.phases, spacing)
    _write_text(truth_dir / f"{sample_id}_truth.json", json.dumps(scan.truth, indent=1) + "\n")
    scan_dir = out_dir / sample_id
    write_tiff(scan_dir / "scan.tif", scan.image, spacing)
    _write_text(
        scan_dir / SCAN_JSON, json.dumps(scan.metadata.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
    )
    _write_text(scan_dir / SCAN_COMPLETE_MARKER, "")
    return scan_dir


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def synthesize_samples(
    out_dir: Path,
    preset: str,
    n_samples: int,
    seed: int,
    *,
    stream: str | None = None,
    touching_rate: float | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Generate and write ``n_samples`` scans; returns their scan directories.

    Sample ``i`` is ``synthesize(preset, s_i, sample_id=f"synth-{preset}-s{seed}-{i:03d}")``
    with ``s_i = SeedSequence([seed, i]).generate_state(1)[0]``, so any sample
    can be regenerated alone. With ``stream=None`` samples cycle through
    feed, concentrate, tailings and other. ``progress(done, total)`` is called
    after each sample.
    """
    name = _resolve_preset(preset).name
    paths = []
    for i in range(n_samples):
        sample_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        scan = synthesize(
            preset,
            sample_seed,
            stream=stream or STREAM_CYCLE[i % len(STREAM_CYCLE)],
            sample_id=f"synth-{name}-s{seed}-{i:03d}",
            touching_rate=touching_rate,
            workers=workers,
        )
        scan = replace(scan, truth=scan.truth | {"batch": {"seed": int(seed), "index": i}})
        paths.append(write_synthetic_scan(scan, out_dir))
        if progress is not None:
            progress(i + 1, n_samples)
    return paths
