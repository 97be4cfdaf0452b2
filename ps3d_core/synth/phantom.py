"""The voxel phantom: particles, their phases and the distractors in an epoxy mount.

Particles are placed largest first by random sequential addition. A new
particle either lands at a random free spot that keeps at least one voxel of
epoxy to every other particle, or (to reach the requested touching rate) is
slid along a random direction towards an existing particle until it is one
step short of overlapping, which leaves it sharing voxel faces with that
particle. A running deficit decides which of the two each particle gets, so
the share of touching particles tracks the request without a separate
calibration run (see ``build_phantom``). Distractors (air bubbles, sugar
spacer grains or the voids they leave) are placed afterwards and may touch
particles: they are background in the ground truth.

Every object is rendered once in its own box (``shapes.render``); its
partial-volume occupancy is deposited into per-voxel *channels*: attenuation
basis coefficients for the projection model, or one effective attenuation for
the image-domain model. Units are voxels; the grid is (z, y, x) with the
rotation axis along z through the centre of the y-x plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from ps3d_core.synth.ctsim import axis_distance
from ps3d_core.synth.materials import Mineralogy
from ps3d_core.synth.shapes import ParticleShape, RenderedParticle, ShapeParams, draw_shape, render

_FACE = ndimage.generate_binary_structure(3, 1)
#: Random spots tried per particle, directions tried per touching placement.
_TRIES, _TOUCH_TRIES = 40, 10
#: Sub-particle textures of inclusion phases (see particle_phases).
TEXTURES = ("blobs", "disseminated", "veins", "rim")


@dataclass(frozen=True)
class PhantomSpec:
    """Geometry and population of one phantom (drawn per sample from a preset).

    Attributes
    ----------
    shape : (int, int, int)
        Work grid (nz, m, m), voxels; the y-x plane is square.
    mount_radius : float
        Radius of the epoxy cylinder about the grid axis, voxels; air outside.
    median_diameter, sigma_ln : float
        Log-normal equivalent-sphere diameter of the particles (voxels; sigma of ln D).
    solids_fraction : float
        Particle volume / mount volume to aim for.
    kind_weights : tuple of (kind, weight)
        Shape-kind mix (see ``shapes.KINDS``).
    touching_rate : float
        Share of particles that should share a face with another particle.
    spacer_fraction, spacer_void_share, spacer_size_ratio : float
        Sugar grains: volume fraction, share that left air voids instead of
        sucrose, and their median diameter relative to the particles'.
    bubble_fraction, bubble_size_ratio : float
        Air bubbles: volume fraction and median diameter relative to particles.
    inclusion_scale : (float, float)
        Correlation length of inclusion textures as a fraction of particle diameter.
    shape_params : ShapeParams
    max_objects : int
        Cap on particles (and separately on distractors), for run time.
    """

    shape: tuple[int, int, int]
    mount_radius: float
    median_diameter: float
    sigma_ln: float
    solids_fraction: float
    kind_weights: tuple[tuple[str, float], ...]
    touching_rate: float
    spacer_fraction: float
    spacer_void_share: float
    spacer_size_ratio: float
    bubble_fraction: float
    bubble_size_ratio: float
    inclusion_scale: tuple[float, float] = (0.05, 0.2)
    shape_params: ShapeParams = ShapeParams()
    max_objects: int = 20000


@dataclass
class ParticleRecord:
    """What the phantom knows about a placed particle.

    ``centre`` is in work-grid voxel coordinates, ``reach`` the largest half
    extent of its box (voxels), ``voxels`` the size of the whole particle
    (including any part beyond the grid), ``texture`` that of its valuable phase.
    """

    index: int
    kind: str
    target_diameter: float
    centre: tuple[float, float, float]
    reach: float
    voxels: int
    texture: str


@dataclass
class Phantom:
    """The rendered phantom.

    Attributes
    ----------
    owner : ndarray, shape (nz, m, m), int32
        ``k > 0``: particle ``k`` (record ``k - 1``); ``-j < 0``: distractor j; 0: matrix or air.
    phase : ndarray, shape (nz, m, m), uint8
        Mineral phase id on particle voxels, 0 elsewhere.
    channels : ndarray, shape (C, nz, m, m), float32
        Per-voxel attenuation channels with partial volume mixed in.
    particles : list of ParticleRecord
    distractors : list of str
        Kind of distractor j (owner value -j) at index j - 1: ``"bubble"``,
        ``"sugar_grain"`` or ``"sugar_void"``.
    spec : PhantomSpec
    """

    owner: np.ndarray
    phase: np.ndarray
    channels: np.ndarray
    particles: list[ParticleRecord]
    distractors: list[str]
    spec: PhantomSpec


def mount_fraction(m: int, radius: float) -> np.ndarray:
    """Partial-volume fraction of a cylinder of ``radius`` voxels in an m x m plane, float32."""
    return np.clip(radius + 0.5 - axis_distance(m), 0.0, 1.0)


def gaussian_random_field(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """White noise smoothed by a Gaussian of ``sigma`` voxels (FFT, so cost does not grow with sigma)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    spectrum = fft.rfftn(noise)
    for axis, n in enumerate(shape):
        f = fft.rfftfreq(n) if axis == len(shape) - 1 else fft.fftfreq(n)
        gain = np.exp(-2.0 * (np.pi * sigma * f) ** 2).astype(np.float32)
        spectrum *= gain.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return fft.irfftn(spectrum, shape)


