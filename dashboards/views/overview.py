"""Overview: every sample with its metadata, status and quality flags."""

import altair as alt
import streamlit as st

from dashboards import common

st.title("Overview")
if not common.has_catalog():
    common.require_selection()  # explains and stops

samples = common.all_samples()
st.subheader("Samples")
st.caption(
    f"{len(samples)} sample(s) in the catalog, {int(samples['particle_count'].fillna(0).sum()):,} particles stored. "
    "D-values: ESD by volume, border-touching particles excluded."
)
shown = samples[[
    "sample_id", "stream", "campaign", "material", "particle_count", "particle_size_mm", "d10_volume_mm",
    "d50_volume_mm", "d80_volume_mm", "mass_g", "model_name", "model_version", "status", "updated_at",
    "acquired_at", "run_finished_at", "error",
]]  # fmt: skip
st.dataframe(shown, hide_index=True, key="overview_samples")

problems = samples[samples["status"] != "ingested"]
if not problems.empty:
    st.warning(
        f"{len(problems)} sample(s) whose latest ingestion did not finish: "
        + ", ".join(f"{r.sample_id} ({r.status})" for r in problems.itertuples())
        + ". Their earlier particles, if any, stay shown."
    )

ids = common.require_selection()
st.subheader("Quality flags")
left, right = st.columns(2)
floor = left.number_input(
    "Resolution floor (voxels)", min_value=1, max_value=10**7, value=1000, step=100, key="quality_floor",
    help="Particles of fewer voxels are dominated by voxelisation (MSPaCMAn drops < 1,000-10,000 voxels).",
)  # fmt: skip
fence = right.number_input(
    "Merger fence (IQRs of ln ESD above Q3)", min_value=0.5, max_value=10.0, value=3.0, step=0.5, key="quality_fence",
    help="A particle whose ln(ESD) lies above Q3 + k IQR of its sample's is flagged as a suspected merger.",
)  # fmt: skip
quality = common.load("quality", sample_ids=ids, floor_voxels=int(floor), merger_iqr=float(fence))
st.dataframe(
    quality.rename(columns={
        "border_pct": "border-touching %", "below_floor": f"< {int(floor)} voxels",
        "below_floor_pct": f"< {int(floor)} voxels %", "suspected_mergers": "suspected mergers",
        "merger_fence_esd_mm": "merger fence ESD (mm)",
    }),
    hide_index=True, key="overview_quality",
)  # fmt: skip
common.weighting_caption("number", int(quality["particles"].sum()), len(quality), "all particles, border-touching included")

long = quality.melt(
    id_vars=["sample_id"], value_vars=["border_pct", "below_floor_pct"], var_name="flag", value_name="pct"
).replace({"border_pct": "touching the border", "below_floor_pct": "below the resolution floor"})
chart = (
    alt.Chart(long)
    .mark_bar()
    .encode(
        x=alt.X("sample_id:N", title="sample"),
        xOffset="flag:N",
        y=alt.Y("pct:Q", title="% of particles (number)"),
        color=alt.Color("flag:N", title="flag"),
        tooltip=["sample_id", "flag", alt.Tooltip("pct:Q", format=".1f")],
    )
    .properties(height=280, title="Quality flags (% of particles, number-weighted)")
)
st.altair_chart(chart, width="stretch", height=450, key="overview_flags")
