# Sourced by scripts/lock.sh and scripts/test_floor.sh: go to the repository root, make a throwaway venv (removed
# when the script exits), activate it and install the CPU build of torch first (see README).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
python -m pip install -q --upgrade pip
pip install -q "torch==2.13.0"   # the CPU build where the index offers it
