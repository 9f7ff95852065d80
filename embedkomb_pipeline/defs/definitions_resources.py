"""Resources bound for the whole code location; tests and the demo bind their own."""

from __future__ import annotations

import dagster as dg

from embedkomb_pipeline.defs.resources import DenseModelResource, HubSourceData, LakeResource


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "lake": LakeResource(),
            "source_data": HubSourceData(),
            "dense_model": DenseModelResource(),
        }
    )
