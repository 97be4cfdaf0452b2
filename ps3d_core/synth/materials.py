"""X-ray attenuation of the simulated materials and the mineral mix of each sample.

The attenuation curves mu(E) and the tube spectra are the precomputed table
``ps3d_core/data/xray_tables.npz`` (made by ``scripts/make_xray_tables.py`` from
xraydb; see there for the source). The mineralogy follows the sample families
of the ParticleSeg3D paper (Sn-skarn, chromite and scheelite ores, sulphide
ores, slags, battery and electronics scrap, synthetic mineral mixes): a sample
draws one ore system, its gangue (host) minerals, and the dense "valuable"
phase whose share of particles (the grade) depends on the process stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

TABLE_PATH = Path(__file__).resolve().parents[1] / "data" / "xray_tables.npz"

#: The two attenuation bases every projection simulation uses (see choose_bases).
BASE_PAIR = ("epoxy", "iron")
MATRIX = "epoxy"
LOW_CONTRAST = ("polyethylene", "polypropylene", "abs", "pet", "coal", "graphite")
HEAVY_ACCESSORIES = ("galena", "cassiterite", "wolframite", "gold", "monazite")


@dataclass(frozen=True)
class XrayTables:
    """The contents of ``xray_tables.npz``.

    Attributes
    ----------
    energies_kev : ndarray, shape (E,), float32
    names : tuple of str, length M
    mu : ndarray, shape (M, E), float32
        Linear attenuation coefficient, 1/cm.
    spectra : ndarray, shape (S, E), float32
        Detected-energy weights per energy bin, each row sums to 1.
    kvp, filter_mm : ndarray, shape (S,), float32
    filters : tuple of str, length S
        Added filter material ("none", "Al", "Cu").
    source : str
    """

    energies_kev: np.ndarray
    names: tuple[str, ...]
    mu: np.ndarray
    spectra: np.ndarray
    kvp: np.ndarray
    filters: tuple[str, ...]
    filter_mm: np.ndarray
    source: str

    def mu_of(self, name: str) -> np.ndarray:
        """mu(E) of one material, shape (E,), 1/cm."""
        return self.mu[self.names.index(name)]


@lru_cache(maxsize=1)
def load_tables(path: Path = TABLE_PATH) -> XrayTables:
    """Read the precomputed attenuation and spectrum table (cached per process)."""
    with np.load(path, allow_pickle=False) as z:
        return XrayTables(
            energies_kev=z["energies_kev"],
            names=tuple(str(n) for n in z["material_names"]),
            mu=z["mu_per_cm"],
            spectra=z["spectra"],
            kvp=z["spectrum_kvp"],
            filters=tuple(str(f) for f in z["spectrum_filter"]),
            filter_mm=z["spectrum_filter_mm"],
            source=str(z["source"]),
        )


@dataclass(frozen=True)
class Spectrum:
    """A detected spectrum rebinned to a few energies for the polychromatic sum.

    Attributes
    ----------
    kvp : float
    filter : str
        e.g. ``"Cu 0.25 mm"``.
    energies_kev : ndarray, shape (B,)
        Weighted mean energy of each bin.
    weights : ndarray, shape (B,)
        Detected-energy weight of each bin (sums to 1).
    """

    kvp: float
    filter: str
    energies_kev: np.ndarray
    weights: np.ndarray


def spectrum(index: int, n_bins: int = 24) -> Spectrum:
    """Rebin table spectrum ``index`` into ``n_bins`` bins of equal energy width."""
    t = load_tables()
    weights = t.spectra[index].astype(np.float64)
    kvp = float(t.kvp[index])
    edges = np.linspace(float(t.energies_kev[0]), kvp, n_bins + 1)
    which = np.clip(np.searchsorted(edges, t.energies_kev, side="right") - 1, 0, n_bins - 1)
    bin_w = np.bincount(which, weights, minlength=n_bins)
    bin_e = np.bincount(which, weights * t.energies_kev, minlength=n_bins) / np.maximum(bin_w, 1e-30)
    keep = bin_w > 1e-6 * bin_w.sum()
    name = t.filters[index] if t.filters[index] == "none" else f"{t.filters[index]} {float(t.filter_mm[index]):g} mm"
    return Spectrum(kvp, name, bin_e[keep], bin_w[keep] / bin_w[keep].sum())


def mu_at(names: list[str] | tuple[str, ...], energies_kev: np.ndarray) -> np.ndarray:
    """mu of each material at each energy (linear interpolation of the table), shape (M, B), 1/cm."""
    t = load_tables()
    return np.stack([np.interp(energies_kev, t.energies_kev, t.mu_of(n)) for n in names])


def effective_mu(names: list[str] | tuple[str, ...], spec: Spectrum) -> np.ndarray:
    """Spectrum-weighted mu of each material (the thin-object limit), shape (M,), 1/cm."""
    return mu_at(names, spec.energies_kev) @ spec.weights


def _fit(mu: np.ndarray, bases: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative least-squares fit of mu(E) (B,) on bases (B, K), minimising the
    spectrum-weighted relative error; returns the coefficients and that rms error."""
    w = np.sqrt(weights) / mu
    coefficients = nnls(bases * w[:, None], mu * w)[0]
    return coefficients, float(np.sqrt((((bases @ coefficients - mu) / mu) ** 2) @ weights))


