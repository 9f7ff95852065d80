"""`make demo`: one whole cycle on one machine; `make ui`: the same services with the Dagster UI.

With no database configured (KOMBINAT_DATABASE_URL or DATABASE_URL), PostgreSQL is the embedded one
(services.py). kombinat is migrated and served on a free loopback port; then Dagster (its instance on the
same PostgreSQL) materializes the cycle on the sample split:

    source_pairs → mining_shard → work_queue + honeypots → two local volunteers label (real `annotator run`,
    llama.cpp, the tiny offline model) → labeled_pairs → verified_pairs (the export) → checkpoint → mteb_scores

Running it again resumes: finished stages whose output is still there are skipped (mining, the queue push,
training when the export did not change), the loop stages re-run and add only what is new; kombinat keys
pairs by pair_id and labels by (pair, contributor), so nothing is ever stored twice. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dagster as dg
import platformdirs
import polars as pl
from rich.console import Console

from embedkomb_pipeline.defs.evaluation import mteb_scores
from embedkomb_pipeline.defs.labeling import honeypots, labeled_pairs, verified_pairs, work_queue
from embedkomb_pipeline.defs.mining import mining_shard
from embedkomb_pipeline.defs.partitions import CYCLE_PARTITIONS_NAME
from embedkomb_pipeline.defs.resources import (
    DenseModelResource,
    HubSourceData,
    KombinatResource,
    LakeResource,
    QualityThresholds,
    SourceDataResource,
)
from embedkomb_pipeline.defs.sources import source_pairs
from embedkomb_pipeline.defs.training import checkpoint
from embedkomb_pipeline.demo.display import Board, DemoSummary, LabelingView, render_summary
from embedkomb_pipeline.demo.services import (
    LocalServices,
    free_port,
    kombinat_counts,
    local_services,
    temporary_environ,
)
from embedkomb_pipeline.demo.volunteers import (
    LabelingConfig,
    Volunteer,
    admit_demo_model,
    label_until_done,
    sign_in_local,
    volunteer_threads,
)
from embedkomb_pipeline.formatting import number
from embedkomb_pipeline.labeling.queue_feed import read_offset
from embedkomb_pipeline.mining.embedding import default_precision
from embedkomb_pipeline.settings import REPO_ROOT
from embedkomb_pipeline.sources.pairs import SAMPLE_SPLITS

DEFAULT_SPLIT = "scifact_title_abstract"
# The tiny model cannot pass honeypots (it labels near chance), so kombinat's quarantine is switched off for the
# demo — said in the summary every time. A real deployment keeps the default 0.9.
DEMO_KOMBINAT_ENV = {"KOMBINAT_HONEYPOT_QUARANTINE": "false", "KOMBINAT_HONEYPOT_MIN_ACCURACY": "0"}
# A short training run: the point is the whole path on a CPU, not the model's quality.
DEMO_TRAINING: dict[str, Any] = {
    "phases": 2,
    "max_steps_per_phase": 8,
    "batch_size": 32,
    # bench.demo_training (SciFact nDCG@10 of these 16 steps from the base's 64.51): lr 1e-4 gave 61.96, with
    # warm-up and linear decay 63.91, lr 2e-5 65.61 -- the demo must not end with a worse model than it began with
    "lr": 2e-5,
    "max_seq_length": 128,
    "track_objective": False,  # each tracked objective re-encodes the whole corpus: minutes on a CPU
    # the frozen caches (5,183 abstracts, 5,181 titles) were 148 of the 180 training seconds in fp32; bf16 autocast
    # is 2-2.5x faster on CPUs with AVX512-BF16 (cosine to fp32 >= 0.99997) and emulated, so skipped, elsewhere
    "cache_precision": default_precision(),
}
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
STAGES = [
    ("services", "services"),
    ("source_pairs", "source_pairs"),
    ("mining_shard", "mining_shard"),
    ("work_queue", "work_queue"),
    ("honeypots", "honeypots"),
    ("labeling", "volunteers label"),
    ("labeled_pairs", "labeled_pairs"),
    ("verified_pairs", "verified_pairs"),
    ("checkpoint", "checkpoint"),
    ("mteb_scores", "mteb_scores"),
]


def default_demo_dir() -> Path:
    """Logs, the volunteers' annotator homes and the resume state: <user data dir>/embedkomb/demo."""
    return Path(os.environ.get("EMBEDKOMB_DEMO_DIR") or Path(platformdirs.user_data_dir("embedkomb")) / "demo")


