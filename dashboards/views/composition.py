"""Composition: modal mineralogy, phase grade by size class, liberation spectrum and yield."""

import altair as alt
import streamlit as st

from dashboards import common, queries

st.title("Composition and liberation")
ids = common.require_selection()
phases = common.load("phases")
if not phases:
    st.info("No stored sample has phases (phase_<name>_fraction columns): give `phases` in scan.json, or let "
            "the features step find them.")  # fmt: skip
    st.stop()

left, right = st.columns(2)
phase = left.selectbox("Phase", phases, index=len(phases) - 1, key="composition_phase")
measure = right.selectbox(
    "Size measure", list(queries.SIZE_MEASURES), format_func=lambda k: queries.SIZE_MEASURES[k][1],
    key="composition_measure",
)  # fmt: skip

st.subheader("Modal mineralogy")
modal = common.load("modal_mineralogy", sample_ids=ids)
if modal.empty:
    st.info(f"The selected samples have no phase columns; phases exist in other samples ({', '.join(phases)}).")
    st.stop()
chart = (
    alt.Chart(modal)
    .mark_bar()
    .encode(
        x=alt.X("sample_id:N", title="sample"),
        y=alt.Y("volume_pct:Q", title="% of the sample's particle volume", stack="zero"),
        color=alt.Color("phase:N", title="phase"),
        tooltip=["sample_id", "phase", alt.Tooltip("volume_pct:Q", format=".2f"), "particles"],
    )
    .properties(height=260, title="Phase volume % per sample")
)
st.altair_chart(chart, width="stretch", height=430, key="composition_modal")
counts = modal.groupby("sample_id")["particles"].max()
common.weighting_caption("volume", int(counts.sum()), len(counts), "all particles")

st.subheader(f"{phase}: grade and deportment by size class")
grades = common.load("grade_by_size", sample_ids=ids, phase=phase, measure=measure)
grades["centre_mm"] = (grades["lower_mm"] * grades["upper_mm"]) ** 0.5
label = queries.SIZE_MEASURES[measure][1]
x = alt.X("centre_mm:Q", scale=alt.Scale(type="log"), title=f"{label}, √2 class centre (mm, log scale)")
tooltip = ["sample_id", alt.Tooltip("lower_mm:Q", format=".3g"), alt.Tooltip("upper_mm:Q", format=".3g"), "particles",
           alt.Tooltip("grade_pct:Q", format=".2f"), alt.Tooltip("deportment_pct:Q", format=".2f")]  # fmt: skip
grade_chart = (
    alt.Chart(grades).mark_line(point=True)
    .encode(x=x, y=alt.Y("grade_pct:Q", title=f"{phase} grade (volume %)"), color="sample_id:N", tooltip=tooltip)
    .properties(height=280, title=f"{phase} grade per size class")
)  # fmt: skip
deportment_chart = (
    alt.Chart(grades).mark_line(point=True, strokeDash=[4, 2])
    .encode(x=x, y=alt.Y("deportment_pct:Q", title=f"% of the sample's {phase}"), color="sample_id:N", tooltip=tooltip)
    .properties(height=280, title=f"Deportment: share of the {phase} in each size class")
)  # fmt: skip
c1, c2 = st.columns(2)
c1.altair_chart(grade_chart, width="stretch", height=390, key="composition_grade")
c2.altair_chart(deportment_chart, width="stretch", height=390, key="composition_deportment")
common.weighting_caption("volume", int(grades["particles"].sum()), grades["sample_id"].nunique(),
                         "border-touching particles excluded; hover for the particles per class")  # fmt: skip

st.subheader(f"{phase}: liberation spectrum")
spectrum = common.load("liberation_spectrum", sample_ids=ids, phase=phase)
order = queries.LIBERATION_LABELS
bars = (
    alt.Chart(spectrum)
    .mark_bar()
    .encode(
        x=alt.X("sample_id:N", title="sample"),
        y=alt.Y("phase_pct:Q", title=f"% of the sample's {phase} volume", stack="zero"),
        color=alt.Color("label:N", sort=order, scale=alt.Scale(scheme="redyellowgreen"),
                        title=f"particle grade of {phase}"),  # fmt: skip
        order=alt.Order("liberation_class:Q"),
        tooltip=["sample_id", "label", "particles", alt.Tooltip("phase_pct:Q", format=".2f"),
                 alt.Tooltip("volume_pct:Q", format=".2f")],
    )  # fmt: skip
    .properties(height=320, title=f"Liberation spectrum: {phase} volume per liberation class")
)
yield_curve = common.load("liberation_yield", sample_ids=ids, phase=phase)
curve = (
    alt.Chart(yield_curve)
    .mark_line()
    .encode(
        x=alt.X("grade_pct:Q", title=f"particle grade of {phase} ≥ (volume %)", scale=alt.Scale(reverse=True)),
        y=alt.Y("phase_yield_pct:Q", title=f"cumulative % of the {phase}", scale=alt.Scale(domain=[0, 100])),
        color="sample_id:N",
        tooltip=["sample_id", "grade_pct", alt.Tooltip("phase_yield_pct:Q", format=".1f"),
                 alt.Tooltip("cumulative_grade_pct:Q", format=".1f"), "particles"],
    )  # fmt: skip
    .properties(height=320, title="Cumulative liberation yield")
)
c1, c2 = st.columns(2)
c1.altair_chart(bars, width="stretch", height=490, key="composition_liberation")
c2.altair_chart(curve, width="stretch", height=430, key="composition_yield")
common.weighting_caption("phase volume", int(spectrum["particles"].sum()), spectrum["sample_id"].nunique(),
                         "all particles (a cut particle's grade is that of its visible part); 3-D grades, no "
                         "stereological correction needed")  # fmt: skip
