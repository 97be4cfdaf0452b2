"""Particle shapes as star-shaped signed-distance functions, rendered in their own box.

Every shape (blobs, crushed fragments, flakes, needles, agglomerates, bitten
grains) is a *radial map* r(theta, phi) on a fixed direction grid, then
stretched by a per-axis scale and rotated. Plane cuts, lobes and bites are all
baked into the radial map, so one evaluation path renders every kind and the
exact volume of the rendered shape is a cheap integral over the grid (used to
hit the requested equivalent-sphere diameter without rendering twice).

Units: voxels throughout. Coordinates are (z, y, x) offsets from the particle
centre; the body frame is whatever the random rotation makes of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import ndimage, special

#: Direction grid: theta includes both poles so the map is single-valued there
#: (every Y_lm with m != 0 vanishes at the poles), phi wraps.
N_THETA, N_PHI = 64, 128
#: Shape kinds, in the order the presets weight them.
KINDS = ("blob", "angular", "flake", "needle", "agglomerate", "bitten")

# Gradient normalisation turns the radial level set into a signed distance; the
# clamp keeps PV sane at kinks (central differences across a ridge) and allows
# the 10x compression of the thinnest flakes.
_GRAD_RANGE = (0.2, 12.0)


@cache
def direction_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polar/azimuth angles and unit vectors of the radial-map grid.

    Returns
    -------
    theta : ndarray, shape (N_THETA,), float64, radians in [0, pi]
    phi : ndarray, shape (N_PHI,), float64, radians in [0, 2 pi)
    dirs : ndarray, shape (N_THETA, N_PHI, 3), float64
        Unit vectors (body axes 0, 1, 2; axis 2 is the polar axis).
    """
    theta = np.linspace(0.0, np.pi, N_THETA)
    phi = np.arange(N_PHI) * (2.0 * np.pi / N_PHI)
    st, ct = np.sin(theta)[:, None], np.cos(theta)[:, None]
    dirs = np.stack(np.broadcast_arrays(st * np.cos(phi), st * np.sin(phi), ct), axis=-1)
    return theta, phi, dirs


