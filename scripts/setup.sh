#!/usr/bin/env bash
# Create .venv and install rnnkit into it. torch is installed first, pinned to 2.13.0: where a local
# CPU wheel is configured for pip (as on the project's machines) that build is used, and no later
# step can pull a CUDA build because the package's own requirement (torch>=2.4) is then satisfied.
# Usage: bash scripts/setup.sh [extras]   e.g. bash scripts/setup.sh dev,datasets
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
py=.venv/bin/python
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install --quiet "torch==2.13.0"
fi
"$py" -m pip install --quiet -e ".[${extras}]"
