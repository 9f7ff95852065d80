"""BEIR-format retrieval data (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) from a local folder or the Hub.

The same loader serves the weakly-supervised sample splits, the evaluation tasks and the honeypots, so the
human judgments they use are read exactly one way.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import snapshot_download


class DataFormatError(ValueError):
    """A data file is not in the expected format; the message names the file and line."""


@dataclass(frozen=True)
class BeirDocument:
    doc_id: str
    title: str
    text: str


@dataclass
class BeirDataset:
    """One BEIR dataset: documents, queries, and human relevance judgments per qrels split."""

    name: str
    root: Path
    corpus: dict[str, BeirDocument]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def judged(self, qrels_split: str) -> dict[str, dict[str, int]]:
        """query-id → {corpus-id: grade} for one qrels split (e.g. "test")."""
        try:
            return self.qrels[qrels_split]
        except KeyError:
            known = ", ".join(sorted(self.qrels)) or "none"
            raise KeyError(f"{self.name} has no qrels split {qrels_split!r} (it has: {known})") from None


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    # strict: invalid UTF-8 must surface as an error naming the line, never as silently mangled text
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root} is not a BEIR folder: {stem}(.gz) is missing")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line; bad lines raise DataFormatError naming the line."""
    # bytes per line, decoded here: a text wrapper decodes in blocks and would blame the wrong line
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{path}:{line_no}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or "_id" not in obj:
                raise DataFormatError(f"{path}:{line_no}: expected a JSON object with an '_id' field")
            yield line_no, obj


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    judged: dict[str, dict[str, int]] = {}
    with _open_text(path) as handle:
        try:
            rows = list(csv.reader(handle, delimiter="\t"))
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: invalid UTF-8 ({exc.reason})") from exc
    for line_no, row in enumerate(rows, start=1):
        if not row or (line_no == 1 and row[0] == "query-id"):
            continue
        if len(row) < 3:
            raise DataFormatError(f"{path}:{line_no}: expected query-id<TAB>corpus-id<TAB>score")
        try:
            grade = int(float(row[2]))
        except ValueError as exc:
            raise DataFormatError(f"{path}:{line_no}: score {row[2]!r} is not a number") from exc
        judged.setdefault(row[0], {})[row[1]] = grade
    return judged


def resolve_beir_root(source: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local folder as is; a name found under data_dir; otherwise a Hub dataset id (e.g. "mteb/scifact")."""
    path = Path(source)
    if path.is_dir():
        return path
    if data_dir is not None and (Path(data_dir) / str(source)).is_dir():
        return Path(data_dir) / str(source)
    if "/" not in str(source):
        where = f" under {data_dir}" if data_dir else ""
        raise FileNotFoundError(f"no BEIR folder {source!r}{where}, and it is not a Hub dataset id (owner/name)")
    return Path(
        snapshot_download(
            repo_id=str(source),
            repo_type="dataset",
            allow_patterns=["*.jsonl", "*.jsonl.gz", "qrels/*", "*.tsv", "README.md"],
        )
    )


def load_beir(source: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> BeirDataset:
    """Load a whole BEIR dataset. Document and query texts are returned as stored (not normalized)."""
    root = resolve_beir_root(source, data_dir)
    corpus: dict[str, BeirDocument] = {}
    for line_no, obj in iter_jsonl(_find(root, "corpus.jsonl")):
        doc_id = str(obj["_id"])
        if doc_id in corpus:
            raise DataFormatError(f"{root}/corpus.jsonl:{line_no}: duplicate document id {doc_id!r}")
        corpus[doc_id] = BeirDocument(doc_id, str(obj.get("title") or ""), str(obj.get("text") or ""))
    queries = {str(obj["_id"]): str(obj.get("text") or "") for _, obj in iter_jsonl(_find(root, "queries.jsonl"))}
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    qrels_dir = root / "qrels"
    if qrels_dir.is_dir():
        for path in sorted(qrels_dir.iterdir()):
            if path.name.endswith((".tsv", ".tsv.gz")):
                qrels[path.name.split(".")[0]] = _read_qrels(path)
    return BeirDataset(name=Path(str(source)).name, root=root, corpus=corpus, queries=queries, qrels=qrels)
