"""Acceptance for the labeling loop, end to end on the real PostgreSQL:

Dagster (instance in PostgreSQL) materializes source → mining → work_queue → honeypots into a real kombinat
(uvicorn on loopback); two volunteers run the real `annotator` command (real HTTP, llama.cpp with the tiny
offline model); then labeled_pairs → verified_pairs; the export loads with `datasets`; the retrain and
refill sensors are evaluated with build_sensor_context; checks pass on good data and fail on planted bad
data (duplicate pair IDs, a contributor who labels at random). GitHub is the only fake.

kombinat's honeypot quarantine is switched off here (KOMBINAT_HONEYPOT_QUARANTINE=false, and the trust bar
KOMBINAT_HONEYPOT_MIN_ACCURACY=0): the tiny test model
(AUC about 0.6) cannot pass honeypots, and this test is about the loop, not about the model's quality.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl
import pytest

from annotator import auth
from embedkomb_pipeline.defs.labeling import (
    honeypots,
    labeled_pairs,
    refill_sensor,
    verified_pairs,
    work_queue,
)
from embedkomb_pipeline.defs.mining import mining_shard
from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME
from embedkomb_pipeline.defs.resources import (
    DatasetPublisherResource,
    DenseModelResource,
    KombinatResource,
    LakeResource,
    LocalSourceData,
    QualityThresholds,
)
from embedkomb_pipeline.defs.sources import source_pairs
from embedkomb_pipeline.defs.training import retrain_sensor
from tests.annotator.conftest import TINY_ENTRY, TINY_MODEL
from tests.conftest import MIRROR_SPLIT
from tests.pipeline.conftest import scifact_rows, write_hub_mirror
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import admit_model, bearer, running_kombinat, sign_in

KEY = dg.MultiPartitionKey({"split": MIRROR_SPLIT, "cycle": "c000"})


@contextmanager
def identity(home: Path) -> Iterator[dict[str, str]]:
    """The ANNOTATOR_* directories of one volunteer, set for this process while inside."""
    env = {
        "ANNOTATOR_CONFIG_DIR": str(home / "config"),
        "ANNOTATOR_DATA_DIR": str(home / "data"),
        "ANNOTATOR_CACHE_DIR": str(home / "cache"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def volunteer(server_url: str, github: FakeGitHub, login: str, user_id: int, home: Path) -> dict[str, str]:
    """Sign a volunteer in through the device flow and store their token where their annotator looks."""
    token = sign_in(_Server(server_url), github, login, user_id)
    me = httpx.get(f"{server_url}/api/v1/me", headers=bearer(token)).json()
    with identity(home) as env:
        auth.save(auth.Credentials(server_url, token, login, str(me["contributor_id"])))
    return env


class _Server:
    def __init__(self, url: str) -> None:
        self.url = url


def run_annotator(server_url: str, env: dict[str, str]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "annotator",
            "run",
            "--server",
            server_url,
            "--model-path",
            str(TINY_MODEL),
            "--json",
            "--once",
            "--batch-size",
            "400",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def label_at_random(server_url: str, token: str, seed: int) -> int:
    """A planted bad contributor: claims a batch through the API and answers coin flips."""
    model = {
        "backend": "llama_cpp",
        "model_id": TINY_ENTRY["model_id"],
        "quantization": "Q4_1",
        "annotator_version": "random-0",
    }
    claim = httpx.post(f"{server_url}/api/v1/batches/claim", headers=bearer(token), json={"size": 400, "model": model})
    claim.raise_for_status()
    batch = claim.json()
    rng = random.Random(seed)
    labels = [
        {
            "pair_id": p["pair_id"],
            "relevant": rng.random() < 0.5,
            "p_relevant": rng.random(),
            "grade": None,
            "truncated": False,
            "seconds": 0.01,
        }
        for p in batch["pairs"]
    ]
    for start in range(0, len(labels), 50):
        sent = httpx.post(
            f"{server_url}/api/v1/batches/{batch['batch_id']}/labels",
            headers=bearer(token),
            json={"model": model, "labels": labels[start : start + 50]},
        )
        sent.raise_for_status()
    return len(labels)


def _checks(result: dg.ExecuteInJobResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _meta(result: dg.ExecuteInJobResult, node: str) -> dict[str, Any]:
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_loop_end_to_end(
    postgres_instance: dg.DagsterInstance, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert TINY_MODEL.exists(), "run `make models-tiny` (make test does)"
    mirror = write_hub_mirror(tmp_path / "mirror", MIRROR_SPLIT, scifact_rows(shared_data, 16, max_chars=400))
    lake = LakeResource(storage_dir=str(tmp_path / "lake"))

    with (
        FakeGitHub() as github,
        running_kombinat(
            github=github,
            env={"KOMBINAT_HONEYPOT_QUARANTINE": "false", "KOMBINAT_HONEYPOT_MIN_ACCURACY": "0"},
            log_path=tmp_path / "kombinat.log",
        ) as server,
    ):
        admit_model(server, TINY_ENTRY)
        kombinat = KombinatResource(url=server.url, admin_token=server.admin_token)
        resources = {
            "lake": lake,
            "source_data": LocalSourceData(mirror_dir=str(mirror), beir_data_dir=str(shared_data)),
            "dense_model": DenseModelResource(),
            "kombinat": kombinat,
            "publisher": DatasetPublisherResource(),
            "quality": QualityThresholds(
                kappa_floor=0.4, honeypot_accuracy_floor=0.0, relevant_rate_max=1.0, min_pairs_for_kappa=10
            ),
        }
        every = [source_pairs, mining_shard, work_queue, honeypots, labeled_pairs, verified_pairs]

        def materialize(selection: list, **kwargs: Any) -> dg.ExecuteInJobResult:
            result = dg.materialize(
                every, selection=selection, resources=resources, instance=postgres_instance, **kwargs
            )
            assert result.success
            return result

        # source → mining → work_queue (two runs: the budget pushes the shard in two chunks) → honeypots
        materialize([source_pairs], partition_key=MIRROR_SPLIT)
        postgres_instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, ["c000"])
        materialize([mining_shard], partition_key=KEY, run_config={"ops": {"mining_shard": {"config": {"top_k": 3}}}})
        queue_config = {"ops": {"work_queue": {"config": {"depth_budget": 30, "chunk_size": 20}}}}
        first_push = _meta(materialize([work_queue], partition_key=KEY, run_config=queue_config), "work_queue")
        assert first_push["enqueued"] == 30 and first_push["remaining_in_shard"] == 48 - 30

        # the queue is full to its budget: the refill sensor asks for nothing until volunteers drain it
        sensor_resources = {"lake": lake, "kombinat": kombinat}
        monkeypatch.setenv("EMBEDKOMB_QUEUE_LOW_WATERMARK", "10")
        with dg.build_sensor_context(instance=postgres_instance, resources=sensor_resources) as context:
            assert refill_sensor(context).run_requests == []
        # a second push is a no-op while the queue is at its budget: nothing is sent twice
        again = _meta(materialize([work_queue], partition_key=KEY, run_config=queue_config), "work_queue")
        assert again["enqueued"] == 0 and again["pushed_through"] == 30
        hp = _meta(
            materialize([honeypots], run_config={"ops": {"honeypots": {"config": {"per_source": 8}}}}), "honeypots"
        )
        assert hp["inserted"] == hp["honeypots"] == 16

        # two volunteers label with the real annotator
        alice = volunteer(server.url, github, "alice", 1001, tmp_path / "alice")
        bob = volunteer(server.url, github, "bob", 1002, tmp_path / "bob")
        run_annotator(server.url, alice)
        run_annotator(server.url, bob)
        # both labels are in: the queue drained below the watermark, so the sensor asks for the next chunk
        with dg.build_sensor_context(instance=postgres_instance, resources=sensor_resources) as context:
            refill = refill_sensor(context)
        assert [r.partition_key for r in refill.run_requests] == [KEY]
        second_push = _meta(materialize([work_queue], partition_key=KEY, run_config=queue_config), "work_queue")
        assert second_push["enqueued"] == 18 and second_push["remaining_in_shard"] == 0
        run_annotator(server.url, alice)
        run_annotator(server.url, bob)

        # enough pairs are verified: the retrain sensor first asks for the export of every split mined in c000
        monkeypatch.setenv("EMBEDKOMB_RETRAIN_THRESHOLD", "5")
        with dg.build_sensor_context(instance=postgres_instance, resources=sensor_resources) as context:
            to_export = retrain_sensor(context)
        assert [(r.job_name, r.partition_key) for r in to_export.run_requests] == [("export_job", KEY)]
        assert not to_export.dynamic_partitions_requests  # the next cycle opens only once its checkpoint is asked for
        with dg.build_sensor_context(
            instance=postgres_instance, resources=sensor_resources, cursor=to_export.cursor
        ) as context:
            waiting = retrain_sensor(context)
        assert waiting.run_requests == [] and waiting.skip_reason is not None
        assert MIRROR_SPLIT in (waiting.skip_reason.skip_message or "")

        # snapshot and export
        labeled = materialize([labeled_pairs], partition_key=KEY)
        labeled_meta = _meta(labeled, "labeled_pairs")
        assert labeled_meta["dagster/row_count"] >= 2 * 48
        assert labeled_meta["contributors"] == 2
        assert _checks(labeled) == {"annotator_agreement": True, "label_balance": True, "honeypot_accuracy": True}
        again = _meta(materialize([labeled_pairs], partition_key=KEY), "labeled_pairs")
        assert again["new_labels"] == 0 and again["dagster/row_count"] == labeled_meta["dagster/row_count"]

        verified = materialize([verified_pairs], partition_key=KEY)
        assert _checks(verified) == {"unique_pair_ids": True}
        verified_meta = _meta(verified, "verified_pairs")
        assert verified_meta["dagster/row_count"] > 0
        export_root = lake.export_dir
        from datasets import load_dataset

        dataset = load_dataset(str(export_root), MIRROR_SPLIT, split="train")
        assert len(dataset) == verified_meta["dagster/row_count"]
        assert {
            "query",
            "document",
            "label",
            "p_relevant",
            "n_labels",
            "agreement",
            "status",
            "pair_id",
            "split",
            "cycle",
            "models",
        } <= set(dataset.column_names)
        assert set(dataset["status"]) == {"verified"} and min(dataset["n_labels"]) >= 2
        assert "smollm2" in (export_root / "README.md").read_text().lower() or dataset["models"][0]
        # re-exporting is idempotent
        materialize([verified_pairs], partition_key=KEY)
        assert pl.read_parquet(export_root / "data" / MIRROR_SPLIT / "*.parquet").height == len(dataset)

        # the export landed: the retrain sensor asks for c000's checkpoint and opens c001, which mines with it
        with dg.build_sensor_context(
            instance=postgres_instance, resources=sensor_resources, cursor=to_export.cursor
        ) as context:
            result = retrain_sensor(context)
        added = result.dynamic_partitions_requests[0]
        assert added.partitions_def_name == CYCLE_PARTITIONS_NAME and list(added.partition_keys) == ["c001"]
        assert [(r.job_name, r.partition_key) for r in result.run_requests] == [("checkpoint_job", "c000")]
        assert json.loads(result.cursor)["opened"] == "c001"
        with dg.build_sensor_context(
            instance=postgres_instance, resources=sensor_resources, cursor=result.cursor
        ) as context:
            assert retrain_sensor(context).run_requests == []

        # planted bad data 1: a contributor who answers at random on fresh pairs alice also labels
        extra = scifact_rows(shared_data, 60, max_chars=300)
        fresh = [
            {
                "pair_id": f"00000000-0000-4000-8000-{i:012d}",
                "query": extra["query"][i],
                "document": extra["document"][-1 - i],
                "split": MIRROR_SPLIT,
                "cycle": "c000",
                "priority": 1.0,
            }
            for i in range(30)
        ]
        httpx.post(
            f"{server.url}/api/v1/admin/pairs", json={"pairs": fresh}, headers=bearer(server.admin_token)
        ).raise_for_status()
        mallory_token = sign_in(_Server(server.url), github, "mallory", 1003)
        assert label_at_random(server.url, mallory_token, seed=7) >= 20
        run_annotator(server.url, alice)
        bad = materialize([labeled_pairs], partition_key=KEY)
        assert _checks(bad)["annotator_agreement"] is False
        evaluation = next(e for e in bad.get_asset_check_evaluations() if e.check_name == "annotator_agreement")
        assert evaluation.metadata["lowest_contributor_kappa"].value < 0.4

        # planted bad data 2: a duplicated pair_id in the export
        shutil.copy(
            export_root / "data" / MIRROR_SPLIT / "c000.parquet", export_root / "data" / MIRROR_SPLIT / "c999.parquet"
        )
        duplicated = materialize([verified_pairs], partition_key=KEY)
        assert _checks(duplicated) == {"unique_pair_ids": False}
