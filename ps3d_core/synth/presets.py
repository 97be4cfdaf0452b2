"""Presets: the ranges every synthetic sample draws its own parameters from.

A preset is data, not code: each field is a (low, high) range (drawn
uniformly, or log-uniformly where noted) or a fixed choice. Breadth is the
point (SynthSeg): the network must not learn one scanner's look. Across the
presets the median particle diameter covers about 8 to 90 voxels, the span
of ParticleSeg3D's training data (55-721 um particles at 5-50 um voxels).
"""

from __future__ import annotations

from dataclasses import dataclass

Range = tuple[float, float]

#: Default shape mix: mostly crushed fragments and rounded grains.
_KINDS = (("blob", 0.25), ("angular", 0.4), ("flake", 0.1), ("needle", 0.05), ("agglomerate", 0.1), ("bitten", 0.1))
#: The hard mix: twice the flakes and needles, more non-convex grains.
_KINDS_HARD = (
    ("blob", 0.15),
    ("angular", 0.3),
    ("flake", 0.2),
    ("needle", 0.1),
    ("agglomerate", 0.13),
    ("bitten", 0.12),
)


@dataclass(frozen=True)
class SynthPreset:
    """Ranges of one preset. Voxel units unless the name says otherwise.

    Geometry and population
    -----------------------
    shape : (nz, ny, nx)
        Output volume; ny == nx.
    physics : "image" or "projection"
        The CT model (``ctsim.image_domain`` or ``ctsim.project_volume``).
    median_diameter : Range
        Median equivalent-sphere diameter of a sample, drawn log-uniformly.
    sigma_ln : Range
        Log-normal width of the diameters within a sample.
    solids_fraction : Range
        Particle volume per mount volume.
    touching_rate : Range
        Share of particles sharing a face with another (overridable per call).
    kind_weights : tuple of (kind, weight)
    fov_scale : Range
        Field-of-view radius / half the output width: < 1 shows the dark
        outside of the reconstruction circle, > 1 crops inside it (corners
        still dark below sqrt 2).
    mount_scale : Range
        Mount radius / FOV radius: < 1 shows the mount edge and air, > 1 is
        a truncated region-of-interest scan.
    spacer_fraction, spacer_void_share, spacer_size_ratio : Range
        Sugar spacer grains (volume fraction, share dissolved to voids,
        median size relative to particles).
    bubble_fraction, bubble_size_ratio : Range
    low_contrast_share : Range
        Share of particles of plastics/coal/graphite (0.8-1.8x epoxy).
    heavy_accessory_probability : float
        Chance that a sample has an extra very dense accessory phase.
    accessory_rate : Range
    spacing_mm : Range
        Voxel size, log-uniform, further limited so particles are 40-1000 um.

    Physics (both models)
    ---------------------
    kvp : Range
        Tube voltage; the nearest tabulated spectrum with a random filter is used.
    blur_sigma : Range
        In-plane PSF sigma (image model) or detector blur (projection model).
    noise : Range
        Noise standard deviation relative to the matrix attenuation.
    ring_strength : Range
        Image model: ring amplitude relative to the matrix.
    cupping : Range
        Image model: explicit radial cupping.
    streaks : Range
        Image model: beam-hardening strength on the densest ray.
    edge_enhancement : Range
        Phase-contrast fringe strength.

    Projection model only
    ---------------------
    angles_per_bin : Range
        Projections / detector bins (full sampling is about pi/2).
    path_scale : Range
        Path-length multiplier: the simulated volume stands for a crop of a
        larger mount, so beam hardening and starvation act as in a bigger sample.
    scatter : Range
    bh_correction : Range
        Vendor linearisation p + c p^2 / p_matrix: relative correction c on the
        longest ray through the matrix (dense grains are over-corrected).
    cor_shift : Range
        Centre-of-rotation error magnitude, detector bins.
    gain_error : Range
        Rms flat-field error of defective detector columns (rings).
    z_blur : Range
        PSF sigma across detector rows (slices).
    """

    name: str
    shape: tuple[int, int, int]
    physics: str
    median_diameter: Range
    sigma_ln: Range = (0.25, 0.5)
    solids_fraction: Range = (0.1, 0.25)
    touching_rate: Range = (0.02, 0.08)
    kind_weights: tuple[tuple[str, float], ...] = _KINDS
    fov_scale: Range = (0.85, 1.3)
    mount_scale: Range = (0.94, 1.3)
    spacer_fraction: Range = (0.0, 0.15)
    spacer_void_share: Range = (0.0, 0.5)
    spacer_size_ratio: Range = (0.8, 2.0)
    bubble_fraction: Range = (0.0, 0.02)
    bubble_size_ratio: Range = (0.2, 1.2)
    low_contrast_share: Range = (0.0, 0.1)
    heavy_accessory_probability: float = 0.3
    accessory_rate: Range = (0.05, 0.3)
    spacing_mm: Range = (0.005, 0.05)
    kvp: Range = (50.0, 180.0)
    blur_sigma: Range = (0.4, 1.1)
    noise: Range = (0.03, 0.2)
    ring_strength: Range = (0.0, 0.15)
    cupping: Range = (0.0, 0.12)
    streaks: Range = (0.0, 0.15)
    edge_enhancement: Range = (0.0, 0.3)
    angles_per_bin: Range = (0.9, 1.3)
    path_scale: Range = (1.0, 5.0)
    scatter: Range = (0.0, 0.04)
    bh_correction: Range = (0.0, 0.15)
    cor_shift: Range = (0.0, 0.6)
    gain_error: Range = (0.0, 0.005)
    z_blur: Range = (0.3, 0.8)

    def __post_init__(self) -> None:
        if self.physics not in ("image", "projection"):
            raise ValueError(f"physics must be 'image' or 'projection', got {self.physics!r}")
        if self.shape[1] != self.shape[2]:
            raise ValueError(f"slices must be square, got shape {self.shape}")


