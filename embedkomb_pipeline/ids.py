"""Stable identifiers: every stage is idempotent on these, so re-running anything never duplicates a row."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid

# Fixed forever: changing it would re-key every published pair.
PAIR_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/embed-kombinat/pairs")

_WHITESPACE = re.compile(r"\s+")
# Unicode category Cc is exactly these ranges; tab, newline and carriage return become spaces anyway.
_CONTROL_OR_SURROGATE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


class EmptyTextError(ValueError):
    """A text is empty or whitespace-only after normalization."""


def normalize_text(text: str) -> str:
    """NFC-normalize, drop lone surrogates and control characters, collapse whitespace.

    Two texts that differ only in Unicode composition or spacing get the same ID; the stored text is the
    normalized one, so what a labeler sees is what the ID names.
    """
    text = unicodedata.normalize("NFC", _CONTROL_OR_SURROGATE.sub("", text))
    return _WHITESPACE.sub(" ", text).strip()


def text_hash(normalized_text: str) -> str:
    """128-bit BLAKE2b of the normalized text, as 32 hex characters (query_id, doc_id, cache keys)."""
    return hashlib.blake2b(normalized_text.encode("utf-8"), digest_size=16).hexdigest()


def pair_id(query_text: str, doc_id: str, source_dataset: str) -> str:
    """uuid5(namespace, normalized query text + doc_id + source dataset), as DESIGN.md fixes it."""
    return str(uuid.uuid5(PAIR_NAMESPACE, query_text + doc_id + source_dataset))
