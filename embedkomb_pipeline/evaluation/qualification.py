"""Annotator-model qualification: which labeling models agree with human judgments well enough to label.

Each candidate model (the pinned offline GGUFs of embedkomb_pipeline.offline_models, and any GGUF path given) scores
a gold set with the annotator's own llama.cpp backend and prompt, exactly as a volunteer's machine would:
one forward pass, P(yes) vs P(no). The gold set is human-judged relevant pairs and clearly non-relevant ones
(the same query with a random unjudged document) from the *test* qrels, which the honeypots never use
(embedkomb_pipeline.sources.gold keeps them apart; `assert_disjoint` checks it again against the honeypot file).

The gold set is split by query into a calibration part and an evaluation part. The decision threshold that
maximises κ on the calibration part is applied to the evaluation part (a fixed 0.5 is poor for small models:
DESIGN.md, "Label quality, measured"); AUC, accuracy and κ are reported on the evaluation part at both 0.5 and
the calibrated threshold. A model is admitted when its κ at the calibrated threshold reaches `kappa_min`
(0.8 by the mission). Its registry entry carries the threshold, which the annotator then uses
(annotator.models.RegistryEntry.threshold).

Scores are kept per (model sha256, prompt version) in a small JSON cache, so re-deciding with another bar
costs no model time.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from annotator.models import sha256_file
from embedkomb_pipeline.formatting import number
from embedkomb_pipeline.labeling.agreement import accuracy, auc, best_threshold, kappa_at
from embedkomb_pipeline.offline_models import MODELS as OFFLINE_MODELS
from embedkomb_pipeline.offline_models import MODELS_DIR, ModelFile
from embedkomb_pipeline.sources.gold import QUALIFICATION_SOURCES, GoldSource, build_gold_pairs

DEFAULT_MODELS_DIR = MODELS_DIR


class QualificationError(ValueError):
    """A candidate or the gold set is unusable; the message says which and why."""


@dataclass(frozen=True)
class Candidate:
    """A labeling model to qualify: its file on this machine, and what its registry entry will say about it."""

    path: Path
    file: ModelFile
    description: str = ""

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def sha256(self) -> str:
        return self.file.sha256


@dataclass
class ModelReport:
    """One model's qualification: every figure, and whether it was admitted."""

    name: str
    model_id: str
    quantization: str
    path: str
    sha256: str
    description: str
    kappa_min: float
    admitted: bool = False
    error: str | None = None
    pairs_calibration: int = 0
    pairs_evaluation: int = 0
    auc: float | None = None
    accuracy_at_0_5: float | None = None
    kappa_at_0_5: float | None = None
    threshold: float | None = None
    kappa_calibration: float | None = None
    kappa: float | None = None  # at the calibrated threshold, on the evaluation part: the admission figure
    accuracy: float | None = None
    per_source: dict[str, dict[str, float | None]] = field(default_factory=dict)
    labels_per_second: float | None = None  # over every pair this model scored into the cache, on this machine
    scored_now: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- candidates -----------------------------------------------------------------------------------------


def offline_candidates(
    models_dir: Path = DEFAULT_MODELS_DIR,
    names: Sequence[str] | None = None,
    sha256_of: Callable[[Path], str] | None = None,
) -> list[Candidate]:
    """The pinned offline models (embedkomb_pipeline.offline_models) present in models_dir (all, or those named).

    A named model that is missing is an error (run `make models`); unnamed missing ones are left out.
    The file is hashed (sha256_of, default a full hash) and must match the pinned hash.
    """
    unknown = [n for n in names or [] if n not in OFFLINE_MODELS]
    if unknown:
        raise QualificationError(f"unknown offline model(s) {unknown}; known: {', '.join(OFFLINE_MODELS)}")
    hasher = sha256_of or sha256_file
    out: list[Candidate] = []
    for key, model in OFFLINE_MODELS.items():
        if names is not None and key not in names:
            continue
        path = model.path(models_dir)
        if not path.exists():
            if names is not None:
                raise QualificationError(f"{path} is missing: run `make models` (or scripts/fetch-models.sh {key})")
            continue
        digest = hasher(path)
        if digest != model.sha256:
            raise QualificationError(f"{path} has sha256 {digest}, not the pinned {model.sha256}: refusing it")
        # the hash matched the pin, so the file is the pinned one, size and all
        out.append(Candidate(path=path, file=model.file, description=model.upstream))
    return out


