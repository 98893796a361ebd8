#!/usr/bin/env bash
# One GPU check for a lent machine (Python 3.12, its own torch, no network, no polars/rdkit/
# snakemake/gemmi/tblite): runs bench/gpu_check.py from this source tree via PYTHONPATH and
# prints one table last. About 4 minutes on an H100; `--quick` is a CPU smoke run.
#   bench/gpu_check.sh                 # full: study batch sizes, eager + torch.compile
#   bench/gpu_check.sh --only voxmol   # one model; --no-compile, --budget-s S, --help
# Environment: PYTHON (default python3), GPU_CHECK_TIMEOUT (hard limit, default 300 s).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1  # leave the source tree as it was
py="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >&2 || true
else
  echo "gpu_check: nvidia-smi not found" >&2
fi
"$py" -c 'import sys, torch; print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, available {torch.cuda.is_available()}", file=sys.stderr)' || exit 1
timeout -k 10 "${GPU_CHECK_TIMEOUT:-300}" "$py" "$root/bench/gpu_check.py" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_check: stopped after ${GPU_CHECK_TIMEOUT:-300} s (GPU_CHECK_TIMEOUT)" >&2
# The efficiency gap's c with e3nn's and cuequivariance's tensor products (issue 17 item 4;
# bench/kernels_c.py, ~1-2 min). GPU_CHECK_KERNELS=0 skips it; GPU_CHECK_WHEELS=<dir> installs
# the wheels there first (no network on the GPU machine: e3nn, nequip and its dependencies,
# cuequivariance, cuequivariance-torch, cuequivariance-ops-torch-cu12, cuequivariance-ops-cu12).
if [ "${GPU_CHECK_KERNELS:-1}" = 1 ]; then
  if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" "$GPU_CHECK_WHEELS"/*.whl >&2 ||
      echo "gpu_check: installing the wheels in $GPU_CHECK_WHEELS failed" >&2
  fi
  timeout -k 10 "${GPU_CHECK_KERNELS_TIMEOUT:-240}" "$py" "$root/bench/kernels_c.py" ||
    echo "gpu_check: kernels_c.py failed or stopped (GPU_CHECK_KERNELS_TIMEOUT)" >&2
fi
exit "$rc"
