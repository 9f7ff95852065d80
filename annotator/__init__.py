"""annotator."""