def candidate_from_path(path: str | os.PathLike[str], sha256_of: Callable[[Path], str] | None = None) -> Candidate:
    """Any local GGUF file: identified by its sha256, quantization read from the file name when it says."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise QualificationError(f"{path} is not a GGUF file")
    quant = re.search(r"(?i)\b(q\d(?:_k)?(?:_[a-z0-9]+)?|f16|bf16|f32)\b", path.stem.replace(".", " "))
    quantization = quant.group(1).upper() if quant else "unknown"
    file = ModelFile(
        name=re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()),
        model_id=f"local/{path.stem}",
        quantization=quantization,
        sha256=(sha256_of or sha256_file)(path),
        size_bytes=path.stat().st_size,
        hub_file=path.name,
    )
    return Candidate(path=path, file=file, description=f"local file {path}")


# --- gold -----------------------------------------------------------------------------------------------


def parse_sources(specs: Sequence[str] | None) -> tuple[GoldSource, ...]:
    """ "dataset:qrels_split[:min_grade]" strings (e.g. "nfcorpus:test:2"); None → gold.QUALIFICATION_SOURCES."""
    if specs is None:
        return QUALIFICATION_SOURCES
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise QualificationError(f"gold source {spec!r}: expected dataset:qrels_split[:min_grade]")
        if parts[1] != "test":
            # train/dev judgments are the honeypots' (gold.HONEYPOT_SOURCES): a model must not be tested on them
            raise QualificationError(f"gold source {spec!r}: qualification uses test qrels only")
        out.append(GoldSource(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 1))
    return tuple(out)


def qualification_gold(
    data_dir: str | Path, sources: tuple[GoldSource, ...] = QUALIFICATION_SOURCES, per_source: int = 40, seed: int = 0
) -> list[dict]:
    """Gold pairs from test qrels: per source, half human-judged relevant, half clearly non-relevant."""
    rows = build_gold_pairs(data_dir, sources, per_source=per_source, seed=seed)
    if not rows:
        raise QualificationError(f"no gold pairs from {[s.dataset for s in sources]} under {data_dir}")
    return rows


def assert_disjoint(gold: Iterable[dict], honeypot_pair_ids: Iterable[str]) -> None:
    """A model must never be qualified on pairs that volunteers also see as honeypots."""
    overlap = {row["pair_id"] for row in gold} & set(honeypot_pair_ids)
    if overlap:
        raise QualificationError(f"{len(overlap)} gold pairs are also honeypots (e.g. {sorted(overlap)[0]})")


def split_gold(rows: Sequence[dict], calibration_fraction: float = 0.5, seed: int = 0) -> tuple[list, list]:
    """(calibration, evaluation), split by query within each source so that no query is in both parts."""
    if not 0.0 < calibration_fraction < 1.0:
        raise QualificationError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    rng = random.Random(seed)
    calibration_queries: set[tuple[str, str]] = set()
    for source in sorted({r["source"] for r in rows}):
        queries = sorted({r["query"] for r in rows if r["source"] == source})
        rng.shuffle(queries)
        n = max(1, round(len(queries) * calibration_fraction)) if len(queries) > 1 else 0
        calibration_queries.update((source, q) for q in queries[:n])
    calibration = [r for r in rows if (r["source"], r["query"]) in calibration_queries]
    evaluation = [r for r in rows if (r["source"], r["query"]) not in calibration_queries]
    if not calibration or not evaluation:
        raise QualificationError(f"{len(rows)} gold pairs are too few to split into calibration and evaluation")
    return calibration, evaluation


# --- scoring --------------------------------------------------------------------------------------------


def score_pairs(
    candidate: Candidate,
    rows: Sequence[dict],
    cache_dir: Path,
    n_ctx: int = 2048,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], int, float | None]:
    """P(relevant) per pair_id with the annotator's llama.cpp backend.

    Returns (scores, pairs scored now, labels/s over every pair this model ever scored into the cache). A partial
    run (Ctrl-C) keeps what it scored.
    """
    from annotator.backends.base import Pair, order_pairs
    from annotator.prompt import PROMPT_VERSION

    cache_path = cache_dir / f"{candidate.sha256[:16]}-{PROMPT_VERSION}.json"
    timing_path = cache_path.with_suffix(".timing.json")
    scores: dict[str, float] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"pairs": 0, "seconds": 0.0}
    todo = [r for r in rows if r["pair_id"] not in scores]
    done = 0
    if todo:
        from annotator.backends.llama_cpp import LlamaCppBackend

        log(f"{candidate.name}: scoring {len(todo)} gold pairs ({len(rows) - len(todo)} cached)")
        backend = LlamaCppBackend(candidate.path, n_ctx=n_ctx, n_threads=threads)
        start = time.perf_counter()
        try:
            pairs = order_pairs(Pair(r["pair_id"], r["query"], r["document"]) for r in todo)
            for score in backend.score_pairs(pairs):
                scores[score.pair_id] = score.p_relevant
                done += 1
                if done % 20 == 0:
                    log(f"{candidate.name}: {done}/{len(todo)}, {done / (time.perf_counter() - start):.2f} labels/s")
        finally:
            timing = {"pairs": timing["pairs"] + done, "seconds": timing["seconds"] + time.perf_counter() - start}
            backend.close()
            cache_dir.mkdir(parents=True, exist_ok=True)
            for path, data in ((cache_path, scores), (timing_path, timing)):
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, path)
    rate = timing["pairs"] / timing["seconds"] if timing["pairs"] and timing["seconds"] > 0 else None
    return {r["pair_id"]: scores[r["pair_id"]] for r in rows}, done, rate


def _auc_of(scores: Sequence[float], gold: Sequence[bool]) -> float:
    return auc(
        [s for s, g in zip(scores, gold, strict=True) if g], [s for s, g in zip(scores, gold, strict=True) if not g]
    )


def assess(
    report: ModelReport, scores: dict[str, float], calibration: Sequence[dict], evaluation: Sequence[dict]
) -> ModelReport:
    """Fill the report's figures: threshold from the calibration part, everything else on the evaluation part."""
    cal_scores = [scores[r["pair_id"]] for r in calibration]
    cal_gold = [bool(r["relevant"]) for r in calibration]
    kappa_cal, threshold = best_threshold(cal_scores, cal_gold)
    ev_scores = [scores[r["pair_id"]] for r in evaluation]
    ev_gold = [bool(r["relevant"]) for r in evaluation]
    report.pairs_calibration, report.pairs_evaluation = len(calibration), len(evaluation)
    report.threshold = round(threshold, 6)
    report.kappa_calibration = kappa_cal
    report.auc = _auc_of(ev_scores, ev_gold)
    report.accuracy_at_0_5 = accuracy(ev_scores, ev_gold, 0.5)
    report.kappa_at_0_5 = kappa_at(ev_scores, ev_gold, 0.5)
    report.accuracy = accuracy(ev_scores, ev_gold, threshold)
    report.kappa = kappa_at(ev_scores, ev_gold, threshold)
    for source in sorted({r["source"] for r in evaluation}):
        part = [r for r in evaluation if r["source"] == source]
        s = [scores[r["pair_id"]] for r in part]
        g = [bool(r["relevant"]) for r in part]
        report.per_source[source] = {
            "pairs": len(part),
            "auc": _auc_of(s, g),
            "kappa": kappa_at(s, g, threshold),
        }
    report.admitted = report.kappa >= report.kappa_min
    return report


