"""HTTP routes, one module per area (FastAPI "bigger applications" layout)."""
