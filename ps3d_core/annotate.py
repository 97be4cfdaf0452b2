"""Particle splitting for reference annotation (paper section 3.1, Figure 5).

Thresholded or Random-Forest reference segmentations give touching particles
a single label. To split one, the annotator places one marker in each
sub-particle and draws a border between them (a few clicks or a brush stroke
in one 2D slice is enough). :func:`split_particle` then computes, inside the
particle, the geodesic distance of every voxel to the drawn border and runs a
marker-based watershed on the negative of that distance: each marker floods
its basin (far from the border) and the floods meet on the ridge, which is the
drawn border extended through the particle in 3D.

All work is done on the particle's bounding box, so splitting a particle in a
full scan costs about as much as in a small patch (plus one pass over the
volume to find the particle).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from skimage.draw import line_nd
from skimage.graph import MCP_Geometric
from skimage.segmentation import watershed

from ps3d_core.errors import ScanError
from ps3d_core.io import atomic_output, open_volume, write_labels_ome_zarr, write_tiff

Point = Sequence[float]


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """Smallest box holding all True voxels of a non-empty (Z, Y, X) mask."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _voxels(points: Sequence[Point] | np.ndarray, what: str) -> np.ndarray:
    """(N, 3) int64 voxel indices of (z, y, x) points, rounded to the nearest voxel."""
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if array.ndim != 2 or array.shape[1] != 3 or not np.isfinite(array).all():
        raise ValueError(f"{what} must be a list of finite (z, y, x) coordinates, got shape {array.shape}")
    return np.rint(array).astype(np.int64)


def rasterize_polyline(vertices: Sequence[Point] | np.ndarray) -> np.ndarray:
    """Voxels of the polyline through ``vertices`` (for borders given as a few clicks).

    Parameters
    ----------
    vertices : sequence of (z, y, x), voxel coordinates
        At least one vertex; consecutive vertices are joined by straight
        26-connected voxel lines (:func:`skimage.draw.line_nd`).

    Returns
    -------
    ndarray, shape (N, 3), int64
        Voxel indices (z, y, x) of the polyline, vertices included.
    """
    vertices = _voxels(vertices, "polyline vertices")
    if len(vertices) == 0:
        raise ValueError("a polyline needs at least one vertex")
    pieces = [vertices[:1]]
    for start, stop in zip(vertices[:-1], vertices[1:]):
        pieces.append(np.stack(line_nd(start, stop, endpoint=True), axis=1))
    return np.unique(np.concatenate(pieces).astype(np.int64), axis=0)


