"""Shape: distributions per sample (box or violin), Zingg diagram, size vs sphericity."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboards import common, queries

st.title("Particle shape")
ids = common.require_selection()
EXCLUDED = "border-touching particles excluded (cut particles do not have their own shape)"

left, middle, right = st.columns(3)
weighting = left.radio("Weighting", queries.WEIGHTINGS, horizontal=True, key="shape_weighting")
style = middle.radio("Plot", ("box", "violin"), horizontal=True, key="shape_style")
measure = right.selectbox(
    "Size measure (density plot)", list(queries.SIZE_MEASURES), format_func=lambda k: queries.SIZE_MEASURES[k][1],
    key="shape_measure",
)  # fmt: skip

st.subheader("Shape distributions per sample")
stats = common.load("shape_box_stats", sample_ids=ids, weighting=weighting)
if stats.empty:
    st.info("The selected samples have no particle that does not touch the border.")
    st.stop()
labels = {k: v[1] for k, v in queries.SHAPE_MEASURES.items()}
stats["measure_label"] = stats["measure"].map(labels)
if style == "box":
    base = alt.Chart(stats).encode(x=alt.X("sample_id:N", title="sample"))
    whiskers = base.mark_rule().encode(y=alt.Y("p5:Q", title="value", scale=alt.Scale(domain=[0, 1])), y2="p95:Q")
    boxes = base.mark_bar(size=18).encode(
        y="q1:Q", y2="q3:Q", color=alt.Color("sample_id:N", legend=None),
        tooltip=["sample_id", "measure_label", "particles", *(alt.Tooltip(f"{c}:Q", format=".3f")
                 for c in ("p5", "q1", "median", "q3", "p95", "mean"))],
    )  # fmt: skip
    medians = base.mark_tick(color="black", size=18, thickness=2).encode(y="median:Q")
    chart = (
        alt.layer(whiskers, boxes, medians, data=stats)
        .properties(width=220, height=260)
        .facet(column=alt.Column("measure_label:N", title=None))
        .properties(title=f"Box: Q1-median-Q3, whiskers P5-P95 ({weighting}-weighted)")
    )
else:
    hist = common.load("shape_histograms", sample_ids=ids, weighting=weighting)
    hist["measure_label"] = hist["measure"].map(labels)
    chart = (
        alt.Chart(hist)
        .mark_area(orient="horizontal", interpolate="monotone")
        .encode(
            y=alt.Y("x:Q", title="value", scale=alt.Scale(domain=[0, 1])),
            x=alt.X("density:Q", stack="center", axis=None, title=None),
            color=alt.Color("sample_id:N", title="sample"),
            tooltip=["sample_id", "measure_label", alt.Tooltip("x:Q", format=".3f"), alt.Tooltip("density:Q", format=".2f"),
                     "particles"],
        )  # fmt: skip
        .properties(width=70, height=240)
        .facet(row=alt.Row("measure_label:N", title=None), column=alt.Column("sample_id:N", title=None))
        .properties(title=f"Violins: density of each measure ({weighting}-weighted)")
    )
st.altair_chart(chart, key="shape_distributions")
counts = stats.groupby("sample_id")["particles"].max()
common.weighting_caption(weighting, int(counts.sum()), len(counts), EXCLUDED)

st.subheader("Zingg diagram")
hexes = common.load("zingg_hexbins", sample_ids=ids, weighting=weighting)
radius = 0.025
width = 420
hexagon = "M0,-1L0.866,-0.5L0.866,0.5L0,1L-0.866,0.5L-0.866,-0.5Z"
limit = queries.ZINGG_LIMIT
cells = (
    alt.Chart(hexes)
    .mark_point(shape=hexagon, filled=True, opacity=1)
    .encode(
        x=alt.X("x:Q", scale=alt.Scale(domain=[0, 1], nice=False), title="elongation b/a (intermediate / major)"),
        y=alt.Y("y:Q", scale=alt.Scale(domain=[0, 1], nice=False), title="flatness c/b (minor / intermediate)"),
        color=alt.Color("weight_pct:Q", scale=alt.Scale(scheme="viridis", type="sqrt"), title=f"% ({weighting})"),
        tooltip=[alt.Tooltip("x:Q", format=".2f"), alt.Tooltip("y:Q", format=".2f"), "particles",
                 alt.Tooltip("weight_pct:Q", format=".2f")],
    )  # fmt: skip
    .properties(width=width, height=width)
)
# a hexagon of circumradius r data units spans 2 r * width pixels vertically
# Vega scales a custom shape's [-1, 1] square to a square of area `size`: circumradius = sqrt(size) / 2 pixels
cells = cells.encode(size=alt.value((2 * radius * width * 1.04) ** 2))
rules = alt.Chart(pd.DataFrame({"v": [limit]}))
zones = pd.DataFrame({
    "x": [0.83, 0.83, 0.33, 0.33], "y": [0.97, 0.30, 0.97, 0.30],
    "label": ["equant", "disc (oblate)", "rod (prolate)", "blade"],
})  # fmt: skip
zingg = alt.layer(
    cells,
    rules.mark_rule(strokeDash=[5, 3], color="black", strokeWidth=1.5).encode(x="v:Q"),
    rules.mark_rule(strokeDash=[5, 3], color="black", strokeWidth=1.5).encode(y="v:Q"),
    alt.Chart(zones).mark_text(color="black", fontWeight="bold").encode(x="x:Q", y="y:Q", text="label:N"),
).properties(title=f"Zingg diagram, hexagonal bins of all selected samples ({weighting}-weighted)")
classes = common.load("zingg_classes", sample_ids=ids, weighting=weighting)
col1, col2 = st.columns([3, 2])
col1.altair_chart(zingg, key="shape_zingg")
col2.dataframe(
    classes.pivot(index="sample_id", columns="zingg_class", values="pct").round(1), key="shape_zingg_classes"
)
col2.caption(f"% of each sample per Zingg class ({weighting}); limits b/a = c/b = 2/3.")
common.weighting_caption(weighting, int(hexes["particles"].sum()), len(ids), EXCLUDED)

st.subheader("Size vs sphericity")
density = common.load("size_sphericity_density", sample_ids=ids, measure=measure, weighting=weighting)
label = queries.SIZE_MEASURES[measure][1]
heat = (
    alt.Chart(density)
    .mark_rect()
    .encode(
        x=alt.X("size_lo_mm:Q", scale=alt.Scale(type="log"), title=f"{label} (mm, log scale)"),
        x2="size_hi_mm:Q",
        y=alt.Y("sph_lo:Q", title="sphericity ψ", scale=alt.Scale(domain=[0, 1])),
        y2="sph_hi:Q",
        color=alt.Color("weight_pct:Q", scale=alt.Scale(scheme="viridis", type="sqrt"), title=f"% ({weighting})"),
        tooltip=[alt.Tooltip("size_lo_mm:Q", format=".4f"), alt.Tooltip("size_hi_mm:Q", format=".4f"),
                 alt.Tooltip("sph_lo:Q", format=".2f"), "particles", alt.Tooltip("weight_pct:Q", format=".2f")],
    )  # fmt: skip
    .properties(height=320, title=f"2-D density of {label} and sphericity ({weighting}-weighted)")
)
st.altair_chart(heat, width="stretch", height=430, key="shape_density")
common.weighting_caption(weighting, int(density["particles"].sum()), len(ids), EXCLUDED)