PRESETS: dict[str, SynthPreset] = {
    "tiny": SynthPreset(name="tiny", shape=(96, 96, 96), physics="image", median_diameter=(8.0, 24.0)),
    "small": SynthPreset(name="small", shape=(160, 160, 160), physics="image", median_diameter=(8.0, 40.0)),
    "typical": SynthPreset(
        name="typical",
        shape=(256, 256, 256),
        physics="projection",
        median_diameter=(10.0, 64.0),
        # The projection model simulates the whole mount: keep the work grid
        # at most ~1.2x the output width.
        fov_scale=(0.85, 1.12),
        mount_scale=(0.94, 1.1),
    ),
    "hard": SynthPreset(
        name="hard",
        shape=(256, 256, 256),
        physics="projection",
        median_diameter=(8.0, 90.0),
        sigma_ln=(0.35, 0.6),
        solids_fraction=(0.15, 0.3),
        touching_rate=(0.08, 0.2),
        kind_weights=_KINDS_HARD,
        fov_scale=(0.85, 1.12),
        mount_scale=(0.94, 1.1),
        spacer_fraction=(0.05, 0.2),
        spacer_void_share=(0.0, 0.7),
        bubble_fraction=(0.005, 0.03),
        low_contrast_share=(0.1, 0.35),
        heavy_accessory_probability=0.8,
        accessory_rate=(0.15, 0.5),
        noise=(0.08, 0.35),
        ring_strength=(0.02, 0.3),
        edge_enhancement=(0.0, 0.5),
        angles_per_bin=(0.6, 1.0),
        path_scale=(3.0, 10.0),
        scatter=(0.01, 0.08),
        bh_correction=(0.0, 0.3),
        cor_shift=(0.2, 1.5),
        gain_error=(0.002, 0.015),
        z_blur=(0.4, 1.0),
    ),
}