@cache
def sh_basis(lmax: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Real spherical harmonics on the direction grid, computed once per process.

    Returns
    -------
    basis : ndarray, shape (K, N_THETA * N_PHI), float64, C-contiguous
        Y_lm for l = 1..lmax (l = 0 is the mean radius, handled separately),
        flattened so that a particle's field is one matrix-vector product.
    degree : ndarray, shape (K,), int
        l of each basis function (for the l^-beta power law).
    """
    theta, phi = direction_grid()[:2]
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    rows, degree = [], []
    for ell in range(1, lmax + 1):
        for m in range(-ell, ell + 1):
            y = special.sph_harm_y(ell, abs(m), th, ph)
            rows.append(y.real if m == 0 else np.sqrt(2.0) * (y.imag if m < 0 else y.real))
            degree.append(ell)
    return np.ascontiguousarray(np.stack(rows).reshape(len(rows), -1)), np.asarray(degree)


def _solid_angle_weights() -> np.ndarray:
    """dOmega of each grid node (trapezoid in theta), shape (N_THETA, 1)."""
    theta = direction_grid()[0]
    w = np.sin(theta) * (np.pi / (N_THETA - 1))
    w[[0, -1]] = 0.0
    return (w * (2.0 * np.pi / N_PHI))[:, None]


def radial_volume(radial: np.ndarray) -> float:
    """Volume enclosed by a radial map: (1/3) integral of r^3 dOmega (body units)."""
    return float((radial**3 * _solid_angle_weights()).sum() / 3.0)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation matrix (3, 3) from a random unit quaternion."""
    w, x, y, z = rng.normal(size=4)
    n = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def random_unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """n isotropic unit vectors, shape (n, 3)."""
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def gaussian_random_sphere(rng: np.random.Generator, sigma_log: float, beta: float, lmax: int = 10) -> np.ndarray:
    """Radial map exp(sigma * field) of a Gaussian random sphere, mean radius about 1.

    Parameters
    ----------
    sigma_log : float
        Standard deviation of log-radius over the sphere (0 gives a sphere).
    beta : float
        Power-law decay of the angular spectrum, amplitude ~ l**-beta; larger
        values give smoother, rounder grains.

    Returns
    -------
    ndarray, shape (N_THETA, N_PHI), float64
    """
    basis, degree = sh_basis(lmax)
    # einsum, not @: BLAS threads gain nothing on this size and stall when the cores are busy.
    field = np.einsum("k,kn->n", rng.normal(size=len(degree)) * degree.astype(float) ** -beta, basis).reshape(
        N_THETA, N_PHI
    )
    field /= max(field.std(), 1e-12)
    return np.exp(sigma_log * field)


def _ray_sphere(dirs: np.ndarray, centre: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit distances of rays from the origin through a sphere (nan when missed)."""
    b = dirs[..., 0] * centre[0] + dirs[..., 1] * centre[1] + dirs[..., 2] * centre[2]
    disc = b * b - centre @ centre + radius * radius
    root = np.sqrt(np.where(disc >= 0, disc, np.nan))
    return b - root, b + root


def cut_by_planes(
    radial: np.ndarray, rng: np.random.Generator, n_planes: int, depth: tuple[float, float]
) -> np.ndarray:
    """Intersect a star shape with random half-spaces n.x <= h * mean radius (crushed faces)."""
    dirs = direction_grid()[2]
    normals = random_unit_vectors(rng, n_planes)
    heights = rng.uniform(*depth, size=n_planes) * float(np.median(radial))
    cos = dirs[..., 0:1] * normals[:, 0] + dirs[..., 1:2] * normals[:, 1] + dirs[..., 2:3] * normals[:, 2]
    with np.errstate(divide="ignore"):
        limits = np.where(cos > 1e-9, heights / cos, np.inf)
    return np.minimum(radial, limits.min(axis=-1))


def agglomerate(rng: np.random.Generator, n_lobes: int) -> np.ndarray:
    """Union of overlapping spheres that all contain the origin: star-shaped, non-convex."""
    dirs = direction_grid()[2]
    radial = np.zeros(dirs.shape[:2])
    for direction in random_unit_vectors(rng, n_lobes):
        radius = rng.uniform(0.5, 0.8)
        centre = direction * radius * rng.uniform(0.45, 0.9)
        radial = np.maximum(radial, _ray_sphere(dirs, centre, radius)[1])
    return radial


def bite(radial: np.ndarray, rng: np.random.Generator, n_bites: int) -> np.ndarray:
    """Remove spheres centred just outside the surface (concave notches)."""
    dirs = direction_grid()[2]
    out = radial.copy()
    for direction in random_unit_vectors(rng, n_bites):
        i = int(round(np.arccos(np.clip(direction[2], -1, 1)) / np.pi * (N_THETA - 1)))
        j = int(round((np.arctan2(direction[1], direction[0]) % (2 * np.pi)) / (2 * np.pi) * N_PHI)) % N_PHI
        surface = radial[i, j]
        centre = direction * surface * rng.uniform(1.0, 1.25)
        entry, _ = _ray_sphere(dirs, centre, surface * rng.uniform(0.35, 0.6))
        hit = np.isfinite(entry) & (entry > 0)
        out = np.where(hit, np.minimum(out, entry), out)
    return np.maximum(out, 0.05 * float(radial.mean()))


@dataclass(frozen=True)
class ParticleShape:
    """A star-shaped body: radial map (voxels along body axes), scale and rotation.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS` (or ``"sphere"``/``"bubble"``/``"crystal"`` for helpers).
    radial : ndarray, shape (N_THETA, N_PHI), float64
        Radius in body units (voxels before scaling) per grid direction.
    scale : ndarray, shape (3,)
        Stretch of body axes 0, 1, 2 (1 = unchanged); flakes and needles < 1.
    rotation : ndarray, shape (3, 3)
        Columns are the body axes in (z, y, x) voxel coordinates.
    """

    kind: str
    radial: np.ndarray
    scale: np.ndarray
    rotation: np.ndarray

    @property
    def volume(self) -> float:
        """Exact volume of the continuous shape in voxels^3."""
        return radial_volume(self.radial) * float(np.prod(self.scale))

    @property
    def equivalent_diameter(self) -> float:
        """Diameter of the sphere of equal volume, voxels."""
        return float((6.0 * self.volume / np.pi) ** (1.0 / 3.0))

    @property
    def half_extent(self) -> np.ndarray:
        """Half side lengths (z, y, x) of an axis-aligned box holding the shape, voxels."""
        axes = self.rotation * self.scale[None, :]
        return float(self.radial.max()) * np.sqrt((axes**2).sum(axis=1))

    @property
    def bounding_radius(self) -> float:
        """Radius of a sphere about the centre holding the shape, voxels."""
        return float(self.radial.max() * self.scale.max())

    def level(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Radial level set |q| - r(q/|q|): negative inside, zero on the surface.

        Parameters
        ----------
        z, y, x : ndarray, broadcastable
            Voxel offsets from the particle centre (e.g. open-grid axes).

        Returns
        -------
        ndarray, broadcast shape, float32, body units (about voxels).
        """
        # Body coordinates q_j = sum_i p_i R_ij / s_j, by broadcasting rather
        # than a (N, 3) @ (3, 3) product that would materialise the grid.
        to_body = self.rotation / self.scale[None, :]
        q0, q1, q2 = (z * to_body[0, j] + y * to_body[1, j] + x * to_body[2, j] for j in range(3))
        norm = np.sqrt(q0 * q0 + q1 * q1 + q2 * q2)
        theta_index = np.arccos(np.clip(q2 / np.maximum(norm, 1e-9), -1.0, 1.0)) * ((N_THETA - 1) / np.pi)
        phi_index = (np.arctan2(q1, q0) % (2.0 * np.pi)) * (N_PHI / (2.0 * np.pi))
        wrapped = np.concatenate([self.radial, self.radial[:, :1]], axis=1)
        r = ndimage.map_coordinates(wrapped, [theta_index.ravel(), phi_index.ravel()], order=1, mode="nearest")
        return (norm - r.reshape(norm.shape)).astype(np.float32)

    def scaled_to(self, diameter: float) -> ParticleShape:
        """The same shape resized to an equivalent-sphere diameter (voxels)."""
        factor = diameter / self.equivalent_diameter
        return ParticleShape(self.kind, self.radial * factor, self.scale, self.rotation)


@dataclass(frozen=True)
class RenderedParticle:
    """A shape rasterised in its own box.

    Attributes
    ----------
    sdf : ndarray, shape (bz, by, bx), float32
        Approximate signed distance to the surface, voxels (negative inside).
    occupancy : ndarray, shape (bz, by, bx), float32
        Partial-volume fraction ``clip(0.5 - sdf, 0, 1)``.
    mask : ndarray, shape (bz, by, bx), bool
        Voxels labelled as the particle (``sdf < 0``), one 6-connected piece.
    centre_in_box : ndarray, shape (3,)
        Position of the shape centre in box index coordinates (fractional).
    """

    sdf: np.ndarray
    occupancy: np.ndarray
    mask: np.ndarray
    centre_in_box: np.ndarray


def render(shape: ParticleShape, subvoxel: np.ndarray) -> RenderedParticle:
    """Rasterise a shape whose centre sits ``subvoxel`` (each in [0, 1)) past a voxel centre.

    The level set is evaluated on the whole box and turned into a signed
    distance by dividing by its numerical gradient magnitude, which makes the
    partial-volume band one voxel wide whatever the stretch of flakes and
    needles. Only the largest 6-connected piece of the mask is kept (thin
    necks can leave specks), and the specks' occupancy is removed with it.
    """
    half = np.ceil(shape.half_extent + 2.0).astype(int)
    axes = [np.arange(-h, h + 2, dtype=np.float32) - np.float32(s) for h, s in zip(half, subvoxel)]
    level = shape.level(*np.ix_(*axes))
    gradient = np.sqrt(sum(g * g for g in np.gradient(level)))
    sdf = level / np.clip(gradient, *_GRAD_RANGE)
    mask = sdf < 0
    labelled, n = ndimage.label(mask)
    if n > 1:
        keep = labelled == (np.argmax(np.bincount(labelled.ravel())[1:]) + 1)
        sdf = np.where(mask & ~keep, np.float32(0.5), sdf)
        mask = keep
    occupancy = np.clip(np.float32(0.5) - sdf, 0.0, 1.0)
    return RenderedParticle(sdf, occupancy, mask, half.astype(float) + subvoxel)


def sphere(radius: float) -> ParticleShape:
    """An exact sphere of the given radius (voxels); the partial-volume reference."""
    return ParticleShape("sphere", np.full((N_THETA, N_PHI), float(radius)), np.ones(3), np.eye(3))


@dataclass(frozen=True)
class ShapeParams:
    """Per-sample ranges that shape a particle population (drawn from a preset)."""

    sigma_log: tuple[float, float] = (0.08, 0.25)
    beta: tuple[float, float] = (2.0, 3.2)
    elongation: tuple[float, float] = (0.65, 1.0)
    planes: tuple[int, int] = (4, 10)
    plane_depth: tuple[float, float] = (0.55, 0.9)
    flake_thickness: tuple[float, float] = (0.1, 0.3)
    needle_width: tuple[float, float] = (0.1, 0.3)


def draw_shape(
    rng: np.random.Generator, kind: str, diameter: float, params: ShapeParams = ShapeParams()
) -> ParticleShape:
    """A random shape of the given kind and equivalent-sphere diameter (voxels).

    Kinds: ``blob`` (Gaussian random sphere), ``angular`` (blob cut by random
    planes, the crushed look), ``flake`` (1 : 0.6-1 : 0.1-0.3), ``needle``
    (1 : 0.1-0.3 : 0.1-0.3), ``agglomerate`` (2-4 fused lobes), ``bitten``
    (concave notches), plus ``bubble`` (near-spherical) and ``crystal``
    (faceted sugar grain) for distractors.
    """
    sigma = rng.uniform(*params.sigma_log)
    beta = rng.uniform(*params.beta)
    scale = np.ones(3)
    if kind == "bubble":
        radial = gaussian_random_sphere(rng, sigma * 0.15, 3.5)
        scale[:2] = rng.uniform(0.85, 1.0, size=2)
    elif kind == "agglomerate":
        radial = agglomerate(rng, int(rng.integers(2, 5))) * gaussian_random_sphere(rng, sigma * 0.5, beta)
    else:
        radial = gaussian_random_sphere(rng, sigma * (0.5 if kind in ("angular", "crystal") else 1.0), beta)
        if kind in ("angular", "crystal", "flake", "bitten") or (kind == "needle" and rng.random() < 0.5):
            low, high = params.planes
            radial = cut_by_planes(radial, rng, int(rng.integers(low, high + 1)), params.plane_depth)
        if kind == "bitten":
            radial = bite(radial, rng, int(rng.integers(1, 3)))
        if kind == "flake":
            scale = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(*params.flake_thickness)])
        elif kind == "needle":
            scale = np.array([1.0, rng.uniform(*params.needle_width), rng.uniform(*params.needle_width)])
        else:
            scale[:2] = rng.uniform(*params.elongation, size=2)
    shape = ParticleShape(kind, radial, scale, random_rotation(rng))
    return shape.scaled_to(diameter)