@dataclass
class DemoConfig:
    split: str = DEFAULT_SPLIT
    cycle: str = "c000"
    top_k: int = 20  # candidates per query kept by mining
    # the queue for this cycle: the hardest candidates pushed to kombinat. Labeling is the slow part on a CPU:
    # every pair costs both volunteers a SciFact abstract (~300 tokens) through the tiny model
    pairs: int = 100
    # SciFact train + NFCorpus dev judgments; new contributors get honeypot-heavy batches, so each volunteer labels
    # all of them: 20 in all keep labeling (the demo's long pole, ~4 s a pair on one core) to 120 pairs each
    honeypots_per_source: int = 10
    volunteers: tuple[str, ...] = ("demo-alice", "demo-bob")
    training: dict[str, Any] = field(default_factory=lambda: dict(DEMO_TRAINING))
    # mteb_scores run config: SciFact only; bf16 on CPUs with AVX512-BF16 is several times faster and both models
    # are scored the same way (not comparable with MTEB's published fp32 runs, which the asset records)
    evaluation: dict[str, Any] = field(default_factory=lambda: {"tasks": ["scifact"], "precision": default_precision()})
    evaluate: bool = True
    demo_dir: Path = field(default_factory=default_demo_dir)
    storage_dir: str | None = None  # the lake; None: EMBEDKOMB_STORAGE_DIR or the user data dir
    postgres_dir: Path | None = None  # embedded PostgreSQL data; None: EMBEDKOMB_POSTGRES_DIR or the user data dir
    dagster_home: Path | None = None  # None: DAGSTER_HOME or .dagster_home in the repository

    @property
    def key(self) -> dg.MultiPartitionKey:
        return dg.MultiPartitionKey({"split": self.split, "cycle": self.cycle})


@dataclass
class DemoSession:
    """The running services, the Dagster instance on them and the resources every asset gets."""

    services: LocalServices
    instance: dg.DagsterInstance
    resources: dict[str, Any]
    lake: LakeResource
    dagster_home: Path
    log_dir: Path


@contextmanager
def demo_session(
    config: DemoConfig, source_data: SourceDataResource | None = None, database_url: str | None = None
) -> Iterator[DemoSession]:
    """Start PostgreSQL (configured or embedded) and kombinat, open the Dagster instance; stop all on exit."""
    from embedkomb_pipeline.demo.instance import project_instance

    log_dir = config.demo_dir / "logs"
    with ExitStack() as stack:
        services = stack.enter_context(
            local_services(
                postgres_dir=config.postgres_dir,
                kombinat_env=DEMO_KOMBINAT_ENV,
                log_dir=log_dir,
                database_url=database_url,
            )
        )
        home = Path(config.dagster_home or os.environ.get("DAGSTER_HOME") or REPO_ROOT / ".dagster_home")
        stack.enter_context(
            temporary_environ(DAGSTER_POSTGRES_URL=services.dagster_postgres_url, DAGSTER_HOME=str(home))
        )
        instance = project_instance()
        stack.callback(instance.dispose)  # before PostgreSQL stops (callbacks run last-in, first-out)
        lake = LakeResource(storage_dir=config.storage_dir) if config.storage_dir else LakeResource()
        resources = demo_resources(
            lake=lake,
            source_data=source_data or HubSourceData(),
            dense_model=DenseModelResource(),
            kombinat=KombinatResource(url=services.kombinat_url, admin_token=services.admin_token),
            quality=QualityThresholds(),  # production thresholds: the checks say what they say
        )
        yield DemoSession(services, instance, resources, lake, home, log_dir)


def demo_resources(**overrides: Any) -> dict[str, Any]:
    """The code location's resources with the demo's in their place, and every Hub publisher switched off
    (whatever HF_TOKEN says: the demo never pushes)."""
    from embedkomb_pipeline.defs.resources import resources as location_resources

    location = location_resources()
    assert location.resources is not None  # resources() always defines them
    resources = dict(location.resources)
    for key, resource in resources.items():
        if isinstance(resource, dg.ConfigurableResource) and {"repo_id", "token"} <= set(type(resource).model_fields):
            resources[key] = type(resource)()  # no repo, no token: `configured` is False
    return {**resources, **overrides}


