"""Annotator-model qualification, as the mission states it: a labeling model is admitted only when its labels agree
with a reference — frontier-model labels by default — at Cohen's κ ≥ 0.8 on held-out queries.

Each candidate model (the pinned offline GGUFs of embedkomb_pipeline.offline_models, and any GGUF path given)
scores judged pairs with the annotator's own llama.cpp backend, once per prompt version, exactly as a volunteer's
machine would. The measurement is embedkomb_pipeline.evaluation.label_quality's (the same code as
``python -m bench.labeling``): the judged pairs are a query-stratified sample of the TREC DL19 judged pool, where
every pair carries the NIST assessors' grade and the labels GPT-4o and GPT-4 gave it (plus, optionally, human-judged
SciFact / NFCorpus test pairs, which honeypots never use). Queries are split in half: on the calibration half the
model's prompt version is chosen (best AUC against the reference), and a Platt calibration and its decision
threshold are fitted against the reference; on the evaluation half κ against the reference (the admission figure)
and against humans are reported, with bootstrap intervals over queries.

The registry entry carries the chosen ``prompt_version`` (the annotator renders that wording) and the
``calibration`` (kombinat applies it to every label's raw score server-side, so no annotator can move a verdict).
Scores are cached per (model sha256, prompt version, document cap): re-deciding with another bar or reference costs
no model time.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from annotator.models import sha256_file
from annotator.prompt import PROMPTS
from embedkomb_pipeline.evaluation.label_quality import (
    FRONTIER_REFERENCES,
    HUMAN,
    JudgedPair,
    PlattCalibration,
    assess_labeler,
    beir_human_pairs,
    best_labeler,
    calibration_auc,
    dl19_pairs,
    score_with_llama_cpp,
    split_by_query,
)
from embedkomb_pipeline.formatting import number
from embedkomb_pipeline.offline_models import MODELS as OFFLINE_MODELS
from embedkomb_pipeline.offline_models import MODELS_DIR, ModelFile
from embedkomb_pipeline.sources.gold import GoldSource

DEFAULT_MODELS_DIR = MODELS_DIR
DEFAULT_REFERENCE = "gpt-4o"


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
    reference: str
    admitted: bool = False
    error: str | None = None
    prompt_version: str | None = None
    prompt_auc_calibration: dict[str, float] = field(default_factory=dict)  # per version tried: how it was chosen
    pairs_calibration: int = 0
    pairs_evaluation: int = 0
    kappa: float | None = None  # vs the reference, calibrated threshold, evaluation queries: the admission figure
    kappa_interval: list[float] = field(default_factory=list)
    kappa_human: float | None = None
    kappa_by_reference: dict[str, list[float]] = field(default_factory=dict)  # [value, low, high]
    auc: float | None = None  # vs humans
    threshold: float | None = None  # the raw score at which the calibrated probability crosses its threshold
    calibration: dict[str, Any] | None = None  # the registry's `calibration` object (Platt, vs the reference)
    ece_raw: float | None = None
    ece_calibrated: float | None = None
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
    """ "dataset:qrels_split[:min_grade]" strings (e.g. "nfcorpus:test:2"): human-judged BEIR test pairs to report
    beside the DL19 judged pool; None → none."""
    if specs is None:
        return ()
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


def resolve_reference(reference: str) -> tuple[str, Path | None]:
    """ "human", a frontier judge of the DL19 pool (gpt-4o, gpt-4), or a qrels-style label file (*.tsv) of 0-3 grades
    for the DL19 judged pairs → (reference name, file to load or None)."""
    if reference == HUMAN or reference in FRONTIER_REFERENCES:
        return reference, None
    path = Path(reference)
    if path.suffix == ".tsv":
        if not path.is_file():
            raise QualificationError(f"reference label file {path} does not exist")
        return path.stem, path
    known = ", ".join([HUMAN, *FRONTIER_REFERENCES])
    raise QualificationError(f"reference {reference!r}: expected one of {known} or a labels/*.tsv file")


def qualification_pairs(
    data_dir: str | Path,
    *,
    reference: str = DEFAULT_REFERENCE,
    dl19_per_query: int = 8,
    dl19_hard: int = 0,
    sources: Sequence[GoldSource] = (),
    per_source: int = 40,
    seed: int = 0,
    cache_dir: Path | None = None,
    dl19_max_queries: int | None = None,
) -> list[JudgedPair]:
    """The judged pairs: a DL19 judged-pool sample (with human and frontier verdicts) and any BEIR test sources."""
    name, path = resolve_reference(reference)
    pairs = dl19_pairs(
        data_dir,
        per_query=dl19_per_query,
        hard=dl19_hard,
        seed=seed,
        cache_dir=cache_dir,
        reference_files={name: path} if path else None,
        max_queries=dl19_max_queries,
    )
    for source in sources:
        pairs += beir_human_pairs(data_dir, source.dataset, per_source, source.min_relevant_grade, seed)
    if not pairs:
        raise QualificationError(f"no judged pairs under {data_dir}")
    return pairs


def assert_disjoint(pairs: Iterable[JudgedPair], honeypot_pair_ids: Iterable[str]) -> None:
    """A model must never be qualified on pairs that volunteers also see as honeypots (BEIR pairs keep the
    pipeline's pair id after their dataset prefix; DL19 judged-pool pairs are never honeypots)."""
    overlap = {p.pair_id.split(":", 1)[1] for p in pairs} & set(honeypot_pair_ids)
    if overlap:
        raise QualificationError(f"{len(overlap)} gold pairs are also honeypots (e.g. {sorted(overlap)[0]})")


# --- scoring and deciding -------------------------------------------------------------------------------


def qualify(
    candidates: Sequence[Candidate],
    pairs: Sequence[JudgedPair],
    cache_dir: Path,
    *,
    reference: str = DEFAULT_REFERENCE,
    prompt_versions: Sequence[str] | None = None,
    kappa_min: float = 0.8,
    seed: int = 0,
    n_ctx: int = 2048,
    threads: int | None = None,
    max_document_tokens: int = 384,
    resamples: int = 200,
    log: Callable[[str], None] = print,
) -> list[ModelReport]:
    """A report per candidate; a model that fails to load or score is reported (not admitted), never skipped."""
    reference_name, _ = resolve_reference(reference)
    versions = list(prompt_versions or PROMPTS)
    unknown = [v for v in versions if v not in PROMPTS]
    if unknown:
        raise QualificationError(f"unknown prompt version(s) {unknown}; known: {', '.join(PROMPTS)}")
    calibration_queries, _ = split_by_query(pairs, seed)
    datasets = sorted({p.dataset for p in pairs})
    admission_dataset = "dl19" if "dl19" in datasets else datasets[0]
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
            reference=reference_name,
        )
        start = time.perf_counter()
        try:
            runs = []
            for version in versions:
                run = score_with_llama_cpp(
                    candidate.path, candidate.sha256, f"{candidate.name}/{version}", version, pairs, cache_dir,
                    threads=threads, n_ctx=n_ctx, max_document_tokens=max_document_tokens, log=log,
                )  # fmt: skip
                report.scored_now += run.pairs_scored_now
                runs.append(run)
            _decide(report, runs, pairs, calibration_queries, reference_name, admission_dataset, resamples, seed)
        except Exception as exc:
            report.error = f"{type(exc).__name__}: {exc}"
            log(f"{candidate.name}: failed: {report.error}")
        report.seconds = time.perf_counter() - start
        reports.append(report)
    return reports


