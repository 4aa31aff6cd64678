#!/usr/bin/env bash
# Re-resolve the tested dependency set (constraints.txt) from pyproject.toml's ranges.
# Bumping the set is a deliberate commit: run this, then both README quick-start commands in a
# fresh venv (they install with the new constraints.txt), raise or keep the pyproject upper
# bounds so that they admit exactly what was tested, and commit constraints.txt with them.
#   bash scripts/update_constraints.sh [python]      (default python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3.11}
venv=$(mktemp -d)/venv
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
    || "$venv/bin/python" -m pip install -q torch
"$venv/bin/python" -m pip install -q -e ".[dev]"
header=$(sed -n '/^#/p' constraints.txt)
{ printf '%s\n' "$header"
  "$venv/bin/python" -m pip freeze --exclude-editable \
      | grep -v -i '^triton==' | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/' | sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt rewritten from $venv; now run the README commands in a fresh venv"