def choose_bases(
    names: list[str] | tuple[str, ...], spec: Spectrum, *, tolerance: float = 0.1, max_extra: int = 2
) -> tuple[tuple[str, ...], np.ndarray]:
    """Attenuation bases of the projection model and each material's coefficients.

    Every material's mu(E) is written as a non-negative mix of a few basis
    curves, so one slice needs one forward projection per basis whatever the
    number of materials. The bases are epoxy and iron, plus (at most
    ``max_extra``) the materials that this two-basis fit represents worst when
    their spectrum-weighted relative error exceeds ``tolerance``: absorption
    edges inside the spectrum (Sn K at 29 keV, W K at 69.5 keV, Pb K at 88 keV)
    cannot be mixed from epoxy and iron.

    Returns
    -------
    bases : tuple of str
        Basis material names, ``("epoxy", "iron", ...)``.
    coefficients : ndarray, shape (M, K), float64
        Coefficients of each material; air gives zeros.
    """
    bases = list(BASE_PAIR)
    mu = mu_at(names, spec.energies_kev)
    dense = [i for i, m in enumerate(mu) if m.max() >= 1e-2]
    errors = {names[i]: _fit(mu[i], mu_at(bases, spec.energies_kev).T, spec.weights)[1] for i in dense}
    worst = sorted((e, n) for n, e in errors.items() if e > tolerance and n not in bases)[::-1]
    bases += [n for _, n in worst[:max_extra]]
    basis_mu = mu_at(bases, spec.energies_kev).T
    coefficients = np.zeros((len(names), len(bases)))
    for i in dense:
        coefficients[i] = _fit(mu[i], basis_mu, spec.weights)[0]
    return tuple(bases), coefficients


@dataclass(frozen=True)
class OreSystem:
    """A family of samples: which minerals host the particles and which are valuable.

    Weights are relative abundances (by particle count).
    """

    name: str
    gangue: tuple[tuple[str, float], ...]
    valuable: tuple[tuple[str, float], ...]
    accessory: tuple[tuple[str, float], ...]


