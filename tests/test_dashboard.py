"""The Streamlit dashboard (dashboards/): every page through Streamlit's AppTest, and its SQL
checked against numpy on the same particles.

The databases are built with ``ps3d_core.catalog.store_sample`` from particle
tables generated with pyarrow by ``dashboards.demo_data`` (schemas.particles):
log-normal sizes that differ by stream, two phases whose grades differ by
stream (the concentrate and tailings come from a simulated separation of the
feed), Zingg shapes and sphericities, border-touching particles, and one small
real scan with labels for the particle explorer.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from dashboards import balance, demo_data, queries, slices
from ps3d_core import catalog

APP = Path(__file__).resolve().parent.parent / "dashboards" / "app.py"
PAGES = ["overview", "size", "shape", "composition", "process", "explorer", "sql"]
#: Charts each page shows on the demo database with its default choices.
CHARTS = {"overview": 1, "size": 2, "shape": 3, "composition": 5, "process": 4, "explorer": 0, "sql": 0}
TIMEOUT = 120


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory) -> Path:
    return demo_data.build(tmp_path_factory.mktemp("dash") / "home", particles=1500, seed=3)


def app(home: Path, monkeypatch, page: str = "overview") -> AppTest:
    monkeypatch.setenv(catalog.HOME_ENV, str(home))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    if page != "overview":
        at.switch_page(f"views/{page}.py").run()
    return at


def charts(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


def particles_of(home: Path) -> pa.Table:
    """Every stored particle, read with pyarrow (independently of DuckDB)."""
    tables = []
    for path in sorted((home / "particles").glob("sample_id=*/part-*.parquet")):
        tables.append(pq.read_table(path))
    return pa.concat_tables(tables, promote_options="default")


def sample_arrays(home: Path, sample_id: str) -> dict[str, np.ndarray]:
    table = particles_of(home)
    mask = np.asarray(table["sample_id"]) == sample_id
    return {name: np.asarray(table[name].to_numpy(zero_copy_only=False))[mask] for name in table.column_names}


# --------------------------------------------------------------------------
# pages
# --------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_charts_weighting_and_counts(demo_home, monkeypatch, page):
    at = app(demo_home, monkeypatch, page)
    no_errors(at)
    assert len(charts(at)) >= CHARTS[page], page
    if CHARTS[page]:
        weighting = [c for c in captions(at) if c.startswith("Weighting:")]
        assert weighting, captions(at)
        assert all(re.search(r"[\d,]+ particles", c) for c in weighting), weighting
    # the sidebar selects by campaign and stream
    assert {w.label for w in at.sidebar.multiselect} == {"Campaign", "Stream", "Samples"}


def test_overview_lists_samples_and_quality_flags(demo_home, monkeypatch):
    at = app(demo_home, monkeypatch)
    no_errors(at)
    samples, quality = at.dataframe[0].value, at.dataframe[1].value
    assert len(samples) == 8
    assert {"stream", "campaign", "particle_count", "model_version", "status", "updated_at"} <= set(samples.columns)
    assert set(samples["status"]) == {"ingested"}
    feed = sample_arrays(demo_home, "Q4-feed")
    row = quality.set_index("sample_id").loc["Q4-feed"]
    assert row["particles"] == len(feed["esd_mm"])
    assert row["border-touching %"] == pytest.approx(100 * feed["touches_border"].mean())
    assert row["< 1000 voxels"] == int((feed["voxel_count"] < 1000).sum())


def test_sidebar_filters_by_campaign_and_stream(demo_home, monkeypatch):
    at = app(demo_home, monkeypatch, "size")
    at.sidebar.multiselect(key="filter_campaign").set_value(["2026-Q3 pilot"]).run()
    at.sidebar.multiselect(key="filter_stream").set_value(["feed", "tailings"]).run()
    no_errors(at)
    assert set(at.dataframe[0].value["sample_id"]) == {"Q3-feed", "Q3-tail"}
    at.sidebar.multiselect(key="filter_stream").set_value([]).run()
    assert any("No sample selected" in i.value for i in at.info)


def test_size_page_measure_and_weighting(demo_home, monkeypatch):
    at = app(demo_home, monkeypatch, "size")
    at.selectbox(key="size_measure").select("feret_min").run()
    at.radio(key="size_weighting").set_value("number").run()
    no_errors(at)
    table = at.dataframe[0].value
    assert list(table.columns[:5]) == ["sample_id", "particles", "d10_number (mm)", "d50_number (mm)", "d80_number (mm)"]
    assert any("minimum Feret" in c for c in captions(at))
    assert any("Weighting: **number" in c for c in captions(at))


def test_shape_page_violins_and_volume_weighting(demo_home, monkeypatch):
    at = app(demo_home, monkeypatch, "shape")
    at.radio(key="shape_style").set_value("violin").run()
    at.radio(key="shape_weighting").set_value("volume").run()
    no_errors(at)
    assert len(charts(at)) == 3
    assert any("Weighting: **volume" in c for c in captions(at))


def test_process_page_mass_balance_from_masses_and_from_grades(demo_home, monkeypatch):
    at = app(demo_home, monkeypatch, "process")
    no_errors(at)
    assert at.selectbox(key="process_campaign").value == "2026-Q3 pilot"  # first campaign with all three streams
    table = at.dataframe[0].value.set_index("quantity")
    grades = {}
    for stream, sample in (("feed", "Q3-feed"), ("concentrate", "Q3-conc"), ("tailings", "Q3-tail")):
        a = sample_arrays(demo_home, sample)
        keep = ~a["touches_border"]
        grades[stream] = float(np.sum(a["phase_sulphide_fraction"][keep] * a["volume_mm3"][keep]) / np.sum(a["volume_mm3"][keep]))
    f, c, t = grades["feed"], grades["concentrate"], grades["tailings"]
    split = (f - t) / (c - t)
    assert table.loc["C/F (concentrate yield)", "value"] == f"{100 * split:.2f} %"
    assert "two-product formula" in table.loc["C/F (concentrate yield)", "source"]
    assert "mass_g not given" in table.loc["C/F (concentrate yield)", "source"]
    assert table.loc["sulphide recovery R to the concentrate", "value"] == f"{100 * c * (f - t) / (f * (c - t)):.1f} %"
    assert any("one density for all phases" in c for c in captions(at))

    at.selectbox(key="process_campaign").select("2026-Q4 flotation").run()
    no_errors(at)
    table = at.dataframe[0].value.set_index("quantity")
    masses = catalog.query(demo_home, "SELECT sample_id, mass_g FROM samples WHERE campaign = '2026-Q4 flotation'").table
    mass = dict(zip(masses["sample_id"].to_pylist(), masses["mass_g"].to_pylist()))
    measured = mass["Q4-conc"] / (mass["Q4-conc"] + mass["Q4-tail"])
    assert table.loc["C/F (concentrate yield)", "value"] == f"{100 * measured:.2f} %"
    assert "measured: mass_g" in table.loc["C/F (concentrate yield)", "source"]
    assert "C/F from grades (check)" in table.index
    assert len(charts(at)) == 4
    at.checkbox(key="process_use_masses").uncheck().run()
    table = at.dataframe[0].value.set_index("quantity")
    assert "mass_g not used" in table.loc["C/F (concentrate yield)", "source"]


def test_explorer_filters_and_shows_slices(demo_home, monkeypatch):
    at = app(demo_home, monkeypatch, "explorer")
    no_errors(at)
    assert at.selectbox(key="explorer_sample").value == "Q4-scan"  # the sample whose labels are archived
    listed = at.dataframe[0].value
    assert len(listed) == len(sample_arrays(demo_home, "Q4-scan")["particle_id"])
    assert len(at.get("imgs")) + len(at.get("image")) >= 3
    low, high = at.slider(key="explorer_range_Q4-scan_esd_mm").value
    at.slider(key="explorer_range_Q4-scan_esd_mm").set_range(low, (low + high) / 2).run()
    no_errors(at)
    esd = sample_arrays(demo_home, "Q4-scan")["esd_mm"]
    assert len(at.dataframe[0].value) == int(((esd >= low) & (esd <= (low + high) / 2)).sum())
    # a sample without archived scan/labels: says what is missing
    at.selectbox(key="explorer_sample").select("Q3-feed").run()
    no_errors(at)
    assert any("no path to the scan image or the labels" in i.value for i in at.info)


def test_sql_page_results_csv_and_refusals(demo_home, monkeypatch):
    at = app(demo_home, monkeypatch, "sql")
    no_errors(at)
    assert len(at.dataframe[0].value) == 8  # the example query
    at.text_area(key="sql_text").input("SELECT stream, count(*) AS n FROM particles GROUP BY stream").run()
    at.button(key="sql_run").click().run()
    assert any("Binder Error" in e.value or "SQL error" in e.value for e in at.error)  # stream is not a particle column
    at.text_area(key="sql_text").input(
        "SELECT s.stream, count(*) AS n FROM particles p JOIN samples s USING (sample_id) GROUP BY 1 ORDER BY 1"
    ).run()
    at.button(key="sql_run").click().run()
    no_errors(at)
    result = at.dataframe[0].value
    assert list(result["stream"]) == ["concentrate", "feed", "other", "tailings"]
    assert int(result["n"].sum()) == particles_of(demo_home).num_rows
    assert len(at.get("download_button")) == 1
    for sql, why in [
        ("SELECT * FROM read_text('/etc/hostname')", "reading files"),
        (f"SELECT * FROM read_parquet('{demo_home}/../outside.parquet')", "reading files"),
        ("ATTACH '/tmp/other.duckdb' AS other", "only SELECT"),
        ("COPY samples TO '/tmp/ps3d-dashboard-leak.csv'", "only SELECT"),
        ("DELETE FROM samples", "only SELECT"),
    ]:
        at.text_area(key="sql_text").input(sql).run()
        at.button(key="sql_run").click().run()
        assert not at.exception
        assert any(e.value.startswith("Refused:") and why in e.value for e in at.error), (sql, [e.value for e in at.error])
        assert not at.dataframe
    assert not Path("/tmp/ps3d-dashboard-leak.csv").exists()


# --------------------------------------------------------------------------
# empty databases, a campaign without products, a database that changes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["no catalog", "catalog without samples"])
@pytest.mark.parametrize("page", PAGES)
def test_empty_database(tmp_path, monkeypatch, kind, page):
    home = tmp_path / "home"
    if kind == "catalog without samples":
        catalog.init_catalog(home)
    at = app(home, monkeypatch, page)
    no_errors(at)
    assert not charts(at)
    if page == "sql" and kind == "catalog without samples":
        assert len(at.dataframe[0].value) == 0  # SQL still answers on an empty catalog
    else:
        assert any("particle database" in i.value for i in at.info), [i.value for i in at.info]


@pytest.fixture(scope="module")
def feed_only_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("feed-only") / "home"
    rng = np.random.default_rng(5)
    esd, grade = rng.lognormal(math.log(0.2), 0.5, 800), np.clip(rng.beta(1, 5, 800), 0, 1)
    demo_data.store(home, "F1-feed", "feed", "2026-Q1 feed survey", esd, grade, seed=5)
    return home


@pytest.mark.parametrize("page", PAGES)
def test_a_campaign_with_a_feed_but_no_concentrate_or_tailings(feed_only_home, monkeypatch, page):
    at = app(feed_only_home, monkeypatch, page)
    no_errors(at)
    if page == "process":
        assert any("no concentrate and no tailings" in w.value for w in at.warning)
        assert not charts(at)
    else:
        assert len(charts(at)) >= CHARTS[page]


def test_new_samples_show_without_restarting(tmp_path, monkeypatch):
    home = tmp_path / "home"
    rng = np.random.default_rng(1)
    demo_data.store(home, "A-feed", "feed", "c", rng.lognormal(-1.6, 0.5, 300), rng.random(300), seed=1)
    at = app(home, monkeypatch)
    assert list(at.dataframe[0].value["sample_id"]) == ["A-feed"]
    demo_data.store(home, "A-conc", "concentrate", "c", rng.lognormal(-1.8, 0.5, 200), rng.random(200), seed=2)
    at.run()
    no_errors(at)
    assert sorted(at.dataframe[0].value["sample_id"]) == ["A-conc", "A-feed"]


# --------------------------------------------------------------------------
# the SQL behind the charts, against numpy
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def connection(demo_home):
    con = catalog.connect_readonly(demo_home)
    yield con
    con.close()


def _log_linear_d(sizes: np.ndarray, weights: np.ndarray, p: float) -> float:
    order = np.argsort(sizes)
    s, w = sizes[order], weights[order]
    passing = 100 * np.cumsum(w) / w.sum()
    i = int(np.searchsorted(passing, p))
    if i == 0:
        return float(s[0])
    return float(np.exp(np.interp(p, [passing[i - 1], passing[i]], [np.log(s[i - 1]), np.log(s[i])])))


@pytest.mark.parametrize("measure", list(queries.SIZE_MEASURES))
def test_d_values_match_numpy(connection, demo_home, measure):
    column = queries.SIZE_MEASURES[measure][0]
    d = queries.d_values(connection, ["Q4-feed", "Q4-conc"], measure).set_index("sample_id")
    for sample in ("Q4-feed", "Q4-conc"):
        a = sample_arrays(demo_home, sample)
        keep = ~a["touches_border"]
        size = a[column][keep]
        assert d.loc[sample, "particles"] == keep.sum()
        for basis, weights in (("number", np.ones(keep.sum())), ("volume", a["volume_mm3"][keep])):
            for p in (10, 50, 80):
                expected = _log_linear_d(size, weights, p)
                assert d.loc[sample, f"d{p}_{basis}_mm"] == pytest.approx(expected, rel=1e-9), (sample, basis, p)
    if measure == "esd":  # the catalog's own view, on every sample
        view = catalog.query(demo_home, "SELECT * FROM d_values WHERE sample_id = 'Q4-feed'").table.to_pylist()[0]
        for column in ("d10_volume_mm", "d50_number_mm", "d80_volume_mm"):
            assert d.loc["Q4-feed", column] == pytest.approx(view[column], rel=1e-12)


def test_psd_curves_and_size_classes_match_numpy(connection, demo_home):
    curves = queries.psd_curves(connection, ["Q3-tail"], "axis_intermediate")
    a = sample_arrays(demo_home, "Q3-tail")
    keep = ~a["touches_border"]
    size, volume = a["axis_intermediate_mm"][keep], a["volume_mm3"][keep]
    for row in curves.sample(20, random_state=0).itertuples():
        # a curve point at a bin edge: the share of particles below that edge (edges are exp(k/32))
        below = size < row.size_mm * (1 - 1e-12)
        assert row.passing_number_pct == pytest.approx(100 * below.mean(), abs=1e-9)
        assert row.passing_volume_pct == pytest.approx(100 * volume[below].sum() / volume.sum(), abs=1e-9)
    assert curves["passing_volume_pct"].max() == pytest.approx(100)
    classes = queries.size_classes(connection, ["Q3-tail"], "axis_intermediate")
    expected = np.floor(2 * np.log2(size)).astype(int)
    for row in classes.itertuples():
        assert row.particles == int((expected == row.size_class).sum())
    assert classes["number_pct"].sum() == pytest.approx(100)
    assert classes["volume_pct"].sum() == pytest.approx(100)


@pytest.mark.parametrize("weighting", queries.WEIGHTINGS)
def test_shape_box_stats_match_numpy(connection, demo_home, weighting):
    stats = queries.shape_box_stats(connection, ["Q3-feed"], weighting).set_index("measure")
    a = sample_arrays(demo_home, "Q3-feed")
    keep = ~a["touches_border"]
    values = {
        "sphericity": a["sphericity"][keep], "elongation": a["elongation"][keep], "flatness": a["flatness"][keep],
        "feret_ratio": a["feret_min_mm"][keep] / a["feret_max_mm"][keep],
    }  # fmt: skip
    weights = np.ones(keep.sum()) if weighting == "number" else a["volume_mm3"][keep]
    for measure, x in values.items():
        x = np.clip(x, 0, 1)
        order = np.argsort(x)
        cumulative = np.cumsum(weights[order]) / weights.sum()
        for column, q in (("p5", 0.05), ("q1", 0.25), ("median", 0.5), ("q3", 0.75), ("p95", 0.95)):
            expected = x[order][np.searchsorted(cumulative, q)]
            assert stats.loc[measure, column] == pytest.approx(expected, abs=2 / 400 + 0.01 * (weighting == "volume")), (
                measure, column)  # fmt: skip
        assert stats.loc[measure, "mean"] == pytest.approx(np.average(x, weights=weights))
        assert stats.loc[measure, "particles"] == keep.sum()


def test_zingg_hexbins_assign_each_particle_to_its_nearest_hexagon(connection, demo_home):
    radius = 0.025
    hexes = queries.zingg_hexbins(connection, ["Q4-tail"], "number", radius)
    a = sample_arrays(demo_home, "Q4-tail")
    keep = ~a["touches_border"]
    x, y = a["elongation"][keep], a["flatness"][keep]
    assert hexes["particles"].sum() == keep.sum()
    assert hexes["weight_pct"].sum() == pytest.approx(100)
    # the centres of a hexagonal lattice: the nearest centre of every point is the one it was counted in
    q = np.arange(-5, 30)
    lattice = np.array([(radius * math.sqrt(3) * (i + j / 2), radius * 1.5 * j) for i in q for j in q])
    nearest = np.argmin((x[:, None] - lattice[None, :, 0]) ** 2 + (y[:, None] - lattice[None, :, 1]) ** 2, axis=1)
    centres, counts = np.unique(np.round(lattice[nearest], 9), axis=0, return_counts=True)
    got = {(round(r.x, 9), round(r.y, 9)): r.particles for r in hexes.itertuples()}
    assert got == {(cx, cy): n for (cx, cy), n in zip(map(tuple, centres), counts)}


def test_quality_flags_match_numpy(connection, demo_home):
    quality = queries.quality(connection, ["Q4-feed"], floor_voxels=2000, merger_iqr=1.5).set_index("sample_id")
    a = sample_arrays(demo_home, "Q4-feed")
    inside = ~a["touches_border"]
    log_size = np.log(a["esd_mm"][inside])
    q1, q3 = np.quantile(log_size, [0.25, 0.75])
    row = quality.loc["Q4-feed"]
    assert row["below_floor"] == int((a["voxel_count"] < 2000).sum())
    assert row["border_touching"] == int(a["touches_border"].sum())
    assert row["suspected_mergers"] == int((log_size > q3 + 1.5 * (q3 - q1)).sum()) > 0


def test_liberation_and_grades_match_numpy(connection, demo_home):
    a = sample_arrays(demo_home, "Q4-conc")
    g, v = a["phase_sulphide_fraction"], a["volume_mm3"]
    spectrum = queries.liberation_spectrum(connection, ["Q4-conc"], "sulphide").set_index("liberation_class")
    classes = np.where(g <= 0, 0, np.where(g >= 1, 11, np.clip(np.ceil(g * 10), 1, 10))).astype(int)
    for k, row in spectrum.iterrows():
        assert row["particles"] == int((classes == k).sum())
        assert row["phase_pct"] == pytest.approx(100 * np.sum((g * v)[classes == k]) / np.sum(g * v))
    assert spectrum["phase_pct"].sum() == pytest.approx(100)
    assert spectrum.loc[11, "label"] == "100 %" and spectrum.loc[0, "label"] == "0 %"
    curve = queries.liberation_yield(connection, ["Q4-conc"], "sulphide").set_index("grade_pct")
    assert curve.loc[0.0, "phase_yield_pct"] == pytest.approx(100)
    assert curve.loc[50.0, "phase_yield_pct"] == pytest.approx(100 * np.sum((g * v)[g >= 0.5]) / np.sum(g * v))
    assert curve.loc[50.0, "cumulative_grade_pct"] == pytest.approx(100 * np.sum((g * v)[g >= 0.5]) / np.sum(v[g >= 0.5]))
    modal = queries.modal_mineralogy(connection, ["Q4-conc"]).set_index("phase")
    assert modal.loc["sulphide", "volume_pct"] == pytest.approx(100 * np.sum(g * v) / np.sum(v))
    assert modal["volume_pct"].sum() == pytest.approx(100)


def test_queries_refuse_unknown_names(connection):
    with pytest.raises(ValueError, match="not a sample id"):
        queries.size_classes(connection, ["x'); DROP TABLE samples; --"])
    with pytest.raises(ValueError, match="size measure"):
        queries.psd_curves(connection, ["Q4-feed"], "volume_mm3; SELECT 1")
    with pytest.raises(ValueError, match="unknown phase"):
        queries.grade_by_size(connection, ["Q4-feed"], "gold")
    with pytest.raises(ValueError, match="unknown column"):
        queries.find_particles(connection, "Q4-feed", {"esd_mm) OR (1=1": (0, 1)})


# --------------------------------------------------------------------------
# mass balance arithmetic and the particle slices
# --------------------------------------------------------------------------


def test_two_product_balance_recovers_a_known_split():
    # feed = 0.2 concentrate (grade 0.6) + 0.8 tailings (grade 0.05)
    f = 0.2 * 0.6 + 0.8 * 0.05
    assert balance.two_product_split(f, 0.6, 0.05) == pytest.approx(0.2)
    assert balance.recovery(f, 0.6, 0.05) == pytest.approx(0.2 * 0.6 / f)
    assert balance.two_product_split(0.7, 0.6, 0.05) is None  # feed richer than the concentrate: inconsistent
    assert balance.two_product_split(0.3, 0.3, 0.3) is None
    assert balance.split_from_masses(2.0, 8.0) == pytest.approx(0.2)
    assert balance.split_from_masses(2.0, None) is None
    # per class: the recovery of every class when each class splits 50/50 by mass between equal-grade products
    assert balance.class_recovery(0.5, [0.5, 0.5], [0.5, 0.5], [0.1, 0.3], [0.1, 0.3]) == [0.5, 0.5]
    assert balance.partition_numbers(0.2, [0.5, 0.5], [0.5, 0.5]) == pytest.approx([0.2, 0.2])


def test_partition_curve_d50_and_ep_of_a_known_logistic_curve():
    d50, ep = 0.1, 0.02  # mm
    sizes = np.geomspace(0.01, 1, 200)
    # a logistic curve in size with P(d50 +- ...) such that d25, d75 = d50 -+ Ep (symmetric in size)
    k = math.log(3) / ep
    partition = 1 / (1 + np.exp(-k * (sizes - d50)))
    got_d50, got_ep = balance.d50_ep(sizes.tolist(), partition.tolist())
    assert got_d50 == pytest.approx(d50, rel=1e-3)
    assert got_ep == pytest.approx(ep, rel=2e-2)
    assert balance.d50_ep([0.1, 0.2], [0.1, 0.2]) == (None, None)


def test_particle_slices_outline_the_particle(demo_home, connection):
    info = queries.samples(connection).set_index("sample_id").loc["Q4-scan"]
    spacing = (info["spacing_z_mm"], info["spacing_y_mm"], info["spacing_x_mm"])
    from ps3d_core.io.ngff import open_ome_zarr

    labels, _, _ = open_ome_zarr(slices.locate(demo_home, "Q4-scan").labels)
    labels = np.asarray(labels[:])
    for particle_id in (1, 5):
        row = queries.particle(connection, "Q4-scan", particle_id)
        images = slices.particle_slices(demo_home, row, spacing, margin=4, upscale_to=0)
        assert list(images) == ["z (axial)", "y (coronal)", "x (sagittal)"]
        z = int(round(row["centroid_z_mm"] / spacing[0]))
        crop = labels[z, max(row["bbox_y0"] - 4, 0):row["bbox_y1"] + 4, max(row["bbox_x0"] - 4, 0):row["bbox_x1"] + 4]
        red = np.all(images["z (axial)"] == slices.OUTLINE_RGB, axis=2)
        assert red.shape == crop.shape
        assert red.any() and np.all(crop[red] == particle_id)  # the outline lies on the particle
        inner = (crop == particle_id) & ~red
        assert not np.any(np.all(images["z (axial)"][inner] == slices.OUTLINE_RGB, axis=1))
    missing = slices.locate(demo_home, "Q3-feed")
    assert not missing.labels_found and not missing.image_found