# --- the cycle ----------------------------------------------------------------------------------------


class Cycle:
    """One cycle through Dagster, stage by stage, filling the board and the summary."""

    def __init__(self, config: DemoConfig, session: DemoSession, board: Board) -> None:
        self.config, self.session, self.board = config, session, board
        self.summary = DemoSummary(split=config.split, cycle=config.cycle)
        self.assets = [
            source_pairs, mining_shard, work_queue, honeypots, labeled_pairs, verified_pairs, checkpoint, mteb_scores
        ]  # fmt: skip
        self.state_path = session.lake.root / "demo" / "state.json"
        self.retrained = False

    # Dagster helpers
    def materialize(self, asset: Any, partition_key: str | None, op_config: dict[str, Any] | None = None) -> dict:
        run_config: dict[str, Any] = dict(QUIET_LOGS)
        if op_config is not None:
            run_config["ops"] = {asset.key.to_user_string(): {"config": op_config}}
        result = dg.materialize(self.assets, selection=[asset], partition_key=partition_key,
                                resources=self.session.resources, instance=self.session.instance,
                                run_config=run_config, tags={"embedkomb/trigger": "demo"})  # fmt: skip
        if not result.success:
            raise RuntimeError(f"{asset.key.to_user_string()} failed; see the run in the Dagster UI")
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        self.summary.checks.update(checks)
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        meta = {k: v.value for k, v in result.asset_materializations_for_node(asset.op.name)[0].metadata.items()}
        return {**meta, "_checks": evaluations}

    def latest(self, asset: Any, partition_key: str | None) -> dict[str, Any] | None:
        records = self.session.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset.key, asset_partitions=[partition_key] if partition_key else None),
            limit=1,
        ).records
        if not records or records[0].asset_materialization is None:
            return None
        return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}

    def counts(self) -> dict[str, Any]:
        return kombinat_counts(self.session.services.kombinat_database_url, self.config.split, self.config.cycle)

    def _state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def _save_state(self, **values: Any) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps({**self._state(), **values}, indent=1))

    # the stages
    def run(self) -> DemoSummary:
        s = self.summary
        s.database, s.kombinat_url = self.session.services.database, self.session.services.kombinat_url
        s.lake, s.logs, s.dagster_home = (
            str(self.session.lake.root),
            str(self.session.log_dir),
            str(self.session.dagster_home),
        )
        before = self.counts()
        self.source()
        self.mine()
        self.queue()
        self.load_honeypots()
        self.label()
        self.snapshot()
        self.export()
        self.train()
        self.evaluate()
        after = self.counts()
        s.queued_total, s.queued_added = after["pairs"], after["pairs"] - before["pairs"]
        s.labels_total, s.labels_added = after["labels"], after["labels"] - before["labels"]
        s.honeypots, s.honeypots_added = after["honeypots"], after["honeypots"] - before["honeypots"]
        s.honeypot_answers, s.disputed = after["honeypot_labels"], after["disputed"]
        s.notes.append(
            "kombinat's honeypot quarantine is OFF for this demo (KOMBINAT_HONEYPOT_QUARANTINE=false, "
            "KOMBINAT_HONEYPOT_MIN_ACCURACY=0): the tiny SmolLM2-135M labels near chance and would be quarantined; "
            "a real deployment keeps both on"
        )
        s.notes.append(
            "the volunteers are local contributors (`kombinat create-local-contributor`, no GitHub); "
            "volunteers of a public deployment sign in with GitHub (`annotator login`)"
        )
        return s

    def source(self) -> None:
        split = self.config.split
        with self.board.stage("source_pairs", f"loading {self.session.resources['source_data'].describe(split)}") as st:
            meta = self.latest(source_pairs, split)
            if meta and Path(meta["path"]).exists():
                st.state = "skipped"
                st.detail = f"{meta['rows_written']:,} pairs already materialized"
            else:
                meta = self.materialize(source_pairs, split)
                st.detail = f"{meta['rows_written']:,} pairs ({meta['unique_queries']:,} queries)"
        self.summary.source_pairs = int(meta["rows_written"])

    def mine(self) -> None:
        c = self.config
        self.session.instance.add_dynamic_partitions(CYCLE_PARTITIONS_NAME, [c.cycle])
        running = "BM25 + all-MiniLM-L6-v2 + RRF; embedding the corpus is the slow part on a CPU (cached after)"
        with self.board.stage("mining_shard", running) as st:
            meta = self.latest(mining_shard, str(c.key))
            if meta and Path(meta["path"]).exists() and meta["top_k"] == c.top_k:
                st.state = "skipped"
            else:
                meta = self.materialize(mining_shard, c.key, {"top_k": c.top_k})
            st.detail = (f"{meta['dagster/row_count']:,} candidates, top {meta['top_k']} per query; "
                         f"recall@{meta['top_k']} of the known positive {meta['recall_at_k_rrf']:.3f}")  # fmt: skip
        self.summary.mined, self.summary.top_k = int(meta["dagster/row_count"]), int(meta["top_k"])

    def queue(self) -> None:
        c, lake = self.config, self.session.lake
        target = min(c.pairs, self.summary.mined)
        with self.board.stage("work_queue", f"pushing the {target} hardest candidates") as st:
            offset = read_offset(lake.queue_state_path(c.split, c.cycle))
            if offset >= target:
                st.state, st.detail = "skipped", f"{offset:,} pairs pushed by an earlier run (offset file)"
                return
            meta = self.materialize(work_queue, c.key, {"depth_budget": target, "chunk_size": target})
            st.detail = f"{meta['enqueued']:,} enqueued, {meta['already_present']:,} already there"

    def load_honeypots(self) -> None:
        source_data = self.session.resources["source_data"]
        data_dir = source_data.beir_data_dir
        with self.board.stage("honeypots", "gold pairs from SciFact train + NFCorpus dev judgments") as st:
            if not data_dir or not all((Path(data_dir) / name).is_dir() for name in ("scifact", "nfcorpus")):
                st.state, st.detail = "skipped", "needs the BEIR folders locally (EMBEDKOMB_DATA_DIR)"
                self.summary.notes.append(
                    "no honeypots: set EMBEDKOMB_DATA_DIR to a folder with scifact/ and nfcorpus/"
                )
                return
            meta = self.materialize(honeypots, None, {"per_source": self.config.honeypots_per_source})
            new, present = meta["inserted"], meta["already_present"]
            st.detail = f"{meta['honeypots']:,} gold pairs: {new:,} new, {present:,} already loaded"

    def label(self) -> None:
        c, services = self.config, self.session.services
        model_path = admit_demo_model(services.kombinat_url, services.admin_token)
        volunteers = []
        for name in c.volunteers:
            v = sign_in_local(Volunteer(name, c.demo_dir / "volunteers" / name), services.kombinat_url,
                              services.kombinat_database_url)  # fmt: skip
            services.tokens.append(v.token)  # revoked when the demo stops
            volunteers.append(v)
        target = self.counts()["pairs"]
        per_claim = max(20, math.ceil(1.5 * target / len(volunteers)))  # ≈ half the queue each, plus honeypots
        config = LabelingConfig(batch_size=min(per_claim, 1000), threads=volunteer_threads(len(volunteers)))
        view = LabelingView(target=target)
        self.board.labeling = view
        last = [0.0]

        def tick(round_number: int) -> None:
            view.round = round_number
            if time.monotonic() - last[0] >= 2.0:
                last[0] = time.monotonic()
                counts = self.counts()
                view.counts, view.per_volunteer = counts, counts["per_contributor"]

        who = " and ".join(v.login for v in volunteers)
        with self.board.stage("labeling", f"{who}: annotator run --once (llama.cpp, {model_path.name})") as st:
            rounds = label_until_done(volunteers, services.kombinat_url, model_path, config, self.session.log_dir, tick)
            new = sum(v.labeled for v in volunteers)
            st.detail = f"{new:,} labels in {len(rounds)} rounds by {who}"
        contributors = {row["contributor_id"]: row for row in self._contributors()}
        for v in volunteers:
            row = contributors.get(v.contributor_id, {})
            self.summary.volunteers.append({"login": v.login, "labels": row.get("labels", 0), "rate": v.rate,
                                            "honeypot_accuracy": row.get("honeypot_accuracy"),
                                            "reputation": row.get("reputation")})  # fmt: skip

    def _contributors(self) -> list[dict[str, Any]]:
        with self.session.resources["kombinat"].client() as client:
            return client.contributors()

    def snapshot(self) -> None:
        with self.board.stage("labeled_pairs", "pulling new labels from kombinat") as st:
            meta = self.materialize(labeled_pairs, self.config.key)
            agreement = meta["_checks"].get("annotator_agreement")
            if agreement is not None:
                checked = agreement.metadata
                self.summary.kappa = checked["kappa_first_two_labels"].value
                self.summary.kappa_same_config = checked["kappa_same_model_config"].value
                self.summary.pairs_same_config = checked["pairs_same_model_config"].value
                self.summary.kappa_different_configs = checked["kappa_different_model_configs"].value
                self.summary.pairs_different_configs = checked["pairs_different_model_configs"].value
            labels = pl.read_parquet(meta["path"])
            self.summary.snapshot_rows, self.summary.snapshot_distinct = labels.height, labels["label_id"].n_unique()
            st.detail = (
                f"{meta['dagster/row_count']:,} labels ({meta['new_labels']:,} new), κ {number(self.summary.kappa)}"
            )

    def export(self) -> None:
        with self.board.stage("verified_pairs", "exporting verified pairs (Hugging Face layout)") as st:
            meta = self.materialize(verified_pairs, self.config.key)
            s = self.summary
            s.verified, s.verified_relevant = int(meta["dagster/row_count"]), int(meta["relevant"])
            s.mean_agreement, s.dataset_path = meta["mean_agreement"], str(meta["dataset"])
            frame = pl.read_parquet(Path(meta["dataset"]) / "data" / "*" / "*.parquet")
            s.export_rows, s.export_distinct = frame.height, frame["pair_id"].n_unique()
            st.detail = f"{s.verified:,} verified pairs ({s.verified_relevant:,} relevant) → {meta['path']}"

    def _export_fingerprint(self) -> str:
        """What the checkpoint trains on, by content (a re-export rewrites the same rows)."""
        path = self.session.lake.export_dir / "data" / self.config.split / f"{self.config.cycle}.parquet"
        if not path.exists():
            return ""
        frame = pl.read_parquet(path).select("pair_id", "label").sort("pair_id")
        return hashlib.sha256(frame.write_csv().encode()).hexdigest()

    def train(self) -> None:
        c = self.config
        fingerprint = self._export_fingerprint()
        with self.board.stage("checkpoint", f"training from all-MiniLM-L6-v2 ({c.training})") as st:
            if self.summary.verified == 0:
                st.state, st.detail = "skipped", "no verified pairs to train on"
                return
            meta = self.latest(checkpoint, c.cycle)
            trained = self._state().get("checkpoint", {})
            if meta and Path(meta["model_path"]).exists() and trained == {"export": fingerprint, "config": c.training}:
                st.state = "skipped"
                st.detail = f"the export did not change since the checkpoint at {meta['model_path']}"
            else:
                meta = self.materialize(checkpoint, c.cycle, {**c.training, "splits": [c.split]})
                self._save_state(checkpoint={"export": fingerprint, "config": c.training})
                self.retrained = True
                st.detail = f"{meta['steps']} steps in {meta['seconds']:.0f} s → {meta['model_path']}"
        self.summary.checkpoint_path, self.summary.checkpoint_steps = str(meta["model_path"]), int(meta["steps"])

    def evaluate(self) -> None:
        if not self.config.evaluate:
            why = "switched off (--no-eval)"
            self.board.skip("mteb_scores", why)
            self.summary.scores_note = f"not evaluated: {why}"
            return
        with self.board.stage("mteb_scores", "nDCG@10 on SciFact: base model and checkpoint") as st:
            meta = self.latest(mteb_scores, self.config.cycle)
            if meta is not None and not self.retrained and self._state().get("mteb_scores") == self.config.evaluation:
                st.state = "skipped"  # same checkpoint, same tasks: the scores stand
            else:
                meta = self.materialize(mteb_scores, self.config.cycle, self.config.evaluation)
                self._save_state(mteb_scores=self.config.evaluation)
            scores = self.summary.scores = scores_from_metadata(meta)
            st.detail = f"base {number(scores.get('base'), 4)} → {number(scores.get('checkpoint'), 4)}"


