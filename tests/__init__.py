"""Test suite of the embedkomb repository."""
