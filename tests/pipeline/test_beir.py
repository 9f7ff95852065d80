from __future__ import annotations

from pathlib import Path

import pytest

from embedkomb_pipeline.sources.beir import DataFormatError, load_beir, resolve_beir_root


def test_loads_real_scifact_with_official_counts(shared_data: Path) -> None:
    scifact = load_beir("scifact", data_dir=shared_data)
    assert len(scifact.corpus) == 5183
    assert len(scifact.queries) == 1109
    test = scifact.judged("test")
    assert len(test) == 300
    assert sum(len(docs) for docs in test.values()) == 339
    assert all(doc in scifact.corpus for docs in test.values() for doc in docs)


def test_graded_qrels_keep_their_grades(shared_data: Path) -> None:
    dl19 = load_beir(shared_data / "msmarco-dl19-subset5k")
    grades = {g for docs in dl19.judged("test").values() for g in docs.values()}
    assert grades == {1, 2, 3}


def test_unknown_qrels_split_names_the_known_ones(shared_data: Path) -> None:
    scifact = load_beir("scifact", data_dir=shared_data)
    with pytest.raises(KeyError, match=r"has no qrels split 'dev'.*test, train"):
        scifact.judged("dev")


def _beir(tmp_path: Path, corpus: bytes) -> Path:
    (tmp_path / "corpus.jsonl").write_bytes(corpus)
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "query"}\n')
    return tmp_path


def test_invalid_utf8_is_an_error_naming_the_line(tmp_path: Path) -> None:
    root = _beir(tmp_path, b'{"_id": "d1", "text": "fine"}\n{"_id": "d2", "text": "bad \xff byte"}\n')
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: invalid UTF-8"):
        load_beir(root)


def test_malformed_json_is_an_error_naming_the_line(tmp_path: Path) -> None:
    root = _beir(tmp_path, b'{"_id": "d1", "text": "fine"}\n\n{"_id": "d2", "text": \n')
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:3: not valid JSON"):
        load_beir(root)


def test_duplicate_document_ids_are_refused(tmp_path: Path) -> None:
    root = _beir(tmp_path, b'{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n')
    with pytest.raises(DataFormatError, match="duplicate document id 'd1'"):
        load_beir(root)


def test_missing_folder_that_is_not_a_hub_id_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no BEIR folder 'nosuch'"):
        resolve_beir_root("nosuch", data_dir=tmp_path)
