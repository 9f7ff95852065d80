"""ASGI entry point for uvicorn (``kombinat_api.asgi:app``): settings come from the environment."""

from kombinat_api.main import create_app

app = create_app()
