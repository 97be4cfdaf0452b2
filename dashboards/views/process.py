"""Process: a feed with its concentrate and tailings: mass balance, recovery, partition curve, grade-recovery."""

import math

import altair as alt
import pandas as pd
import streamlit as st

from dashboards import balance, common, queries

st.title("Process: feed, concentrate and tailings")
ids = common.require_selection()
info = common.sample_info(ids)
campaigns = sorted({c for c in info["campaign"] if isinstance(c, str)})
if not campaigns:
    st.info("None of the selected samples has a campaign; the process page compares the streams of one campaign.")
    st.stop()
complete = [c for c in campaigns if {"feed", "concentrate", "tailings"} <= set(info[info["campaign"] == c]["stream"])]
campaign = st.selectbox(
    "Campaign", campaigns, index=campaigns.index(complete[0]) if complete else 0, key="process_campaign",
    help="Campaigns with a feed, a concentrate and a tailings sample come first by default.",
)  # fmt: skip
in_campaign = info[info["campaign"] == campaign]
columns = st.columns(3)
chosen = {}
for column, stream in zip(columns, ("feed", "concentrate", "tailings")):
    options = list(in_campaign[in_campaign["stream"] == stream]["sample_id"])
    if options:
        chosen[stream] = column.selectbox(stream.capitalize(), options, key=f"process_{stream}")
    else:
        column.markdown(f"**{stream.capitalize()}**: no {stream} sample selected in this campaign")
missing = [s for s in ("concentrate", "tailings") if s not in chosen]
if missing:
    st.warning(
        f"Campaign {campaign!r} has no {' and no '.join(missing)} among the selected samples: a mass balance needs "
        "a concentrate and a tailings (and a feed for checking). Compare the streams on the Size, Shape and "
        "Composition pages meanwhile."
    )
    if "feed" in chosen:
        feed_row = in_campaign[in_campaign["sample_id"] == chosen["feed"]].iloc[0]
        st.caption(f"Feed {chosen['feed']}: {int(feed_row.particle_count or 0):,} particles.")
    st.stop()

phases = common.load("phases")
if not phases:
    st.info("The samples have no phases: recovery needs the grade of a phase.")
    st.stop()
left, right = st.columns(2)
phase = left.selectbox("Valuable phase", phases, index=len(phases) - 1, key="process_phase")
measure = right.selectbox(
    "Size measure", list(queries.SIZE_MEASURES), format_func=lambda k: queries.SIZE_MEASURES[k][1], key="process_measure"
)  # fmt: skip
product_ids = [chosen[s] for s in ("feed", "concentrate", "tailings") if s in chosen]
totals = common.load("product_totals", sample_ids=product_ids, phase=phase).set_index("sample_id")
if not {chosen["concentrate"], chosen["tailings"]} <= set(totals.index):
    st.info(f"The concentrate or the tailings has no {phase} column or no particle off the border.")
    st.stop()
grade = {s: totals.loc[chosen[s], "grade_pct"] / 100 for s in chosen if chosen[s] in totals.index}

# ---- mass split
st.subheader("Two-product mass balance")
masses = info.set_index("sample_id")["mass_g"]
mass_c, mass_t = (masses.get(chosen[s]) for s in ("concentrate", "tailings"))
mass_c = None if mass_c is None or pd.isna(mass_c) else float(mass_c)
mass_t = None if mass_t is None or pd.isna(mass_t) else float(mass_t)
from_masses = balance.split_from_masses(mass_c, mass_t)
from_grades = (
    balance.two_product_split(grade["feed"], grade["concentrate"], grade["tailings"]) if "feed" in grade else None
)
use_masses = False
if from_masses is not None:
    use_masses = st.checkbox(
        "Use mass_g of the concentrate and tailings as the products' masses", value=True, key="process_use_masses",
        help="Right when each product was weighed whole (and scanned, or the scan is of a split whose mass_g was "
        "scaled to the product); untick when mass_g is only the mass of a scanned sub-sample.",
    )  # fmt: skip
if use_masses:
    split = balance.Split(from_masses, 1 - from_masses,
                          f"measured: mass_g of the concentrate ({mass_c:g} g) and tailings ({mass_t:g} g)")  # fmt: skip
elif from_grades is not None:
    split = balance.Split(from_grades, 1 - from_grades,
                          f"two-product formula C/F = (f - t)/(c - t) on the {phase} grades "
                          + ("(mass_g not given for both products)" if from_masses is None else "(mass_g not used)"))  # fmt: skip
else:
    st.error(
        "No mass split: mass_g is not given for both products and the two-product formula is undefined "
        + ("(no feed sample)" if "feed" not in grade else "(the feed grade does not lie between the products' grades)")
    )
    st.stop()
