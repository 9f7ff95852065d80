"""The demo's machinery, not a pipeline stage: local services (embedded PostgreSQL, kombinat), local volunteers
running the real annotator, the Dagster instance, the live board, and the runner behind `make demo`."""
