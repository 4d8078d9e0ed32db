#!/usr/bin/env bash
# The README's first command: install what is missing, then run the quickstart
# pipeline (embedded defaults: local Ray on 127.0.0.1, MLflow in a local SQLite
# file, offline MNIST as sensitive data, glyphs + Fashion-MNIST as public data).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec "${PRIVIMAGE_VENV:-$ROOT/.venv}/bin/privimage" run "$@"
