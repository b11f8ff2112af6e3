#!/usr/bin/env bash
# Static checks: ruff lint, ruff format (check only) and mypy on fedsim/ and strategies/,
# in the same venv as the tests (scripts/setup.sh creates it when missing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup.sh")"
cd "$root"
"$py" -m ruff check fedsim strategies tests scripts hydra_plugins
"$py" -m ruff format --check fedsim strategies tests scripts hydra_plugins
"$py" -m mypy
