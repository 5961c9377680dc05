#!/usr/bin/env bash
# Run the test suite (sets up .venv and the requirements first if needed). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m pytest -q "$@"
