"""How good is a labeler? Its scores measured against human assessors and frontier-model judges, with statistics.

The one home of label-quality measurement: ``python -m bench.labeling`` (every offline model × prompt version)
and the ``model_qualification`` asset (embedkomb_pipeline.evaluation.qualification) both call it.

Judged pairs come from
- the whole TREC DL 2019 judged pool (``msmarco-dl19-judged``: 43 queries, 9,260 NIST-graded pairs, and the labels
  GPT-4o and GPT-4 gave the same pairs). A query-stratified sample takes, per query, its ``hard`` top candidates as
  the pipeline would mine them (BM25 + dense, fused by RRF, ranked among the passages judged for that query — the
  pairs a labeler meets in production) and ``per_query - hard`` more at random from the rest of its judged pool;
- the human-judged test pairs of SciFact and NFCorpus (relevant vs a random unjudged document of the corpus).

Every figure that needs a decision threshold is *held out by query*: the threshold (and the Platt calibration) is
fitted on the calibration half of the queries and reported on the other half. 95% confidence intervals come from a
bootstrap over the evaluation queries (pairs of one query move together: they share the query's difficulty).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedkomb_pipeline.labeling.agreement import best_threshold, cohens_kappa
from embedkomb_pipeline.sources.beir import load_beir
from embedkomb_pipeline.sources.gold import GoldSource, build_gold_pairs

DL19 = "msmarco-dl19-judged"
# TREC's binary cut for DL passage judgments (and for the LLM judges' 0-3 labels of the same pairs).
DL19_RELEVANT_GRADE = 2
# Frontier references on the DL19 pool: name → file under labels/ (UMBRELA zero-shot, the graded prompt).
FRONTIER_REFERENCES = {
    "gpt-4o": "gpt-4o_umbrela-zeroshot.tsv",
    "gpt-4": "gpt-4_umbrela-zeroshot.tsv",
}
HUMAN = "human"


class LabelQualityError(ValueError):
    """The judged data or a score cache is unusable; the message says which and why."""


@dataclass(frozen=True)
class JudgedPair:
    """A (query, document) pair with a human verdict and, on DL19, frontier-model verdicts."""

    pair_id: str
    dataset: str  # "dl19", "scifact", "nfcorpus"
    query_id: str
    query: str
    document: str
    human_grade: int
    references: Mapping[str, bool]  # HUMAN always; "gpt-4o"/"gpt-4" on DL19
    mined_rank: int | None = None  # rank among the query's judged passages (DL19 hard half); None: random

    @property
    def human(self) -> bool:
        return self.references[HUMAN]


# --- judged data ------------------------------------------------------------------------------------------


def read_label_file(path: Path) -> dict[tuple[str, str], int]:
    """A qrels-style TSV (query-id, corpus-id, score) → {(qid, did): grade}; the first label of a pair counts."""
    if not path.is_file():
        raise LabelQualityError(f"label file {path} does not exist")
    out: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header[:3] != ["query-id", "corpus-id", "score"]:
            raise LabelQualityError(f"{path}: expected the header 'query-id corpus-id score', got {header}")
        for number, line in enumerate(fh, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                raise LabelQualityError(f"{path}:{number}: expected 3 tab-separated fields, got {len(parts)}")
            try:
                grade = int(float(parts[2]))
            except ValueError:
                raise LabelQualityError(f"{path}:{number}: score {parts[2]!r} is not a number") from None
            out.setdefault((parts[0], parts[1]), grade)
    return out


def _pool_ranking(
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    judged: Mapping[str, Mapping[str, int]],
    cache_dir: Path | None,
) -> dict[str, list[str]]:
    """Per query, its judged passages ranked as the pipeline mines: BM25 and dense ranks fused by RRF (k=60)."""
    import bm25s
    import Stemmer

    from embedkomb_pipeline.mining.embedding import DenseEncoder, default_base_model_path
    from embedkomb_pipeline.mining.retrieval import rrf_fuse

    doc_ids = sorted(documents)
    texts = [documents[d] for d in doc_ids]
    qids = sorted(judged)
    tokenizer = bm25s.tokenization.Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))
    retriever = bm25s.BM25()
    retriever.index(tokenizer.tokenize(texts, return_as="tuple", show_progress=False), show_progress=False)
    q_tokens = tokenizer.tokenize([queries[q] for q in qids], update_vocab="never", return_as="string",
                                  show_progress=False)  # fmt: skip
    bm25_ids, _ = retriever.retrieve(q_tokens, k=len(doc_ids), show_progress=False)

    cache = cache_dir / f"dl19-pool-minilm-{len(doc_ids)}.npy" if cache_dir else None
    encoder = DenseEncoder(default_base_model_path(), precision="fp32")
    if cache is not None and cache.exists():
        doc_vectors = np.load(cache)
    else:
        doc_vectors = encoder.encode(texts, show_progress=False)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, doc_vectors)
    query_vectors = encoder.encode([queries[q] for q in qids])
    dense_order = np.argsort(-(query_vectors @ doc_vectors.T), axis=1, kind="stable")

    ranking: dict[str, list[str]] = {}
    for row, qid in enumerate(qids):
        mine = set(judged[qid])
        index_of = {d: i for i, d in enumerate(doc_ids)}
        bm25 = [i for i in bm25_ids[row].tolist() if doc_ids[i] in mine]
        dense = [i for i in dense_order[row].tolist() if doc_ids[i] in mine]
        fused = [doc_ids[i] for i, _ in rrf_fuse([bm25, dense])]
        ranking[qid] = fused + sorted(mine - set(fused), key=index_of.__getitem__)
    return ranking


def dl19_pairs(
    data_dir: str | Path,
    per_query: int = 24,
    hard: int = 12,
    seed: int = 0,
    cache_dir: Path | None = None,
    reference_files: Mapping[str, Path] | None = None,
    max_queries: int | None = None,
) -> list[JudgedPair]:
    """A query-stratified sample of the DL19 judged pool: per query its ``hard`` top-mined judged passages and
    ``per_query - hard`` more at random; ``per_query = 0`` takes every judged pair.

    Each pair carries the human verdict and the verdict of every frontier label file (FRONTIER_REFERENCES, plus
    ``reference_files``: name → a qrels-style TSV of 0-3 grades for the same pool). ``max_queries`` keeps the
    first queries (by id) only: for tests and quick looks, never for figures."""
    root = Path(data_dir) / DL19
    data = load_beir(DL19, data_dir=data_dir)
    judged = data.judged("test")
    if max_queries is not None:
        judged = {q: judged[q] for q in sorted(judged)[:max_queries]}
    files = {name: root / "labels" / file for name, file in FRONTIER_REFERENCES.items()} | dict(reference_files or {})
    references = {name: read_label_file(path) for name, path in files.items()}
    documents = {d: doc.text for d, doc in data.corpus.items()}
    rng = random.Random(seed)
    ranking = _pool_ranking(data.queries, documents, judged, cache_dir) if per_query and hard else {}
    out: list[JudgedPair] = []
    for qid in sorted(judged):
        if qid not in data.queries:
            continue
        pool = sorted(judged[qid])
        if not per_query:
            chosen: list[tuple[str, int | None]] = [(d, None) for d in pool]
        else:
            top = ranking.get(qid, [])[:hard]
            rest = [d for d in pool if d not in set(top)]
            rng.shuffle(rest)
            chosen = [(d, rank) for rank, d in enumerate(top, start=1)]
            chosen += [(d, None) for d in sorted(rest[: max(0, per_query - len(top))])]
        for did, rank in chosen:
            if did not in documents:
                raise LabelQualityError(f"{DL19}: judged passage {did} has no text in corpus.jsonl")
            refs = {HUMAN: judged[qid][did] >= DL19_RELEVANT_GRADE}
            for name, labels in references.items():
                if (qid, did) in labels:
                    refs[name] = labels[(qid, did)] >= DL19_RELEVANT_GRADE
            out.append(
                JudgedPair(
                    pair_id=f"dl19:{qid}:{did}",
                    dataset="dl19",
                    query_id=qid,
                    query=data.queries[qid],
                    document=documents[did],
                    human_grade=judged[qid][did],
                    references=refs,
                    mined_rank=rank,
                )
            )
    return out


def beir_human_pairs(
    data_dir: str | Path, dataset: str, per_source: int, min_grade: int = 1, seed: int = 0
) -> list[JudgedPair]:
    """Human-judged test pairs of a BEIR dataset: half relevant (grade ≥ min_grade), half a random unjudged
    document (sources.gold's construction; test qrels, which honeypots never use)."""
    rows = build_gold_pairs(data_dir, (GoldSource(dataset, "test", min_grade),), per_source=per_source, seed=seed)
    return [
        JudgedPair(
            pair_id=f"{dataset}:{r['pair_id']}",
            dataset=dataset,
            query_id=hashlib.sha1(r["query"].encode()).hexdigest()[:12],
            query=r["query"],
            document=r["document"],
            human_grade=int(r["grade"]),
            references={HUMAN: bool(r["relevant"])},
        )
        for r in rows
    ]


def split_by_query(pairs: Sequence[JudgedPair], seed: int = 0) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(calibration queries, evaluation queries): half of each dataset's queries each, deterministic per seed."""
    rng = random.Random(seed)
    calibration: set[tuple[str, str]] = set()
    evaluation: set[tuple[str, str]] = set()
    for dataset in sorted({p.dataset for p in pairs}):
        queries = sorted({p.query_id for p in pairs if p.dataset == dataset})
        rng.shuffle(queries)
        half = len(queries) // 2
        calibration.update((dataset, q) for q in queries[:half])
        evaluation.update((dataset, q) for q in queries[half:])
    return calibration, evaluation


# --- scoring -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairScore:
    score: float
    prompt_tokens: int
    evaluated_tokens: int
    seconds: float
    answer_mass: float


@dataclass
class ScoreRun:
    """A labeler's scores on judged pairs, and how fast it made them (over every pair in its cache)."""

    labeler: str  # "<model name>/<prompt version>"
    scores: dict[str, PairScore]
    pairs_scored_now: int = 0

    @property
    def pairs_per_second(self) -> float | None:
        seconds = sum(s.seconds for s in self.scores.values())
        return len(self.scores) / seconds if seconds > 0 else None

    @property
    def prompt_tokens_per_second(self) -> float | None:
        seconds = sum(s.seconds for s in self.scores.values())
        return sum(s.prompt_tokens for s in self.scores.values()) / seconds if seconds > 0 else None

    @property
    def evaluated_tokens_per_second(self) -> float | None:
        seconds = sum(s.seconds for s in self.scores.values())
        return sum(s.evaluated_tokens for s in self.scores.values()) / seconds if seconds > 0 else None


def score_cache_path(cache_dir: Path, sha256: str, prompt_version: str, max_document_tokens: int) -> Path:
    return cache_dir / f"{sha256[:16]}-{prompt_version}-d{max_document_tokens}.json"


def score_with_llama_cpp(
    model_path: Path,
    sha256: str,
    labeler: str,
    prompt_version: str,
    pairs: Sequence[JudgedPair],
    cache_dir: Path,
    *,
    threads: int | None = None,
    n_ctx: int = 2048,
    max_document_tokens: int = 512,
    log: Callable[[str], None] = print,
) -> ScoreRun:
    """Score pairs with the annotator's own llama.cpp backend and prompt, as a volunteer's machine would.

    Scores are cached per (model sha256, prompt version, document cap) and written every 25 pairs and on any
    exit, so an interrupted run (Ctrl-C, a crash) resumes where it stopped.
    """
    from annotator.backends.base import Pair, order_pairs

    path = score_cache_path(cache_dir, sha256, prompt_version, max_document_tokens)
    cached: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}
    todo = [p for p in pairs if p.pair_id not in cached]
    done = 0

    def save() -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached))
        os.replace(tmp, path)

    if todo:
        from annotator.backends.llama_cpp import LlamaCppBackend

        log(f"{labeler}: scoring {len(todo)} pairs ({len(pairs) - len(todo)} cached)")
        backend = LlamaCppBackend(
            model_path,
            n_ctx=n_ctx,
            n_threads=threads,
            prompt_version=prompt_version,
            max_document_tokens=max_document_tokens,
        )
        started = time.perf_counter()
        try:
            ordered = order_pairs(Pair(p.pair_id, p.query, p.document) for p in todo)
            for s in backend.score_pairs(ordered):
                cached[s.pair_id] = {
                    "score": s.p_relevant,
                    "prompt_tokens": s.prompt_tokens,
                    "evaluated_tokens": s.evaluated_tokens,
                    "seconds": s.seconds,
                    "answer_mass": s.yes_no_mass,
                }
                done += 1
                if done % 25 == 0:
                    save()
                    rate = done / (time.perf_counter() - started)
                    log(f"{labeler}: {done}/{len(todo)} pairs, {rate:.2f} pairs/s")
        finally:
            backend.close()
            save()
    scores = {p.pair_id: PairScore(**cached[p.pair_id]) for p in pairs if p.pair_id in cached}  # type: ignore[arg-type]
    return ScoreRun(labeler=labeler, scores=scores, pairs_scored_now=done)


