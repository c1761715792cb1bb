#!/usr/bin/env bash
# The measuring run on a lent GPU, in one command (at most 8 minutes):
#
#   benchmarks/gpu/run.sh OUTDIR [--dry-run] [--parts a,b] [--budget SECONDS]
#
# 1. installs the wheel bundle in .whl/ (scripts/gpu_wheels.py builds it; see its
#    requirements.txt) offline into /tmp/ovis-site, which goes first on PYTHONPATH with
#    src/: the GPU image's own torch stays;
# 2. runs benchmarks/gpu/suite.py, which writes OUTDIR/report.md and OUTDIR/logs.tar.gz.
#
# --dry-run: the same on the CPU with the tiny model and tiny sizes (under 2 minutes on a
# quiet 2-core machine), without installing the bundle. Without a bundle in .whl/ the
# packages already installed are used.
# PYTHON picks the interpreter (default: .venv/bin/python where there is one, else python3).
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUTDIR [--dry-run] [--parts a,b] [--budget SECONDS] [--note TEXT]" >&2
  exit 2
fi
outdir=$1
shift
mkdir -p "$outdir" || exit 1
outdir=$(cd "$outdir" && pwd)

total=480
dry_run=0
budget=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; total=300; args+=("$1") ;;
    --budget) budget=$2; args+=("$1" "$2"); shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

site=/tmp/ovis-site
install_note="no wheel bundle in .whl/: the packages already installed are used"
if [ "$dry_run" = 1 ]; then
  install_note="dry run: the wheel bundle (built for the GPU machine's Python 3.12) is not installed"
elif [ -f .whl/requirements.txt ]; then
  started=$SECONDS
  # pip install --no-index --find-links .whl --no-deps --target "$site" -r .whl/requirements.txt
  if "$PYTHON" scripts/gpu_wheels.py install .whl "$site" >"$outdir/install.log" 2>&1; then
    install_note="wheel bundle installed offline into $site in $((SECONDS - started)) s"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    install_note="the wheel bundle did not install (see install.log); the run goes on"
  fi
fi
export PYTHONPATH="$root/src:$root${PYTHONPATH:+:$PYTHONPATH}"
echo "$install_note"

if [ -z "$budget" ]; then
  args+=(--budget "$((total - SECONDS))")
fi
exec "$PYTHON" -m benchmarks.gpu.suite "$outdir" --note "$install_note" "${args[@]}"
