#!/usr/bin/env bash
# nnU-Net's own environment for bench/bench_nnunet.py: .venv-nnunet beside the repo, with nnunetv2 and the project's
# torch pin. Not a project dependency. nnunetv2's dependencies pull in torchvision, which nnU-Net's training and
# prediction do not import and whose wheel on some indexes is built against another torch (see the README): it is
# removed again. Re-running it is cheap (pip skips what is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[[ -x .venv-nnunet/bin/python ]] || "$PY" -m venv .venv-nnunet
.venv-nnunet/bin/python -m pip install --quiet --disable-pip-version-check "$(grep '^torch==' requirements.txt)" \
    nnunetv2==2.8.1
.venv-nnunet/bin/python -m pip uninstall --quiet --yes torchvision 2>/dev/null || true
.venv-nnunet/bin/python -c "import nnunetv2.training.nnUNetTrainer.nnUNetTrainer, torch; print('nnU-Net ready, torch', torch.__version__)"
