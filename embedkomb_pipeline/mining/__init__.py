"""Mining candidate pairs: BM25 + dense retrieval fused by RRF (`retrieval`), and the dense encoder with its
content-addressed embedding cache (`embedding`). Wired in `defs/mining.py`."""