def _region(field_: np.ndarray, inside: np.ndarray, fraction: float, texture: str, sdf: np.ndarray) -> np.ndarray:
    """Voxels of an inclusion phase covering about ``fraction`` of the particle."""
    if texture == "rim":
        depth = np.quantile(-sdf[inside], fraction)
        return sdf > -depth
    values = np.abs(field_) if texture == "veins" else -field_
    return values < np.quantile(values[inside], fraction)


def particle_phases(
    rendered: RenderedParticle,
    diameter: float,
    mineralogy: Mineralogy,
    rng: np.random.Generator,
    inclusion_scale: tuple[float, float],
) -> tuple[np.ndarray, str]:
    """Phase ids over a particle's box (defined beyond the mask so partial-volume voxels get one).

    The body is a gangue mineral (or a low-contrast material); a ``grade``
    share of particles carries the valuable phase, either throughout
    (liberated) or as inclusions; some carry accessory inclusions. Inclusions
    are thresholded Gaussian random fields (blobs, fine disseminated grains,
    veins) or a rim of given depth (alteration, coating).

    Returns
    -------
    phases : ndarray, shape of the box, uint8
    texture : str
        ``"none"``, ``"liberated"`` or the texture of the valuable inclusions.
    """
    inside = rendered.mask
    if len(mineralogy.low_contrast_ids) and rng.random() < mineralogy.low_contrast_share:
        return np.full(inside.shape, rng.choice(mineralogy.low_contrast_ids), np.uint8), "none"
    out = np.full(inside.shape, rng.choice(mineralogy.host_ids, p=mineralogy.host_weights), np.uint8)
    texture = "none"
    carriers = []
    if rng.random() < mineralogy.grade:
        valuable = rng.choice(mineralogy.valuable_ids, p=mineralogy.valuable_weights)
        if rng.random() < mineralogy.liberation:
            out[:] = valuable
            texture = "liberated"
        else:
            texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
            carriers.append((valuable, rng.uniform(0.05, 0.5), texture))
    if len(mineralogy.accessory_ids) and rng.random() < mineralogy.accessory_rate:
        accessory = rng.choice(mineralogy.accessory_ids, p=mineralogy.accessory_weights)
        carriers.append((accessory, rng.uniform(0.01, 0.08), "disseminated" if rng.random() < 0.6 else "blobs"))
    for phase_id, fraction, kind in carriers:
        scale = 0.03 if kind == "disseminated" else rng.uniform(*inclusion_scale)
        grf = gaussian_random_field(inside.shape, max(0.8, scale * diameter), rng)
        out[_region(grf, inside, fraction, kind, rendered.sdf)] = phase_id
    return out, texture