def _decide(
    report: ModelReport,
    runs: Sequence[Any],
    pairs: Sequence[JudgedPair],
    calibration_queries: set[tuple[str, str]],
    reference: str,
    dataset: str,
    resamples: int,
    seed: int,
) -> None:
    """Choose the prompt version, fit the calibration and fill the figures (label_quality's measurement)."""
    for run in runs:
        value = calibration_auc(run, pairs, calibration_queries, reference, dataset)
        report.prompt_auc_calibration[run.labeler.split("/")[-1]] = round(value, 4)
    chosen = best_labeler(runs, pairs, calibration_queries, reference, dataset)
    if chosen is None:
        raise QualificationError(f"no scores against {reference!r} on the calibration queries of {dataset}")
    scores = {pid: s.score for pid, s in chosen.scores.items()}
    measured = assess_labeler(
        chosen.labeler, dataset, pairs, scores, calibration_queries, resamples, seed, calibrate_against=reference
    )
    calibration = PlattCalibration(**{k: measured.calibration[k] for k in ("a", "b", "threshold")})
    report.prompt_version = chosen.labeler.split("/")[-1]
    report.pairs_calibration, report.pairs_evaluation = measured.pairs_calibration, measured.pairs_evaluation
    report.kappa_by_reference = measured.kappa
    report.kappa = measured.kappa[reference][0]
    report.kappa_interval = measured.kappa[reference][1:]
    report.kappa_human = measured.kappa[HUMAN][0]
    report.auc = measured.auc_human[0]
    report.calibration = measured.calibration
    report.threshold = round(calibration.raw_threshold(), 6)
    report.ece_raw, report.ece_calibrated = measured.ece_raw[0], measured.ece_calibrated[0]
    report.labels_per_second = chosen.pairs_per_second
    for other in sorted({p.dataset for p in pairs} - {dataset}):
        extra = assess_labeler(chosen.labeler, other, pairs, scores, calibration_queries, resamples, seed)
        report.per_source[other] = {
            "pairs": extra.pairs_evaluation,
            "auc": extra.auc_human[0],
            "kappa": extra.kappa[HUMAN][0],
        }
    report.admitted = report.kappa >= report.kappa_min


