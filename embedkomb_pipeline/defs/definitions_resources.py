"""Resources bound for the whole code location; tests and the demo bind their own."""

from __future__ import annotations

import os

import dagster as dg

from embedkomb_pipeline.defs.resources import (
    CheckpointPublisherResource,
    DatasetPublisherResource,
    DenseModelResource,
    HubSourceData,
    KombinatResource,
    LakeResource,
    QualityThresholds,
)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "lake": LakeResource(),
            "source_data": HubSourceData(),
            "dense_model": DenseModelResource(),
            "kombinat": KombinatResource(
                url=os.environ.get("KOMBINAT_URL", "http://127.0.0.1:8000"),
                admin_token=dg.EnvVar("KOMBINAT_ADMIN_TOKEN"),
            ),
            "publisher": DatasetPublisherResource(
                repo_id=os.environ.get("EMBEDKOMB_HUB_DATASET_REPO"), token=os.environ.get("HF_TOKEN")
            ),
            "checkpoint_publisher": CheckpointPublisherResource(
                repo_id=os.environ.get("EMBEDKOMB_HUB_MODEL_REPO"), token=os.environ.get("HF_TOKEN")
            ),
            "quality": QualityThresholds(),
        }
    )