def scores_from_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Base and checkpoint nDCG@10 from the mteb_scores materialization ("<Task>/ndcg_at_10", "<Task>/base/…")."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        parts = key.split("/")
        if parts[-1] != "ndcg_at_10" or len(parts) not in (2, 3):
            continue
        out["task"] = parts[0]
        out["base" if len(parts) == 3 and parts[1] == "base" else "checkpoint"] = float(value)
    return out


def run_demo(
    config: DemoConfig,
    console: Console | None = None,
    source_data: SourceDataResource | None = None,
    database_url: str | None = None,
) -> DemoSummary:
    """The whole `make demo`: services up, one cycle, summary printed, everything down. Returns the summary."""
    console = console or Console()
    started = time.perf_counter()
    board = Board(STAGES, console)
    # the stack closes before the live board: services are down before the summary is printed
    with board.live(), ExitStack() as stack:
        with board.stage("services", "PostgreSQL, kombinat, Dagster instance") as st:
            session = stack.enter_context(demo_session(config, source_data, database_url))
            st.detail = f"{session.services.database}; kombinat {session.services.kombinat_url}"
        summary = Cycle(config, session, board).run()
    summary.seconds = time.perf_counter() - started
    render_summary(summary, console)
    return summary


# --- make ui ------------------------------------------------------------------------------------------


