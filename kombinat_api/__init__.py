"""kombinat: the coordination server of Embed Kombinat (FastAPI + PostgreSQL)."""

__version__ = "0.1.0"
