#!/usr/bin/env bash
# Run the linter and the test suite (sets up .venv and the requirements first if needed). Extra arguments go to
# pytest. --quick leaves out the tests marked slow (subprocesses, torchrun, training; see tests/conftest.py).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
args=()
for arg in "$@"; do
  if [[ "$arg" == "--quick" ]]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
python -m ruff check --quiet . || { echo "ruff found the problems above (fix them, or 'ruff check --fix')" >&2; exit 1; }
exec python -m pytest -q "${args[@]}"
