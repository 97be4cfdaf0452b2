"""ParticleSeg3D science core: pure functions on arrays and files.

No Prefect, Dask or Streamlit imports here; the orchestration layers
(``tasks``, ``flows``, ``deployments``, ``dashboards``) wrap these functions.
"""

__version__ = "0.1.0"