ORE_SYSTEMS: tuple[OreSystem, ...] = (
    OreSystem(
        "Sn-skarn ore",
        (("quartz", 3), ("calcite", 2.5), ("fluorite", 2), ("andradite", 1.5), ("muscovite", 1)),
        (("cassiterite", 1),),
        (("magnetite", 1), ("sphalerite", 1), ("scheelite", 0.5)),
    ),
    OreSystem(
        "chromite ore",
        (("forsterite", 4), ("serpentine", 4), ("dolomite", 2)),
        (("chromite", 1),),
        (("magnetite", 1), ("ilmenite", 0.5)),
    ),
    OreSystem(
        "scheelite ore",
        (("quartz", 4), ("calcite", 4), ("fluorite", 2)),
        (("scheelite", 1),),
        (("pyrite", 1), ("apatite", 0.5)),
    ),
    OreSystem(
        "sulphide ore",
        (("quartz", 5), ("orthoclase", 3), ("calcite", 2)),
        (("chalcopyrite", 4), ("sphalerite", 3), ("galena", 3)),
        (("pyrite", 2), ("pyrrhotite", 1)),
    ),
    OreSystem(
        "gold ore",
        (("quartz", 7), ("muscovite", 3)),
        (("pyrite", 1),),
        (("gold", 1), ("chalcopyrite", 1)),
    ),
    OreSystem(
        "iron ore",
        (("quartz", 6), ("albite", 2), ("apatite", 1)),
        (("magnetite", 6), ("hematite", 4)),
        (("ilmenite", 1),),
    ),
    OreSystem(
        "rare-earth ore",
        (("quartz", 4), ("calcite", 3), ("barite", 1), ("fluorite", 2)),
        (("monazite", 1),),
        (("zircon", 1), ("hematite", 1)),
    ),
    OreSystem(
        "Cu-Fe slag",
        (("fayalite", 6), ("glass", 4)),
        (("copper", 5), ("iron", 5)),
        (("magnetite", 1),),
    ),
    OreSystem(
        "Li-ion battery scrap",
        (("polypropylene", 3), ("polyethylene", 1), ("graphite", 3), ("aluminium", 3)),
        (("nmc_cathode", 6), ("lco_cathode", 4)),
        (("copper", 1),),
    ),
    OreSystem(
        "electronics scrap (WEEE)",
        (("glass", 3), ("pvc", 2), ("abs", 3), ("aluminium", 2)),
        (("copper", 6), ("solder", 4)),
        (("iron", 1), ("gold", 0.3)),
    ),
    OreSystem(
        "mineral mix",
        (("quartz", 3.5), ("calcite", 3.5), ("glass", 1), ("lepidolite", 2)),
        (("fluorite", 1),),
        (("barite", 1),),
    ),
    OreSystem(
        "coal and plastics",
        (("coal", 6), ("pet", 2), ("graphite", 2)),
        (("pyrite", 1),),
        (("quartz", 1), ("calcite", 1)),
    ),
)

#: Share of particles that carry the valuable phase, per stream (uniform range).
GRADE_BY_STREAM = {
    "feed": (0.1, 0.4),
    "concentrate": (0.55, 0.95),
    "tailings": (0.01, 0.08),
    "other": (0.0, 1.0),
}
#: Where in the preset's log-diameter range each stream tends to fall
#: (exponent on a uniform draw: > 1 favours the fine end). Regrinding makes
#: concentrates finer; the paper's Sn-skarn tailings are the coarsest of the
#: three streams (177 vs 113-122 um).
SIZE_BIAS_BY_STREAM = {"feed": 1.0, "concentrate": 1.7, "tailings": 0.6, "other": 1.0}


@dataclass(frozen=True)
class Phase:
    """One mineral phase of a sample: its id in the phase volume and its material."""

    id: int
    name: str
    material: str
    role: str  # "gangue", "valuable", "accessory", "low_contrast"