class _Builder:
    """Mutable state of one phantom while objects are placed."""

    def __init__(self, spec: PhantomSpec, matrix: np.ndarray):
        nz, m, _ = spec.shape
        self.spec = spec
        self.matrix = matrix.astype(np.float32)
        self.owner = np.zeros(spec.shape, np.int32)
        self.phase = np.zeros(spec.shape, np.uint8)
        self.occupied = np.zeros(spec.shape, np.float32)
        frac = mount_fraction(m, spec.mount_radius)
        self.channels = np.empty((len(matrix),) + spec.shape, np.float32)
        for c, value in enumerate(self.matrix):
            self.channels[c] = frac[None] * value
        self.axis = (m - 1) / 2.0
        self.touching: set[int] = set()

    def clip(self, origin: np.ndarray, box: tuple[int, int, int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """Grid and box slices of a box placed at ``origin`` (None when fully outside)."""
        grid, local = [], []
        for o, b, n in zip(origin, box, self.spec.shape):
            lo, hi = max(o, 0), min(o + b, n)
            if lo >= hi:
                return None
            grid.append(slice(lo, hi))
            local.append(slice(lo - o, hi - o))
        return tuple(grid), tuple(local)

    def allowed(self, centre: np.ndarray, half: np.ndarray) -> bool:
        """Inside the mount radially; may stick out of the grid along z (cut by the border)."""
        nz = self.spec.shape[0]
        radial = np.hypot(centre[1] - self.axis, centre[2] - self.axis) + max(half[1], half[2])
        return radial <= self.spec.mount_radius - 0.5 and -0.6 * half[0] <= centre[0] <= nz - 1 + 0.6 * half[0]

    def probe(self, rendered: RenderedParticle, halo: np.ndarray, origin: np.ndarray) -> np.ndarray | None:
        """Particle ids sharing a face with the object at ``origin``; None if it overlaps anything."""
        clipped = self.clip(origin, rendered.mask.shape)
        if clipped is None:
            return None
        grid, local = clipped
        owner = self.owner[grid]
        mask = rendered.mask[local]
        if owner[mask].any():
            return None
        if mask.shape != rendered.mask.shape:
            # A halo voxel just inside the border can belong to a mask voxel
            # outside the grid: a contact that the volume does not hold.
            halo = ndimage.binary_dilation(mask, _FACE)
        else:
            halo = halo[local]
        near = owner[halo]
        return np.unique(near[near > 0])

    def random_centre(self, rng: np.random.Generator, half: np.ndarray) -> np.ndarray:
        """A uniformly random centre (z, y, x) where an object of half extents ``half`` is :meth:`allowed`."""
        nz = self.spec.shape[0]
        reach = max(self.spec.mount_radius - 0.5 - max(half[1], half[2]), 0.0)
        rho, angle = reach * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        z = rng.uniform(-0.6 * half[0], nz - 1 + 0.6 * half[0])
        return np.array([z, self.axis + rho * np.sin(angle), self.axis + rho * np.cos(angle)])

    def place_apart(
        self, rendered: RenderedParticle, halo: np.ndarray, half: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray | None:
        """A random spot with no overlap and no face contact with any particle."""
        for _ in range(_TRIES):
            origin = np.floor(self.random_centre(rng, half) - rendered.centre_in_box).astype(int)
            contacts = self.probe(rendered, halo, origin)
            if contacts is not None and len(contacts) == 0:
                return origin
        return None

    def place_touching(
        self,
        rendered: RenderedParticle,
        halo: np.ndarray,
        half: np.ndarray,
        rng: np.random.Generator,
        records: list[ParticleRecord],
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Slide towards a placed particle until one step short of overlap; returns origin and contacts."""
        lonely = [r.index for r in records if r.index + 1 not in self.touching]
        for _ in range(_TOUCH_TRIES):
            pool = lonely if lonely and rng.random() < 0.8 else [r.index for r in records]
            partner = records[pool[int(rng.integers(len(pool)))]]
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            step = direction / np.abs(direction).max()  # at most one voxel per axis per step
            start = np.asarray(partner.centre) + direction * (half.max() + partner.reach + 2.0)
            last = None
            for k in range(int(np.ceil(np.linalg.norm(start - partner.centre) / np.linalg.norm(step))) + 1):
                centre = start - k * step
                if not self.allowed(centre, half):
                    if last is not None:
                        break
                    continue
                origin = np.floor(centre - rendered.centre_in_box).astype(int)
                contacts = self.probe(rendered, halo, origin)
                if contacts is None:
                    break
                last = (origin, contacts)
            if last is not None and partner.index + 1 in last[1]:
                return last
        return None

    def deposit(
        self,
        rendered: RenderedParticle,
        origin: np.ndarray,
        values: np.ndarray,
        label: int,
        phases: np.ndarray | None = None,
    ) -> None:
        """Write the object's label and partial-volume attenuation.

        ``values`` is (C,) for a uniform object or (C, *box) per voxel.
        """
        grid, local = self.clip(origin, rendered.mask.shape)
        mask = rendered.mask[local]
        self.owner[grid][mask] = label
        if phases is not None:
            self.phase[grid][mask] = phases[local][mask]
        free = 1.0 - self.occupied[grid]
        added = np.minimum(rendered.occupancy[local], np.maximum(free, 0.0))
        self.occupied[grid] += added
        for c in range(len(self.matrix)):
            value = values[c][local] if values.ndim > 1 else values[c]
            self.channels[c][grid] += added * (value - self.matrix[c])


def _diameters(
    rng: np.random.Generator, median: float, sigma: float, volume: float, lo: float, hi: float, cap: int
) -> np.ndarray:
    """Log-normal equivalent diameters (voxels) until their spheres fill ``volume``, largest first."""
    out, total = [], 0.0
    while total < volume and len(out) < cap:
        d = float(np.clip(median * np.exp(sigma * rng.normal()), lo, hi))
        out.append(d)
        total += np.pi / 6.0 * d**3
    return np.sort(np.asarray(out))[::-1]


def build_phantom(
    spec: PhantomSpec,
    mineralogy: Mineralogy,
    channel_table: dict[str, np.ndarray],
    seed: np.random.SeedSequence,
) -> Phantom:
    """Render particles and distractors into the work grid.

    Parameters
    ----------
    spec : PhantomSpec
    mineralogy : Mineralogy
        Phase table and per-particle phase odds.
    channel_table : dict
        Attenuation channels (C,) of ``"matrix"``, ``"air"``, ``"sucrose"`` and
        of every phase material name.
    seed : SeedSequence
        Each object draws from its own child, so the phantom does not depend
        on how many tries an earlier object needed.
    """
    nz, m, _ = spec.shape
    builder = _Builder(spec, channel_table["matrix"])
    rng = np.random.default_rng(seed.spawn(1)[0])
    mount_volume = np.pi * spec.mount_radius**2 * nz
    largest = 0.8 * min(nz, 2 * spec.mount_radius)
    diameters = _diameters(
        rng, spec.median_diameter, spec.sigma_ln, spec.solids_fraction * mount_volume, 3.0, largest, spec.max_objects
    )
    # A touch adds about two touching particles: touching when the deficit
    # passes a threshold drawn from [0, 2) makes the expected count right even
    # for samples of a dozen particles (a fixed threshold of 1 rounds them down).
    threshold = rng.uniform(0.0, 2.0)
    kinds, weights = zip(*spec.kind_weights)
    weights = np.asarray(weights, float) / sum(weights)
    phase_values = np.stack([channel_table[p.material] for p in mineralogy.phases])  # (K, C)
    lookup = np.concatenate([channel_table["matrix"][None], phase_values]).T  # (C, K + 1)

    records: list[ParticleRecord] = []
    for diameter, child in zip(diameters, seed.spawn(len(diameters))):
        prng = np.random.default_rng(child)
        kind = kinds[int(prng.choice(len(kinds), p=weights))]
        shape = draw_shape(prng, kind, diameter, spec.shape_params)
        rendered = render(shape, prng.random(3))
        halo = ndimage.binary_dilation(rendered.mask, _FACE)
        phases, texture = particle_phases(rendered, diameter, mineralogy, prng, spec.inclusion_scale)
        half = shape.half_extent
        deficit = spec.touching_rate * (len(records) + 1) - len(builder.touching)
        touch = bool(records) and deficit >= threshold
        placed = builder.place_touching(rendered, halo, half, prng, records) if touch else None
        if placed is None:
            origin = builder.place_apart(rendered, halo, half, prng)
            contacts = np.empty(0, int)
        else:
            origin, contacts = placed
        if origin is None:
            continue
        label = len(records) + 1
        builder.deposit(rendered, origin, lookup[:, phases], label, phases)
        if len(contacts):
            builder.touching.update(int(c) for c in contacts)
            builder.touching.add(label)
        records.append(
            ParticleRecord(
                index=label - 1,
                kind=shape.kind,
                target_diameter=float(diameter),
                centre=tuple(map(float, origin + rendered.centre_in_box)),
                reach=float(half.max()),
                voxels=int(rendered.mask.sum()),
                texture=texture,
            )
        )

    distractors = _place_distractors(builder, spec, channel_table, seed.spawn(1)[0], mount_volume, largest)
    return Phantom(builder.owner, builder.phase, builder.channels, records, distractors, spec)


def _place_distractors(
    builder: _Builder,
    spec: PhantomSpec,
    table: dict[str, np.ndarray],
    seed: np.random.SeedSequence,
    mount_volume: float,
    largest: float,
) -> list[str]:
    """Air bubbles and sugar spacer grains (or the voids they left); they may touch particles."""
    rng = np.random.default_rng(seed)
    groups = [
        ("bubble", spec.bubble_fraction, spec.bubble_size_ratio, 0.5),
        ("crystal", spec.spacer_fraction, spec.spacer_size_ratio, 0.3),
    ]
    kinds: list[str] = []
    for kind, fraction, ratio, sigma in groups:
        diameters = _diameters(
            rng, spec.median_diameter * ratio, sigma, fraction * mount_volume, 2.5, largest, spec.max_objects
        )
        for diameter, child in zip(diameters, seed.spawn(len(diameters))):
            prng = np.random.default_rng(child)
            shape: ParticleShape = draw_shape(prng, kind, diameter, spec.shape_params)
            rendered = render(shape, prng.random(3))
            half = shape.half_extent
            void = kind == "bubble" or prng.random() < spec.spacer_void_share
            for _ in range(_TRIES):
                origin = np.floor(builder.random_centre(prng, half) - rendered.centre_in_box).astype(int)
                if builder.probe(rendered, rendered.mask, origin) is not None:
                    kinds.append("bubble" if kind == "bubble" else "sugar_void" if void else "sugar_grain")
                    builder.deposit(rendered, origin, table["air" if void else "sucrose"], -len(kinds))
                    break
    return kinds
