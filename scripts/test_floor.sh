#!/usr/bin/env bash
# Run the test suite with the oldest declared versions (requirements/floor.txt) in a fresh venv.
#   bash scripts/test_floor.sh [pytest args]
set -euo pipefail
. "$(dirname "$0")/_fresh_venv.sh"
# not the app extra: gradio 6 needs huggingface-hub >= 1.16, transformers 4.x needs < 1.0 (its tests skip)
pip install -q -c requirements/floor.txt -e ".[rewards,dev]"
python scripts/check_versions.py
python -m pytest "$@"
