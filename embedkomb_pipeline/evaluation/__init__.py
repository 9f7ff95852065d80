"""Measuring models: the mteb harness for checkpoints (`harness`) and the qualification of labeling models
against human judgments (`qualification`). Wired in `defs/evaluation.py`."""
