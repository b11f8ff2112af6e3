#!/usr/bin/env bash
# One command for a run: set up the venv if needed, then `python -m fedsim` with any Hydra
# overrides, e.g. scripts/run.sh dataset=fashion_mnist model=cnn rounds=20
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup.sh")"
cd "$root"
exec "$py" -m fedsim "$@"
