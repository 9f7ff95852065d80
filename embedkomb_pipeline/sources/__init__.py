"""Where pairs come from: the BEIR loader (`beir`), a split's known positives (`pairs`), and gold pairs from human
judgments for honeypots and model qualification (`gold`). Wired in `defs/sources.py`."""
