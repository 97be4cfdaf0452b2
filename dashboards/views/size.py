"""Size: cumulative passing curves, D-values, size-class frequencies."""

import altair as alt
import streamlit as st

from dashboards import common, queries

st.title("Particle size distribution")
ids = common.require_selection()

left, right = st.columns(2)
measure = left.selectbox(
    "Size measure", list(queries.SIZE_MEASURES), format_func=lambda k: queries.SIZE_MEASURES[k][1], key="size_measure",
    help="ESD by default; the minimum Feret diameter or the intermediate axis are closer to sieve sizes for "
    "elongated particles.",
)  # fmt: skip
weighting = right.radio("Weighting", queries.WEIGHTINGS, index=1, horizontal=True, key="size_weighting")
label = queries.SIZE_MEASURES[measure][1]
EXCLUDED = "border-touching particles excluded"

curves = common.load("psd_curves", sample_ids=ids, measure=measure)
if curves.empty:
    st.info("The selected samples have no particle that does not touch the border.")
    st.stop()
value = f"passing_{weighting}_pct"
particles = curves.groupby("sample_id")["particles"].first()
st.subheader("Cumulative passing")
chart = (
    alt.Chart(curves)
    .mark_line()
    .encode(
        x=alt.X("size_mm:Q", scale=alt.Scale(type="log"), title=f"{label} (mm, log scale)"),
        y=alt.Y(f"{value}:Q", title=f"cumulative % passing ({weighting})", scale=alt.Scale(domain=[0, 100])),
        color=alt.Color("sample_id:N", title="sample"),
        tooltip=["sample_id", alt.Tooltip("size_mm:Q", format=".4f"), alt.Tooltip(f"{value}:Q", format=".1f"), "particles"],
    )
    .properties(height=380, title=f"Cumulative % passing by {weighting} vs {label}")
)
st.altair_chart(chart, width="stretch", height=490, key="size_curves")
common.weighting_caption(weighting, int(particles.sum()), len(particles), EXCLUDED)

st.subheader("D-values")
d = common.load("d_values", sample_ids=ids, measure=measure)
columns = ["sample_id", "particles", *(f"d{p}_{weighting}_mm" for p in (10, 50, 80))]
other = "number" if weighting == "volume" else "volume"
columns += [f"d{p}_{other}_mm" for p in (10, 50, 80)]
st.dataframe(d[columns].rename(columns=lambda c: c.replace("_mm", " (mm)")), hide_index=True, key="size_dvalues")
method = "log-linear interpolation between particles (the catalog's d_values algorithm)"
st.caption(f"D10/D50/D80 of {label} by {weighting} and by {other}: {method}; D80 is P80; {EXCLUDED}.")

st.subheader("Size-class frequencies")
classes = common.load("size_classes", sample_ids=ids, measure=measure)
classes["size class (mm)"] = [f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(classes["lower_mm"], classes["upper_mm"])]
order = list(dict.fromkeys(classes.sort_values("lower_mm")["size class (mm)"]))
pct = f"{weighting}_pct"
bars = (
    alt.Chart(classes)
    .mark_bar()
    .encode(
        x=alt.X("size class (mm):N", sort=order, title=f"{label}, √2 classes (mm)"),
        xOffset="sample_id:N",
        y=alt.Y(f"{pct}:Q", title=f"% of the sample ({weighting})"),
        color=alt.Color("sample_id:N", title="sample"),
        tooltip=["sample_id", "size class (mm)", alt.Tooltip(f"{pct}:Q", format=".2f"), "particles"],
    )
    .properties(height=320, title=f"Frequency per size class ({weighting}); hover for particle counts")
)
st.altair_chart(bars, width="stretch", height=490, key="size_classes")
common.weighting_caption(weighting, int(classes["particles"].sum()), classes["sample_id"].nunique(), EXCLUDED)