# --- registry and report --------------------------------------------------------------------------------


def qualified_registry_entry(candidate: Candidate, report: ModelReport, gold_sources: Sequence[str]) -> dict[str, Any]:
    """kombinat's model registry entry for one qualified-or-not model, its figures in `qualification`."""
    return candidate.file.registry_entry(
        admitted=report.admitted,
        prompt_version=report.prompt_version or "p1",
        calibration=report.calibration,
        qualification={
            "reference": report.reference,
            "kappa": report.kappa,
            "kappa_interval": report.kappa_interval,
            "kappa_min": report.kappa_min,
            "kappa_human": report.kappa_human,
            "threshold": report.threshold,
            "auc": report.auc,
            "ece_calibrated": report.ece_calibrated,
            "prompt_auc_calibration": report.prompt_auc_calibration,
            "pairs_evaluation": report.pairs_evaluation,
            "pairs_calibration": report.pairs_calibration,
            "gold": list(gold_sources),
            "error": report.error,
            "qualified_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


def report_markdown(reports: Sequence[ModelReport], gold_sources: Sequence[str], kappa_min: float) -> str:
    lines = [
        f"Admission bar: κ ≥ {kappa_min:g} against the reference, at the calibrated threshold, on held-out queries"
        + (" (**lowered below the mission's 0.8**)" if kappa_min < 0.8 else ""),
        f"Judged pairs: {', '.join(gold_sources)}.",
        "",
        "| model | prompt | admitted | reference | eval pairs | κ vs reference [95% CI] | κ vs human | AUC vs human "
        "| ECE calibrated | raw threshold | labels/s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        interval = f" [{r.kappa_interval[0]:.2f}, {r.kappa_interval[1]:.2f}]" if len(r.kappa_interval) == 2 else ""
        lines.append(
            f"| {r.name} | {r.prompt_version or '–'} | {'**yes**' if r.admitted else 'no'} | {r.reference} "
            f"| {r.pairs_evaluation} | {number(r.kappa)}{interval} | {number(r.kappa_human)} | {number(r.auc)} "
            f"| {number(r.ece_calibrated)} | {number(r.threshold, 4)} | {number(r.labels_per_second, 2)} "
            f"| {r.error or ''} |"
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