assumption = (
    "Grades are volume fractions, taken as mass fractions: this assumes one density for all phases "
    "(the catalog stores no phase densities); border-touching particles are excluded."
)
rows = [
    {"quantity": "C/F (concentrate yield)", "value": f"{100 * split.concentrate:.2f} %", "source": split.source},
    {"quantity": "T/F (tailings)", "value": f"{100 * split.tailings:.2f} %", "source": "1 - C/F"},
]
if from_grades is not None and use_masses:
    rows.append({"quantity": "C/F from grades (check)", "value": f"{100 * from_grades:.2f} %",
                 "source": "two-product formula on the grades"})  # fmt: skip
for stream in ("feed", "concentrate", "tailings"):
    if stream in grade:
        rows.append({"quantity": f"{phase} grade of the {stream}", "value": f"{100 * grade[stream]:.2f} %",
                     "source": f"{chosen[stream]}: {int(totals.loc[chosen[stream], 'particles']):,} particles"})  # fmt: skip
c, t = grade["concentrate"], grade["tailings"]
feed_calc = split.concentrate * c + split.tailings * t
rows.append({"quantity": f"{phase} grade of the feed, calculated", "value": f"{100 * feed_calc:.2f} %",
             "source": "C c + T t"})  # fmt: skip
recovery = split.concentrate * c / feed_calc if feed_calc > 0 else math.nan
rows.append({"quantity": f"{phase} recovery R to the concentrate", "value": f"{100 * recovery:.1f} %",
             "source": "C c / (C c + T t)" + (" = c (f - t)/[f (c - t)]" if not use_masses else "")})  # fmt: skip
st.dataframe(pd.DataFrame(rows), hide_index=True, key="process_balance")
common.weighting_caption("volume", int(totals["particles"].sum()), len(totals), assumption)


# ---- recovery and partition by class
def by_class(by: str) -> pd.DataFrame:
    data = common.load("product_classes", sample_ids=[chosen["concentrate"], chosen["tailings"]], phase=phase, by=by,
                       measure=measure)  # fmt: skip
    numbers = ["class", "particles", "volume_mm3", "phase_volume_mm3", "volume_share_pct"]
    conc = data[data["sample_id"] == chosen["concentrate"]][numbers].set_index("class")
    tail = data[data["sample_id"] == chosen["tailings"]][numbers].set_index("class")
    classes = sorted(set(conc.index) | set(tail.index))
    conc, tail = conc.reindex(classes).fillna(0), tail.reindex(classes).fillna(0)
    out = pd.DataFrame({"class": classes})
    c_share, t_share = (conc["volume_share_pct"] / 100).tolist(), (tail["volume_share_pct"] / 100).tolist()
    c_grade = (conc["phase_volume_mm3"] / conc["volume_mm3"].where(conc["volume_mm3"] > 0)).fillna(0).tolist()
    t_grade = (tail["phase_volume_mm3"] / tail["volume_mm3"].where(tail["volume_mm3"] > 0)).fillna(0).tolist()
    out["recovery_pct"] = [None if r is None else 100 * r
                           for r in balance.class_recovery(split.concentrate, c_share, t_share, c_grade, t_grade)]  # fmt: skip
    out["partition_pct"] = [None if p is None else 100 * p
                            for p in balance.partition_numbers(split.concentrate, c_share, t_share)]  # fmt: skip
    out["particles_concentrate"] = conc["particles"].astype(int).tolist()
    out["particles_tailings"] = tail["particles"].astype(int).tolist()
    out["particles"] = out["particles_concentrate"] + out["particles_tailings"]
    return out


size = by_class("size")
size["lower_mm"] = 2 ** (size["class"] / 2)
size["upper_mm"] = 2 ** ((size["class"] + 1) / 2)
size["centre_mm"] = (size["lower_mm"] * size["upper_mm"]) ** 0.5
liberation = by_class("liberation")
liberation["label"] = [queries.LIBERATION_LABELS[int(k)] for k in liberation["class"]]
label = queries.SIZE_MEASURES[measure][1]
counts = int(size["particles"].sum())

st.subheader("Recovery by size class and by liberation class")
tooltip_size = [alt.Tooltip("lower_mm:Q", format=".3g"), alt.Tooltip("upper_mm:Q", format=".3g"),
                alt.Tooltip("recovery_pct:Q", format=".1f"), alt.Tooltip("partition_pct:Q", format=".1f"),
                "particles_concentrate", "particles_tailings"]  # fmt: skip