@dataclass(frozen=True)
class Mineralogy:
    """The phases of one sample and how particles draw them.

    Attributes
    ----------
    system : str
        Ore-system name (``"sulphide ore"``).
    phases : tuple of Phase
        Ids 1..K, in order.
    host_ids, host_weights : ndarray
        Phases a particle body is made of, with probabilities.
    valuable_ids, valuable_weights : ndarray
        Dense phases carried by a ``grade`` share of particles.
    accessory_ids, accessory_weights : ndarray
        Minor inclusion phases.
    low_contrast_ids : ndarray
        Phases of low-contrast particles (below or near epoxy).
    grade : float
        Share of particles carrying a valuable phase.
    liberation : float
        Share of those that are entirely valuable (the rest carry inclusions).
    accessory_rate : float
        Share of particles with accessory inclusions.
    low_contrast_share : float
        Share of particles made of a low-contrast material.
    """

    system: str
    phases: tuple[Phase, ...]
    host_ids: np.ndarray
    host_weights: np.ndarray
    valuable_ids: np.ndarray
    valuable_weights: np.ndarray
    accessory_ids: np.ndarray
    accessory_weights: np.ndarray
    low_contrast_ids: np.ndarray
    grade: float
    liberation: float
    accessory_rate: float
    low_contrast_share: float

    @property
    def materials(self) -> list[str]:
        """Material of each phase id 1..K, as a list indexed by id - 1."""
        return [p.material for p in self.phases]

    def describe(self) -> str:
        """One line for ``scan.json``'s ``material`` field."""
        return f"synthetic {self.system}: " + ", ".join(p.material for p in self.phases)


def draw_mineralogy(
    rng: np.random.Generator,
    stream: str,
    *,
    low_contrast_share: float,
    heavy_accessory: bool,
    accessory_rate: float,
) -> Mineralogy:
    """Draw a sample's ore system, its phase table and the per-particle phase odds.

    Parameters
    ----------
    stream : str
        feed, concentrate, tailings or other; sets the grade.
    low_contrast_share : float
        Share of particles replaced by plastics, coal or graphite (0.8-1.8x epoxy).
    heavy_accessory : bool
        Add a very dense accessory (galena, cassiterite, wolframite, gold or monazite).
    accessory_rate : float
        Share of particles with accessory inclusions.
    """
    system = ORE_SYSTEMS[int(rng.integers(len(ORE_SYSTEMS)))]
    gangue = list(system.gangue)
    # A sample holds a subset of its system's gangue minerals, as real ones do.
    keep = max(1, int(rng.integers(1, len(gangue) + 1)))
    gangue = [gangue[i] for i in sorted(rng.choice(len(gangue), size=keep, replace=False))]
    accessory = list(system.accessory)
    if heavy_accessory:
        accessory.append((HEAVY_ACCESSORIES[int(rng.integers(len(HEAVY_ACCESSORIES)))], 1.0))
    low = [LOW_CONTRAST[i] for i in sorted(rng.choice(len(LOW_CONTRAST), size=2, replace=False))]
    low = [(m, 1.0) for m in low] if low_contrast_share > 0 else []

    phases: list[Phase] = []
    index: dict[str, int] = {}

    def add(entries: list[tuple[str, float]], role: str) -> tuple[np.ndarray, np.ndarray]:
        ids, weights = [], []
        for material, weight in entries:
            if material not in index:
                index[material] = len(phases) + 1
                phases.append(Phase(index[material], material, material, role))
            ids.append(index[material])
            weights.append(weight)
        w = np.asarray(weights, float)
        return np.asarray(ids, int), (w / w.sum() if len(w) else w)

    host_ids, host_w = add(gangue, "gangue")
    valuable_ids, valuable_w = add(list(system.valuable), "valuable")
    accessory_ids, accessory_w = add(accessory, "accessory")
    low_ids, _ = add(low, "low_contrast")
    return Mineralogy(
        system=system.name,
        phases=tuple(phases),
        host_ids=host_ids,
        host_weights=host_w,
        valuable_ids=valuable_ids,
        valuable_weights=valuable_w,
        accessory_ids=accessory_ids,
        accessory_weights=accessory_w,
        low_contrast_ids=low_ids,
        grade=float(rng.uniform(*GRADE_BY_STREAM[stream])),
        liberation=float(rng.uniform(0.15, 0.6)),
        accessory_rate=float(accessory_rate),
        low_contrast_share=float(low_contrast_share),
    )