def qualify(
    candidates: Sequence[Candidate],
    gold: Sequence[dict],
    cache_dir: Path,
    kappa_min: float = 0.8,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    n_ctx: int = 2048,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> list[ModelReport]:
    """A report per candidate; a model that fails to load or score is reported (not admitted), never skipped."""
    calibration, evaluation = split_gold(gold, calibration_fraction, seed)
    reports = []
    for candidate in candidates:
        report = ModelReport(
            name=candidate.name,
            model_id=candidate.file.model_id,
            quantization=candidate.file.quantization,
            path=str(candidate.path),
            sha256=candidate.sha256,
            description=candidate.description,
            kappa_min=kappa_min,
        )
        start = time.perf_counter()
        try:
            scores, scored, rate = score_pairs(candidate, gold, cache_dir, n_ctx=n_ctx, threads=threads, log=log)
        except Exception as exc:
            report.error = f"{type(exc).__name__}: {exc}"
            log(f"{candidate.name}: failed: {report.error}")
        else:
            assess(report, scores, calibration, evaluation)
            report.scored_now = scored
            report.labels_per_second = rate
        report.seconds = time.perf_counter() - start
        reports.append(report)
    return reports


# --- registry and report --------------------------------------------------------------------------------


def qualified_registry_entry(candidate: Candidate, report: ModelReport, gold_sources: Sequence[str]) -> dict[str, Any]:
    """kombinat's model registry entry for one qualified-or-not model, its figures in `qualification`."""
    return candidate.file.registry_entry(
        admitted=report.admitted,
        qualification={
            "kappa": report.kappa,
            "kappa_min": report.kappa_min,
            "threshold": report.threshold,
            "kappa_at_0_5": report.kappa_at_0_5,
            "auc": report.auc,
            "accuracy": report.accuracy,
            "pairs_evaluation": report.pairs_evaluation,
            "pairs_calibration": report.pairs_calibration,
            "gold": list(gold_sources),
            "error": report.error,
            "qualified_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


def report_markdown(reports: Sequence[ModelReport], gold_sources: Sequence[str], kappa_min: float) -> str:
    lines = [
        f"Admission bar: κ ≥ {kappa_min:g} at the threshold calibrated on the calibration part"
        + (" (**lowered below the mission's 0.8**)" if kappa_min < 0.8 else ""),
        f"Gold: {', '.join(gold_sources)} (test qrels; relevant vs random unjudged documents).",
        "",
        "| model | admitted | eval pairs | AUC | acc@0.5 | κ@0.5 | threshold | κ@threshold | acc@threshold "
        "| labels/s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.name} | {'**yes**' if r.admitted else 'no'} | {r.pairs_evaluation} | {number(r.auc)} "
            f"| {number(r.accuracy_at_0_5)} | {number(r.kappa_at_0_5)} | {number(r.threshold, 4)} | {number(r.kappa)} "
            f"| {number(r.accuracy)} | {number(r.labels_per_second, 2)} | {r.error or ''} |"
        )
    return "\n".join(lines)


def write_report(
    reports: Sequence[ModelReport], out_dir: Path, gold_sources: Sequence[str], kappa_min: float, extra: dict
) -> dict[str, Path]:
    """report.json and report.md in out_dir (replaced atomically), plus a dated copy of the JSON as history."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {
        "generated_at": stamp,
        "kappa_min": kappa_min,
        "gold": list(gold_sources),
        **extra,
        "models": [r.as_dict() for r in reports],
    }
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    (out_dir / "history").mkdir(exist_ok=True)
    (out_dir / "history" / f"{stamp}.json").write_text(json.dumps(payload, indent=1))
    texts = {"json": json.dumps(payload, indent=1), "markdown": report_markdown(reports, gold_sources, kappa_min)}
    for key, text in texts.items():
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, paths[key])
    return paths