# --- calibration ---------------------------------------------------------------------------------------------

_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class PlattCalibration:
    """p_cal = σ(a · logit(p) + b), and a label is relevant iff p_cal ≥ threshold (kombinat applies it)."""

    a: float
    b: float
    threshold: float = 0.5

    def apply(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        z = self.a * _logit(np.asarray(scores, dtype=np.float64)) + self.b
        return 1.0 / (1.0 + np.exp(-z))

    def raw_threshold(self) -> float:
        """The raw score at which p_cal crosses the threshold (what the annotator's own display uses)."""
        if self.a <= 0:
            return 0.5
        z = (math.log(self.threshold / (1 - self.threshold)) - self.b) / self.a
        return float(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z)))))

    def registry_form(self) -> dict[str, Any]:
        """The `calibration` object of a kombinat registry entry."""
        return {"method": "platt", "a": round(self.a, 6), "b": round(self.b, 6), "threshold": round(self.threshold, 6)}


def fit_platt(scores: Sequence[float], gold: Sequence[bool], iterations: int = 100) -> PlattCalibration:
    """Logistic regression of gold on logit(score) by Newton's method, with Platt's target smoothing
    (targets (N₊+1)/(N₊+2) and 1/(N₋+2)) so that separable data give finite parameters."""
    x = _logit(np.asarray(scores, dtype=np.float64))
    y = np.asarray(gold, dtype=bool)
    if len(x) == 0 or y.all() or not y.any():
        raise LabelQualityError("Platt calibration needs both relevant and non-relevant pairs")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    a, b = 1.0, 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a * x + b)))
        w = np.maximum(p * (1 - p), 1e-12)
        g = np.array([np.sum((p - t) * x), np.sum(p - t)])
        h = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - float(step[0]), b - float(step[1])
        if float(np.abs(step).max()) < 1e-10:
            break
    return PlattCalibration(a, b)


