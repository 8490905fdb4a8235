#!/usr/bin/env bash
# Re-make requirements/lock.txt: the newest versions of every dependency (with the extras CI installs) that
# resolve together today, minus the known breaks in requirements/exclude.txt, frozen from a fresh venv (torch
# excepted: it is installed first, by hand, as the README says).
#   bash scripts/lock.sh            # then run the tests with the new lock (.ci/run) before committing it
set -euo pipefail
. "$(dirname "$0")/_fresh_venv.sh"
pip install -q -c requirements/exclude.txt -e ".[all,dev]"
{
  echo "# The tested set of versions: pip install -c requirements/lock.txt -e \".[all,dev]\" (see README)."
  echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $(python --version); do not edit by hand."
  # torch is not locked: it is installed first, by hand (the CPU build here, any CUDA build >= the floor elsewhere).
  pip freeze --exclude-editable | grep -viE '^(pip|setuptools|wheel|torch)=='
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
