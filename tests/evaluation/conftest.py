"""The tiny offline LLM fixture, shared with the annotator tests (fetched like `make models-tiny` when missing)."""

from tests.annotator.conftest import tiny_model_path

__all__ = ["tiny_model_path"]