def expected_calibration_error(probabilities: np.ndarray, gold: np.ndarray, bins: int = 10) -> float:
    """ECE over equal-width bins: Σ_bins (n_bin / n) · |mean predicted − share relevant|."""
    if len(probabilities) == 0:
        return math.nan
    edges = np.minimum((probabilities * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = edges == b
        if mask.any():
            total += mask.sum() / len(probabilities) * abs(float(probabilities[mask].mean()) - float(gold[mask].mean()))
    return total


# --- metrics with bootstrap CIs -----------------------------------------------------------------------------


def _auc(scores: np.ndarray, gold: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half, from ranks (O(n log n))."""
    n_pos, n_neg = int(gold.sum()), int((~gold).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[gold].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0:
        return math.nan
    return cohens_kappa(a.tolist(), b.tolist())


def _paired_kappa(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], float]:
    """κ of two raters on the pairs a bootstrap sample picks (a closure per rater pair, bound now, not late)."""
    return lambda picked: _kappa(a[picked], b[picked])


@dataclass
class Estimate:
    value: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [round(self.value, 4), round(self.low, 4), round(self.high, 4)]


def bootstrap(
    groups: Sequence[np.ndarray], statistic: Callable[[np.ndarray], float], resamples: int = 1000, seed: int = 0
) -> Estimate:
    """The statistic on all pairs, and its 95% percentile interval over resampled *queries* (groups of pair
    indices drawn with replacement)."""
    everything = np.concatenate(groups) if groups else np.array([], dtype=int)
    value = statistic(everything)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        picked = rng.integers(0, len(groups), size=len(groups))
        sample = np.concatenate([groups[i] for i in picked])
        stat = statistic(sample)
        if not math.isnan(stat):
            draws.append(stat)
    if not draws:
        return Estimate(value, math.nan, math.nan)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(value, float(low), float(high))


@dataclass
class LabelerReport:
    """One labeler (model/prompt, or an ensemble) on one dataset's evaluation queries."""

    labeler: str
    dataset: str
    pairs_calibration: int
    pairs_evaluation: int
    queries_evaluation: int
    auc_human: list[float]
    kappa: dict[str, list[float]]  # reference → [value, low, high] at the threshold fitted for that reference
    thresholds: dict[str, float]
    ece_raw: list[float]
    ece_calibrated: list[float]
    calibration: dict[str, Any]
    reference_kappa_vs_human: dict[str, list[float]] = field(default_factory=dict)  # the anchors, same pairs
    false_negatives: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def assess_labeler(
    labeler: str,
    dataset: str,
    pairs: Sequence[JudgedPair],
    scores: Mapping[str, float],
    calibration_queries: set[tuple[str, str]],
    resamples: int = 1000,
    seed: int = 0,
    calibrate_against: str = HUMAN,
) -> LabelerReport:
    """Every figure for one labeler on one dataset: thresholds and calibration from the calibration queries,
    figures with bootstrap CIs on the evaluation queries. The Platt calibration (and its threshold) is fitted
    against ``calibrate_against`` (humans, or the frontier reference a qualification admits by); ECE is vs it."""
    rows = [p for p in pairs if p.dataset == dataset and p.pair_id in scores]
    cal = [p for p in rows if (p.dataset, p.query_id) in calibration_queries]
    ev = [p for p in rows if (p.dataset, p.query_id) not in calibration_queries]
    if not cal or not ev:
        raise LabelQualityError(f"{labeler} on {dataset}: too few scored pairs to split by query")
    references = [r for r in rows[0].references if all(r in p.references for p in rows)] if rows else []
    if calibrate_against not in references:
        raise LabelQualityError(f"{labeler} on {dataset}: no {calibrate_against!r} verdicts to calibrate against")
    s_cal = np.array([scores[p.pair_id] for p in cal])
    s_ev = np.array([scores[p.pair_id] for p in ev])
    human_ev = np.array([p.human for p in ev])
    target_cal = [p.references[calibrate_against] for p in cal]
    target_ev = np.array([p.references[calibrate_against] for p in ev])
    query_index: dict[str, list[int]] = {}
    for i, p in enumerate(ev):
        query_index.setdefault(p.query_id, []).append(i)
    groups = [np.array(v) for v in query_index.values()]

    kappas: dict[str, list[float]] = {}
    thresholds: dict[str, float] = {}
    anchors: dict[str, list[float]] = {}
    for ref in references:
        _, threshold = best_threshold(s_cal.tolist(), [p.references[ref] for p in cal])
        thresholds[ref] = threshold
        gold = np.array([p.references[ref] for p in ev])
        verdict = s_ev >= threshold
        kappas[ref] = bootstrap(groups, _paired_kappa(verdict, gold), resamples, seed).as_list()
        if ref != HUMAN:
            anchors[ref] = bootstrap(groups, _paired_kappa(gold, human_ev), resamples, seed).as_list()
    platt = fit_platt(s_cal.tolist(), target_cal)
    platt = PlattCalibration(platt.a, platt.b, _calibrated_threshold(platt, s_cal, target_cal))
    p_ev = platt.apply(s_ev)
    report = LabelerReport(
        labeler=labeler,
        dataset=dataset,
        pairs_calibration=len(cal),
        pairs_evaluation=len(ev),
        queries_evaluation=len(groups),
        auc_human=bootstrap(groups, lambda i: _auc(s_ev[i], human_ev[i]), resamples, seed).as_list(),
        kappa=kappas,
        thresholds={k: round(v, 6) for k, v in thresholds.items()},
        ece_raw=bootstrap(
            groups, lambda i: expected_calibration_error(s_ev[i], target_ev[i]), resamples, seed
        ).as_list(),
        ece_calibrated=bootstrap(
            groups, lambda i: expected_calibration_error(p_ev[i], target_ev[i]), resamples, seed
        ).as_list(),
        calibration=platt.registry_form(),
        reference_kappa_vs_human=anchors,
    )
    mined = [i for i, p in enumerate(ev) if p.mined_rank is not None]
    if mined:
        report.false_negatives = false_negative_recall(
            s_ev[mined], human_ev[mined], {r: np.array([ev[i].references[r] for i in mined]) for r in references}
        )
    return report


def best_labeler(
    runs: Sequence[ScoreRun],
    pairs: Sequence[JudgedPair],
    calibration_queries: set[tuple[str, str]],
    reference: str = HUMAN,
    dataset: str = "dl19",
) -> ScoreRun | None:
    """The run (say, one model's prompt versions) with the best AUC against ``reference`` on the *calibration*
    queries of ``dataset`` — never the reported half, so that choosing does not flatter the figures."""
    best: tuple[float, int] | None = None
    for index, run in enumerate(runs):
        value = calibration_auc(run, pairs, calibration_queries, reference, dataset)
        if not math.isnan(value) and (best is None or value > best[0]):
            best = (value, index)
    return runs[best[1]] if best else None


def calibration_auc(
    run: ScoreRun,
    pairs: Sequence[JudgedPair],
    calibration_queries: set[tuple[str, str]],
    reference: str = HUMAN,
    dataset: str = "dl19",
) -> float:
    """AUC of a run's scores against ``reference`` on the calibration queries of ``dataset`` (NaN if unscored)."""
    rows = [
        p for p in pairs
        if p.dataset == dataset and (p.dataset, p.query_id) in calibration_queries
        and reference in p.references and p.pair_id in run.scores
    ]  # fmt: skip
    if not rows:
        return math.nan
    gold = np.array([p.references[reference] for p in rows], dtype=bool)
    return _auc(np.array([run.scores[p.pair_id].score for p in rows]), gold)


def _calibrated_threshold(platt: PlattCalibration, scores: np.ndarray, gold: Sequence[bool]) -> float:
    """The κ-maximising threshold on the calibrated scale (monotone in the raw score, so the same cut)."""
    _, threshold = best_threshold(platt.apply(scores).tolist(), list(gold))
    return float(min(max(threshold, 1e-4), 1 - 1e-4))


def false_negative_recall(
    scores: np.ndarray, human: np.ndarray, references: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Among mined candidates, the share of truly relevant ones (false negatives of weak supervision) that the
    labeler flags, at the thresholds that keep 90% and 95% of the truly non-relevant candidates as negatives;
    and the same two rates for each binary reference judge, for comparison."""
    relevant, nonrelevant = scores[human], scores[~human]
    out: dict[str, Any] = {"candidates": len(scores), "relevant": int(human.sum())}
    if len(relevant) == 0 or len(nonrelevant) == 0:
        return out
    for keep in (0.90, 0.95):
        cut = float(np.quantile(nonrelevant, keep))
        out[f"flagged_at_keep_{int(keep * 100)}"] = round(float((relevant > cut).mean()), 4)
    for name, verdict in references.items():
        if name == HUMAN:
            continue
        out[f"{name}_flagged"] = round(float(verdict[human].mean()), 4)
        out[f"{name}_keeps"] = round(float((~verdict[~human]).mean()), 4)
    return out


def ensemble_scores(
    runs: Sequence[ScoreRun], pairs: Sequence[JudgedPair], calibration_queries: set[tuple[str, str]]
) -> dict[str, float]:
    """Mean of the labelers' Platt-calibrated probabilities (each fitted on its calibration queries vs humans),
    per dataset; a pair counts only where every labeler scored it."""
    out: dict[str, float] = {}
    for dataset in sorted({p.dataset for p in pairs}):
        rows = [p for p in pairs if p.dataset == dataset and all(p.pair_id in r.scores for r in runs)]
        cal = [p for p in rows if (p.dataset, p.query_id) in calibration_queries]
        if not cal:
            continue
        total = np.zeros(len(rows))
        for run in runs:
            platt = fit_platt([run.scores[p.pair_id].score for p in cal], [p.human for p in cal])
            total += platt.apply([run.scores[p.pair_id].score for p in rows])
        out.update({p.pair_id: float(v) for p, v in zip(rows, total / len(runs), strict=True)})
    return out


def quorum_accuracy(
    verdicts: Mapping[str, Mapping[str, bool]], pairs: Sequence[JudgedPair], references: Sequence[str]
) -> list[dict[str, Any]]:
    """What a quorum of two labels verifies, per pair of labelers (a labeler paired with itself = two copies of
    one deterministic model): coverage (share of pairs where the two agree) and the accuracy of the agreed
    verdict against each reference."""
    names = sorted(verdicts)
    rows = []
    for i, a in enumerate(names):
        for b in names[i:]:
            common = [p for p in pairs if p.pair_id in verdicts[a] and p.pair_id in verdicts[b]]
            agreed = [p for p in common if verdicts[a][p.pair_id] == verdicts[b][p.pair_id]]
            row: dict[str, Any] = {
                "labelers": [a, b],
                "same_model": a == b,
                "pairs": len(common),
                "coverage": round(len(agreed) / len(common), 4) if common else math.nan,
            }
            for ref in references:
                judged = [p for p in agreed if ref in p.references]
                correct = sum(verdicts[a][p.pair_id] == p.references[ref] for p in judged)
                row[f"accuracy_{ref}"] = round(correct / len(judged), 4) if judged else math.nan
            rows.append(row)
    return rows


# --- speed against the machine's compute limit ---------------------------------------------------------------


def llama_cpp_compute_limit(
    model_path: Path,
    prompt_version: str,
    pairs: Sequence[JudgedPair],
    *,
    threads: int | None = None,
    n_ctx: int = 2048,
    max_document_tokens: int = 512,
    rounds: int = 2,
) -> dict[str, float]:
    """Labels/s of the annotator's full path against llama.cpp's own prompt processing of the same tokens.

    Both run in one process on one loaded model, the same thread count and the same token sequences in the same
    order (pairs grouped by query, the KV prefix of the previous pair kept exactly as the backend keeps it). The
    limit is ``Llama.eval`` alone — llama.cpp decoding the tokens the backend would run and nothing else: no
    tokenization, no prompt building, no reading of the answer distribution. Best of ``rounds`` for each.
    """
    from annotator.backends.base import Pair, common_prefix_len, order_pairs
    from annotator.backends.llama_cpp import LlamaCppBackend, default_threads

    threads = threads or default_threads()
    backend = LlamaCppBackend(
        model_path, n_ctx=n_ctx, n_threads=threads, prompt_version=prompt_version,
        max_document_tokens=max_document_tokens,
    )  # fmt: skip
    try:
        ordered = order_pairs(Pair(p.pair_id, p.query, p.document) for p in pairs)
        sequences = [backend.builder.build(p.query, p.document).ids for p in ordered]
        llm = backend.llm
        backend.forget_cache()
        list(backend.score_pairs(ordered[: min(4, len(ordered))]))  # warm-up: page the weights in
        ours, limit = math.inf, math.inf
        for _ in range(rounds):
            backend.forget_cache()
            started = time.perf_counter()
            for _score in backend.score_pairs(ordered):
                pass
            ours = min(ours, time.perf_counter() - started)
            previous: list[int] = []
            started = time.perf_counter()
            for ids in sequences:
                keep = min(common_prefix_len(previous, ids), len(ids) - 1)
                llm.n_tokens = keep
                llm.eval(ids[keep:])
                previous = ids
            limit = min(limit, time.perf_counter() - started)
        backend.forget_cache()
        evaluated = 0
        previous = []
        for ids in sequences:
            evaluated += len(ids) - min(common_prefix_len(previous, ids), len(ids) - 1)
            previous = ids
    finally:
        backend.close()
    n = len(sequences)
    return {
        "pairs": n,
        "threads": threads,
        "evaluated_tokens": evaluated,
        "labels_per_second": round(n / ours, 3),
        "limit_labels_per_second": round(n / limit, 3),
        "limit_evaluated_tokens_per_second": round(evaluated / limit, 1),
        "share_of_limit": round(limit / ours, 4),
    }
