"""Particle explorer: filter one sample's particles by any column; slices of one particle."""

import math

import streamlit as st

from dashboards import common, slices

st.title("Particle explorer")
ids = common.require_selection()
with_volumes = [i for i in ids if slices.locate(common.home(), i).labels_found]
sample_id = st.selectbox(
    "Sample", ids, index=ids.index(with_volumes[0]) if with_volumes else 0, key="explorer_sample",
    help="Samples whose labels are archived in this home (slices available) are chosen first.",
)  # fmt: skip
columns = common.load("filterable_columns")
chosen = st.multiselect(
    "Filter by columns", [c for c in columns if c != "particle_id"], default=["esd_mm"], key="explorer_columns"
)
ranges = {}
for column in chosen:
    low, high = common.load("column_range", sample_id=sample_id, column=column)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        st.caption(f"{column}: no values in {sample_id}")
        continue
    if low == high:
        st.caption(f"{column}: every particle has {low:g}")
        continue
    ranges[column] = st.slider(column, min_value=float(low), max_value=float(high), value=(float(low), float(high)),
                               key=f"explorer_range_{sample_id}_{column}")  # fmt: skip
left, right = st.columns(2)
order_by = left.selectbox("Order by", columns, index=columns.index("volume_mm3"), key="explorer_order")
descending = right.radio("Order", ("descending", "ascending"), horizontal=True, key="explorer_direction") == "descending"
rows, matches = common.load(
    "find_particles", sample_id=sample_id, ranges=ranges, order_by=order_by, descending=descending, limit=200
)
st.caption(f"{matches:,} particle(s) of {sample_id} match; the first {len(rows)} are listed.")
st.dataframe(rows, hide_index=True, key="explorer_table")
if rows.empty:
    st.stop()

st.subheader("Slices of one particle")
particle_id = st.selectbox("Particle", rows["particle_id"].tolist(), key=f"explorer_particle_{sample_id}")
row = common.load("particle", sample_id=sample_id, particle_id=int(particle_id))
info = common.sample_info([sample_id]).iloc[0]
where = slices.locate(common.home(), sample_id)
st.caption(
    f"Bounding box z {row['bbox_z0']}-{row['bbox_z1']}, y {row['bbox_y0']}-{row['bbox_y1']}, "
    f"x {row['bbox_x0']}-{row['bbox_x1']} (voxels); ESD {row['esd_mm']:.4g} mm; "
    f"{'touches the border' if row['touches_border'] else 'inside the volume'}."
)
if not where.labels_found:
    st.info(
        "No slices: the catalog stores each particle's bounding box and the sample's voxel size, but no path to the "
        f"scan image or the labels, and the ingest flow's archive is not in this home (looked for `{where.labels}` "
        f"and `{where.image}`). Slices are shown for samples ingested by `ps3d serve` into this home."
    )
    st.stop()
spacing = (info["spacing_z_mm"], info["spacing_y_mm"], info["spacing_x_mm"])
try:
    images = slices.particle_slices(common.home(), row, spacing)
except (OSError, ValueError) as error:
    st.error(f"Could not read the crop of particle {particle_id}: {error}")
    st.stop()
if not where.image_found:
    st.warning(f"Scan image `{where.image}` not found: showing the label mask only.")
columns_ = st.columns(3)
for column, (name, image) in zip(columns_, images.items()):
    column.image(image, caption=f"slice {name} through the centroid")
st.caption("Crop = bounding box + 4 voxels; red: the particle's label outline; grey values scaled to the crop's "
           "1st-99.5th percentile.")  # fmt: skip
