from __future__ import annotations

import uuid

from embedkomb_pipeline.ids import PAIR_NAMESPACE, normalize_text, pair_id, text_hash


def test_normalization_folds_spacing_composition_and_control_characters() -> None:
    composed = "Caf\u00e9  au\tlait\n"
    decomposed = "  Cafe\u0301 au lait\x00"
    assert normalize_text(composed) == normalize_text(decomposed) == "Café au lait"
    assert text_hash(normalize_text(composed)) == text_hash(normalize_text(decomposed))


def test_lone_surrogates_are_dropped_not_fatal() -> None:
    assert normalize_text("ab\ud800c") == "abc"


def test_pair_id_is_uuid5_of_query_doc_and_dataset() -> None:
    expected = uuid.uuid5(PAIR_NAMESPACE, "what is x" + "d1" + "scifact")
    assert pair_id("what is x", "d1", "scifact") == str(expected)
    assert pair_id("what is x", "d1", "scifact") == pair_id("what is x", "d1", "scifact")
    assert pair_id("what is x", "d1", "nfcorpus") != pair_id("what is x", "d1", "scifact")
