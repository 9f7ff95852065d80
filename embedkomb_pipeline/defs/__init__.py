"""Dagster wiring only: assets, checks, sensors and resources that call the plain modules beside this folder."""