rec_size = (
    alt.Chart(size).mark_line(point=True)
    .encode(x=alt.X("centre_mm:Q", scale=alt.Scale(type="log"), title=f"{label}, √2 class centre (mm, log scale)"),
            y=alt.Y("recovery_pct:Q", title=f"{phase} recovery (%)", scale=alt.Scale(domain=[0, 100])),
            tooltip=tooltip_size)
    .properties(height=280, title=f"{phase} recovery by size class")
)  # fmt: skip
rec_lib = (
    alt.Chart(liberation).mark_bar()
    .encode(x=alt.X("label:N", sort=queries.LIBERATION_LABELS, title=f"particle grade of {phase} (liberation class)"),
            y=alt.Y("recovery_pct:Q", title=f"{phase} recovery (%)", scale=alt.Scale(domain=[0, 100])),
            tooltip=["label", alt.Tooltip("recovery_pct:Q", format=".1f"), alt.Tooltip("partition_pct:Q", format=".1f"),
                     "particles_concentrate", "particles_tailings"])
    .properties(height=280, title=f"{phase} recovery by liberation class")
)  # fmt: skip
c1, c2 = st.columns(2)
c1.altair_chart(rec_size, width="stretch", height=390, key="process_recovery_size")
c2.altair_chart(rec_lib, width="stretch", height=450, key="process_recovery_liberation")
common.weighting_caption("volume", counts, 2, f"concentrate + tailings; split {split.source}")

st.subheader("Partition (Tromp) curve by size")
d50, ep = balance.d50_ep(size["centre_mm"].tolist(), [None if pd.isna(p) else p / 100 for p in size["partition_pct"]])
tromp = alt.Chart(size).mark_line(point=True).encode(
    x=alt.X("centre_mm:Q", scale=alt.Scale(type="log"), title=f"{label} (mm, log scale)"),
    y=alt.Y("partition_pct:Q", title="partition number to concentrate (%)", scale=alt.Scale(domain=[0, 100])),
    tooltip=tooltip_size,
)
layers = [tromp, alt.Chart(pd.DataFrame({"p": [50]})).mark_rule(strokeDash=[4, 3], color="gray").encode(y="p:Q")]
if d50 is not None:
    layers.append(alt.Chart(pd.DataFrame({"d": [d50]})).mark_rule(color="red").encode(x="d:Q"))
st.altair_chart(alt.layer(*layers).properties(height=300, title="Partition curve P_i = C c_i / (C c_i + T t_i)"),
                width="stretch", height=410, key="process_tromp")  # fmt: skip
st.markdown(
    f"**d50** = {d50:.4g} mm · **Ep** = (d75 - d25)/2 = {ep:.4g} mm" if d50 is not None and ep is not None
    else f"**d50** = {d50:.4g} mm · Ep: the curve does not cross both 25 % and 75 %" if d50 is not None
    else "**d50**: the partition curve does not cross 50 % in the measured size range"
)  # fmt: skip
common.weighting_caption("volume", counts, 2, "concentrate + tailings, border-touching particles excluded")

st.subheader("Grade–recovery")
feed_id = chosen.get("feed")
if feed_id is None:
    st.info("No feed sample: the liberation-limited curve is computed from the feed's particles.")
else:
    curve = common.load("liberation_yield", sample_ids=[feed_id], phase=phase)
    theory = alt.Chart(curve).mark_line().encode(
        x=alt.X("phase_yield_pct:Q", title=f"{phase} recovery (%)", scale=alt.Scale(domain=[0, 100])),
        y=alt.Y("cumulative_grade_pct:Q", title=f"{phase} grade of the concentrate (volume %)"),
        tooltip=[alt.Tooltip("grade_pct:Q", title="particles of grade ≥ (%)"),
                 alt.Tooltip("phase_yield_pct:Q", format=".1f"), alt.Tooltip("cumulative_grade_pct:Q", format=".1f"),
                 "particles"],
    )  # fmt: skip
    actual = alt.Chart(pd.DataFrame({"recovery": [100 * recovery], "grade": [100 * c], "what": ["actual concentrate"]}))
    point = actual.mark_point(size=160, filled=True, color="red").encode(
        x="recovery:Q", y="grade:Q", tooltip=["what", alt.Tooltip("recovery:Q", format=".1f"),
                                              alt.Tooltip("grade:Q", format=".1f")])  # fmt: skip
    st.altair_chart(
        alt.layer(theory, point).properties(
            height=320, title="Liberation-limited grade-recovery of the feed (line) and the actual concentrate (point)"
        ),
        width="stretch", height=430, key="process_grade_recovery",
    )  # fmt: skip
    feed_particles = int(curve["particles"].max()) if not curve.empty else 0
    common.weighting_caption("phase volume", feed_particles, 1,
                             "feed particles sorted by grade and accumulated (all particles of the feed)")  # fmt: skip