def serve_ui(config: DemoConfig, console: Console, port: int = 3000) -> int:
    """The demo's services plus `dagster dev` on the same instance; blocks until Ctrl-C, then stops all."""
    with demo_session(config) as session:
        services = session.services
        port = port if _port_free(port) else free_port()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(session.dagster_home),
            "DAGSTER_POSTGRES_URL": services.dagster_postgres_url,
            "KOMBINAT_URL": services.kombinat_url,
            "KOMBINAT_ADMIN_TOKEN": services.admin_token,
            "EMBEDKOMB_STORAGE_DIR": str(session.lake.root),
        }
        cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
        say = partial(console.print, soft_wrap=True)  # URLs and commands stay whole, whatever the width
        say(f"[bold]Embed Kombinat[/] — {services.database}")
        say(f"  Dagster UI:     http://127.0.0.1:{port}")
        say(f"  progress page:  {services.kombinat_url}/progress")
        say(f"  kombinat API:   {services.kombinat_url}/docs (admin token in KOMBINAT_ADMIN_TOKEN of dagster dev)")
        model_path = admit_demo_model(services.kombinat_url, services.admin_token)
        name = config.volunteers[0]
        volunteer = Volunteer(name, config.demo_dir / "volunteers" / name)
        sign_in_local(volunteer, services.kombinat_url, services.kombinat_database_url)
        services.tokens.append(volunteer.token)
        env_line = " ".join(f"{k}={v}" for k, v in volunteer.env.items())
        say(f"  label as {volunteer.login}: {env_line} annotator run --server {services.kombinat_url} "
            f"--model-path {model_path}")  # fmt: skip
        say("  Ctrl-C stops Dagster, kombinat and PostgreSQL.")
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT)  # same process group: Ctrl-C reaches it too
        try:
            return proc.wait()
        except KeyboardInterrupt:
            say("stopping …")
            try:
                return proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops as cleanly as Ctrl-C: every context exits and stops its process


def quiet_libraries() -> None:
    """mteb's FutureWarnings and the per-split progress bars of `datasets` would tear through the live board."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
    except (ImportError, AttributeError):  # pragma: no cover - datasets comes with mteb
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ui", action="store_true", help="services + Dagster UI, no cycle (make ui)")
    parser.add_argument("--split", default=DEFAULT_SPLIT, choices=sorted(SAMPLE_SPLITS))
    parser.add_argument("--cycle", default="c000")
    parser.add_argument("--top-k", type=int, default=20, help="candidates kept per query (default 20)")
    parser.add_argument("--pairs", type=int, default=100, help="pairs queued for labeling (default 100)")
    parser.add_argument("--no-eval", action="store_true", help="skip mteb_scores")
    parser.add_argument("--port", type=int, default=3000, help="Dagster UI port for --ui")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    quiet_libraries()
    console = Console()
    config = DemoConfig(split=args.split, cycle=args.cycle, top_k=args.top_k, pairs=args.pairs,
                        evaluate=not args.no_eval)  # fmt: skip
    try:
        if args.ui:
            sys.exit(serve_ui(config, console, args.port))
        run_demo(config, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: every service was stopped; `make demo` again resumes where it left off")
        sys.exit(130)
