#!/usr/bin/env bash
# Create the virtual environment (.venv, or $FEDSIM_VENV) if missing and install fedsim into it
# with its test and parquet extras (the tests read Parquet files). Re-installs only when
# pyproject.toml changed. Prints the venv's python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDSIM_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
stamp="$venv/.fedsim-install-stamp"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # pip (not uv): on machines with a local wheel cache pip takes torch from it.
  "$venv/bin/python" -m pip install -q -e "$root[test,parquet]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
