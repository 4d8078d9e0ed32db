#!/usr/bin/env bash
# The README's second command (and what CI runs): install what is missing,
# then run the default test suite. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the long end-to-end tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec "${PRIVIMAGE_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
