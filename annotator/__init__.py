"""annotator: the volunteer CLI that labels kombinat's candidate pairs with a local LLM.

This package is the base install (`pip install embedkomb`): it must never import Dagster, torch, FastAPI or
SQLAlchemy. Backend libraries (llama-cpp-python, vllm, mlx-lm) are imported lazily, only by the backend in use.
"""

__version__ = "0.1.0"
