#!/usr/bin/env bash
# One command for the test suite: set up the venv if needed, then pytest (extra args passed on).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup.sh")"
cd "$root"
exec "$py" -m pytest -q -p no:cacheprovider "$@"