def geodesic_distance(mask: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Geodesic distance inside ``mask`` from the ``sources`` voxels.

    Parameters
    ----------
    mask : ndarray, shape (Z, Y, X), bool
        Where paths may go.
    sources : ndarray, shape (N, 3), int
        Voxel indices (z, y, x) inside ``mask`` where the distance is 0.

    Returns
    -------
    ndarray, shape (Z, Y, X), float64
        Length in voxels of the shortest 26-connected path inside ``mask``
        (steps of length 1, sqrt 2, sqrt 3: :class:`skimage.graph.MCP_Geometric`
        with unit cost); ``inf`` outside ``mask`` and where unreachable.
    """
    costs = np.where(mask, 1.0, np.inf)
    distance, _ = MCP_Geometric(costs, fully_connected=True).find_costs([tuple(p) for p in sources])
    distance[~mask] = np.inf
    return distance


def split_particle(
    labels: np.ndarray,
    label: int,
    markers: Sequence[Point] | np.ndarray,
    border_points: Sequence[Point] | np.ndarray,
) -> np.ndarray:
    """Split one particle into sub-particles along a drawn border.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X), integer dtype
        Instance labels, 0 = background. Not modified.
    label : int
        The particle to split.
    markers : sequence of (z, y, x), voxel coordinates, length >= 2
        One point inside each sub-particle (rounded to the nearest voxel).
    border_points : sequence of (z, y, x), voxel coordinates
        Voxels of the drawn border between the sub-particles (rounded; use
        :func:`rasterize_polyline` for a polyline). Points outside the particle
        are ignored; at least one must lie inside it.

    Returns
    -------
    ndarray, shape (Z, Y, X)
        A new label array, ``labels``' dtype (widened if the new ids do not
        fit). The sub-particle of ``markers[i]`` gets id ``labels.max() + 1 + i``
        (fresh ids, so that anything keyed by the old id, such as a property
        table, cannot silently describe the new shape); ``label`` remains only
        on voxels of the particle that no marker can reach inside it (pieces
        of a disconnected particle without a marker). All other voxels are
        unchanged.

    Raises
    ------
    ValueError
        ``label`` is 0 or absent; fewer than 2 markers; a marker outside the
        volume, not on the particle, or two markers on the same voxel; no
        border point on the particle.

    Notes
    -----
    Geodesic distance ``d`` to the border voxels inside the particle (26-
    connected paths, Euclidean step lengths), then
    ``skimage.segmentation.watershed(-d, markers, mask=particle)``. Voxels
    the border cannot reach (another connected piece) get a distance above
    every reachable one so they join the marker of their piece.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a (z, y, x) integer array, got shape {labels.shape} dtype {labels.dtype}")
    label = int(label)
    if label == 0:
        raise ValueError("label 0 is the background, not a particle")
    particle = labels == label
    if not particle.any():
        raise ValueError(f"label {label} is not in the volume")

    points = _voxels(markers, "markers")
    if len(points) < 2:
        raise ValueError(f"splitting needs at least 2 markers (one per sub-particle), got {len(points)}")
    for i, point in enumerate(points):
        if not all(0 <= c < n for c, n in zip(point, labels.shape)):
            raise ValueError(f"marker {i} at {tuple(point.tolist())} is outside the volume {labels.shape}")
        found = labels[tuple(point)]
        if found != label:
            where = "the background" if found == 0 else f"particle {found}"
            raise ValueError(f"marker {i} at {tuple(point.tolist())} lies on {where}, not on particle {label}")
    if len(np.unique(points, axis=0)) != len(points):
        raise ValueError("two markers are on the same voxel; place one marker per sub-particle")

    border = _voxels(border_points, "border_points")
    inside = np.all((border >= 0) & (border < np.array(labels.shape)), axis=1)
    border = border[inside]
    border = border[particle[tuple(border.T)]] if len(border) else border
    if len(border) == 0:
        raise ValueError(f"no border point lies on particle {label}; draw the border across it")

    box = _bounding_box(particle)
    origin = np.array([s.start for s in box])
    crop = particle[box]
    del particle
    distance = geodesic_distance(crop, border - origin)
    reachable = np.isfinite(distance)
    if (crop & ~reachable).any():
        # Pieces of the particle the border cannot reach: put them above every
        # reachable voxel so the watershed treats them as deep basins.
        distance[crop & ~reachable] = distance[reachable].max() + 1.0 if reachable.any() else 1.0
    seeds = np.zeros(crop.shape, dtype=np.int32)
    seeds[tuple((points - origin).T)] = np.arange(1, len(points) + 1, dtype=np.int32)
    parts = watershed(-np.where(crop, distance, 0.0), markers=seeds, mask=crop)

    first = int(labels.max()) + 1
    last = first + len(points) - 1
    dtype = labels.dtype
    if last > np.iinfo(dtype).max:
        dtype = np.promote_types(dtype, np.min_scalar_type(last))
    out = labels.astype(dtype, copy=True)
    region = out[box]
    assigned = parts > 0
    region[assigned] = (parts[assigned] - 1 + first).astype(dtype)
    return out


def split_particle_file(
    labels_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    label: int,
    markers: Sequence[Point],
    border_points: Sequence[Point],
) -> list[int]:
    """:func:`split_particle` on a label image file, written atomically.

    Parameters
    ----------
    labels_path : path
        Label image (TIFF, OME-Zarr/zarr, folder of TIFF slices or NIfTI;
        anything :func:`ps3d_core.io.open_volume` reads), shape (Z, Y, X).
    out_path : path
        Where to write the result: ``.tif``/``.tiff`` (multi-page TIFF) or a
        ``.zarr`` directory (OME-Zarr with a label pyramid when the input has a
        voxel size, otherwise a plain zarr array). May equal ``labels_path``;
        it is replaced only once the new file is complete. The voxel size of
        the input is kept.
    label, markers, border_points
        As :func:`split_particle`; coordinates are voxel indices (z, y, x).

    Returns
    -------
    list of int
        The ids of the new sub-particles, in marker order.

    Raises
    ------
    ScanError
        Unreadable input, or an output suffix that is neither TIFF nor zarr.
    ValueError
        As :func:`split_particle`.
    """
    out_path = Path(out_path)
    name = out_path.name.lower()
    is_tiff = name.endswith((".tif", ".tiff"))
    if not is_tiff and not name.endswith(".zarr"):
        raise ScanError(out_path, "output must be a .tif/.tiff file or a .zarr directory")
    with open_volume(labels_path) as volume:
        labels = volume.read(0, volume.shape[0])
        spacing = volume.spacing_zyx_mm
    result = split_particle(labels, label, markers, border_points)
    first = int(labels.max()) + 1
    del labels
    if is_tiff:
        write_tiff(out_path, result, spacing)
    elif spacing is not None:
        write_labels_ome_zarr(result, out_path, spacing)
    else:
        with atomic_output(out_path) as temporary:
            zarr.create_array(temporary, data=result, zarr_format=3, dimension_names=("z", "y", "x"))
    return list(range(first, first + len(markers)))
