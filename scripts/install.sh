#!/usr/bin/env bash
# Install ovis-server into ./.venv (made if missing).
#   scripts/install.sh          the server
#   scripts/install.sh --dev    the server and what its tests need
# Where there is no NVIDIA GPU, the CPU build of PyTorch goes in first, so that pip does
# not pull several GB of CUDA packages for a machine that cannot use them.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
case "${1:-}" in
  --dev) extras="[dev]" ;;
  "") ;;
  *) echo "usage: $0 [--dev]" >&2; exit 2 ;;
esac

[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "NVIDIA GPU found: PyTorch comes from PyPI with CUDA"
  else
    echo "no NVIDIA GPU: installing the CPU build of PyTorch first"
    python -m pip install --quiet "torch==2.13.0"
  fi
fi

if [ -n "$extras" ]; then
  python -m pip install --quiet -e ".${extras}"
else
  python -m pip install --quiet .
fi
echo "installed: $(python -m ovis_server --version) in $(dirname "$(dirname "$(command -v python)")")"
