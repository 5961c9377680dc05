# Sourced by demo.sh and test.sh: make sure a Python environment with the project installed is active.
# Uses the active virtualenv if there is one, else creates/uses .venv beside the repo.
# Re-installs only when requirements*.txt or pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  PY="${PYTHON:-python3.11}"
  command -v "$PY" >/dev/null || PY=python3
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
STAMP="$VIRTUAL_ENV/.vesuvius_monai_installed"
WANT="$(cat requirements.txt requirements-betti-matching.txt requirements-nnunet-arch.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "installing requirements into $VIRTUAL_ENV ..."
  python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  # exact Betti matching: the extension alone, without the wheel's dependencies (see that file)
  python -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      -r requirements-betti-matching.txt \
    || echo "warning: exact Betti matching (topolosses) not installed; TopoScore will use a stand-in" >&2
  # nnU-Net model folders: the network library alone, without its timm / torchvision (see that file)
  python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nnunet-arch.txt
  python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$WANT" > "$STAMP"
fi
export MPLBACKEND=Agg
