#!/usr/bin/env bash
# Install ovis-server into ./.venv (made if missing).
#   scripts/install.sh              the server
#   scripts/install.sh --dev        the server and what its tests need
#   scripts/install.sh --dry-run    print the commands it would run, run none
# Where there is no NVIDIA GPU, the CPU build of PyTorch goes in first, from PyTorch's own
# CPU wheel index, so that pip does not pull some 2.7 GB of CUDA packages for a machine that
# cannot use them. Where that index cannot be reached (asked once, with a short timeout),
# PyTorch comes from the usual index, as pip finds it. OVIS_TORCH_CPU_INDEX_URL names another
# CPU index (a mirror); OVIS_TORCH_PROBE_TIMEOUT the seconds the probe waits (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."

torch_requirement="torch==2.13.0"
cpu_index="${OVIS_TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
probe_timeout="${OVIS_TORCH_PROBE_TIMEOUT:-5}"

extras=""
dry_run=""
for argument in "$@"; do
  case "$argument" in
    --dev) extras="[dev]" ;;
    --dry-run) dry_run=1 ;;
    *) echo "usage: $0 [--dev] [--dry-run]" >&2; exit 2 ;;
  esac
done

# Runs a command, or with --dry-run prints it.
run() {
  if [ -n "$dry_run" ]; then
    echo "would run: $*"
  else
    "$@"
  fi
}

case "$probe_timeout" in
  "" | *[!0-9]*) echo "OVIS_TORCH_PROBE_TIMEOUT must be whole seconds, not '$probe_timeout'" >&2; exit 2 ;;
esac

# True when the CPU index answers within the timeout: one GET of its torch page, no retries;
# the whole probe, name lookup included, is cut off a second after the timeout.
cpu_index_reachable() {
  local limit=()
  if command -v timeout >/dev/null 2>&1; then
    limit=(timeout "$((probe_timeout + 1))")
  fi
  "${limit[@]}" "$probe_python" - "$cpu_index" "$probe_timeout" <<'EOF'
import sys
import urllib.request

url, timeout = sys.argv[1].rstrip("/") + "/torch/", float(sys.argv[2])
try:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

python=.venv/bin/python
probe_python=$python
has_torch=""
if [ -x "$python" ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    has_torch=1
  fi
else
  run python3 -m venv .venv
  # A new environment has no torch. With --dry-run none is made: python3 asks the index.
  if [ -n "$dry_run" ]; then
    probe_python=python3
  fi
fi

if [ -n "$has_torch" ]; then
  echo "PyTorch already in .venv: kept"
elif command -v nvidia-smi >/dev/null 2>&1; then
  echo "NVIDIA GPU found: PyTorch comes from PyPI with CUDA"
elif cpu_index_reachable; then
  echo "no NVIDIA GPU: installing the CPU build of PyTorch from $cpu_index"
  if ! run "$python" -m pip install --quiet --index-url "$cpu_index" "$torch_requirement"; then
    echo "the CPU index could not provide $torch_requirement: installing PyTorch as pip finds it"
    run "$python" -m pip install --quiet "$torch_requirement"
  fi
else
  echo "no NVIDIA GPU, but PyTorch's CPU index ($cpu_index) cannot be reached within" \
    "${probe_timeout}s: installing PyTorch as pip finds it (from PyPI that is the CUDA build," \
    "about 2.7 GB, unless a CPU wheel is at hand)"
  run "$python" -m pip install --quiet "$torch_requirement"
fi

if [ -n "$extras" ]; then
  run "$python" -m pip install --quiet -e ".${extras}"
else
  run "$python" -m pip install --quiet .
fi
if [ -z "$dry_run" ]; then
  echo "installed: $("$python" -m ovis_server --version) in $(pwd)/.venv"
fi
