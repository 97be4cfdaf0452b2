"""Build ``ps3d_core/data/xray_tables.npz``: attenuation curves and tube spectra.

The synthetic-scan generator (``ps3d_core.synth``) needs the linear attenuation
coefficient mu(E) of every material it simulates and a handful of detected
X-ray spectra. Both come from **xraydb** (Newville, https://github.com/xraypy/XrayDB,
built on the Elam, Ravel & Sieber 2002 tables of photo-absorption plus coherent
and incoherent scattering cross sections, and on its X-ray emission lines).
xraydb is *not* a runtime dependency: run this script once in a throwaway
environment and commit the (small) output::

    python -m venv /tmp/xrayvenv && /tmp/xrayvenv/bin/pip install xraydb numpy
    /tmp/xrayvenv/bin/python scripts/make_xray_tables.py

Spectra follow Kramers' law for a tungsten anode (bremsstrahlung photon number
per keV proportional to (kVp - E) / E) plus the tungsten K lines above the
69.5 keV K edge, whose share of the photons grows as (kVp / 69.5 - 1) ** 1.63
(the usual empirical exponent, about 10 % of photons at 150 kVp). The beam
is filtered by a 0.5 mm beryllium window and the added filter (aluminium or
copper), and detected by an energy-integrating 0.2 mm CsI scintillator, so each
stored spectrum is the *detected energy* weight per keV bin (sums to 1). This
is an approximation of real tube spectra (no anode self-absorption, no
off-focal radiation), adequate for randomised simulation.

Densities are handbook values (g/cm3); formulas of mixtures (coal, glass,
NMC cathode) are representative compositions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import xraydb

ENERGIES_KEV = np.arange(10.0, 181.0, 1.0)

#: name, formula, density (g/cm3), group. Names are valid phase names
#: (letters, digits, underscore) because they end up in scan.json.
MATERIALS: list[tuple[str, str, float, str]] = [
    ("air", "N1.56O0.42Ar0.0093", 0.0012, "background"),
    ("epoxy", "C18H20O3", 1.16, "matrix"),
    ("pmma", "C5H8O2", 1.18, "matrix"),
    ("sucrose", "C12H22O11", 1.59, "spacer"),
    ("polyethylene", "C2H4", 0.94, "plastic"),
    ("polypropylene", "C3H6", 0.90, "plastic"),
    ("abs", "C15H17N", 1.05, "plastic"),
    ("pet", "C10H8O4", 1.38, "plastic"),
    ("pvc", "C2H3Cl", 1.38, "plastic"),
    ("coal", "C137H97O9NS", 1.30, "organic"),
    ("graphite", "C", 2.10, "organic"),
    ("quartz", "SiO2", 2.65, "silicate"),
    ("orthoclase", "KAlSi3O8", 2.56, "silicate"),
    ("albite", "NaAlSi3O8", 2.62, "silicate"),
    ("muscovite", "KAl3Si3O12H2", 2.82, "silicate"),
    ("lepidolite", "KLi2AlSi4O10F2", 2.84, "silicate"),
    ("forsterite", "Mg2SiO4", 3.27, "silicate"),
    ("serpentine", "Mg3Si2O9H4", 2.55, "silicate"),
    ("andradite", "Ca3Fe2Si3O12", 3.86, "silicate"),
    ("glass", "Na0.28Ca0.1Mg0.06Si0.74O1.9", 2.50, "silicate"),
    ("calcite", "CaCO3", 2.71, "carbonate"),
    ("dolomite", "CaMgC2O6", 2.84, "carbonate"),
    ("fluorite", "CaF2", 3.18, "halide"),
    ("apatite", "Ca5P3O12F", 3.19, "phosphate"),
    ("barite", "BaSO4", 4.48, "sulphate"),
    ("fayalite", "Fe2SiO4", 4.39, "slag"),
    ("pyrite", "FeS2", 5.01, "sulphide"),
    ("chalcopyrite", "CuFeS2", 4.19, "sulphide"),
    ("sphalerite", "ZnS", 4.05, "sulphide"),
    ("pyrrhotite", "Fe7S8", 4.61, "sulphide"),
    ("magnetite", "Fe3O4", 5.17, "oxide"),
    ("hematite", "Fe2O3", 5.26, "oxide"),
    ("chromite", "FeCr2O4", 4.79, "oxide"),
    ("ilmenite", "FeTiO3", 4.72, "oxide"),
    ("zircon", "ZrSiO4", 4.65, "silicate_heavy"),
    ("monazite", "CePO4", 5.10, "phosphate_heavy"),
    ("galena", "PbS", 7.60, "heavy"),
    ("cassiterite", "SnO2", 6.95, "heavy"),
    ("scheelite", "CaWO4", 6.10, "heavy"),
    ("wolframite", "FeWO4", 7.30, "heavy"),
    ("aluminium", "Al", 2.70, "metal"),
    ("iron", "Fe", 7.87, "metal"),
    ("copper", "Cu", 8.96, "metal"),
    ("solder", "Sn0.73Pb0.27", 8.40, "metal"),
    ("gold", "Au", 19.3, "metal"),
    ("lead", "Pb", 11.35, "metal"),
    ("nmc_cathode", "LiNi0.33Mn0.33Co0.33O2", 4.70, "battery"),
    ("lco_cathode", "LiCoO2", 5.05, "battery"),
]

KVP = (50.0, 60.0, 70.0, 80.0, 100.0, 120.0, 140.0, 160.0, 180.0)
#: added filter: (material, formula, density, thickness mm)
FILTERS = (
    ("none", "Al", 2.70, 0.0),
    ("Al", "Al", 2.70, 0.5),
    ("Al", "Al", 2.70, 1.0),
    ("Al", "Al", 2.70, 2.0),
    ("Cu", "Cu", 8.96, 0.1),
    ("Cu", "Cu", 8.96, 0.25),
    ("Cu", "Cu", 8.96, 0.5),
    ("Cu", "Cu", 8.96, 1.0),
)
W_K_EDGE_KEV = 69.525


def mu_per_cm(formula: str, density: float, energies_kev: np.ndarray) -> np.ndarray:
    """Linear attenuation coefficient (1/cm) including scattering."""
    return np.asarray(xraydb.material_mu(formula, energies_kev * 1000.0, density=density, kind="total"))


def detected_spectrum(kvp: float, filter_formula: str, filter_density: float, filter_mm: float) -> np.ndarray:
    """Detected-energy weight per 1 keV bin of a filtered tungsten tube, summing to 1."""
    e = ENERGIES_KEV
    photons = np.where(e < kvp, (kvp - e) / e, 0.0)
    if kvp > W_K_EDGE_KEV:
        lines = xraydb.xray_lines("W", "K")
        line_total = sum(line.intensity for line in lines.values())
        k_share = 0.08 * (kvp / W_K_EDGE_KEV - 1.0) ** 1.63
        for line in lines.values():
            index = int(np.argmin(np.abs(e - line.energy / 1000.0)))
            photons[index] += k_share * photons.sum() * line.intensity / line_total
    transmission = np.exp(-mu_per_cm("Be", 1.85, e) * 0.05)
    if filter_mm > 0:
        transmission *= np.exp(-mu_per_cm(filter_formula, filter_density, e) * filter_mm / 10.0)
    absorbed = 1.0 - np.exp(-mu_per_cm("CsI", 4.51, e) * 0.02)
    weights = photons * transmission * absorbed * e
    return weights / weights.sum()


def build() -> dict[str, np.ndarray]:
    names = [m[0] for m in MATERIALS]
    mu = np.stack([mu_per_cm(formula, density, ENERGIES_KEV) for _, formula, density, _ in MATERIALS])
    spectra, kvps, filter_names, filter_mm = [], [], [], []
    for kvp in KVP:
        for name, formula, density, thickness in FILTERS:
            spectra.append(detected_spectrum(kvp, formula, density, thickness))
            kvps.append(kvp)
            filter_names.append(name)
            filter_mm.append(thickness)
    return {
        "energies_kev": ENERGIES_KEV.astype(np.float32),
        "material_names": np.array(names),
        "material_formulas": np.array([m[1] for m in MATERIALS]),
        "material_densities": np.array([m[2] for m in MATERIALS], dtype=np.float32),
        "material_groups": np.array([m[3] for m in MATERIALS]),
        "mu_per_cm": mu.astype(np.float32),
        "spectra": np.stack(spectra).astype(np.float32),
        "spectrum_kvp": np.array(kvps, dtype=np.float32),
        "spectrum_filter": np.array(filter_names),
        "spectrum_filter_mm": np.array(filter_mm, dtype=np.float32),
        "source": np.array(
            f"xraydb {xraydb.__version__} (Elam-Ravel-Sieber cross sections); Kramers-law W-anode spectra, "
            "0.5 mm Be window, 0.2 mm CsI energy-integrating detector; scripts/make_xray_tables.py"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "ps3d_core" / "data" / "xray_tables.npz"
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args()
    tables = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **tables)
    epoxy = tables["mu_per_cm"][list(tables["material_names"]).index("epoxy")]
    at60 = int(np.argmin(np.abs(ENERGIES_KEV - 60.0)))
    for name, mu in zip(tables["material_names"], tables["mu_per_cm"]):
        print(f"{name:>15s}  mu/mu_epoxy at 60 keV = {mu[at60] / epoxy[at60]:8.2f}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
