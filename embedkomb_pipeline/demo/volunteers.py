"""Local volunteers for a demo: the real `annotator run` processes, each with its own identity and model.

Real GitHub cannot be reached from a demo machine, so each volunteer is a local contributor (`local:<name>`,
what `kombinat create-local-contributor` mints with database access; see kombinat_api/cli.py). Everything
after the sign-in is the production path: the annotator reads kombinat's registry, checks the model file's
sha256 against it, claims batches over HTTP, labels with llama.cpp and streams labels back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedkomb_pipeline.demo.services import child_process, local_contributor_token, stop_process, temporary_environ
from embedkomb_pipeline.labeling.kombinat_client import KombinatAdminClient
from embedkomb_pipeline.offline_models import TINY, offline_registry_entry, tiny_model_path
from embedkomb_pipeline.settings import REPO_ROOT

DEMO_MODEL_NOTE = "demo model: exercises the code path, labels near chance"


def admit_demo_model(kombinat_url: str, admin_token: str) -> Path:
    """Admit the tiny SmolLM2 GGUF (`make models-tiny`) to kombinat's registry through the admin API, marked as
    what it is (a model for exercising the code path, its labels near chance), and return its file."""
    path = tiny_model_path()
    with KombinatAdminClient(kombinat_url, admin_token) as client:
        client.upsert_models([offline_registry_entry(TINY, admitted=True, note=DEMO_MODEL_NOTE)])
    return path


@dataclass
class Volunteer:
    """One annotator identity: a local contributor and its own annotator config/data/cache directories."""

    name: str
    home: Path
    contributor_id: int = 0
    token: str = ""
    labeled: int = 0  # this run, all rounds
    rate: float | None = None  # pairs/s of the last round that labeled anything

    @property
    def login(self) -> str:
        return f"local:{self.name}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "ANNOTATOR_CONFIG_DIR": str(self.home / "config"),
            "ANNOTATOR_DATA_DIR": str(self.home / "data"),
            "ANNOTATOR_CACHE_DIR": str(self.home / "cache"),
        }


def sign_in_local(volunteer: Volunteer, kombinat_url: str, database_url: str) -> Volunteer:
    """Mint a token for `local:<name>` and store it where that volunteer's annotator looks (0600, like login)."""
    from annotator import auth

    volunteer.contributor_id, volunteer.token = local_contributor_token(database_url, volunteer.name)
    with temporary_environ(volunteer.env):  # annotator.auth resolves its directories from these at call time
        auth.save(auth.Credentials(kombinat_url, volunteer.token, volunteer.login, str(volunteer.contributor_id)))
    return volunteer


@dataclass
class LabelingConfig:
    batch_size: int = 100  # pairs per claim; about half the queue, so both volunteers work at once
    threads: int = 1  # llama.cpp threads per volunteer (two volunteers on two cores)
    max_rounds: int = 6
    round_timeout_s: float = 900.0


@dataclass
class RoundResult:
    labeled: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def _annotator_once(
    volunteer: Volunteer, kombinat_url: str, model_path: Path, config: LabelingConfig, log_path: Path
) -> Any:
    cmd = [sys.executable, "-m", "annotator", "run", "--server", kombinat_url, "--model-path", str(model_path),
           "--json", "--once", "--batch-size", str(config.batch_size), "--threads", str(config.threads)]  # fmt: skip
    env = {**os.environ, **volunteer.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # same process group as the demo: a Ctrl-C reaches the annotators too, which then finish the pair they
    # score, send what they labeled and give the rest back (their own clean-stop path)
    return child_process(cmd, env=env, log_path=log_path, new_group=False)


def _finish_event(log_path: Path, start_offset: int) -> dict[str, Any] | None:
    with log_path.open("rb") as f:
        f.seek(start_offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "finish":
                return event
    return None


def label_until_done(
    volunteers: list[Volunteer],
    kombinat_url: str,
    model_path: Path,
    config: LabelingConfig,
    log_dir: Path,
    on_tick: Callable[[int], None] = lambda _round: None,
) -> list[RoundResult]:
    """Rounds of `annotator run --once`, all volunteers at once, until a round labels nothing.

    A pair needs labels from different contributors, so each round hands every volunteer the pairs the others
    labeled before; the loop ends when no volunteer finds work it may do (pairs still disputed after both voted
    wait for a third contributor). on_tick is called about twice a second while a round runs (live display).
    """
    rounds: list[RoundResult] = []
    for number in range(1, config.max_rounds + 1):
        procs = []
        for v in volunteers:
            log_path = log_dir / f"annotator-{v.name}.log"
            log_path.touch()
            offset = log_path.stat().st_size
            procs.append((v, _annotator_once(v, kombinat_url, model_path, config, log_path), log_path, offset))
        deadline = time.monotonic() + config.round_timeout_s
        try:
            while any(p.poll() is None for _, p, _, _ in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"labeling round {number} took over {config.round_timeout_s:.0f} s")
                on_tick(number)
                time.sleep(0.5)
        finally:
            for _, proc, _, _ in procs:
                stop_process(proc, timeout=30)  # a no-op for those that already exited
        result = RoundResult()
        for v, proc, log_path, offset in procs:
            event = _finish_event(log_path, offset)
            if proc.returncode != 0 or event is None:
                raise RuntimeError(
                    f"annotator of {v.login} exited with code {proc.returncode} in round {number}; its log: {log_path}"
                )
            result.labeled[v.name] = int(event["labeled"])
            result.reasons[v.name] = str(event["reason"])
            v.labeled += int(event["labeled"])
            if int(event["labeled"]):
                v.rate = float(event.get("pairs_per_second") or 0.0)
        rounds.append(result)
        on_tick(number)
        if not any(result.labeled.values()):
            break
    return rounds


def volunteer_threads(n_volunteers: int) -> int:
    """llama.cpp threads per volunteer: the cores shared out, at least one each."""
    return max(1, (os.cpu_count() or 2) // max(1, n_volunteers))
