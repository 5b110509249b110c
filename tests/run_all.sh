#!/usr/bin/env bash
# The project's test command: Python tests (integration ones skip visibly without COMFYUI_DIR),
# then the web/ drawing code under node's test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q tests
if command -v node >/dev/null 2>&1 && ls web/tests/*.test.mjs >/dev/null 2>&1; then
  node --test web/tests/
else
  echo "web tests skipped: node not found or no web/tests/*.test.mjs"
fi
